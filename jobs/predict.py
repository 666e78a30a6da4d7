"""Classify images from the command line.

    python -m jobs.predict IMAGE... [--classifier SPEC] [--top 5] [--json]

Each image gets its top classes with synset, name and probability. A file that cannot be read or
decoded gets a one-line error; the others are still answered and the exit status is 1 at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.datasets import sample_photos
from pipeline.images import ImageDecodeError, load_image
from pipeline.models import DEFAULT_CLASSIFIER, load_classifier, select_runtime

logger = logging.getLogger("jobs.predict")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", type=Path, help="image files to classify")
    parser.add_argument("--sample-photos", action="store_true",
                        help="also classify the real photos that ship with scikit-image")
    parser.add_argument("--classifier", default=DEFAULT_CLASSIFIER,
                        help=f"classifier model spec (default: {DEFAULT_CLASSIFIER})")
    parser.add_argument("--top", type=int, default=5, help="classes to print per image (default: 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be >= 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if not args.images and not args.sample_photos:
        parser.error("give at least one IMAGE (or --sample-photos)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (0 when every image was classified)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    paths = list(args.images) + (sample_photos() if args.sample_photos else [])
    try:
        classifier = load_classifier(args.classifier, select_runtime(args.device))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    failures = 0
    ready: list[tuple[Path, np.ndarray]] = []
    for path in paths:
        try:
            ready.append((path, load_image(path.read_bytes(), classifier.preprocess)))
        except OSError as exc:
            failures += 1
            print(f"error: {path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        except ImageDecodeError as exc:
            failures += 1
            print(f"error: {path}: {exc}", file=sys.stderr)

    start = time.perf_counter()
    for begin in range(0, len(ready), args.batch_size):
        chunk = ready[begin : begin + args.batch_size]
        indices, probs = classifier.classify(np.stack([image for _, image in chunk]), top_n=args.top)
        for (path, _), row_idx, row_prob in zip(chunk, indices, probs):
            classes = [{"synset": classifier.labels.id_of(int(i)), "name": classifier.labels.name_of(int(i)),
                        "probability": round(float(p), 4)} for i, p in zip(row_idx, row_prob)]
            if args.json:
                print(json.dumps({"image": str(path), "classes": classes}, ensure_ascii=False))
            else:
                print(f"{path}")
                for c in classes:
                    print(f"  {c['probability']:6.1%}  {c['synset']}  {c['name']}")
    logger.info("classified %d images in %.2fs", len(ready), time.perf_counter() - start)
    if failures:
        print(f"{failures} of {len(paths)} images could not be classified", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
