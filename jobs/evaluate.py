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
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray

from jobs.embed import run as run_embedding_job
from pipeline.datasets import DATASETS, list_labelled_images, write_dataset
from pipeline.embed_output import EmbedConfig
from pipeline.evaluation import EvalConfig, evaluate_engine, link_gallery, markdown_table, split, write_grids
from pipeline.files import write_json_atomically
from pipeline.index import IndexConfig, build_index
from pipeline.models import DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER, CropPolicy, load_detector, select_runtime
from pipeline.search import QueryEngine

logger = logging.getLogger("jobs.evaluate")


def build_gallery_index(out: Path, gallery: Path, classifier: str, embedder: str, split_key: str) -> Path:
    """Runs the embedding job and builds the index for one embedder (reused when already built)."""
    key = hashlib.sha1(f"{classifier}|{embedder}|{split_key}".encode()).hexdigest()[:12]
    folder = out / "runs" / key
    index = folder / "index"
    if (index / "manifest.json").is_file():
        return index
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    summary = run_embedding_job(EmbedConfig(inputs=(str(gallery),), output=str(folder / "embedding-job"), classifier=classifier,
                              embedder=embedder, batch_size="auto"))
    logger.info("embedded the gallery with %s: %s", embedder, summary["counts"])
    build_index(folder / "embedding-job", index, IndexConfig())
    return index


def run(config: EvalConfig) -> dict:
    """Splits, builds the gallery index per embedder, runs every strategy; writes the results."""
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
