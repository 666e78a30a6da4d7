"""Throughput benchmarks, one module per area on a shared runner (``runner.py``), command line in ``cli.py``:

    python -m jobs.benchmark batch --input DIR [--limit 2000] [--classifier SPEC] [--embedder SPEC]
    python -m jobs.benchmark index [--rows 1000000] [--dim 512] [--classes 20000]
    python -m jobs.benchmark scale [--classes 21841] [--per-class 3] [--work DIR] [--output URI]
    python -m jobs.benchmark serve --index DIR --images DIR [--soak 120] [--cooldown 30]
    python -m jobs.benchmark uploads [--index DIR] [--side 7000] [--concurrent 12]

``batch.py``: the embedding job against the model-only ceiling; ``index.py``: index build, search
latency, QPS and recall; ``scale.py``: the embedding job on an ImageNet-22k-shaped input with a
near-free model (orchestration and resume at scale); ``serve.py``: the Ray Serve graph under a
bounded loopback load; ``uploads.py``: the ingress replica's memory under a burst of large
uploads, with its decode budget and without.
"""

from jobs.benchmark.cli import main

__all__ = ["main"]
