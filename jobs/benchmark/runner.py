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
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


#: Environment variables that set thread counts or instruction sets of the libraries measured.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "FAISS_SIMD_LEVEL",
                    "OPENBLAS_CORETYPE")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, e.g. a container's cpuset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine() -> str:
    """The machine the figures come from, as the results and the printed headers name it."""
    return f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} CPUs"


def thread_settings() -> dict:
    """What sets the benchmark's parallelism: CPUs, the thread environment variables (unset: None),
    and whether torch (whose own thread pool competes with FAISS's OpenMP) was imported. An area
    adds its libraries' own figures (the index benchmark: FAISS's OpenMP threads and SIMD level)."""
    return {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
            "env": {name: os.environ.get(name) for name in THREAD_VARIABLES},
            "torch_imported": "torch" in sys.modules}


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
