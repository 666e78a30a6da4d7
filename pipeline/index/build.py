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
from pipeline.index.keying import UNLABELLED, Keying, resolve_keying
from pipeline.index.faiss_index import IndexConfig, SearchParams, build_faiss_index, choose_index_type, head_file
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


def _read_embedding_parts(parts: Iterable[Location], columns: list[str]) -> Iterable[pa.Table]:
    for part in parts:
        yield part.read_parquet(columns)


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


def count_classes(parts: list[Location], keying: Keying, skip_ids: np.ndarray | None = None) -> dict[int, int]:
    """Rows per class over the parts (reads only the id column and what ``keying`` needs)."""
    skip = np.sort(skip_ids) if skip_ids is not None else np.zeros(0, np.int64)
    counts: dict[int, int] = {}
    for table in _read_embedding_parts(parts, ["id", *keying.columns]):
        keep = _not_in(table.column("id").to_numpy(), skip)
        top = keying.classes(table)[0][keep]
        for cls, n in zip(*np.unique(top, return_counts=True)):
            counts[int(cls)] = counts.get(int(cls), 0) + int(n)
    return counts


def write_buckets(parts: list[Location], scratch: Location, shard_of: dict[int, int], keying: Keying,
                  skip_ids: np.ndarray | None = None) -> tuple[dict[int, Location], int]:
    """One streaming pass: each row, keyed (``class``, ``class_prob``), goes to its shard's bucket
    file. Memory holds one part at a time, never the whole gallery.

    Returns:
        ``({shard: bucket file}, dim)``.
    """
    skip = np.sort(skip_ids) if skip_ids is not None else np.zeros(0, np.int64)
    scratch.make_folder()
    writers: dict[int, pq.ParquetWriter] = {}
    buckets: dict[int, Location] = {}
    dim = 0
    columns = list(dict.fromkeys(["id", "uri", "label", "embedding", *keying.columns]))
    for table in _read_embedding_parts(parts, columns):
        dim = table.schema.field("embedding").type.list_size
        table = table.filter(pa.array(_not_in(table.column("id").to_numpy(), skip)))
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


def build_shard_from_bucket(bucket: Location, directory: Location, config: IndexConfig, dtype: str = "float32",
                            existing: Location | None = None) -> tuple[ShardEntry, dict[int, list[int]]]:
    """Builds one shard from its bucket file (plus, when appending, the shard's current contents)."""
    rows, vectors = _rows_and_vectors(bucket.read_parquet())
    if existing is not None:
        old_rows = (existing / "rows.parquet").read_parquet()
        stored = existing / "vectors.npy"
        old_vectors = (np.load(io.BytesIO(stored.read_bytes())) if stored.remote
                       else np.load(stored.path, mmap_mode="r")).astype(np.float32)
        rows = pa.concat_tables([old_rows, rows])
        vectors = np.concatenate([old_vectors, vectors])
    rows, vectors = _sort_shard(rows, vectors)
    return write_shard(directory, rows, vectors, config, dtype)


def write_index_manifest(index_dir: Location, shards: list[tuple[ShardEntry, dict[int, list[int]]]],
                         models: ModelSet, max_pixels: int, keying: Keying, config: IndexConfig, dim: int,
                         dtype: str, sources: list[str], strategy: dict | None = None,
                         search: SearchParams | None = None) -> IndexManifest:
    """Writes the index ``manifest.json``: the shards (each with where its classes lie), the models
    and decode limit of the gallery (queries go through the same), how rows were keyed, the default
    search strategy and the search parameters."""
    class_map = {}
    for number, (_, ranges) in enumerate(shards):
        for cls, (start, end) in ranges.items():
            class_map[str(cls)] = [number, start, end]
    manifest = IndexManifest(
        models=models, dim=dim, vector_dtype=dtype, config=dataclasses.asdict(config), sources=sources,
        rows=sum(entry.rows for entry, _ in shards), classes=class_map, max_pixels=max_pixels,
        strategy=strategy, search=(search or SearchParams()).to_json(), shards=[entry for entry, _ in shards],
        class_source=keying.to_json())
    manifest.write(index_dir)
    return manifest


def _shard_dir(index_dir: Location, number: int) -> Location:
    return index_dir / "shards" / f"{number:04d}"


def _shard_jobs_map(jobs: list[tuple], mapper) -> list[tuple[ShardEntry, dict[int, list[int]]]]:
    return list(mapper(lambda job: build_shard_from_bucket(*job), jobs))


def build_index(embeddings_dir: str | Path | Location, index_dir: str | Path | Location, config: IndexConfig = IndexConfig(),
                dtype: str = "float32", mapper=map, strategy: dict | None = None,
                search: SearchParams | None = None, classes: str | None = None,
                classifier: str | None = None) -> IndexManifest:
    """Builds a class-sharded index from an embedding job's output.

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
        raise FileExistsError(f"{index_dir} already holds an index; use append (--append) or a new folder")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    parts, source = embedding_parts(embeddings_dir)
    keying, models = resolve_keying(source.models, parts, classes, classifier)
    counts = count_classes(parts, keying)
    shards = plan_shards(counts, config.shard_size)
    shard_of = {cls: s for s, members in enumerate(shards) for cls in members}
    scratch = index_dir / ".build-tmp"
    try:
        buckets, dim = write_buckets(parts, scratch, shard_of, keying)
        dim = dim or source.dim
        jobs = [(buckets[s], _shard_dir(index_dir, s), config, dtype) for s in range(len(shards))]
        entries = _shard_jobs_map(jobs, mapper)
    finally:
        scratch.delete_tree()
    return write_index_manifest(index_dir, entries, models, source.max_pixels, keying, config, dim, dtype,
                                [str(embeddings_dir)], strategy, search)


def append_index(embeddings_dir: str | Path | Location, index_dir: str | Path | Location, mapper=map,
                 strategy: dict | None = None) -> IndexManifest:
    """Adds a new embedding output to an existing index, rebuilding only the shards it touches.

    Rows whose id is already indexed are skipped; images of known classes go to their class's shard
    (which may then exceed ``shard_size``; rebuild from scratch to re-balance); new classes get new
    shards. The result answers searches exactly as an index built from both outputs at once. The
    index keeps its default search strategy unless ``strategy`` is given.

    The new rows are keyed as the index's were: by their labels, or by the index's classifier (a
    head re-keys them from their vectors when the output was classified by another model).

    Raises:
        FileNotFoundError: no index at ``index_dir``.
        ValueError: the new embeddings were made with other models.
    """
    embeddings_dir, index_dir = Location(embeddings_dir), Location(index_dir)
    old = IndexManifest.read(index_dir)
    parts, source = embedding_parts(embeddings_dir)
    what = f"the index {index_dir} (appending {embeddings_dir})"
    old.models.require({"embedder": source.models.spec("embedder")}, what)
    index_classifier = old.models.spec("classifier")
    if not index_classifier.startswith("head:"):
        old.models.require({"classifier": source.models.spec("classifier")}, what)
    keying, _ = resolve_keying(source.models, parts, old.class_source["source"] if old.class_source else "predicted",
                               index_classifier, require_labels=False)
    if source.max_pixels != old.max_pixels:
        raise ValueError(f"{embeddings_dir} was decoded with max_pixels {source.max_pixels}, the index "
                         f"{index_dir} with {old.max_pixels}; re-run the embedding job with --max-pixels "
                         f"{old.max_pixels}")
    config = IndexConfig(**old.config)
    known_ids = np.sort(np.concatenate([(index_dir / s.path / "rows.parquet").read_parquet(["id"])
                                        ["id"].to_numpy() for s in old.shards] or [np.zeros(0, np.int64)]))
    counts = count_classes(parts, keying, known_ids)
    old_map = {int(c): v for c, v in old.classes.items()}
    shard_of = {cls: old_map[cls][0] for cls in counts if cls in old_map}
    new_classes = {cls: n for cls, n in counts.items() if cls not in old_map}
    first_new = len(old.shards)
    for offset, members in enumerate(plan_shards(new_classes, config.shard_size)):
        shard_of.update({cls: first_new + offset for cls in members})
    scratch = index_dir / ".append-tmp"
    try:
        buckets, _ = write_buckets(parts, scratch, shard_of, keying, known_ids)
        jobs = [(bucket, _shard_dir(index_dir, s), config, old.vector_dtype,
                 _shard_dir(index_dir, s) if s < first_new else None) for s, bucket in sorted(buckets.items())]
        rebuilt = dict(zip(sorted(buckets), _shard_jobs_map(jobs, mapper)))
    finally:
        scratch.delete_tree()
    entries = []
    for number in range(max([first_new - 1, *rebuilt]) + 1):
        if number in rebuilt:
            entries.append(rebuilt[number])
        else:
            entries.append((old.shards[number], {c: [v[1], v[2]] for c, v in old_map.items() if v[0] == number}))
    return write_index_manifest(index_dir, entries, old.models, old.max_pixels, keying, config, old.dim,
                                old.vector_dtype, old.sources + [str(embeddings_dir)],
                                old.strategy if strategy is None else strategy, SearchParams.from_json(old.search))
