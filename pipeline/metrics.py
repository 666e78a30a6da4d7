"""Retrieval metrics: mAP@k, precision@k, recall@k.

Definitions (relevance = the retrieved item has the query's label):

* ``rel_i`` is 1 when the i-th retrieved item (1-based, i <= k) is relevant, else 0.
* ``P@i = (rel_1 + ... + rel_i) / i``.
* ``AP@k = sum_{i<=k} P@i * rel_i / min(k, R)`` where R is the number of relevant items in the
  gallery for that query. Dividing by ``min(k, R)`` makes a perfect top-k list score 1 even when
  R > k, and a query whose class has fewer than k gallery items is not penalised for the
  missing ones. A query with R = 0 has AP@k = 0.
* ``mAP@k`` is the mean of AP@k over queries.
* ``precision@k = (rel_1 + ... + rel_k) / k``; ``recall@k = (rel_1 + ... + rel_k) / R`` (0 when R = 0).

Retrieved lists shorter than k (fewer results returned) count the missing positions as
non-relevant.
"""

from __future__ import annotations

import numpy as np


def _relevance(retrieved_labels: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) 0/1 matrix; positions beyond the returned list (or padded with None/-1) are 0."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    retrieved = np.asarray(retrieved_labels, dtype=object)
    if retrieved.ndim != 2:
        raise ValueError(f"retrieved_labels must be 2-D (queries, results), got shape {retrieved.shape}")
    queries = np.asarray(query_labels, dtype=object).reshape(-1)
    if len(queries) != len(retrieved):
        raise ValueError(f"{len(queries)} query labels but {len(retrieved)} result lists")
    top = retrieved[:, :k]
    rel = np.zeros((len(queries), k), dtype=np.float64)
    rel[:, : top.shape[1]] = top == queries[:, None]
    return rel


def _relevant_counts(n_relevant: np.ndarray | list[int], n_queries: int) -> np.ndarray:
    counts = np.asarray(n_relevant, dtype=np.float64).reshape(-1)
    if len(counts) != n_queries:
        raise ValueError(f"{n_queries} queries but {len(counts)} relevant counts")
    if (counts < 0).any():
        raise ValueError("relevant counts must be >= 0")
    return counts


def average_precision_at_k(retrieved_labels: np.ndarray, query_labels: np.ndarray,
                           n_relevant: np.ndarray | list[int], k: int) -> np.ndarray:
    """AP@k of each query (see the module docstring for the definition).

    Args:
        retrieved_labels: (queries, results) labels of the retrieved items, best first.
        query_labels: (queries,) label of each query.
        n_relevant: (queries,) number of gallery items sharing each query's label.
        k: cut-off.

    Returns:
        float64 array (queries,).
    """
    rel = _relevance(retrieved_labels, query_labels, k)
    counts = _relevant_counts(n_relevant, len(rel))
    precision_at_i = rel.cumsum(axis=1) / np.arange(1, k + 1)
    denom = np.minimum(k, counts)
    summed = (precision_at_i * rel).sum(axis=1)
    return np.divide(summed, denom, out=np.zeros_like(summed), where=denom > 0)


def map_at_k(retrieved_labels: np.ndarray, query_labels: np.ndarray,
             n_relevant: np.ndarray | list[int], k: int) -> float:
    """Mean of :func:`average_precision_at_k` over queries."""
    return float(average_precision_at_k(retrieved_labels, query_labels, n_relevant, k).mean())


def precision_at_k_per_query(retrieved_labels: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
    """Each query's fraction of the top k that are relevant."""
    return _relevance(retrieved_labels, query_labels, k).mean(axis=1)


def recall_at_k_per_query(retrieved_labels: np.ndarray, query_labels: np.ndarray,
                          n_relevant: np.ndarray | list[int], k: int) -> np.ndarray:
    """Each query's fraction of its relevant gallery items found in the top k (0 when it has none)."""
    rel = _relevance(retrieved_labels, query_labels, k)
    counts = _relevant_counts(n_relevant, len(rel))
    hits = rel.sum(axis=1)
    return np.divide(hits, counts, out=np.zeros_like(hits), where=counts > 0)


def precision_at_k(retrieved_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Mean fraction of the top k that are relevant."""
    return float(precision_at_k_per_query(retrieved_labels, query_labels, k).mean())


def recall_at_k(retrieved_labels: np.ndarray, query_labels: np.ndarray,
                n_relevant: np.ndarray | list[int], k: int) -> float:
    """Mean fraction of each query's relevant gallery items found in the top k."""
    return float(recall_at_k_per_query(retrieved_labels, query_labels, n_relevant, k).mean())
