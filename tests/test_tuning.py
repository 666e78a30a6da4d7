"""Batch size selection (the GPU's is measured the same way; here with fake and tiny CPU runs)."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_CLASSIFIER

from pipeline.model_stages import ClassifyAndEmbed, ModelSettings
from pipeline.tuning import choose_batch_size, model_batch_runner


class FakeDevice:
    """A batch costs a fixed overhead plus one unit per image; ``oom`` images and more do not fit."""

    def __init__(self, overhead: float, oom: int) -> None:
        self.overhead, self.oom, self.clock = overhead, oom, 0.0

    def run(self, size: int) -> None:
        if size >= self.oom:
            raise torch.OutOfMemoryError("fake")
        self.clock += self.overhead + size

    def timer(self) -> float:
        return self.clock


# Throughput size / (overhead + size): with overhead 10 the gains are 1.38x, 1.24x, 1.14x, 1.07x,
# 1.04x from 8 to 256, so 128 is the last size worth 5 %; with almost no overhead 8 is enough.
@pytest.mark.parametrize("overhead,oom,expected", [(10, 10**6, 128), (10, 128, 64), (0.1, 10**6, 8)])
def test_stops_where_gains_end_or_memory_does(overhead: float, oom: int, expected: int) -> None:
    device = FakeDevice(overhead, oom)
    size, rows = choose_batch_size(device.run, timer=device.timer)
    assert size == expected
    if oom < 10**6:
        assert rows[-1] == {"batch_size": oom, "error": "out of memory"}


def test_nothing_fits() -> None:
    device = FakeDevice(10, 1)
    with pytest.raises(RuntimeError, match="no batch size fits"):
        choose_batch_size(device.run, timer=device.timer)


def test_real_model_runner_on_cpu() -> None:
    stage = ClassifyAndEmbed(TINY_CLASSIFIER, TINY_CLASSIFIER, ModelSettings(device="cpu"))
    size = stage.models.classifier.preprocess.size
    chosen, rows = choose_batch_size(model_batch_runner(stage, {"image_cls": size, "image_emb": size}, "cpu"),
                                     candidates=(2, 4), repeats=1)
    assert chosen in (2, 4) and [r["batch_size"] for r in rows][0] == 2 and rows[0]["images_per_s"] > 0
