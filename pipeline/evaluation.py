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
from pipeline.metrics import (
    average_precision_at_k,
    map_at_k,
    precision_at_k,
    precision_at_k_per_query,
    recall_at_k,
    recall_at_k_per_query,
)
from pipeline.models import DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER, CropPolicy, crop_image
from pipeline.search import Encoded, class_answers
from pipeline.sources import read_uri
from pipeline.strategy import Strategy


@dataclass(frozen=True)
class EvalConfig:
    """The settings of one evaluation (written to ``OUT/config.json``)."""

    output: str
    data: str | None = None
    dataset: str | None = None
    per_class: int | None = None
    queries_per_class: int = 20
    seed: int = 0
    classifier: str = DEFAULT_CLASSIFIER   # a timm spec, or "head": one fitted on the gallery split
    classes: str | None = None       # the index's partition: labels, predicted, None: jobs.build_index's rule
    embedder: str = DEFAULT_EMBEDDER
    finetuned: str | None = None
    detector: str | None = None
    crop_min_score: float = CropPolicy.min_score
    top_n: int = 3
    ks: tuple[int, ...] = (1, 3, 5)
    batch_size: int = 32
    grids: int = 0
    worst: int = 5
    metric: str | None = None       # what calibration maximises (default: mAP at the largest k)
    recommend: str | None = None    # write the recommended strategy to this file
    min_gain: float = 0.0           # least gain over global (its lower confidence bound) to recommend another
    confidence: float = 0.95        # of that bound (paired bootstrap over the queries; 0: the measured gain)

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
        if self.classes not in (None, "labels", "predicted"):
            raise ValueError(f"--classes must be labels or predicted, got {self.classes!r}")
        if not 0 <= self.confidence < 1:
            raise ValueError(f"--confidence must be in [0, 1), got {self.confidence}")
        if self.top_n > 5:
            raise ValueError(f"--top-n must be 1 to 5 (the classes a query keeps), got {self.top_n}")
        name, _, k = self.target_metric.partition("@")
        if name not in ("mAP", "P", "R") or not k.isdigit() or int(k) not in self.ks:
            raise ValueError(f"--metric must be mAP@k, P@k or R@k with k one of {self.ks}, got {self.metric!r}")
        CropPolicy(min_score=self.crop_min_score)

    @property
    def target_metric(self) -> str:
        """What calibration maximises: ``metric``, or mAP at the largest k."""
        return self.metric or f"mAP@{max(self.ks)}"


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


#: rerank's weights of the query's class probability swept by the calibration.
RERANK_BETAS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def strategy_grid(top1: np.ndarray, top_n: int) -> list[Strategy]:
    """The strategies a calibration sweeps, simplest first: global, class@1, class@N, gated@1 and
    gated@N at thresholds between the 5 % and 95 % quantiles of the queries' top-1 probabilities,
    and rerank at :data:`RERANK_BETAS`."""
    taus = sorted({round(float(t), 4) for t in np.quantile(top1, np.linspace(0.05, 0.95, 19))} - {0.0})
    grid = [Strategy(), Strategy("class", 1)] + ([Strategy("class", top_n)] if top_n > 1 else [])
    for n in dict.fromkeys((1, top_n)):
        grid += [Strategy("gated", n, tau=t) for t in taus]
    return grid + [Strategy("rerank", beta=b) for b in RERANK_BETAS]


def calibration_folds(query_labels: np.ndarray, seed: int) -> np.ndarray:
    """Fold 0 or 1 per query: each class's queries, shuffled (seeded), alternate between the folds."""
    rng = np.random.default_rng(seed + 1)
    folds = np.zeros(len(query_labels), dtype=int)
    for label in sorted(set(query_labels)):
        members = rng.permutation(np.flatnonzero(query_labels == label))
        folds[members[1::2]] = 1
    return folds


def best_strategy(scores: list[float]) -> int:
    """The index of the best score; the earliest (simplest) among equals."""
    return int(np.argmax(np.round(scores, 10)))


#: Bootstrap resamples of the recommendation's confidence bounds.
RESAMPLES = 2000


def gain_bounds(per_query: np.ndarray, confidence: float, seed: int = 0) -> np.ndarray:
    """Lower confidence bounds on each strategy's mean gain over global (row 0), all at once.

    A paired bootstrap over the queries: the queries are resampled with replacement
    :data:`RESAMPLES` times, and the bound of every strategy is its measured gain minus the
    ``confidence`` quantile of the largest overshoot of any strategy's resampled gain. So with
    probability about ``confidence`` every bound holds at the same time: picking the best of a
    sweep of many strategies does not make a lucky one look real.

    Args:
        per_query: (strategies, queries) the metric of each query under each strategy; row 0 is global.
        confidence: 0 gives the measured gains themselves.
        seed: of the resampling.
    """
    per_query = np.asarray(per_query, dtype=np.float64)
    return _lower_bounds(per_query - per_query[0], confidence, seed)


def _lower_bounds(diffs: np.ndarray, confidence: float, seed: int) -> np.ndarray:
    """Simultaneous lower confidence bounds on the means of the rows of ``diffs`` (rows, queries)."""
    measured = diffs.mean(axis=1) if diffs.shape[1] else np.zeros(len(diffs))
    if confidence <= 0 or diffs.shape[1] == 0:
        return measured
    queries = diffs.shape[1]
    counts = np.random.default_rng(seed).multinomial(queries, np.full(queries, 1 / queries), size=RESAMPLES)
    overshoot = (counts @ diffs.T / queries - measured).max(axis=1)
    return measured - np.quantile(overshoot, confidence)


def recommend(per_query: np.ndarray, min_gain: float = 0.0, confidence: float = 0.95, seed: int = 0) -> int:
    """The strategy to recommend (an index into the sweep, whose row 0 is global and whose order is
    simplest first).

    The candidates are global and the strategies whose gain over global has a lower confidence bound
    (:func:`gain_bounds`) above ``min_gain``. Among them, the simplest (earliest) one that is not
    significantly worse than the best of them (the lower bound of the best's gain over it is not
    above 0) is recommended: on a few queries no gain is significant and the answer is
    global, on many a real gain is picked up, and of several strategies that measure the same
    within the noise the simplest wins.
    """
    per_query = np.asarray(per_query, dtype=np.float64)
    bounds = gain_bounds(per_query, confidence, seed)
    candidates = [0] + [s for s in range(1, len(per_query)) if bounds[s] > min_gain]
    if len(candidates) == 1 or per_query.shape[1] == 0:
        return 0
    means = per_query.mean(axis=1)
    best = candidates[best_strategy([means[s] for s in candidates])]
    behind = _lower_bounds(per_query[best] - per_query[candidates], confidence, seed + 1)
    return next(s for s, bound in zip(candidates, behind) if bound <= 0)


def retrieved_labels(results: list, k: int) -> np.ndarray:
    retrieved = np.full((len(results), k), None, dtype=object)
    for q, result in enumerate(results):
        for j, hit in enumerate(result.hits[:k]):
            retrieved[q, j] = hit.label
    return retrieved


def evaluate_engine(engine, images: list[bytes], query_labels: np.ndarray, n_relevant: np.ndarray,
                    config: EvalConfig, crop: bool) -> tuple[list[dict], dict]:
    """Every strategy of the sweep for one engine (one embedder) and one crop setting.

    Returns:
        The table's rows — global, class@1, class@N, the best gated and rerank settings (chosen on
        all queries) and ``calibrated``: per half of the queries, the setting recommended on the
        other half (a held-out estimate of what calibration gives) — and the calibration: the sweep,
        the best setting per metric, and the setting recommended for ``config.metric``
        (:func:`recommend`: the best one whose gain over global is significant at
        ``config.confidence``, else global).
    """
    k_max = max(config.ks)
    start = time.perf_counter()
    batches = [engine.encode(images[i: i + config.batch_size], crop=crop)
               for i in range(0, len(images), config.batch_size)]
    encoded = Encoded(*(np.concatenate([getattr(b, f) for b in batches]) for f in ("classes", "probs", "vectors")),
                      [box for b in batches for box in b.boxes])
    encode_s = time.perf_counter() - start
    boxes = sum(box is not None for box in encoded.boxes)
    classes = class_answers(engine.models.classifier.labels, encoded.classes, encoded.probs)
    grid = strategy_grid(np.array([row[0]["probability"] for row in classes]), config.top_n)
    runs = []
    for strategy in grid:
        start = time.perf_counter()
        results = engine.answer(encoded, k_max, strategy)
        seconds = time.perf_counter() - start
        retrieved = retrieved_labels(results, k_max)
        runs.append({"strategy": strategy, "results": results, "retrieved": retrieved, "search_s": seconds,
                     "metrics": metrics_row(retrieved, query_labels, n_relevant, config.ks),
                     "class_searches": sum(strategy.wants_class(row) for row in classes)})
    metric = config.target_metric
    scores = [run["metrics"][metric] for run in runs]
    per_query = np.stack([metric_per_query(run["retrieved"], query_labels, n_relevant, metric) for run in runs])

    def choose(queries: np.ndarray | slice) -> int:
        return recommend(per_query[:, queries], config.min_gain, config.confidence, config.seed)

    folds = calibration_folds(query_labels, config.seed)
    held_out = np.full((len(images), k_max), None, dtype=object)
    chosen = []
    for fold in (0, 1):  # chosen on one half by the same rule, measured on the other
        pick = choose(folds != fold)
        chosen.append(str(grid[pick]))
        held_out[folds == fold] = runs[pick]["retrieved"][folds == fold]

    def row(name: str, run: dict, retrieved: np.ndarray | None = None) -> dict:
        retrieved = run["retrieved"] if retrieved is None else retrieved
        return {"strategy": name, "crop": "on" if crop else "off",
                **(run["metrics"] if retrieved is run["retrieved"]
                   else metrics_row(retrieved, query_labels, n_relevant, config.ks)),
                "queries_per_s": round(len(images) / (encode_s + run["search_s"]), 2),
                "class_searches": run["class_searches"], "cropped_queries": int(boxes),
                "worst_classes": worst_classes(retrieved, query_labels, n_relevant, k_max, config.worst),
                "_results": run["results"]}

    rows = [row(str(run["strategy"]), run) for run in runs if run["strategy"].kind in ("global", "class")]
    for kind in ("gated", "rerank"):
        candidates = [i for i, run in enumerate(runs) if run["strategy"].kind == kind]
        best = candidates[best_strategy([scores[i] for i in candidates])]
        rows.append(row(str(runs[best]["strategy"]), runs[best]))
    recommended = grid[choose(slice(None))]
    rows.append(row("calibrated", runs[grid.index(recommended)], held_out) | {"chosen": chosen})
    calibration = {
        "metric": metric, "recommended": recommended.to_json(), "recommended_value": scores[grid.index(recommended)],
        "held_out_value": rows[-1][metric], "global_value": scores[0], "held_out_chosen": chosen,
        "best_per_metric": {m: {"strategy": str(grid[i]), "value": runs[i]["metrics"][m]}
                            for m in runs[0]["metrics"] if m.startswith("mAP")
                            for i in [best_strategy([run["metrics"][m] for run in runs])]},
        "confidence": config.confidence,
        "sweep": [{"strategy": str(run["strategy"]), "class_searches": run["class_searches"], **run["metrics"],
                   "gain_bound": round(float(bound), 6)}
                  for run, bound in zip(runs, gain_bounds(per_query, config.confidence, config.seed))]}
    return rows, calibration


def metric_per_query(retrieved: np.ndarray, query_labels: np.ndarray, n_relevant: np.ndarray,
                     metric: str) -> np.ndarray:
    """One metric (``mAP@k``: each query's AP@k, ``P@k`` or ``R@k``) of each query."""
    name, k = metric.split("@")
    k = int(k)
    if name == "mAP":
        return average_precision_at_k(retrieved, query_labels, n_relevant, k)
    if name == "P":
        return precision_at_k_per_query(retrieved, query_labels, k)
    return recall_at_k_per_query(retrieved, query_labels, n_relevant, k)


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


def calibration_table(calibrations: list[dict]) -> str:
    """The best setting per metric, and the recommended one, of each calibration."""
    lines = ["## Calibration: the best setting per metric (all queries)", "",
             "| embedder | crop | metric | best strategy | value | global |", "|---|---|---|---|---|---|"]
    for c in calibrations:
        globals_ = next(row for row in c["sweep"] if row["strategy"] == "global")
        for metric, best in c["best_per_metric"].items():
            lines.append(f"| {c['embedder']} | {c['crop']} | {metric} | {best['strategy']} | {best['value']:.4f} | "
                         f"{globals_[metric]:.4f} |")

    def setting(c: dict) -> str:
        head = "" if c.get("head_accuracy") is None else f"; head accuracy {c['head_accuracy']:.4f}"
        return f"{c['embedder']}, crop {c['crop']} (classes: {c.get('classes', 'predicted')}{head})"

    lines += [""] + [f"- {setting(c)}: recommended for {c['metric']}: "
                     f"**{c['recommended']['name']}** ({c['recommended_value']:.4f}); held out (each half with "
                     f"the other half's best: {' / '.join(c['held_out_chosen'])}): {c['held_out_value']:.4f}"
                     for c in calibrations]
    return "\n".join(lines) + "\n"
