"""Throughput benchmarks, one module per area on a shared runner (``runner.py``), command line in ``cli.py``:

    python -m jobs.benchmark batch --input DIR [--limit 2000] [--classifier SPEC] [--embedder SPEC]
    python -m jobs.benchmark index [--rows 1000000] [--dim 512] [--classes 20000]
    python -m jobs.benchmark serve --index DIR --images DIR [--soak 120] [--cooldown 30]

``batch.py``: the embedding job against the model-only ceiling; ``index.py``: index build, search
latency, QPS and recall; ``serve.py``: the Ray Serve graph under a bounded loopback load.
"""

from jobs.benchmark.cli import main

__all__ = ["main"]
