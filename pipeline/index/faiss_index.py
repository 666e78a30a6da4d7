"""FAISS index types for a shard's global search and its head classes: the build settings, the
automatic choice by size, the construction, and the search parameters (``SearchParams``, the one
place they are set)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import faiss
import numpy as np

GLOBAL_INDEX_TYPES = ("auto", "flat", "hnsw-sq8", "ivf", "ivfpq", "hnsw")
#: "auto" keeps exact (flat) search for shards up to this many rows, HNSW over 8-bit codes above.
AUTO_FLAT_MAX_ROWS = 50_000
#: Classes with at least this many rows get their own HNSW index (``IndexConfig.head_min_rows``);
#: chosen with ``python -m jobs.benchmark index`` (docs/PERFORMANCE.md, "Index at scale").
HEAD_MIN_ROWS = 5_000


@dataclass(frozen=True)
class IndexConfig:
    """How an index is built.

    Attributes:
        shard_size: most rows per shard (a class larger than this gets a shard of its own; classes
            are never split).
        global_index: ``auto``, ``flat``, ``hnsw-sq8`` (HNSW graph over 8-bit scalar-quantised
            codes; results re-scored exactly from ``vectors.npy``), ``ivf``, ``ivfpq`` or ``hnsw``
            (HNSW over float32 copies).
        head_min_rows: classes with at least this many rows get their own ``hnsw-sq8`` index for
            class-restricted search (smaller classes are scanned exactly); None: none.
        nlist: IVF lists (None: about 4 * sqrt(rows), at most rows / 39).
        pq_m: IVF-PQ sub-quantisers (must divide the dimension).
        hnsw_m: HNSW graph degree.
        ef_construction: HNSW build breadth. 200 (not FAISS's 40 or the 80 used before): a better
            graph reaches recall@10 0.95 at about a third of the search breadth, which is what keeps
            global search >= 10x exact on CPUs with slow memory (docs/PERFORMANCE.md); the build
            takes about twice as long.
        train_size: vectors sampled to train IVF and scalar quantisers.
        seed: sampling seed.
    """

    shard_size: int = 1_000_000
    global_index: str = "auto"
    head_min_rows: int | None = HEAD_MIN_ROWS
    nlist: int | None = None
    pq_m: int = 32
    hnsw_m: int = 32
    ef_construction: int = 200
    train_size: int = 100_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.global_index not in GLOBAL_INDEX_TYPES:
            raise ValueError(f"global_index must be one of {GLOBAL_INDEX_TYPES}, got {self.global_index!r}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist must be >= 1, got {self.nlist}")
        if self.head_min_rows is not None and self.head_min_rows < 1:
            raise ValueError(f"head_min_rows must be >= 1 (or None for no head indexes), got {self.head_min_rows}")


@dataclass(frozen=True)
class SearchParams:
    """How approximate indexes are searched; the one place these are set. An index records the ones
    it was built with (manifest ``search``); ``ShardedIndex.load(search=...)`` overrides them.

    The defaults are the ones ``python -m jobs.benchmark index`` chose on 1M vectors
    (docs/PERFORMANCE.md, "Index at scale"): a global breadth with recall@10 above 0.95 with some
    margin on graphs built with efConstruction 200 (128: 0.960 with 10 % of the rows deleted), and
    the largest head breadth whose class searches keep p99 under 1 ms.

    Attributes:
        ef_search: HNSW search breadth of the global indexes.
        head_ef_search: HNSW search breadth of the head classes' own indexes.
        nprobe: IVF lists visited per shard.
        refine: an approximate index returns ``refine * k`` candidates, re-scored exactly from
            ``vectors.npy`` (so every score is an exact similarity) and the best k kept. (Indexes
            written before this name record it as ``rerank``, which is read as ``refine``.)
    """

    ef_search: int = 128
    head_ef_search: int = 128
    nprobe: int = 32
    refine: int = 4

    def __post_init__(self) -> None:
        for name in ("ef_search", "head_ef_search", "nprobe", "refine"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_json(cls, raw: dict | None) -> "SearchParams":
        raw = dict(raw or {})
        if "rerank" in raw:  # the earlier name of ``refine``
            raw["refine"] = raw.pop("rerank")
        return cls(**raw)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def candidates(self, k: int) -> int:
        """How many candidates to take from an approximate index for ``k`` results."""
        return k * self.refine

    def faiss_params(self, index: faiss.Index, n: int, head: bool = False,
                     sel: faiss.IDSelector | None = None) -> faiss.SearchParameters | None:
        """Per-call FAISS parameters for taking ``n`` results from ``index`` (a head class's index
        when ``head``), skipping the ids ``sel`` rejects (deleted rows: the search itself walks
        past them, no over-fetching); None: it needs none. Passed with each search, so concurrent
        searches never change a shared index."""
        extra = {} if sel is None else {"sel": sel}
        if hasattr(index, "hnsw"):
            return faiss.SearchParametersHNSW(efSearch=max(self.head_ef_search if head else self.ef_search, n), **extra)
        ivf = ivf_of(index)
        if ivf is not None:
            return faiss.SearchParametersIVF(nprobe=min(self.nprobe, ivf.nlist), **extra)
        return faiss.SearchParameters(**extra) if extra else None


def head_file(cls: int) -> str:
    """The file of a head class's own index inside its shard folder."""
    return f"head-{cls:06d}.faiss"


def nlist_for(rows: int, config: IndexConfig) -> int:
    if config.nlist:
        return max(1, min(config.nlist, rows))
    # ~4 sqrt(n) lists, and enough training points per list (FAISS wants >= 39 each).
    return max(1, min(int(4 * math.sqrt(rows)), min(rows, config.train_size) // 39))


def choose_index_type(rows: int, config: IndexConfig) -> str:
    """The global index type for a shard of ``rows`` vectors."""
    if config.global_index != "auto":
        return config.global_index
    return "flat" if rows <= AUTO_FLAT_MAX_ROWS else "hnsw-sq8"


def is_exact(kind: str) -> bool:
    """Whether an index of this kind returns exact scores (no re-scoring needed)."""
    return kind == "flat"


def build_faiss_index(vectors: np.ndarray, kind: str, config: IndexConfig) -> faiss.Index:
    """Builds an inner-product FAISS index of ``kind`` over ``vectors`` (float32, L2-normalised)."""
    rows, dim = vectors.shape
    if kind == "flat" or rows == 0:
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
    elif kind == "hnsw-sq8":
        index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.train(_training_sample(vectors, config))
    elif kind in ("ivf", "ivfpq"):
        nlist = nlist_for(rows, config)
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            if dim % config.pq_m:
                raise ValueError(f"pq_m={config.pq_m} must divide the dimension {dim}")
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, config.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(_training_sample(vectors, config))
        index.quantizer_trains_alone = 0
    else:
        raise ValueError(f"unknown index type {kind!r}")
    # HNSW takes all rows in one call: FAISS then inserts them by decreasing level, so the upper
    # layers span every class. Added in chunks of class-sorted rows, they would span the first
    # chunk's classes only (recall@10 0.90 instead of 0.96 on the 300k benchmark).
    step = rows if kind in ("hnsw", "hnsw-sq8") else 100_000
    for start in range(0, rows, max(step, 1)):
        index.add(np.ascontiguousarray(vectors[start : start + step], dtype=np.float32))
    return index


def _training_sample(vectors: np.ndarray, config: IndexConfig) -> np.ndarray:
    rows = len(vectors)
    if rows > config.train_size:
        vectors = vectors[np.sort(np.random.default_rng(config.seed).choice(rows, config.train_size, replace=False))]
    return np.ascontiguousarray(vectors, dtype=np.float32)


def ivf_of(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def faiss_uses_gpu(use_gpu: str) -> bool:
    if use_gpu not in ("auto", "yes", "no"):
        raise ValueError(f"use_gpu must be auto, yes or no, got {use_gpu!r}")
    available = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if use_gpu == "yes" and not available:
        raise ValueError("use_gpu='yes' but FAISS sees no GPU (install the gpu extra: faiss-gpu)")
    return available and use_gpu != "no"
