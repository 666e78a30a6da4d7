"""Measure retrieval quality (mAP@k) of every search strategy on a labelled image set.

    python -m jobs.evaluate --data FOLDER | --dataset NAME  --output OUT
                            [--queries-per-class 20] [--finetuned SPEC] [--detector SPEC] [--grids 4]

The set (one sub-folder per class, or a named set: mnist5000, fashion-mnist, mnist:DIR, ... see
``pipeline.datasets``) is split per class, seeded: ``--queries-per-class`` images of each class are
held out as queries, the rest is the gallery (``OUT/gallery``, links to the files, and
``OUT/split.json``). The gallery goes through the product's own path — the embedding job on Ray,
then the class-sharded index — and every query through ``pipeline.search.QueryEngine``, as
``jobs.search`` and the service answer it. Strategies:

    global       embedding similarity over the whole gallery
    class@1      Approach 2: among the gallery images of the top predicted class
    class@N      among those of the top N predicted classes (--top-n)
  for the pretrained embedder and, with --finetuned, a triplet-trained one (``jobs.train_triplet
  --data OUT/gallery``); each with the detection crop off and, with --detector, on (queries cropped).

A result is relevant when its folder label equals the query's. Writes ``OUT/results.md`` (the
table: strategy x mAP@1/3/5, precision@k, recall@k, queries/s), ``OUT/results.json`` (with the
worst classes of every strategy) and, with --grids, PNGs of queries beside their top results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.datasets import DATASETS, list_labelled_images, write_dataset
from pipeline.files import write_json_atomically
from pipeline.metrics import map_at_k, precision_at_k, recall_at_k
from pipeline.models import DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER, CropPolicy

logger = logging.getLogger("jobs.evaluate")


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


def build_gallery_index(out: Path, gallery: Path, classifier: str, embedder: str, split_key: str) -> Path:
    """Runs the embedding job and builds the index for one embedder (reused when already built)."""
    from jobs.embed import EmbedConfig, run
    from pipeline.index import IndexConfig, build_index

    key = hashlib.sha1(f"{classifier}|{embedder}|{split_key}".encode()).hexdigest()[:12]
    folder = out / "runs" / key
    index = folder / "index"
    if (index / "manifest.json").is_file():
        return index
    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    summary = run(EmbedConfig(inputs=(str(gallery),), output=str(folder / "embedding-job"), classifier=classifier,
                              embedder=embedder, batch_size="auto"))
    logger.info("embedded the gallery with %s: %s", embedder, summary["counts"])
    build_index(folder / "embedding-job", index, IndexConfig())
    return index


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
    from pipeline.grids import draw_grid, result_tiles
    from pipeline.images import decode_image
    from pipeline.models import crop_image
    from pipeline.sources import read_uri

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


def run(config: EvalConfig) -> dict:
    """Splits, builds the gallery index per embedder, runs every strategy; writes the results."""
    from pipeline.models import load_detector, select_runtime
    from pipeline.search import QueryEngine

    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    if config.dataset:
        paths, labels = write_dataset(config.dataset, out / "data", per_class=config.per_class, seed=config.seed)
    else:
        paths, labels = list_labelled_images(Path(config.data))
    query_idx, gallery_idx = split(labels, config.queries_per_class, config.seed)
    split_key = hashlib.sha1(json.dumps([paths, labels, query_idx.tolist()]).encode()).hexdigest()[:12]
    gallery = link_gallery(out, paths, labels, gallery_idx)
    write_json_atomically({"seed": config.seed, "queries_per_class": config.queries_per_class,
                           "queries": [paths[i] for i in query_idx], "gallery": [paths[i] for i in gallery_idx],
                           "key": split_key}, out / "split.json")
    write_json_atomically(asdict(config), out / "config.json")
    query_labels = np.array([labels[i] for i in query_idx], dtype=object)
    gallery_counts = Counter(labels[i] for i in gallery_idx)
    n_relevant = np.array([gallery_counts[label] for label in query_labels])
    images = [Path(paths[i]).read_bytes() for i in query_idx]
    logger.info("%d classes: %d queries, %d gallery images", len(gallery_counts), len(query_idx), len(gallery_idx))

    runtime = select_runtime("auto")
    detector = load_detector(config.detector, runtime, policy=CropPolicy(min_score=config.crop_min_score)) \
        if config.detector else None
    embedders = [("pretrained", config.embedder)] + ([("finetuned", config.finetuned)] if config.finetuned else [])
    rows: list[dict] = []
    for role, spec in embedders:
        index = build_gallery_index(out, gallery, config.classifier, spec, split_key)
        engine = QueryEngine.load(str(index), runtime=runtime, top_n=config.top_n, detector=detector)
        for crop in (False, True) if detector else (False,):
            for row in evaluate_engine(engine, images, query_labels, n_relevant, config, crop):
                rows.append({"embedder": role, "embedder_spec": spec, **row})
    grids = []
    if config.grids:
        best = max(rows, key=lambda r: r[f"mAP@{max(config.ks)}"])
        for row in {id(r): r for r in (rows[0], best)}.values():
            grids += write_grids(out, row, [paths[i] for i in query_idx], query_labels, config.grids, max(config.ks))
    title = f"{config.dataset or config.data}: {len(query_idx)} queries, {len(gallery_idx)} gallery images, " \
            f"{len(gallery_counts)} classes"
    table = markdown_table(rows, config.ks, title)
    results = {"title": title, "classifier": config.classifier,
               "rows": [{k: v for k, v in r.items() if k != "_results"} for r in rows], "grids": grids}
    (out / "results.md").write_text(table)
    write_json_atomically(results, out / "results.json")
    return results


def parse_args(argv: list[str] | None) -> EvalConfig:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="folder with one sub-folder of images per class")
    source.add_argument("--dataset", help=f"a named set read from disk: {', '.join(DATASETS)}")
    parser.add_argument("--output", required=True, help="results folder")
    parser.add_argument("--per-class", type=int, help="--dataset: images per class to use (default: all)")
    parser.add_argument("--queries-per-class", type=int, default=20, help="held-out queries per class (default: 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier", default=DEFAULT_CLASSIFIER)
    parser.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="the pretrained embedder")
    parser.add_argument("--finetuned", help="a triplet-trained embedder spec (from jobs.train_triplet)")
    parser.add_argument("--detector", help="torchvision detector spec: adds the crop-on rows")
    parser.add_argument("--crop-min-score", type=float, default=CropPolicy.min_score)
    parser.add_argument("--top-n", type=int, default=3, help="classes searched by the class@N strategy")
    parser.add_argument("-k", type=int, nargs="+", default=[1, 3, 5], help="cut-offs (default: 1 3 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="queries per forward pass (default: 32)")
    parser.add_argument("--grids", type=int, default=0, help="write result grids for this many queries")
    parser.add_argument("--worst", type=int, default=5, help="worst classes listed per strategy")
    args = parser.parse_args(argv)
    try:
        return EvalConfig(output=args.output, data=args.data, dataset=args.dataset, per_class=args.per_class,
                          queries_per_class=args.queries_per_class, seed=args.seed, classifier=args.classifier,
                          embedder=args.embedder, finetuned=args.finetuned, detector=args.detector,
                          crop_min_score=args.crop_min_score, top_n=args.top_n, ks=tuple(sorted(set(args.k))),
                          batch_size=args.batch_size, grids=args.grids, worst=args.worst)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    """Runs the evaluation and prints the table."""
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        results = run(config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print((Path(config.output) / "results.md").read_text())
    for row in results["rows"][:1]:
        worst = ", ".join(f"{w['class']} {w[f'mAP@{max(config.ks)}']:.3f}" for w in row["worst_classes"])
        print(f"worst classes ({row['embedder']}, {row['strategy']}): {worst}")
    if results["grids"]:
        print(f"grids: {Path(results['grids'][0]).parent}/ ({len(results['grids'])} images)")
    print(f"results: {Path(config.output).resolve()}/results.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
