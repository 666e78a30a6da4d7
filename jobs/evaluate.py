"""Measure retrieval quality (mAP@k) of every search strategy on a labelled image set.

    python -m jobs.evaluate --data FOLDER | --dataset NAME  --output OUT [--recommend FILE]
                            [--queries-per-class 20] [--finetuned SPEC] [--detector SPEC] [--grids 4]
                            [--classifier SPEC|head] [--classes labels|predicted]

The set (one sub-folder per class, or a named set: mnist5000, fashion-mnist, mnist:DIR, ... see
``pipeline.datasets``) is split per class, seeded: ``--queries-per-class`` images of each class are
held out as queries, the rest is the gallery (``OUT/gallery``, links to the files, and
``OUT/split.json``). The gallery goes through the product's own path — the embedding job on Ray,
then the class-sharded index — and every query through ``pipeline.search.QueryEngine``, as
``jobs.search`` and the service answer it. ``--classifier head`` fits a classifier head on the
gallery's stored vectors and labels for each embedder (``jobs.train_classifier``; the queries stay
unseen), and the index's classes are the gallery's own labels; ``--classes`` chooses the partition
(default: ``jobs.build_index``'s rule). The strategies (``pipeline.strategy``) are swept:

    global       embedding similarity over the whole gallery
    class@1      Approach 2: among the gallery images of the top predicted class (filled up from
                 global search when the class holds fewer than k)
    class@N      among those of the top N predicted classes (--top-n)
    gated@N:TAU  class@N when the top-1 probability is >= TAU, else global (TAU swept)
    rerank:BETA  global candidates re-ordered by similarity + BETA x the query's probability of
                 their class (BETA swept)
    calibrated   held out: each half of the queries answered with the setting best on the other half

for the pretrained embedder and, with --finetuned, a fine-tuned one (``jobs.train_embedder
--data OUT/gallery``); each with the detection crop off and, with --detector, on (queries cropped).

A result is relevant when its folder label equals the query's. Writes ``OUT/results.md`` (the
table: strategy x mAP@1/3/5, precision@k, recall@k, queries/s, and the best setting per metric),
``OUT/results.json`` (with the whole sweep and the worst classes of every strategy), with
--recommend the setting best for --metric (global unless another's gain over global is significant:
its lower --confidence bound, from a paired bootstrap over the queries, above --min-gain; the
fine-tuned embedder's when given) as a strategy file
for ``jobs.build_index --strategy`` and the service, and with --grids PNGs of queries beside their
top results.
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

from pipeline.datasets import DATASETS, list_labelled_images, write_dataset
from pipeline.embed_job import run as run_embedding_job
from pipeline.embed_output import EmbedConfig
from pipeline.evaluation import (
    EvalConfig,
    calibration_table,
    evaluate_engine,
    link_gallery,
    markdown_table,
    split,
    write_grids,
)
from pipeline.files import check_output_folder, sha256_file, write_json_atomically
from pipeline.head_training import fit_head
from pipeline.index import IndexConfig, build_index
from pipeline.index.build import embedding_parts
from pipeline.index.keying import CLASS_SOURCES
from pipeline.manifests import Recommendation
from pipeline.models import (
    DEFAULT_CLASSIFIER,
    DEFAULT_EMBEDDER,
    NO_CLASSIFIER,
    CropPolicy,
    as_spec,
    head_spec,
    load_detector,
    load_head,
    save_head,
    select_runtime,
)
from pipeline.search import QueryEngine
from pipeline.storage import Location

logger = logging.getLogger("jobs.evaluate")


def build_gallery_index(out: Path, gallery: Path, config: EvalConfig, embedder: str,
                        split_key: str) -> tuple[Path, float | None]:
    """Runs the embedding job and builds the index for one embedder (reused when already built with
    the same models and partition, weight files included: a re-trained embedder at the same path is
    re-embedded); with ``--classifier head``, fits the head on the gallery first.

    Returns:
        The index and the head's held-out accuracy (None without a head).
    """
    head = config.classifier == "head"
    job_classifier = NO_CLASSIFIER if head else config.classifier  # the head supplies the classes
    files = [as_spec(spec).weight_file for spec in (config.classifier, embedder) if spec != "head"]
    weights = [sha256_file(f) for f in files if f is not None and f.is_file()]
    key = hashlib.sha1((f"{config.classifier}|{embedder}|{split_key}|{config.classes}" +
                        (f"|{weights}" if weights else "")).encode()).hexdigest()[:12]
    folder = out / "runs" / key
    index, head_file = folder / "index", folder / "head.safetensors"
    if (index / "manifest.json").is_file():
        return index, load_head(head_spec(head_file)).accuracy if head else None
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    summary = run_embedding_job(EmbedConfig(inputs=(str(gallery),), output=str(folder / "embedding-job"),
                                            classifier=job_classifier, embedder=embedder, batch_size="auto"))
    logger.info("embedded the gallery with %s: %s", embedder, summary["counts"])
    accuracy = None
    if head:
        parts, manifest = embedding_parts(Location(folder / "embedding-job"))
        fitted = fit_head(parts)
        save_head(head_file, fitted.net, fitted.labels, fitted.temperature, manifest.models.spec("embedder"),
                  fitted.accuracy)
        accuracy = fitted.accuracy
        logger.info("classifier head on the gallery: %d classes, held-out accuracy %.4f", len(fitted.labels),
                    accuracy)
    build_index(folder / "embedding-job", index, IndexConfig(), classes=config.classes,
                classifier=head_spec(head_file) if head else None)
    return index, accuracy


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
    calibrations: list[dict] = []
    for role, spec in embedders:
        index, head_accuracy = build_gallery_index(out, gallery, config, spec, split_key)
        engine = QueryEngine.load(str(index), runtime=runtime, detector=detector)
        keyed = (engine.index.manifest.class_source or {}).get("source", "predicted")
        facts = {"embedder": role, "embedder_spec": spec, "classifier_spec": engine.index.manifest.models.spec("classifier"),
                 "classes": keyed, "head_accuracy": head_accuracy}
        for crop in (False, True) if detector else (False,):
            found, calibration = evaluate_engine(engine, images, query_labels, n_relevant, config, crop)
            rows += [facts | row for row in found]
            calibrations.append(facts | {"crop": "on" if crop else "off"} | calibration)
    grids = []
    if config.grids:
        best = max((r for r in rows if r["strategy"] != "calibrated"), key=lambda r: r[config.target_metric])
        for row in {id(r): r for r in (rows[0], best)}.values():
            grids += write_grids(out, row, [paths[i] for i in query_idx], query_labels, config.grids, max(config.ks))
    title = f"{config.dataset or config.data}: {len(query_idx)} queries, {len(gallery_idx)} gallery images, " \
            f"{len(gallery_counts)} classes"
    table = markdown_table(rows, config.ks, title) + "\n" + calibration_table(calibrations)
    results = {"title": title, "classifier": config.classifier, "classes": config.classes,
               "rows": [{k: v for k, v in r.items() if k != "_results"} for r in rows],
               "calibration": calibrations, "grids": grids}
    (out / "results.md").write_text(table)
    write_json_atomically(results, out / "results.json")
    if config.recommend:
        chosen = next(c for c in calibrations[::-1] if c["crop"] == "off")  # the fine-tuned embedder's, if any
        Recommendation(strategy=chosen["recommended"], metric=chosen["metric"], value=chosen["recommended_value"],
                       held_out_value=chosen["held_out_value"], global_value=chosen["global_value"],
                       evaluation=title, classifier=chosen["classifier_spec"],
                       embedder=chosen["embedder_spec"]).write(config.recommend)
        results["recommended"] = chosen
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
    parser.add_argument("--classifier", default=DEFAULT_CLASSIFIER,
                        help="the query classifier: a timm spec, or head: a classifier head fitted on the gallery "
                             f"split's embeddings for each embedder (default: {DEFAULT_CLASSIFIER})")
    parser.add_argument("--classes", choices=CLASS_SOURCES,
                        help="the index's class partition: labels (the gallery's own) or predicted (the "
                             "classifier's top-1); default: jobs.build_index's rule")
    parser.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="the pretrained embedder")
    parser.add_argument("--finetuned", help="a fine-tuned embedder spec (from jobs.train_embedder)")
    parser.add_argument("--detector", help="torchvision detector spec: adds the crop-on rows")
    parser.add_argument("--crop-min-score", type=float, default=CropPolicy.min_score)
    parser.add_argument("--top-n", type=int, default=3, help="classes searched by class@N and gated@N (default: 3)")
    parser.add_argument("-k", type=int, nargs="+", default=[1, 3, 5], help="cut-offs (default: 1 3 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="queries per forward pass (default: 32)")
    parser.add_argument("--grids", type=int, default=0, help="write result grids for this many queries")
    parser.add_argument("--worst", type=int, default=5, help="worst classes listed per strategy")
    parser.add_argument("--metric", help="what calibration maximises: mAP@k, P@k or R@k (default: mAP at the largest k)")
    parser.add_argument("--min-gain", type=float, default=0.0,
                        help="least gain over global (its lower confidence bound) for another strategy to be "
                             "recommended (default: 0)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="confidence of that bound: a paired bootstrap over the queries, simultaneous over "
                             "the sweep (default: 0.95; 0: the measured gain)")
    parser.add_argument("--recommend", help="write the best strategy for --metric to this file (for "
                                            "jobs.build_index --strategy, jobs.search --strategy, the service)")
    args = parser.parse_args(argv)
    if problem := check_output_folder(args.output):
        parser.error(problem)
    try:
        return EvalConfig(output=args.output, data=args.data, dataset=args.dataset, per_class=args.per_class,
                          queries_per_class=args.queries_per_class, seed=args.seed, classifier=args.classifier,
                          embedder=args.embedder, finetuned=args.finetuned, detector=args.detector,
                          crop_min_score=args.crop_min_score, top_n=args.top_n, ks=tuple(sorted(set(args.k))),
                          batch_size=args.batch_size, grids=args.grids, worst=args.worst, metric=args.metric,
                          recommend=args.recommend, min_gain=args.min_gain,
                          confidence=args.confidence, classes=args.classes)
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
    if "recommended" in results:
        chosen = results["recommended"]
        print(f"recommended strategy ({chosen['embedder']} embedder, {chosen['metric']}): "
              f"{chosen['recommended']['name']} {chosen['recommended_value']:.4f} on all queries, "
              f"{chosen['held_out_value']:.4f} held out (global {chosen['global_value']:.4f}) -> {config.recommend}")
    if results["grids"]:
        print(f"grids: {Path(results['grids'][0]).parent}/ ({len(results['grids'])} images)")
    print(f"results: {Path(config.output).resolve()}/results.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
