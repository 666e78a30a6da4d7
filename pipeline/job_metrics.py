"""The embedding job's metrics, exported through Ray's metrics system from the job's driver.

The driver sees every committed part (the dataset's rows are the parts' write summaries) and
every committed error part (listed from ``OUT/errors`` at each progress tick and at the end), so
the counts are exact and need nothing from the workers. Ray exports them on each node's Prometheus
endpoint with the prefix ``ray_`` (counters with the suffix ``_total``), labelled by the output
folder or URI (``output``):

- ``ray_lookalike_job_images_total{output}``: images embedded and committed by this run;
- ``ray_lookalike_job_parts_total{output}``: parts committed;
- ``ray_lookalike_job_failed_total{output, stage, kind}``: images that failed (``read``/``decode``,
  ``unreadable``/``undecodable``/``too_large`` ..., as in ``OUT/errors``);
- ``ray_lookalike_job_busy_seconds_total{output, stage}``: seconds the ``read``, ``decode``, ``model``
  and ``write`` stages spent on the committed images, summed over their workers: images/s per stage
  (one worker's) is ``rate(images) / rate(busy_seconds{stage})``, as in ``summary.json``; the job's
  images/s is ``rate(images)``.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally

import numpy as np
from ray.util.metrics import Counter

from pipeline.parts import committed_parts, read_column
from pipeline.storage import Location

logger = logging.getLogger(__name__)
#: The stages whose busy seconds each part summary carries (``pipeline.batch.WriteParts``).
STAGES = ("read", "decode", "model", "write")


class JobMetrics:
    """Counts one run's parts and failures into Ray's metrics (create it after ``ray.init``).

    Args:
        out: the job's output.
        errors_before: names of the error parts committed before this run (not counted again).
    """

    def __init__(self, out: Location, errors_before: set[str]) -> None:
        self.tags = {"output": str(out)}
        self.errors_dir = out / "errors"
        self.seen_errors = set(errors_before)
        self.images = Counter("lookalike_job_images", description="Images embedded and committed",
                              tag_keys=("output",))
        self.parts = Counter("lookalike_job_parts", description="Parts committed", tag_keys=("output",))
        self.failed = Counter("lookalike_job_failed", description="Images that failed, by stage and kind",
                              tag_keys=("output", "stage", "kind"))
        self.busy = Counter("lookalike_job_busy_seconds", description="Seconds each stage spent on committed images "
                            "(summed over its workers)", tag_keys=("output", "stage"))

    def part(self, summary: dict) -> None:
        """One committed part: its write summary (``rows`` and the ``*_s`` busy seconds)."""
        self.images.inc(int(summary["rows"]), tags=self.tags)
        self.parts.inc(1, tags=self.tags)
        for stage in STAGES:
            seconds = float(summary.get(f"{stage}_s", 0.0))
            if seconds > 0:
                self.busy.inc(seconds, tags={**self.tags, "stage": stage})

    def sweep_errors(self) -> None:
        """Counts the failures of the error parts committed since the last sweep."""
        try:
            new = sorted(set(committed_parts(self.errors_dir)) - self.seen_errors)
            if not new:
                return
            stages = read_column(self.errors_dir, new, "stage")
            kinds = read_column(self.errors_dir, new, "error_type")
        except (OSError, ValueError) as exc:  # a metric must never fail the job
            logger.warning("job metrics: cannot read the error parts (%s); failures not counted yet", exc)
            return
        self.seen_errors.update(new)
        found = Tally(zip(map(str, np.concatenate(stages)), map(str, np.concatenate(kinds))))
        for (stage, kind), n in found.items():
            self.failed.inc(n, tags={**self.tags, "stage": stage, "kind": kind})
