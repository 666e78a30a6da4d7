"""Model stages called from two threads at once (as the job's actors call them): staging may overlap a
compute, computes never overlap each other, and the results equal one-at-a-time calls."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers import TINY_CLASSIFIER, TINY_CLIP_SPEC, assert_same_ranking

from pipeline.model_stages import ClassifyAndEmbed, ModelSettings
from pipeline.staging import Staging

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def batches(stage: ClassifyAndEmbed, count: int, size: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    cls_size = stage.models.classifier.preprocess.size
    emb_size = stage.models.embedder.preprocess.size
    return [{"id": np.arange(i * size, (i + 1) * size),
             "image_cls": rng.integers(0, 256, (size, *cls_size, 3), dtype=np.uint8),
             "image_emb": rng.integers(0, 256, (size, *emb_size, 3), dtype=np.uint8)} for i in range(count)]


@pytest.mark.parametrize("device", DEVICES)
def test_staging_puts_uint8_batches_on_the_device(device: str) -> None:
    staging = Staging(device)
    array = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    tensor, event = staging.run(lambda: staging.to_device(array))
    staging.ready(event, [tensor])
    assert tensor.device.type == device and tensor.dtype == torch.uint8
    np.testing.assert_array_equal(tensor.cpu().numpy(), array)
    assert (event is None) == (device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_concurrent_calls_equal_sequential_calls(device: str) -> None:
    stage = ClassifyAndEmbed(TINY_CLASSIFIER, TINY_CLIP_SPEC, ModelSettings(device=device, precision="fp32", top_n=3))
    inputs = batches(stage, 6)
    sequential = [stage(b) for b in inputs]
    with ThreadPoolExecutor(2) as pool:
        concurrent = list(pool.map(stage, inputs))
    for one, other in zip(sequential, concurrent):
        np.testing.assert_array_equal(one["id"], other["id"])
        for row in range(len(one["id"])):  # same batch, other thread: equal up to near-tied classes
            assert_same_ranking(other["classes"][row], other["class_probs"][row], one["classes"][row],
                                one["class_probs"][row])
        np.testing.assert_allclose(one["embedding"], other["embedding"], atol=1e-5)
        assert "image_cls" not in other and "image_emb" not in other
        assert other["model_s"].shape == (3,) and np.all(other["model_s"] > 0)


def test_staging_overlaps_a_compute_and_computes_never_overlap() -> None:
    """While call A computes, call B stages (proved by B's staging finishing before A's compute ends);
    B's compute waits for A's."""
    stage = ClassifyAndEmbed(TINY_CLASSIFIER, TINY_CLIP_SPEC, ModelSettings(device="cpu", precision="fp32", top_n=3))
    first, second = batches(stage, 2)
    staged_b = threading.Event()
    computing, overlaps, log = [], [], []
    compute, stage_in = stage.compute, stage.stage

    def traced_compute(batch):
        computing.append(1)
        overlaps.append(len(computing))
        log.append(("compute", int(batch["id"][0])))
        if int(batch["id"][0]) == 0:  # A: hold the compute until B has staged (or give up)
            log.append(("B staged during A", staged_b.wait(timeout=30)))
        out = compute(batch)
        computing.pop()
        return out

    def traced_stage(batch):
        out = stage_in(batch)
        if int(batch["id"][0]) == 3:
            staged_b.set()
        return out

    stage.compute, stage.stage = traced_compute, traced_stage
    a = threading.Thread(target=stage, args=(first,))
    a.start()
    while not computing:  # A holds the lock before B arrives
        threading.Event().wait(0.01)
    b_out = stage(second)
    a.join(timeout=60)
    assert ("B staged during A", True) in log
    assert max(overlaps) == 1  # never two computes at once
    assert [entry for entry in log if entry[0] == "compute"] == [("compute", 0), ("compute", 3)]
    np.testing.assert_array_equal(b_out["id"], second["id"])
