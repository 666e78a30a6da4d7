"""Choosing the batch size that fills a GPU: measured, not guessed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

BATCH_CANDIDATES = (8, 16, 32, 64, 128, 256, 512, 1024)


def choose_batch_size(run: Callable[[int], None], candidates: Sequence[int] = BATCH_CANDIDATES, *,
                      min_gain: float = 1.05, repeats: int = 3,
                      timer: Callable[[], float] = time.perf_counter) -> tuple[int, list[dict]]:
    """The smallest batch size within ``min_gain`` of the best throughput that fits in memory.

    Tries the candidates in increasing order: each is run once to warm up, then ``repeats`` times
    timed. Stops at the first out-of-memory error, or when a size gains less than ``min_gain``
    over the previous one (a larger batch would only add latency and memory).

    Args:
        run: runs one batch of the given size to completion (synchronised on GPUs).

    Returns:
        The chosen size and the measurements (``batch_size``, ``images_per_s`` or ``error``).

    Raises:
        RuntimeError: not even the smallest candidate fits.
    """
    rows: list[dict] = []
    best = None
    for size in sorted(candidates):
        try:
            run(size)
            start = timer()
            for _ in range(repeats):
                run(size)
            rate = size * repeats / max(timer() - start, 1e-9)
        except torch.OutOfMemoryError:
            rows.append({"batch_size": size, "error": "out of memory"})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            break
        rows.append({"batch_size": size, "images_per_s": round(rate, 2)})
        if best is not None and rate < best[1] * min_gain:
            break
        best = (size, rate) if best is None or rate > best[1] else best
    if best is None:
        raise RuntimeError(f"no batch size fits: {rows}")
    logger.info("batch sizes tried: %s -> %d", rows, best[0])
    return best[0], rows


def model_batch_runner(stage, inputs: dict[str, tuple[int, int]], device: str) -> Callable[[int], None]:
    """A ``run(size)`` for :func:`choose_batch_size` over a model stage (e.g. ClassifyAndEmbed) on
    random uint8 images already on ``device``, synchronised so that timings are real."""
    generator = torch.Generator().manual_seed(0)

    def run(size: int) -> None:
        batch = {"id": np.arange(size)}
        for name, (height, width) in inputs.items():
            batch[name] = torch.randint(0, 256, (size, height, width, 3), dtype=torch.uint8,
                                        generator=generator).to(device)
        stage(batch)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    return run
