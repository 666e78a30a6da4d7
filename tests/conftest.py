"""Shared test set-up: offline hubs, the tiny open_clip config, seeded generators."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# No test may reach a model hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ASSETS = Path(__file__).parent / "assets"
TINY_CLIP = "lookalike-tiny-clip"
TINY_CLASSIFIER = "timm:test_efficientnet@random"
TINY_CLIP_SPEC = f"open_clip:{TINY_CLIP}@random"


def pytest_configure(config: pytest.Config) -> None:
    import open_clip

    open_clip.add_model_config(ASSETS / f"{TINY_CLIP}.json")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
