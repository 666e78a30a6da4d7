"""Building an index from an embedding job's output, and appending a new output to it.

Rows are sorted by class (their own label or their top-1 predicted class: :mod:`pipeline.index.keying`)
and cut into shards of whole classes; each shard gets its vectors, its rows and a FAISS index for
global search. One streaming pass writes each row to its
shard's bucket, so memory holds one part at a time, never the whole gallery.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.files import sha256_file
from pipeline.embed_output import change_log, live_parts
from pipeline.index.keying import UNLABELLED, Keying, resolve_keying
from pipeline.index.faiss_index import IndexConfig, SearchParams, build_faiss_index, choose_index_type, head_file
from pipeline.index.versions import (GRACE_S, KEEP_VERSIONS, publish, read_tombstones, remove_old_versions,
                                     shard_folder, version_file, write_tombstones)
from pipeline.manifests import EmbeddingManifest, IndexManifest, ModelSet, ShardEntry
from pipeline.storage import Location

ROW_SCHEMA = pa.schema([("id", pa.int64()), ("uri", pa.string()), ("label", pa.string()),
                        ("class", pa.int32()), ("class_prob", pa.float32())])


def plan_shards(class_counts: dict[int, int], shard_size: int) -> list[list[int]]:
    """Cuts the sorted classes into shards of at most ``shard_size`` rows, never splitting a class.

    Returns:
        the class indices of each shard, in class order.
    """
    shards: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for cls in sorted(class_counts):
        count = class_counts[cls]
        if current and rows + count > shard_size:
            shards.append(current)
            current, rows = [], 0
        current.append(cls)
        rows += count
    if current:
        shards.append(current)
    return shards


def write_shard(directory: Location, rows: pa.Table, vectors: np.ndarray, config: IndexConfig,
                dtype: str = "float32") -> tuple[ShardEntry, dict[int, list[int]]]:
    """Writes one shard (rows already sorted by class, id) and returns its manifest entry and where
    each of its classes lies (class -> ``[start, end]`` row positions).

    The files are built in a local folder first, then moved (a local index) or uploaded (an object
    store) to ``directory``; the index manifest, written after every shard, is what commits them.

    Args:
        directory: the shard's folder (replaced when it exists).
        rows: ``ROW_SCHEMA`` table, one row per vector, sorted by (class, id).
        vectors: (rows, dim) L2-normalised embeddings in the same order.
        config: index settings.
        dtype: storage type of ``vectors.npy`` (``float32`` or ``float16``).
    """
    if rows.num_rows != len(vectors):
        raise ValueError(f"{rows.num_rows} rows but {len(vectors)} vectors")
    if directory.remote:
        tmp = Path(tempfile.mkdtemp(prefix="lookalike-shard-"))
    else:
        tmp = directory.path.with_name(f".tmp-{directory.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    np.save(tmp / "vectors.npy", np.ascontiguousarray(vectors, dtype=dtype))
    pq.write_table(rows, tmp / "rows.parquet")
    kind = choose_index_type(len(vectors), config)
    faiss.write_index(build_faiss_index(vectors, kind, config), str(tmp / "index.faiss"))
    ranges = class_ranges(rows.column("class").to_numpy())
    heads = [cls for cls, (start, end) in ranges.items() if cls != UNLABELLED
             if config.head_min_rows is not None and end - start >= config.head_min_rows]
    for cls in heads:
        start, end = ranges[cls]
        faiss.write_index(build_faiss_index(vectors[start:end], "hnsw-sq8", config), str(tmp / head_file(cls)))
    files = {path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
             for path in sorted(tmp.iterdir())}
    if directory.remote:
        try:
            for name in files:
                (directory / name).upload(tmp / name)
            for stale in set(directory.list()) - set(files):  # e.g. a class that is no longer a head
                (directory / stale).delete()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        if directory.path.exists():
            shutil.rmtree(directory.path)
        os.replace(tmp, directory.path)
    entry = ShardEntry(path=f"shards/{directory.name}", rows=int(len(vectors)), index_type=kind,
                       classes=len(ranges), files=files, heads=heads)
    return entry, ranges


def class_ranges(classes: np.ndarray) -> dict[int, list[int]]:
    """Class -> [start, end) position range, for positions sorted by class."""
    if not len(classes):
        return {}
    starts = np.flatnonzero(np.r_[True, classes[1:] != classes[:-1]])
    ends = np.r_[starts[1:], len(classes)]
    return {int(classes[s]): [int(s), int(e)] for s, e in zip(starts, ends)}


#: An embedding part and the ids in it to leave out (sorted): rows a later run replaced or deleted.
Part = tuple[Location, np.ndarray]


def _read_embedding_parts(parts: Iterable[Part], columns: list[str], skip_ids: np.ndarray | None = None
                          ) -> Iterable[pa.Table]:
    """Each part's rows, less its own stale ids and ``skip_ids`` (sorted)."""
    for part, stale in parts:
        table = part.read_parquet(columns)
        keep = _not_in(table.column("id").to_numpy(), stale)
        if skip_ids is not None:
            keep &= _not_in(table.column("id").to_numpy(), skip_ids)
        yield table if keep.all() else table.filter(pa.array(keep))


def _rows_and_vectors(table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """Bucket rows (keyed: ``class``, ``class_prob``) -> index rows and float32 vectors."""
    rows = pa.table({name: table.column(name) for name in ROW_SCHEMA.names}, schema=ROW_SCHEMA)
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    return rows, vectors


def _sort_shard(rows: pa.Table, vectors: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    order = np.lexsort((rows.column("id").to_numpy(), rows.column("class").to_numpy()))
    return rows.take(pa.array(order)), vectors[order]


def embedding_parts(embeddings_dir: Location) -> tuple[list[Location], EmbeddingManifest]:
    """The part files the manifest of an embedding job output folder lists, and the manifest.

    Raises:
        FileNotFoundError: not an embedding job output (no manifest.json), or parts missing.
    """
    manifest = EmbeddingManifest.read(embeddings_dir)
    parts = [embeddings_dir / p["path"] for p in manifest.parts]
    present = {f"{folder}/{name}" for folder in {p["path"].split("/")[0] for p in manifest.parts}
               for name in (embeddings_dir / folder).list("part-*.parquet")}
    missing = [str(embeddings_dir / p["path"]) for p in manifest.parts if p["path"] not in present]
    if missing:
        raise FileNotFoundError(f"embedding parts listed in {embeddings_dir / 'manifest.json'} are missing: "
                                f"{missing[:3]}")
    return parts, manifest


def source_parts(embeddings_dir: Location, after_run: int = 0) -> tuple[list[Part], EmbeddingManifest, int]:
    """The live rows of an embedding job output: the parts written by its runs after ``after_run``,
    each with the ids in it that a later run changed or deleted; the manifest; the output's last run.

    Raises:
        FileNotFoundError: not an embedding job output (no manifest.json), or parts missing.
    """
    _, manifest = embedding_parts(embeddings_dir)
    parts = [(location, stale) for location, _, stale in live_parts(embeddings_dir, after_run)]
    last_run = max([c.run for c in change_log(embeddings_dir)], default=0)
    return parts, manifest, last_run


def count_classes(parts: list[Part], keying: Keying, skip_ids: np.ndarray | None = None) -> dict[int, int]:
    """Rows per class over the parts (reads only the id column and what ``keying`` needs)."""
    counts: dict[int, int] = {}
    for table in _read_embedding_parts(parts, list(dict.fromkeys(["id", *keying.columns])), skip_ids):
        top = keying.classes(table)[0]
        for cls, n in zip(*np.unique(top, return_counts=True)):
            counts[int(cls)] = counts.get(int(cls), 0) + int(n)
    return counts


def write_buckets(parts: list[Part], scratch: Location, shard_of: dict[int, int], keying: Keying,
                  skip_ids: np.ndarray | None = None) -> tuple[dict[int, Location], int]:
    """One streaming pass: each row, keyed (``class``, ``class_prob``), goes to its shard's bucket
    file. Memory holds one part at a time, never the whole gallery.

    Returns:
        ``({shard: bucket file}, dim)``.
    """
    scratch.make_folder()
    writers: dict[int, pq.ParquetWriter] = {}
    buckets: dict[int, Location] = {}
    dim = 0
    columns = list(dict.fromkeys(["id", "uri", "label", "embedding", *keying.columns]))
    for table in _read_embedding_parts(parts, columns, skip_ids):
        dim = table.schema.field("embedding").type.list_size
        top, prob = keying.classes(table)
        table = table.select(["id", "uri", "label", "embedding"]).append_column(
            "class", pa.array(top, pa.int32())).append_column("class_prob", pa.array(prob, pa.float32()))
        targets = np.array([shard_of[int(c)] for c in top], dtype=np.int64)
        for s in np.unique(targets):
            s = int(s)
            piece = table.filter(pa.array(targets == s))
            if s not in writers:
                buckets[s] = scratch / f"bucket-{s:04d}.parquet"
                writers[s] = pq.ParquetWriter(buckets[s].key, piece.schema, filesystem=buckets[s].fs)
            writers[s].write_table(piece)
    for writer in writers.values():
        writer.close()
    return buckets, dim


def _not_in(values: np.ndarray, sorted_skip: np.ndarray) -> np.ndarray:
    if len(sorted_skip) == 0:
        return np.ones(len(values), dtype=bool)
    pos = np.searchsorted(sorted_skip, values).clip(max=len(sorted_skip) - 1)
    return sorted_skip[pos] != values


def build_shard_from_bucket(bucket: Location | None, directory: Location, config: IndexConfig, dtype: str = "float32",
                            existing: Location | None = None, dead: np.ndarray | None = None
                            ) -> tuple[ShardEntry, dict[int, list[int]]]:
    """Builds one shard from its bucket file (None: no new rows), plus, when ``existing`` (a shard
    folder of the current version) is given, that shard's rows less the ``dead`` positions."""
    parts = []
    if bucket is not None:
        parts.append(_rows_and_vectors(bucket.read_parquet()))
    if existing is not None:
        old_rows = (existing / "rows.parquet").read_parquet()
        stored = existing / "vectors.npy"
        old_vectors = (np.load(io.BytesIO(stored.read_bytes())) if stored.remote
                       else np.load(stored.path, mmap_mode="r"))
        if dead is not None and len(dead):
            keep = np.ones(len(old_vectors), dtype=bool)
            keep[dead] = False
            old_rows, old_vectors = old_rows.filter(pa.array(keep)), old_vectors[keep]
        parts.append((old_rows, np.asarray(old_vectors, dtype=np.float32)))
    rows = pa.concat_tables([r for r, _ in parts]) if parts else ROW_SCHEMA.empty_table()
    vectors = np.concatenate([v for _, v in parts]) if parts else np.zeros((0, 0), np.float32)
    rows, vectors = _sort_shard(rows, vectors)
    return write_shard(directory, rows, vectors, config, dtype)


def write_index_manifest(index_dir: Location, shards: list[tuple[ShardEntry, dict[int, list[int]]]],
                         models: ModelSet, max_pixels: int, keying: Keying | dict | None, config: IndexConfig,
                         dim: int, dtype: str, sources: list[str], strategy: dict | None = None,
                         search: SearchParams | None = None, version: int = 1,
                         applied: dict[str, int] | None = None) -> IndexManifest:
    """Publishes a version (:func:`pipeline.index.versions.publish`): the shards (each with where
    its classes lie: ``[start, end]``, or ``[start, end, live]`` with tombstones), the models and
    decode limit of the gallery (queries go through the same), how rows were keyed, the default
    search strategy and the search parameters."""
    class_map = {}
    for number, (_, ranges) in enumerate(shards):
        for cls, where in ranges.items():
            class_map[str(cls)] = [number, *where]
    manifest = IndexManifest(
        models=models, dim=dim, vector_dtype=dtype, config=dataclasses.asdict(config), sources=sources,
        rows=sum(entry.live_rows for entry, _ in shards), classes=class_map, max_pixels=max_pixels,
        strategy=strategy, search=(search or SearchParams()).to_json(), shards=[entry for entry, _ in shards],
        class_source=keying.to_json() if isinstance(keying, Keying) else keying, version=version,
        applied=dict(applied or {}))
    return publish(index_dir, manifest)


def _shard_jobs_map(jobs: list[tuple], mapper) -> list[tuple[ShardEntry, dict[int, list[int]]]]:
    return list(mapper(lambda job: build_shard_from_bucket(*job), jobs))


def build_index(embeddings_dir: str | Path | Location, index_dir: str | Path | Location, config: IndexConfig = IndexConfig(),
                dtype: str = "float32", mapper=map, strategy: dict | None = None,
                search: SearchParams | None = None, classes: str | None = None,
                classifier: str | None = None) -> IndexManifest:
    """Builds a class-sharded index from an embedding job's output (its version 1).

    Args:
        embeddings_dir: the ``--output`` folder of ``jobs.embed`` (a local folder or an object store URI).
        index_dir: where the index goes (must not hold an index yet; a local folder or an object store URI).
        config: sharding and global index settings.
        dtype: storage type of the vectors (``float32`` or ``float16``).
        mapper: ``map``-like callable running the per-shard builds (e.g. in parallel on Ray).
        strategy: the default search strategy (``Strategy.to_json()``) recorded in the manifest.
        search: the search parameters recorded in the manifest (default: ``SearchParams()``).
        classes: the class partition, ``labels`` or ``predicted`` (None: the rule of
            :func:`pipeline.index.keying.resolve_keying`).
        classifier: a classifier head (``head:PATH``) that becomes the query classifier (re-keys the
            output from its stored vectors); None: the output's classifier.

    Returns:
        the index manifest.

    Raises:
        FileExistsError: ``index_dir`` already holds an index (append to it, or pick a new folder).
        ValueError: a class partition the classifier cannot serve (see ``resolve_keying``).
    """
    embeddings_dir, index_dir = Location(embeddings_dir), Location(index_dir)
    if (index_dir / "manifest.json").is_file():
        raise FileExistsError(f"{index_dir} already holds an index; use append (--append), update (--update) "
                              f"or a new folder")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    parts, source, last_run = source_parts(embeddings_dir)
    keying, models = resolve_keying(source.models, [p for p, _ in parts], classes, classifier)
    counts = count_classes(parts, keying)
    shards = plan_shards(counts, config.shard_size)
    shard_of = {cls: s for s, members in enumerate(shards) for cls in members}
    scratch = index_dir / ".build-tmp"
    try:
        buckets, dim = write_buckets(parts, scratch, shard_of, keying)
        dim = dim or source.dim
        jobs = [(buckets[s], index_dir / shard_folder(s, 1), config, dtype) for s in range(len(shards))]
        entries = _shard_jobs_map(jobs, mapper)
    finally:
        scratch.delete_tree()
    return write_index_manifest(index_dir, entries, models, source.max_pixels, keying, config, dim, dtype,
                                [str(embeddings_dir)], strategy, search, applied={str(embeddings_dir): last_run})


def _index_ids(index_dir: Location, manifest: IndexManifest) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per shard: its row ids (by position) and its deleted positions."""
    return [((index_dir / s.path / "rows.parquet").read_parquet(["id"])["id"].to_numpy(),
             read_tombstones(index_dir, s)) for s in manifest.shards]


def live_ids(index_dir: str | Path | Location) -> np.ndarray:
    """The ids searches can return in the current version (sorted)."""
    index_dir = Location(index_dir)
    found = []
    for ids, dead in _index_ids(index_dir, IndexManifest.read(index_dir)):
        alive = np.ones(len(ids), dtype=bool)
        alive[dead] = False
        found.append(ids[alive])
    return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)


def _live_ranges(ranges: dict[int, list[int]], dead: np.ndarray) -> dict[int, list[int]]:
    """Class ranges of a shard kept with tombstones: ``[start, end, live]`` where rows are dead."""
    out = {}
    for cls, (start, end, *_) in ranges.items():
        gone = int(np.searchsorted(dead, end) - np.searchsorted(dead, start))
        out[cls] = [start, end, end - start - gone] if gone else [start, end]
    return out


def update_index(index_dir: str | Path | Location, embeddings_dir: str | Path | Location | None = None, *,
                 delete_ids: np.ndarray | None = None, only_new: bool = False, mapper=map,
                 strategy: dict | None = None, compact_at: float = 0.2, keep_versions: int = KEEP_VERSIONS,
                 grace_s: float = GRACE_S) -> IndexManifest:
    """Publishes the next version of an index: new and changed images of an embedding output added,
    deleted ones gone, nothing of the current version touched.

    From ``embeddings_dir``, the rows of the runs (change logs) this index has not applied yet are
    added, and the ids those runs changed or deleted leave the index: a changed image is replaced
    by its new row. With ``only_new`` (``append``), only ids the index does not hold are added,
    from every run. ``delete_ids`` (a takedown) leave it too.

    Shards that gain rows are rebuilt (their deleted rows dropped) under new versioned names; a
    shard that only loses rows keeps its files and gets a tombstone file, unless its deleted
    fraction passes ``compact_at``, when it is rebuilt without them. Images of known classes go to
    their class's shard (which may then exceed ``shard_size``; build anew to re-balance); new
    classes get new shards. New rows are keyed as the index's were: by their labels, or by the
    index's classifier (a head re-keys them from their vectors).

    Returns:
        the new version's manifest (old versions are removed by
        :func:`pipeline.index.versions.remove_old_versions` with ``keep_versions``, ``grace_s``).

    Raises:
        FileNotFoundError: no index at ``index_dir``.
        ValueError: the new embeddings were made with other models or another decode limit.
    """
    index_dir = Location(index_dir)
    old = IndexManifest.read(index_dir)
    version = old.version + 1
    if not (index_dir / version_file(old.version)).is_file():  # an index written before versions
        old.write(index_dir, version_file(old.version))
    config = IndexConfig(**old.config)
    shard_ids = _index_ids(index_dir, old)
    removed = np.unique(np.asarray(delete_ids if delete_ids is not None else [], dtype=np.int64))
    parts: list[Part] = []
    applied = dict(old.applied)
    sources = list(old.sources)
    keying = None
    if embeddings_dir is not None:
        embeddings_dir = Location(embeddings_dir)
        key = str(embeddings_dir)
        after = 0 if only_new else applied.get(key, 0)
        parts, source, last_run = source_parts(embeddings_dir, after)
        _check_source(old, source, embeddings_dir, index_dir)
        if not only_new:
            for changes in change_log(embeddings_dir):
                if changes.run > after:
                    removed = np.union1d(removed, np.union1d(changes.changed, changes.deleted))
        applied[key] = max(last_run, applied.get(key, 0))
        if key not in sources:
            sources.append(key)
        index_classifier = old.models.spec("classifier")
        keying, _ = resolve_keying(source.models, [p for p, _ in parts],
                                   old.class_source["source"] if old.class_source else "predicted",
                                   index_classifier, require_labels=False)
    known = np.sort(np.concatenate([ids for ids, _ in shard_ids] or [np.zeros(0, np.int64)]))
    counts = {}
    skip = None
    if parts:
        if only_new:
            skip = known
        else:  # an added id the index holds is a replacement: its old row goes
            added = np.concatenate([p.read_parquet(["id"])["id"].to_numpy() for p, _ in parts] or [np.zeros(0, np.int64)])
            removed = np.union1d(removed, added)
        counts = count_classes(parts, keying, skip)
    old_map = {int(c): v for c, v in old.classes.items()}
    shard_of = {cls: old_map[cls][0] for cls in counts if cls in old_map}
    first_new = len(old.shards)
    new_classes = {cls: n for cls, n in counts.items() if cls not in old_map}
    for offset, members in enumerate(plan_shards(new_classes, config.shard_size)):
        shard_of.update({cls: first_new + offset for cls in members})
    dead = []
    for (ids, tomb), entry in zip(shard_ids, old.shards):
        now_dead = np.flatnonzero(~_not_in(ids, removed)) if len(removed) else np.zeros(0, np.int64)
        dead.append(np.union1d(tomb, now_dead).astype(np.int64))
    scratch = index_dir / f".update-tmp-{version}"
    try:
        buckets = write_buckets(parts, scratch, shard_of, keying, skip)[0] if counts else {}
        compact = {s for s, entry in enumerate(old.shards)  # dead fraction past the threshold: rebuild
                   if len(dead[s]) > (entry.deleted or {}).get("rows", 0) and len(dead[s]) > compact_at * entry.rows}
        rebuild = set(buckets) | compact
        jobs = [(buckets.get(s), index_dir / shard_folder(s, version), config, old.vector_dtype,
                 index_dir / old.shards[s].path if s < first_new else None, dead[s] if s < first_new else None)
                for s in sorted(rebuild)]
        rebuilt = dict(zip(sorted(rebuild), _shard_jobs_map(jobs, mapper)))
    finally:
        scratch.delete_tree()
    entries = []
    for number in range(max([first_new - 1, *rebuilt]) + 1):
        if number in rebuilt:
            entries.append(rebuilt[number])
            continue
        entry = old.shards[number]
        ranges = {c: v[1:3] for c, v in old_map.items() if v[0] == number}
        if len(dead[number]) != (entry.deleted or {}).get("rows", 0):
            entry = dataclasses.replace(entry, deleted=write_tombstones(index_dir, number, version, dead[number]))
        entries.append((entry, _live_ranges(ranges, dead[number])))
    manifest = write_index_manifest(index_dir, entries, old.models, old.max_pixels, old.class_source, config,
                                    old.dim, old.vector_dtype, sources,
                                    old.strategy if strategy is None else strategy, SearchParams.from_json(old.search),
                                    version=version, applied=applied)
    remove_old_versions(index_dir, keep_versions, grace_s)
    return manifest


def _check_source(old: IndexManifest, source: EmbeddingManifest, embeddings_dir: Location, index_dir: Location) -> None:
    what = f"the index {index_dir} (adding {embeddings_dir})"
    old.models.require({"embedder": source.models.spec("embedder")}, what)
    if not old.models.spec("classifier").startswith("head:"):
        old.models.require({"classifier": source.models.spec("classifier")}, what)
    if source.max_pixels != old.max_pixels:
        raise ValueError(f"{embeddings_dir} was decoded with max_pixels {source.max_pixels}, the index "
                         f"{index_dir} with {old.max_pixels}; re-run the embedding job with --max-pixels "
                         f"{old.max_pixels}")


def append_index(embeddings_dir: str | Path | Location, index_dir: str | Path | Location, mapper=map,
                 strategy: dict | None = None) -> IndexManifest:
    """Adds a new embedding output to an existing index (the next version), rebuilding only the
    shards it touches: :func:`update_index` with ``only_new`` (rows whose id is already indexed are
    skipped). The result answers searches exactly as an index built from both outputs at once. The
    index keeps its default search strategy unless ``strategy`` is given.

    Raises:
        FileNotFoundError: no index at ``index_dir``.
        ValueError: the new embeddings were made with other models.
    """
    return update_index(index_dir, embeddings_dir, only_new=True, mapper=mapper, strategy=strategy)


def delete_from_index(index_dir: str | Path | Location, ids: np.ndarray, **kwargs) -> IndexManifest:
    """Publishes the next version without these images (a takedown): :func:`update_index`."""
    return update_index(index_dir, delete_ids=ids, **kwargs)
