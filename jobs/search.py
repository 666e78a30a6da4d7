"""Query an index from the command line (no Ray Serve needed).

    python -m jobs.search --index INDEX --image FILE [FILE ...] [-k 5] [--strategy NAME|FILE] [--json]
                          [--detector torchvision:NAME --crop]

Loads the models the index manifest names, then decodes, classifies, embeds and searches each
image exactly as the online service does, with the index's strategy (``jobs.build_index
--strategy``; global when it has none) or ``--strategy``. A file that cannot be read or decoded gets a one-line
error; the others are answered and the exit status is 1 at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.images import ImageDecodeError
from pipeline.models import CropPolicy, load_detector, select_runtime
from pipeline.search import QueryEngine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="index folder (from jobs.build_index)")
    parser.add_argument("--image", required=True, nargs="+", type=Path, help="query images")
    parser.add_argument("-k", type=int, default=5, help="results per query (default: 5)")
    parser.add_argument("--strategy",
                        help="global, class[@N] (among the top N predicted classes' images), gated[@N]:TAU, "
                             "rerank:BETA, or a file from jobs.evaluate --recommend (default: the index's, "
                             "else global)")
    parser.add_argument("--no-fill", dest="fill", action="store_false", default=None,
                        help="class searches: do not fill up from the global search when the classes give fewer "
                             "than k")
    parser.add_argument("--min-score", type=float, help="drop results below this similarity")
    parser.add_argument("--detector", help="torchvision detector spec, for --crop")
    parser.add_argument("--crop", action="store_true",
                        help="search the largest detected box near the centre instead of the whole image")
    parser.add_argument("--crop-min-score", type=float, default=CropPolicy.min_score,
                        help=f"least detector confidence of a crop box (default: {CropPolicy.min_score})")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="one JSON object per query image")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("-k must be >= 1")
    if args.crop and not args.detector:
        parser.error("--crop needs --detector")
    try:
        runtime = select_runtime(args.device)
        detector = load_detector(args.detector, runtime, policy=CropPolicy(min_score=args.crop_min_score)) \
            if args.detector else None
        engine = QueryEngine.load(args.index, runtime=runtime, strategy=args.strategy, detector=detector)
        strategy = engine.strategy.with_fill(args.fill)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failures = 0
    for path in args.image:
        try:
            result = engine.search([path.read_bytes()], k=args.k, strategy=strategy, min_score=args.min_score,
                                   crop=args.crop)[0]
        except OSError as exc:
            failures += 1
            print(f"error: {path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
            continue
        except ImageDecodeError as exc:
            failures += 1
            print(f"error: {path}: {exc}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"image": str(path), **result.to_json()}, ensure_ascii=False))
            continue
        top = result.classes[0]
        cropped = f", crop {result.crop_box}" if args.crop else ""
        print(f"{path}  (predicted: {top['name']} {top['probability']:.1%}{cropped}; strategy {result.strategy})")
        for rank, hit in enumerate(result.hits, 1):
            print(f"  {rank}. {hit.score:.4f}  {hit.uri}  [{hit.label or '-'}]")
        if result.note:
            print(f"  note: {result.note}")
        if not result.hits:
            print("  (no results)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
