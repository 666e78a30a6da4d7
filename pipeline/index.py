"""Class-sharded FAISS indexes: build, save, load, search (class-restricted and global), append.

Layout of an index folder::

    manifest.json                 models, metric, dim, class -> (shard, start, end), files + sha256
    shards/0000/vectors.npy       this shard's embeddings, rows sorted by (class, id); memory-mapped
    shards/0000/rows.parquet      position -> id, uri, label, class, class_prob
    shards/0000/index.faiss       global-search index over the same rows (flat, IVF, IVF-PQ or HNSW)

Rows are sorted by top-1 predicted class, so every class is one contiguous position range inside
one shard, and a shard is a run of whole classes. A class-restricted search (Approach 2: classify,
then rank the predicted class's images) is an exact scan of one small slice of ``vectors.npy``;
a global search queries every shard's FAISS index and merges by score.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.files import sha256_file, write_json_atomically

logger = logging.getLogger(__name__)

#: Version of the index layout and manifest.
INDEX_SCHEMA_VERSION = 1
GLOBAL_INDEX_TYPES = ("auto", "flat", "ivf", "ivfpq", "hnsw")
#: "auto" keeps exact (flat) search for shards up to this many rows, IVF above.
AUTO_FLAT_MAX_ROWS = 50_000
#: "auto" switches from IVF-Flat to IVF-PQ above this many rows per shard.
AUTO_IVFPQ_MIN_ROWS = 5_000_000

ROW_SCHEMA = pa.schema([("id", pa.int64()), ("uri", pa.string()), ("label", pa.string()),
                        ("class", pa.int32()), ("class_prob", pa.float32())])


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: int
    uri: str
    label: str | None
    cls: int
    score: float

    def to_json(self) -> dict:
        return {"id": self.id, "uri": self.uri, "label": self.label, "class": self.cls, "score": self.score}


@dataclass(frozen=True)
class IndexConfig:
    """How an index is built.

    Attributes:
        shard_size: most rows per shard (a class larger than this gets a shard of its own; classes
            are never split).
        global_index: ``auto``, ``flat``, ``ivf``, ``ivfpq`` or ``hnsw``.
        nlist: IVF lists (None: about 4 * sqrt(rows), at most rows / 39).
        pq_m: IVF-PQ sub-quantisers (must divide the dimension).
        hnsw_m: HNSW graph degree.
        train_size: vectors sampled to train IVF quantisers.
        seed: sampling seed.
    """

    shard_size: int = 1_000_000
    global_index: str = "auto"
    nlist: int | None = None
    pq_m: int = 32
    hnsw_m: int = 32
    train_size: int = 100_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.global_index not in GLOBAL_INDEX_TYPES:
            raise ValueError(f"global_index must be one of {GLOBAL_INDEX_TYPES}, got {self.global_index!r}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist must be >= 1, got {self.nlist}")


class IndexIntegrityError(ValueError):
    """An index file is missing, truncated or corrupted (the message names the file)."""


# --------------------------------------------------------------------------------------------
# Building


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


def _nlist(rows: int, config: IndexConfig) -> int:
    if config.nlist:
        return max(1, min(config.nlist, rows))
    # ~4 sqrt(n) lists, and enough training points per list (FAISS wants >= 39 each).
    return max(1, min(int(4 * math.sqrt(rows)), min(rows, config.train_size) // 39))


def choose_index_type(rows: int, config: IndexConfig) -> str:
    """The global index type for a shard of ``rows`` vectors."""
    if config.global_index != "auto":
        return config.global_index
    if rows <= AUTO_FLAT_MAX_ROWS:
        return "flat"
    return "ivf" if rows < AUTO_IVFPQ_MIN_ROWS else "ivfpq"


def build_faiss_index(vectors: np.ndarray, kind: str, config: IndexConfig) -> faiss.Index:
    """Builds an inner-product FAISS index of ``kind`` over ``vectors`` (float32, L2-normalised)."""
    rows, dim = vectors.shape
    if kind == "flat" or rows == 0:
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    elif kind in ("ivf", "ivfpq"):
        nlist = _nlist(rows, config)
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            if dim % config.pq_m:
                raise ValueError(f"pq_m={config.pq_m} must divide the dimension {dim}")
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, config.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(config.seed)
        sample = vectors if rows <= config.train_size else vectors[np.sort(rng.choice(rows, config.train_size, replace=False))]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.quantizer_trains_alone = 0
    else:
        raise ValueError(f"unknown index type {kind!r}")
    for start in range(0, rows, 100_000):
        index.add(np.ascontiguousarray(vectors[start : start + 100_000], dtype=np.float32))
    return index


def write_shard(directory: Path, rows: pa.Table, vectors: np.ndarray, config: IndexConfig,
                dtype: str = "float32") -> dict:
    """Writes one shard (rows already sorted by class, id) and returns its manifest entry.

    Args:
        directory: the shard's folder (replaced atomically when it exists).
        rows: ``ROW_SCHEMA`` table, one row per vector, sorted by (class, id).
        vectors: (rows, dim) L2-normalised embeddings in the same order.
        config: index settings.
        dtype: storage type of ``vectors.npy`` (``float32`` or ``float16``).
    """
    if rows.num_rows != len(vectors):
        raise ValueError(f"{rows.num_rows} rows but {len(vectors)} vectors")
    tmp = directory.with_name(f".tmp-{directory.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np.save(tmp / "vectors.npy", np.ascontiguousarray(vectors, dtype=dtype))
    pq.write_table(rows, tmp / "rows.parquet")
    kind = choose_index_type(len(vectors), config)
    faiss.write_index(build_faiss_index(vectors, kind, config), str(tmp / "index.faiss"))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    classes = rows.column("class").to_numpy()
    ranges = {}
    if len(classes):
        starts = np.flatnonzero(np.r_[True, classes[1:] != classes[:-1]])
        ends = np.r_[starts[1:], len(classes)]
        ranges = {int(classes[s]): [int(s), int(e)] for s, e in zip(starts, ends)}
    files = {name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
             for name in ("vectors.npy", "rows.parquet", "index.faiss")}
    return {"path": f"shards/{directory.name}", "rows": int(len(vectors)), "index_type": kind,
            "classes": ranges, "files": files}


def _read_embedding_parts(parts: Iterable[Path], columns: list[str]) -> Iterable[pa.Table]:
    for part in parts:
        yield pq.read_table(part, columns=columns)


def _rows_and_vectors(table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """Embedding-job rows -> index rows (top-1 class) and float32 vectors."""
    classes = table.column("classes").combine_chunks()
    probs = table.column("class_probs").combine_chunks()
    top = pc_first(classes).cast(pa.int32())
    top_prob = pc_first(probs).cast(pa.float32())
    rows = pa.table({"id": table.column("id"), "uri": table.column("uri"), "label": table.column("label"),
                     "class": top, "class_prob": top_prob}, schema=ROW_SCHEMA)
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    return rows, vectors


def pc_first(lists: pa.Array) -> pa.Array:
    """The first element of each list (a list array with no empty lists)."""
    import pyarrow.compute as pc

    return pc.list_element(lists, 0)


def _sort_shard(rows: pa.Table, vectors: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    order = np.lexsort((rows.column("id").to_numpy(), rows.column("class").to_numpy()))
    return rows.take(pa.array(order)), vectors[order]


def embedding_parts(embeddings_dir: Path) -> tuple[list[Path], dict]:
    """The part files and the manifest of an embedding job output folder.

    Raises:
        FileNotFoundError: not an embedding job output (no manifest.json).
    """
    manifest_path = embeddings_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found; --embeddings must be the --output folder of "
                                f"a finished `python -m jobs.embed` run")
    manifest = json.loads(manifest_path.read_text())
    parts = [embeddings_dir / p["path"] for p in manifest["parts"]]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"embedding parts listed in {manifest_path} are missing: {missing[:3]}")
    return parts, manifest


def count_classes(parts: list[Path], skip_ids: np.ndarray | None = None) -> dict[int, int]:
    """Rows per top-1 class over the parts (reads only the id and classes columns)."""
    skip = np.sort(skip_ids) if skip_ids is not None else np.zeros(0, np.int64)
    counts: dict[int, int] = {}
    for table in _read_embedding_parts(parts, ["id", "classes"]):
        keep = _not_in(table.column("id").to_numpy(), skip)
        top = pc_first(table.column("classes").combine_chunks()).to_numpy(zero_copy_only=False)[keep]
        for cls, n in zip(*np.unique(top, return_counts=True)):
            counts[int(cls)] = counts.get(int(cls), 0) + int(n)
    return counts


def write_buckets(parts: list[Path], scratch: Path, shard_of: dict[int, int],
                  skip_ids: np.ndarray | None = None) -> tuple[dict[int, Path], int]:
    """One streaming pass: each row goes to its shard's bucket file. Memory holds one part at a
    time, never the whole gallery.

    Returns:
        ``({shard: bucket file}, dim)``.
    """
    skip = np.sort(skip_ids) if skip_ids is not None else np.zeros(0, np.int64)
    scratch.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pq.ParquetWriter] = {}
    buckets: dict[int, Path] = {}
    dim = 0
    for table in _read_embedding_parts(parts, ["id", "uri", "label", "classes", "class_probs", "embedding"]):
        dim = table.schema.field("embedding").type.list_size
        table = table.filter(pa.array(_not_in(table.column("id").to_numpy(), skip)))
        top = pc_first(table.column("classes").combine_chunks()).to_numpy(zero_copy_only=False)
        targets = np.array([shard_of[int(c)] for c in top], dtype=np.int64)
        for s in np.unique(targets):
            s = int(s)
            piece = table.filter(pa.array(targets == s))
            if s not in writers:
                buckets[s] = scratch / f"bucket-{s:04d}.parquet"
                writers[s] = pq.ParquetWriter(buckets[s], piece.schema)
            writers[s].write_table(piece)
    for writer in writers.values():
        writer.close()
    return buckets, dim


def _not_in(values: np.ndarray, sorted_skip: np.ndarray) -> np.ndarray:
    if len(sorted_skip) == 0:
        return np.ones(len(values), dtype=bool)
    pos = np.searchsorted(sorted_skip, values).clip(max=len(sorted_skip) - 1)
    return sorted_skip[pos] != values


def build_shard_from_bucket(bucket: Path, directory: Path, config: IndexConfig, dtype: str = "float32",
                            existing: Path | None = None) -> dict:
    """Builds one shard from its bucket file (plus, when appending, the shard's current contents)."""
    rows, vectors = _rows_and_vectors(pq.read_table(bucket))
    if existing is not None:
        old_rows = pq.read_table(existing / "rows.parquet")
        old_vectors = np.load(existing / "vectors.npy", mmap_mode="r").astype(np.float32)
        rows = pa.concat_tables([old_rows, rows])
        vectors = np.concatenate([old_vectors, vectors])
    rows, vectors = _sort_shard(rows, vectors)
    return write_shard(directory, rows, vectors, config, dtype)


def write_index_manifest(index_dir: Path, shards: list[dict], source_manifest: dict, config: IndexConfig,
                         dim: int, dtype: str, sources: list[str]) -> dict:
    """Writes the index ``manifest.json``."""
    class_map = {}
    for number, shard in enumerate(shards):
        for cls, (start, end) in shard["classes"].items():
            class_map[str(cls)] = [number, start, end]
    manifest = {
        "schema_version": INDEX_SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "models": source_manifest["models"],
        "metric": "inner_product",
        "dim": dim,
        "vector_dtype": dtype,
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "sources": sources,
        "rows": sum(s["rows"] for s in shards),
        "classes": class_map,
        "shards": [{k: v for k, v in s.items() if k != "classes"} | {"classes": len(s["classes"])} for s in shards],
    }
    write_json_atomically(manifest, index_dir / "manifest.json", indent=1)
    return manifest


# --------------------------------------------------------------------------------------------
# Loading and searching


@dataclass
class _Shard:
    number: int
    vectors: np.ndarray          # memory-mapped (rows, dim)
    ids: np.ndarray
    uris: pa.Array
    labels: pa.Array
    classes: np.ndarray
    index: faiss.Index = field(repr=False)

    def scan(self, query: np.ndarray, start: int, end: int, k: int, exact_max_rows: int | None,
             nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, positions) among positions [start, end), best first."""
        if exact_max_rows is not None and end - start > exact_max_rows:
            ivf = _ivf_of(self.index)
            if ivf is not None:
                # Positions are the FAISS ids and each inverted list stores them in ascending order,
                # so a sorted range selector bisects each visited list instead of testing every id.
                params = faiss.SearchParametersIVF(sel=faiss.IDSelectorRange(start, end, True),
                                                   nprobe=min(nprobe, ivf.nlist))
                scores, positions = self.index.search(query[None], k, params=params)
                keep = positions[0] >= 0
                return scores[0][keep], positions[0][keep]
        sims = np.asarray(self.vectors[start:end], dtype=np.float32) @ query
        if len(sims) > k:
            top = np.argpartition(-sims, k - 1)[:k]
            top = top[np.lexsort((top, -sims[top]))]
        else:
            top = np.lexsort((np.arange(len(sims)), -sims))
        return sims[top], start + top

    def hit(self, position: int, score: float) -> Hit:
        label = self.labels[position].as_py()
        return Hit(int(self.ids[position]), self.uris[position].as_py(), label, int(self.classes[position]),
                   float(score))


def models_match(manifest_models: dict, expect: dict[str, str]) -> list[str]:
    """Differences between the index's models and the caller's (``{"classifier": spec, ...}``)."""
    return [f"{role}: index built with {manifest_models.get(role, {}).get('spec')!r}, caller uses {spec!r}"
            for role, spec in expect.items() if manifest_models.get(role, {}).get("spec") != spec]


def _use_gpu(use_gpu: str) -> bool:
    if use_gpu not in ("auto", "yes", "no"):
        raise ValueError(f"use_gpu must be auto, yes or no, got {use_gpu!r}")
    available = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if use_gpu == "yes" and not available:
        raise ValueError("use_gpu='yes' but FAISS sees no GPU (install the gpu extra: faiss-gpu)")
    return available and use_gpu != "no"


class ShardedIndex:
    """A loaded index (all shards, or the subset a serving replica owns).

    Attributes:
        manifest: the index manifest.
        shard_numbers: the shards loaded here.
    """

    def __init__(self, root: Path, manifest: dict, shards: list[_Shard]) -> None:
        self.root = root
        self.manifest = manifest
        self._shards = {s.number: s for s in shards}
        self.shard_numbers = sorted(self._shards)
        self._class_map = {int(c): tuple(v) for c, v in manifest["classes"].items()}
        self._positions: dict[int, tuple[int, int]] | None = None  # id -> (shard, position), built on first lookup

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return sum(len(s.ids) for s in self._shards.values())

    @classmethod
    def load(cls, index_dir: str | Path, *, expect_models: dict[str, str] | None = None,
             shards: Iterable[int] | None = None, verify: bool = True, use_gpu: str = "auto") -> "ShardedIndex":
        """Loads an index; vectors and IVF lists are memory-mapped, so RSS does not grow with it.

        Args:
            index_dir: the index folder.
            expect_models: refuse the index unless it was built with these model specs
                (``{"classifier": spec, "embedder": spec}``).
            shards: load only these shard numbers (a serving replica's share); default all.
            verify: check every file's size and sha256 against the manifest.
            use_gpu: ``auto`` (FAISS GPU when available), ``yes`` or ``no``.

        Raises:
            FileNotFoundError: no manifest.
            IndexIntegrityError: a file is missing, truncated or corrupted.
            ValueError: the index was built with other models.
        """
        root = Path(index_dir)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found; build an index with `python -m jobs.build_index`")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("schema_version") != INDEX_SCHEMA_VERSION:
            raise ValueError(f"{root}: index schema_version {manifest.get('schema_version')} is not "
                             f"{INDEX_SCHEMA_VERSION}; rebuild it with this version")
        if expect_models:
            diffs = models_match(manifest["models"], expect_models)
            if diffs:
                raise ValueError(f"{root} was built with other models; refusing it ({'; '.join(diffs)})")
        numbers = range(len(manifest["shards"])) if shards is None else list(shards)
        gpu = _use_gpu(use_gpu)
        loaded = []
        for number in numbers:
            if not 0 <= number < len(manifest["shards"]):
                raise ValueError(f"shard {number} does not exist (index has {len(manifest['shards'])})")
            entry = manifest["shards"][number]
            loaded.append(_load_shard(root / entry["path"], number, entry, verify, gpu))
        return cls(root, manifest, loaded)

    def lookup(self, image_id: int) -> Hit | None:
        """The gallery image with this id (score 1.0), or None when no loaded shard holds it."""
        if self._positions is None:
            self._positions = {int(i): (number, p) for number, shard in self._shards.items()
                               for p, i in enumerate(shard.ids)}
        where = self._positions.get(int(image_id))
        return None if where is None else self._shards[where[0]].hit(where[1], 1.0)

    def owns_class(self, cls: int) -> bool:
        """Whether the class's images are in a shard loaded here."""
        where = self._class_map.get(int(cls))
        return where is not None and where[0] in self._shards

    def class_size(self, cls: int) -> int:
        """Gallery images of a class (0 for a class with none)."""
        where = self._class_map.get(int(cls))
        return 0 if where is None else where[2] - where[1]

    def search_class(self, queries: np.ndarray, classes: np.ndarray, k: int = 5, *,
                     min_score: float | None = None, fallback_global: bool = False,
                     exact_max_rows: int | None = None, nprobe: int = 32) -> list[list[Hit]]:
        """Approach 2: search among the images of each query's predicted classes only.

        Args:
            queries: (Q, dim) L2-normalised query embeddings.
            classes: (Q, n) predicted class indices per query (top-n); -1 entries are ignored.
            k: results per query.
            min_score: drop results below this similarity.
            fallback_global: when the classes hold fewer than k images (here), fill up from a
                global search.
            exact_max_rows: classes up to this size are scanned exactly (the default, None, scans
                every class exactly). A larger class in a shard with an IVF index is searched
                through that index restricted to the class's position range, visiting ``nprobe``
                lists: approximate, but its cost no longer grows with the class.
            nprobe: IVF lists visited for such large classes.

        Returns:
            per query, up to k hits, best first.
        """
        queries = self._check_queries(queries)
        classes = np.asarray(classes).reshape(len(queries), -1)
        results = []
        for query, query_classes in zip(queries, classes):
            scores, hits = [], []
            for cls in dict.fromkeys(int(c) for c in query_classes if c >= 0):
                where = self._class_map.get(cls)
                if where is None or where[0] not in self._shards:
                    continue
                shard = self._shards[where[0]]
                sims, positions = shard.scan(query, where[1], where[2], k, exact_max_rows, nprobe)
                scores.extend(sims)
                hits.extend((shard, int(p)) for p in positions)
            order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")[:k]
            found = [hits[i][0].hit(hits[i][1], scores[i]) for i in order]
            if fallback_global and len(found) < k:
                seen = {h.id for h in found}
                extra = self.search_global(query[None], k + len(found))[0]
                found += [h for h in extra if h.id not in seen][: k - len(found)]
            results.append(_threshold(found, min_score))
        return results

    def search_global(self, queries: np.ndarray, k: int = 5, *, min_score: float | None = None,
                      nprobe: int = 32, ef_search: int = 128) -> list[list[Hit]]:
        """Scatter-gather over the loaded shards' FAISS indexes, merged by score.

        Args:
            queries: (Q, dim) L2-normalised query embeddings.
            k: results per query.
            min_score: drop results below this similarity.
            nprobe: IVF lists visited per shard (recall/speed trade-off).
            ef_search: HNSW search breadth.
        """
        queries = self._check_queries(queries)
        per_query: list[list[tuple[float, _Shard, int]]] = [[] for _ in range(len(queries))]
        for shard in self._shards.values():
            if shard.index.ntotal == 0:
                continue
            _set_search_params(shard.index, nprobe, ef_search)
            scores, positions = shard.index.search(queries, min(k, shard.index.ntotal))
            for q in range(len(queries)):
                per_query[q].extend((float(s), shard, int(p)) for s, p in zip(scores[q], positions[q]) if p >= 0)
        results = []
        for candidates in per_query:
            candidates.sort(key=lambda c: -c[0])
            results.append(_threshold([shard.hit(pos, score) for score, shard, pos in candidates[:k]], min_score))
        return results

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dim}")
        return queries


def _threshold(hits: list[Hit], min_score: float | None) -> list[Hit]:
    return hits if min_score is None else [h for h in hits if h.score >= min_score]


def _ivf_of(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def _set_search_params(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    try:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(nprobe, ivf.nlist)
    except (RuntimeError, TypeError):
        pass
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = ef_search


def _load_shard(directory: Path, number: int, entry: dict, verify: bool, gpu: bool) -> _Shard:
    for name, facts in entry["files"].items():
        path = directory / name
        if not path.is_file():
            raise IndexIntegrityError(f"index file {path} is missing")
        if path.stat().st_size != facts["bytes"]:
            raise IndexIntegrityError(f"index file {path} is truncated or altered: "
                                      f"{path.stat().st_size} bytes, manifest says {facts['bytes']}")
        if verify and sha256_file(path) != facts["sha256"]:
            raise IndexIntegrityError(f"index file {path} is corrupted: its sha256 does not match the manifest")
    try:
        vectors = np.load(directory / "vectors.npy", mmap_mode="r")
        rows = pq.read_table(directory / "rows.parquet", memory_map=True)
        index = faiss.read_index(str(directory / "index.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except (OSError, ValueError, RuntimeError, pa.ArrowException) as exc:
        raise IndexIntegrityError(f"cannot read shard {directory}: {exc}") from None
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if not (len(vectors) == rows.num_rows == index.ntotal == entry["rows"]):
        raise IndexIntegrityError(f"shard {directory}: vectors {len(vectors)}, rows {rows.num_rows}, "
                                  f"index {index.ntotal}, manifest {entry['rows']} disagree")
    return _Shard(number, vectors, rows.column("id").to_numpy(), rows.column("uri").combine_chunks(),
                  rows.column("label").combine_chunks(), rows.column("class").to_numpy(), index)


# --------------------------------------------------------------------------------------------
# Build and append (the orchestration; jobs/build_index.py adds the CLI and Ray)


def _shard_dir(index_dir: Path, number: int) -> Path:
    return index_dir / "shards" / f"{number:04d}"


def _shard_jobs_map(jobs: list[tuple], mapper) -> list[dict]:
    return list(mapper(lambda job: build_shard_from_bucket(*job), jobs))


def build_index(embeddings_dir: str | Path, index_dir: str | Path, config: IndexConfig = IndexConfig(),
                dtype: str = "float32", mapper=map) -> dict:
    """Builds a class-sharded index from an embedding job's output.

    Args:
        embeddings_dir: the ``--output`` folder of ``jobs.embed``.
        index_dir: where the index goes (must not hold an index yet).
        config: sharding and global index settings.
        dtype: storage type of the vectors (``float32`` or ``float16``).
        mapper: ``map``-like callable running the per-shard builds (e.g. in parallel on Ray).

    Returns:
        the index manifest.

    Raises:
        FileExistsError: ``index_dir`` already holds an index (append to it, or pick a new folder).
    """
    embeddings_dir, index_dir = Path(embeddings_dir), Path(index_dir)
    if (index_dir / "manifest.json").exists():
        raise FileExistsError(f"{index_dir} already holds an index; use append (--append) or a new folder")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    parts, source = embedding_parts(embeddings_dir)
    counts = count_classes(parts)
    shards = plan_shards(counts, config.shard_size)
    shard_of = {cls: s for s, classes in enumerate(shards) for cls in classes}
    scratch = index_dir / ".build-tmp"
    try:
        buckets, dim = write_buckets(parts, scratch, shard_of)
        dim = dim or int(source["models"]["embedder"]["dim"])
        jobs = [(buckets[s], _shard_dir(index_dir, s), config, dtype) for s in range(len(shards))]
        entries = _shard_jobs_map(jobs, mapper)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return write_index_manifest(index_dir, entries, source, config, dim, dtype, [str(embeddings_dir.resolve())])


def append_index(embeddings_dir: str | Path, index_dir: str | Path, mapper=map) -> dict:
    """Adds a new embedding output to an existing index, rebuilding only the shards it touches.

    Rows whose id is already indexed are skipped; images of known classes go to their class's shard
    (which may then exceed ``shard_size``; rebuild from scratch to re-balance); new classes get new
    shards. The result answers searches exactly as an index built from both outputs at once.

    Raises:
        FileNotFoundError: no index at ``index_dir``.
        ValueError: the new embeddings were made with other models.
    """
    embeddings_dir, index_dir = Path(embeddings_dir), Path(index_dir)
    manifest_path = index_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found; build the index first")
    old = json.loads(manifest_path.read_text())
    parts, source = embedding_parts(embeddings_dir)
    diffs = models_match(old["models"], {role: m["spec"] for role, m in source["models"].items()})
    if diffs:
        raise ValueError(f"{embeddings_dir} was embedded with other models than {index_dir}: {'; '.join(diffs)}")
    config = IndexConfig(**old["config"])
    known_ids = np.sort(np.concatenate([pq.read_table(index_dir / s["path"] / "rows.parquet", columns=["id"])
                                        ["id"].to_numpy() for s in old["shards"]] or [np.zeros(0, np.int64)]))
    counts = count_classes(parts, known_ids)
    old_map = {int(c): v for c, v in old["classes"].items()}
    shard_of = {cls: old_map[cls][0] for cls in counts if cls in old_map}
    new_classes = {cls: n for cls, n in counts.items() if cls not in old_map}
    first_new = len(old["shards"])
    for offset, classes in enumerate(plan_shards(new_classes, config.shard_size)):
        shard_of.update({cls: first_new + offset for cls in classes})
    scratch = index_dir / ".append-tmp"
    try:
        buckets, _ = write_buckets(parts, scratch, shard_of, known_ids)
        jobs = [(bucket, _shard_dir(index_dir, s), config, old["vector_dtype"],
                 _shard_dir(index_dir, s) if s < first_new else None) for s, bucket in sorted(buckets.items())]
        rebuilt = dict(zip(sorted(buckets), _shard_jobs_map(jobs, mapper)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    entries = []
    for number in range(max([first_new - 1, *rebuilt]) + 1):
        if number in rebuilt:
            entries.append(rebuilt[number])
        else:
            entry = dict(old["shards"][number])
            entry["classes"] = {c: [v[1], v[2]] for c, v in old_map.items() if v[0] == number}
            entries.append(entry)
    return write_index_manifest(index_dir, entries, old, config, int(old["dim"]), old["vector_dtype"],
                                old["sources"] + [str(embeddings_dir.resolve())])
