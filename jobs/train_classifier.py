"""Fit a classifier head on an embedding output's stored vectors and labels (no image decoded again).

    python -m jobs.train_classifier --embeddings OUT --output HEAD.safetensors [--hidden N] [--epochs N]
                                    [--held-out 0.1] [--batch-size 256] [--lr 0.01] [--seed 0] [--ray-data]

The head maps the embedder's vectors to the gallery's own labels (folder names, synset tar names,
webdataset .cls files; rows without a label are skipped): a linear layer, or with ``--hidden N`` a
small MLP. About ``--held-out`` of the rows (chosen by id) are held out: they calibrate the
probabilities (temperature scaling, so a gated strategy's threshold means something) and give the
accuracy printed at the end. The parts are streamed on this machine (an output larger than its memory
still trains); with ``--ray-data``, Ray tasks read them across the cluster (``ray job submit``,
``RAY_ADDRESS``, else a local Ray) and keep the rows in the cluster's object store between epochs, for
an output larger than one machine's memory. The head is one file; its spec ``head:HEAD.safetensors`` is a classifier
spec for ``jobs.embed``, ``jobs.build_index --classifier`` (re-keys an existing output without
re-embedding), ``jobs.search`` and the service, where it runs inside the embedder: no second network.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import ray

from pipeline.head_training import HeadSettings, fit_head
from pipeline.index.build import embedding_parts
from pipeline.models.head import save_head
from pipeline.storage import Location


def main(argv: list[str] | None = None) -> int:
    defaults = HeadSettings()
    parser = argparse.ArgumentParser(prog="python -m jobs.train_classifier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", required=True, help="the --output of jobs.embed (a folder or s3://...)")
    parser.add_argument("--output", required=True, type=Path, help="the head file to write (.safetensors)")
    parser.add_argument("--hidden", type=int, default=defaults.hidden,
                        help="hidden layer width (default: 0, a linear head)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"default: {defaults.epochs}")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"default: {defaults.batch_size}")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"AdamW learning rate (default: {defaults.lr})")
    parser.add_argument("--held-out", type=float, default=defaults.held_out,
                        help=f"fraction of rows held out for calibration and accuracy (default: {defaults.held_out})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--ray-data", action="store_true",
                        help="read the parts with Ray Data across the Ray cluster (RAY_ADDRESS or `ray job submit`; "
                             "else a local Ray) and keep the rows in its object store between epochs: for outputs "
                             "larger than one machine's memory (default: stream them on this machine)")
    args = parser.parse_args(argv)
    if args.output.suffix != ".safetensors":
        parser.error(f"--output must be a .safetensors file, got {args.output}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = HeadSettings(hidden=args.hidden, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                held_out=args.held_out, seed=args.seed)
        parts, manifest = embedding_parts(Location(args.embeddings))
        if args.ray_data and not ray.is_initialized():
            ray.init(logging_level=logging.WARNING)
        fitted = fit_head(parts, settings, progress=lambda line: print(line, flush=True), ray_data=args.ray_data)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = save_head(args.output, fitted.net, fitted.labels, fitted.temperature, manifest.models.spec("embedder"),
                     fitted.accuracy)
    before, after = fitted.held_out_nll
    print(f"head: {len(fitted.labels)} classes, {'linear' if not args.hidden else f'MLP ({args.hidden} hidden)'}, "
          f"{fitted.train_rows} training rows, {fitted.seconds:.1f} s")
    print(f"held out ({fitted.held_out_rows} rows): accuracy {fitted.accuracy:.4f}; temperature {fitted.temperature:.3f} "
          f"(negative log-likelihood {before:.4f} -> {after:.4f})")
    print(f"classifier spec: {spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
