"""Retrieval-quality evaluation: the seeded per-class split, the metric rows of every search
strategy, the worst classes, the markdown table and the result grids. ``jobs/evaluate.py`` wires
these to the embedding job, the index and :class:`pipeline.search.QueryEngine`.
"""

from __future__ import annotations

import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.grids import draw_grid, result_tiles
from pipeline.images import decode_image
from pipeline.metrics import map_at_k, precision_at_k, recall_at_k
from pipeline.models import DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER, CropPolicy, crop_image
from pipeline.sources import read_uri


@dataclass(frozen=True)
class EvalConfig:
    """The settings of one evaluation (written to ``OUT/config.json``)."""

    output: str
    data: str | None = None
    dataset: str | None = None
    per_class: int | None = None
    queries_per_class: int = 20
    seed: int = 0
    classifier: str = DEFAULT_CLASSIFIER
    embedder: str = DEFAULT_EMBEDDER
    finetuned: str | None = None
    detector: str | None = None
    crop_min_score: float = CropPolicy.min_score
    top_n: int = 3
    ks: tuple[int, ...] = (1, 3, 5)
    batch_size: int = 32
    grids: int = 0
    worst: int = 5

    def __post_init__(self) -> None:
        if (self.data is None) == (self.dataset is None):
            raise ValueError("give either --data FOLDER or --dataset NAME")
        if self.queries_per_class < 1 or self.top_n < 1 or self.batch_size < 1:
            raise ValueError("--queries-per-class, --top-n and --batch-size must be >= 1")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"--k values must be >= 1, got {self.ks}")
        if self.per_class is not None and self.per_class <= self.queries_per_class:
            raise ValueError("--per-class must exceed --queries-per-class (the rest is the gallery)")
        if self.grids < 0 or self.worst < 0:
            raise ValueError("--grids and --worst must be >= 0")
        CropPolicy(min_score=self.crop_min_score)


def split(labels: list[str], queries_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split: ``queries_per_class`` query indices per class, the rest gallery.

    Raises:
        ValueError: a class has no image left for the gallery.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    queries = []
    for label in sorted(set(labels)):
        members = np.flatnonzero(labels_arr == label)
        if len(members) <= queries_per_class:
            raise ValueError(f"class {label!r} has {len(members)} images; it needs more than "
                             f"--queries-per-class {queries_per_class} so that some stay in the gallery")
        queries.append(rng.choice(members, size=queries_per_class, replace=False))
    query_idx = np.sort(np.concatenate(queries))
    return query_idx, np.setdiff1d(np.arange(len(labels)), query_idx)


def link_gallery(out: Path, paths: list[str], labels: list[str], gallery: np.ndarray) -> Path:
    """``OUT/gallery/<label>/<file>`` as symbolic links to the gallery images (rebuilt each run)."""
    root = out / "gallery"
    wanted = {}
    for i in gallery:
        source = Path(paths[i]).resolve()
        wanted[root / labels[i] / f"{i:06d}{source.suffix.lower()}"] = source
    if root.is_dir():
        for existing in root.glob("*/*"):
            if existing not in wanted:
                existing.unlink()
    for link, source in wanted.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink() or Path(os.readlink(link)) != source:
            link.unlink(missing_ok=True)
            link.symlink_to(source)
    return root


def metrics_row(retrieved: np.ndarray, query_labels: np.ndarray, n_relevant: np.ndarray,
                ks: tuple[int, ...]) -> dict[str, float]:
    """mAP@k, precision@k and recall@k for every k (retrieved: (Q, max k) labels, None-padded)."""
    row = {}
    for k in ks:
        row[f"mAP@{k}"] = round(map_at_k(retrieved, query_labels, n_relevant, k), 4)
    for k in ks:
        row[f"P@{k}"] = round(precision_at_k(retrieved, query_labels, k), 4)
        row[f"R@{k}"] = round(recall_at_k(retrieved, query_labels, n_relevant, k), 4)
    return row


def worst_classes(retrieved: np.ndarray, query_labels: np.ndarray, n_relevant: np.ndarray, k: int,
                  count: int) -> list[dict]:
    """The ``count`` classes with the lowest mAP@k, with the labels most often returned instead."""
    rows = []
    for label in sorted(set(query_labels)):
        mask = query_labels == label
        wrong = Counter(x for x in retrieved[mask, :k].ravel() if x is not None and x != label)
        rows.append({"class": label, "queries": int(mask.sum()),
                     f"mAP@{k}": round(map_at_k(retrieved[mask], query_labels[mask], n_relevant[mask], k), 4),
                     "confused_with": [name for name, _ in wrong.most_common(3)]})
    return sorted(rows, key=lambda r: r[f"mAP@{k}"])[:count]


def evaluate_engine(engine, images: list[bytes], query_labels: np.ndarray, n_relevant: np.ndarray,
                    config: EvalConfig, crop: bool) -> list[dict]:
    """Every search mode for one engine (one embedder) and one crop setting."""
    k_max = max(config.ks)
    start = time.perf_counter()
    encoded = [engine.encode(images[i: i + config.batch_size], crop=crop)
               for i in range(0, len(images), config.batch_size)]
    encode_s = time.perf_counter() - start
    boxes = sum(box is not None for e in encoded for box in e.boxes)
    strategies = [("global", "global", 1), ("class@1", "class", 1)]
    if config.top_n > 1:
        strategies.append((f"class@{config.top_n}", "class", config.top_n))
    rows = []
    for name, mode, top_n in strategies:
        start = time.perf_counter()
        results = [r for e in encoded for r in engine.answer(e, k_max, mode, top_n=top_n)]
        search_s = time.perf_counter() - start
        retrieved = np.full((len(results), k_max), None, dtype=object)
        for q, result in enumerate(results):
            for j, hit in enumerate(result.hits[:k_max]):
                retrieved[q, j] = hit.label
        rows.append({"strategy": name, "crop": "on" if crop else "off",
                     **metrics_row(retrieved, query_labels, n_relevant, config.ks),
                     "queries_per_s": round(len(images) / (encode_s + search_s), 2),
                     "cropped_queries": int(boxes),
                     "worst_classes": worst_classes(retrieved, query_labels, n_relevant, k_max, config.worst),
                     "_results": results})
    return rows


def write_grids(out: Path, row: dict, query_paths: list[str], query_labels: np.ndarray, count: int,
                k: int) -> list[str]:
    """PNGs of ``count`` queries (spread over the classes) beside their top-k results."""
    order = np.argsort([zlib.crc32(Path(p).name.encode()) for p in query_paths], kind="stable")  # class-mixing
    chosen = sorted(set(order[:count].tolist()))
    written = []
    for q in chosen:
        result = row["_results"][q]
        query = crop_image(decode_image(read_uri(query_paths[q])), result.crop_box)
        hits = [(decode_image(read_uri(h.uri)), h.label, h.score) for h in result.hits[:k]]
        name = f"{row['embedder']}_{row['strategy'].replace('@', '-top')}_crop-{row['crop']}_{q:05d}.png"
        path = out / "grids" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_grid(result_tiles(query, str(query_labels[q]), hits), k=k).save(path)
        written.append(str(path))
    return written


def markdown_table(rows: list[dict], ks: tuple[int, ...], title: str) -> str:
    k_max = max(ks)
    columns = ["embedder", "crop", "strategy", *[f"mAP@{k}" for k in ks], f"P@{k_max}", f"R@{k_max}",
               "queries/s"]
    lines = [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        values = [r["embedder"], r["crop"], r["strategy"], *[f"{r[f'mAP@{k}']:.4f}" for k in ks],
                  f"{r[f'P@{k_max}']:.4f}", f"{r[f'R@{k_max}']:.4f}", f"{r['queries_per_s']:.1f}"]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"
