"""FAISS index types for a shard's global search: the settings, the automatic choice by size, the
construction, and the search parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

GLOBAL_INDEX_TYPES = ("auto", "flat", "ivf", "ivfpq", "hnsw")
#: "auto" keeps exact (flat) search for shards up to this many rows, IVF above.
AUTO_FLAT_MAX_ROWS = 50_000
#: "auto" switches from IVF-Flat to IVF-PQ above this many rows per shard.
AUTO_IVFPQ_MIN_ROWS = 5_000_000


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


def nlist_for(rows: int, config: IndexConfig) -> int:
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
        nlist = nlist_for(rows, config)
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


def ivf_of(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def set_search_params(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    try:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(nprobe, ivf.nlist)
    except (RuntimeError, TypeError):
        pass
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = ef_search



def faiss_uses_gpu(use_gpu: str) -> bool:
    if use_gpu not in ("auto", "yes", "no"):
        raise ValueError(f"use_gpu must be auto, yes or no, got {use_gpu!r}")
    available = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if use_gpu == "yes" and not available:
        raise ValueError("use_gpu='yes' but FAISS sees no GPU (install the gpu extra: faiss-gpu)")
    return available and use_gpu != "no"
