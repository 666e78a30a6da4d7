"""Throughput benchmarks, measured side by side in one run (shared machines are noisy: compare
ratios, not absolute numbers from different runs).

The command line: one subcommand per area (:data:`AREAS`) on the shared runner. Only the chosen
area's module is imported, so an area's dependencies (torch, ray, faiss, ...) load when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from jobs.benchmark.runner import write_json

#: The areas, each the module ``jobs.benchmark.<name>``, with its one-line help.
AREAS = {
    "batch": "embedding job throughput vs the model-only ceiling",
    "index": "index build, class-restricted latency, global QPS and recall",
    "publish": "publish latency (publish -> loaded by a follower) and the swap's memory",
    "scale": "the embedding job on an ImageNet-22k-shaped input (21,841 tars)",
    "serve": "the Ray Serve graph under a bounded loopback load",
    "uploads": "ingress memory under a burst of large uploads, budget on and off",
}


def build_parser(area: str | None = None) -> argparse.ArgumentParser:
    """One subcommand per area; ``area``'s module adds its arguments, the runner the common ``--json``
    (the other areas are listed by name and help only)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="area", required=True)
    for name, summary in AREAS.items():
        area_parser = sub.add_parser(name, help=summary, description=summary)
        if name == area:
            # The one lazy import of the benchmarks: the chosen area only (see the module docstring).
            importlib.import_module(f"jobs.benchmark.{name}").add_arguments(area_parser)
            area_parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv``, checks the area's arguments, measures, prints, and writes ``--json``.

    Each area's ``add_arguments(parser)`` sets the defaults ``check(args) -> error or None``,
    ``bench(args) -> results`` and ``report(results, args)`` that this calls in turn.
    """
    argv = sys.argv[1:] if argv is None else argv
    area = next((arg for arg in argv if not arg.startswith("-")), None)  # the subcommand: the first positional
    parser = build_parser(area)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    error = args.check(args)
    if error:
        parser.error(error)
    results = args.bench(args)
    args.report(results, args)
    if args.json:
        write_json(args.json, results)
    return 0
