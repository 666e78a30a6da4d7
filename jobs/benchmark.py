"""Throughput benchmarks, measured side by side in one run (shared machines are noisy: compare
ratios, not absolute numbers from different runs).

    python -m jobs.benchmark batch --input DIR [--limit 2000] [--classifier SPEC] [--embedder SPEC]

``batch`` measures on the same images and models:
  (a) model-only ceiling: forward passes on pre-decoded, pre-resized images in one process;
  (b) plain loop: read + decode + resize + forward, one process, batch by batch;
  (c) the Ray Data job (``jobs.embed``), steady state and end to end, for each --stages choice;
and prints images/s and the ratios (c)/(a), (c)/(b). ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.batch import ClassifyAndEmbed
from pipeline.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, resize_image
from pipeline.models import DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER, load_classifier, load_embedder, select_runtime
from pipeline.sources import discover_shards, read_shard


def _images(inputs: list[str], limit: int) -> list[bytes]:
    """The first ``limit`` decodable inputs' bytes, in discovery order."""
    out: list[bytes] = []
    for shard in discover_shards(inputs):
        for item in read_shard(shard):
            if item.data:
                try:
                    decode_image(item.data)
                except ImageDecodeError:
                    continue
                out.append(item.data)
                if len(out) >= limit:
                    return out
    return out


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def bench_batch(args: argparse.Namespace) -> dict:
    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    data = _images(args.input, args.limit)
    if len(data) < args.limit:
        print(f"note: only {len(data)} decodable images found (asked for {args.limit})", file=sys.stderr)
    n = len(data)
    runtime = select_runtime(args.device)
    cls_pre = load_classifier(args.classifier, select_runtime("cpu")).preprocess
    emb_pre = load_embedder(args.embedder, select_runtime("cpu")).preprocess
    stage = ClassifyAndEmbed(args.classifier, args.embedder, device=runtime.device, precision=args.precision)

    def decode_batch(chunk: list[bytes]) -> dict[str, np.ndarray]:
        draft = max(cls_pre.draft_size, emb_pre.draft_size)
        decoded = [decode_image(d, max_pixels=DEFAULT_MAX_PIXELS, draft_size=draft) for d in chunk]
        cls = np.stack([resize_image(im, cls_pre) for im in decoded])
        emb = cls if emb_pre == cls_pre else np.stack([resize_image(im, emb_pre) for im in decoded])
        return {"id": np.arange(len(chunk)), "image_cls": cls, "image_emb": emb}

    results: dict = {"images": n, "batch_size": args.batch_size, "threads": threads,
                     "classifier": args.classifier, "embedder": args.embedder, "device": runtime.device,
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "stage_split_s": {}}

    # (a) model only: everything decoded beforehand, untimed.
    predecoded = [decode_batch(data[s]) for s in _batches(n, args.batch_size)]
    stage(predecoded[0])  # warm-up
    start = time.perf_counter()
    for batch in predecoded:
        stage(batch)
    results["model_only_images_per_s"] = n / (time.perf_counter() - start)
    del predecoded

    # (b) plain single-process loop.
    decode_s = model_s = 0.0
    start = time.perf_counter()
    for s in _batches(n, args.batch_size):
        t0 = time.perf_counter()
        batch = decode_batch(data[s])
        t1 = time.perf_counter()
        stage(batch)
        decode_s += t1 - t0
        model_s += time.perf_counter() - t1
    results["plain_loop_images_per_s"] = n / (time.perf_counter() - start)
    results["stage_split_s"]["plain_loop"] = {"decode": round(decode_s, 2), "model": round(model_s, 2)}

    # (c) the Ray Data job on a fresh output folder, once per stage layout.
    # The very same images as (a) and (b): copied to one folder the job reads.
    import ray

    from jobs.embed import EmbedConfig, run

    ray.init(address=args.address, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as scratch:
        images = Path(scratch) / "images"
        images.mkdir()
        for i, blob in enumerate(data):
            (images / f"{i:06d}.img").write_bytes(blob)
        for layout in args.stages:
            out = Path(scratch) / f"out-{layout}"
            summary = run(EmbedConfig(inputs=(str(images),), output=str(out), classifier=args.classifier,
                                      embedder=args.embedder, batch_size=args.batch_size,
                                      stages=layout, precision=args.precision))
            if summary["counts"]["embedded"] != n:
                raise RuntimeError(f"the job embedded {summary['counts']['embedded']} of {n} images")
            results[f"ray_{layout}"] = {
                "steady_images_per_s": summary["steady_images_per_s"],
                "end_to_end_images_per_s": summary["images_per_s"],
                "wall_s": summary["wall_s"],
                "per_worker_images_per_s": summary["per_worker_images_per_s"],
            }
    ray.shutdown()
    return results


def print_batch(results: dict) -> None:
    a, b = results["model_only_images_per_s"], results["plain_loop_images_per_s"]
    print(f"\nbatch benchmark: {results['images']} images, batch {results['batch_size']}, "
          f"{results['classifier']} + {results['embedder']} on {results['device']} ({results['machine']})")
    print(f"{'measurement':<34}{'images/s':>10}{'vs (a)':>9}{'vs (b)':>9}")
    print(f"{'(a) model only (pre-decoded)':<34}{a:>10.1f}{1:>9.2f}{a / b:>9.2f}")
    print(f"{'(b) plain loop (decode + model)':<34}{b:>10.1f}{b / a:>9.2f}{1:>9.2f}")
    for key, value in results.items():
        if key.startswith("ray_"):
            for kind in ("steady", "end_to_end"):
                c = value[f"{kind}_images_per_s"]
                if c:
                    label = f"(c) Ray Data, {key[4:]}, {kind.replace('_', ' ')}"
                    print(f"{label:<34}{c:>10.1f}{c / a:>9.2f}{c / b:>9.2f}")
    split = results["stage_split_s"]["plain_loop"]
    print(f"plain loop time split: decode {split['decode']} s, model {split['model']} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="area", required=True)
    batch = sub.add_parser("batch", help="embedding job throughput vs the model-only ceiling")
    batch.add_argument("--input", action="append", required=True, help="images (any jobs.embed input)")
    batch.add_argument("--limit", type=int, default=2000, help="images to use (default: 2000)")
    batch.add_argument("--classifier", default=DEFAULT_CLASSIFIER)
    batch.add_argument("--embedder", default=DEFAULT_EMBEDDER)
    batch.add_argument("--batch-size", type=int, default=64)
    batch.add_argument("--threads", type=int, help="torch threads for (a) and (b) (default: all CPUs)")
    batch.add_argument("--device", default="auto")
    batch.add_argument("--precision", default="auto")
    batch.add_argument("--stages", nargs="+", default=["fused", "separate"], choices=["fused", "separate"])
    batch.add_argument("--address", default="local", help="Ray address for (c) (default: a new local Ray)")
    batch.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.limit < 1 or args.batch_size < 1:
        parser.error("--limit and --batch-size must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    results = bench_batch(args)
    print_batch(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
