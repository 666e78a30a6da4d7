"""Throughput benchmarks, measured side by side in one run (shared machines are noisy: compare
ratios, not absolute numbers from different runs).

The command line: one subcommand per area (``batch``, ``index``, ``scale``, ``serve``, ``uploads``) on the shared runner.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jobs.benchmark import batch, index, scale, serve, uploads
from jobs.benchmark.runner import write_json


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per area; each area adds its own arguments, the runner the common ``--json``."""
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="area", required=True)
    for area in (batch, index, scale, serve, uploads):
        area_parser = area.add_arguments(sub)
        area_parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv``, checks the area's arguments, measures, prints, and writes ``--json``.

    Each area's ``add_arguments`` sets the defaults ``check(args) -> error or None``,
    ``bench(args) -> results`` and ``report(results, args)`` that this calls in turn.
    """
    parser = build_parser()
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
