"""Throughput benchmarks, measured side by side in one run (shared machines are noisy: compare
ratios, not absolute numbers from different runs).

What the areas (``batch``, ``index``, ``serve``) share: the measurement helpers more than one area
uses. The command line is ``cli.py``.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


def machine() -> str:
    """The machine the figures come from, as the results and the printed headers name it."""
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


def free_port() -> int:
    """A port nothing on 127.0.0.1 listens on now (the benchmarks' services use no fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_slices(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` items covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def latency_ms(seconds: Iterable[float], percentiles: Iterable[int] = (50, 95, 99), digits: int = 1) -> dict:
    """``{"p50_ms": ..., ...}``: percentiles of latencies given in seconds (zeros when there are none)."""
    ms = np.array(list(seconds)) * 1000
    if not ms.size:
        ms = np.zeros(1)
    return {f"p{p}_ms": round(float(np.percentile(ms, p)), digits) for p in percentiles}


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
