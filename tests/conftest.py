"""Shared test set-up: offline hubs, the tiny open_clip config, seeded generators."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# No test may reach a model hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_CLIP = "lookalike-tiny-clip"  # pipeline/model_configs/lookalike-tiny-clip.json
TINY_CLASSIFIER = "timm:test_efficientnet@random"
TINY_CLIP_SPEC = f"open_clip:{TINY_CLIP}@random"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def write_jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 50)) -> Path:
    """A small random JPEG at ``path`` (parent folders created)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, format="JPEG")
    return path


def make_class_folders(root: Path, classes: int = 2, per_class: int = 6, bad: int = 0, seed: int = 0) -> dict:
    """Class sub-folders of generated JPEGs plus ``bad`` corrupt files; returns what was made."""
    rng = np.random.default_rng(seed)
    good = [write_jpeg(root / f"class{c}" / f"img{i:03d}.jpg", rng) for c in range(classes) for i in range(per_class)]
    broken = []
    for i in range(bad):
        path = root / "class0" / f"broken{i}.jpg"
        path.write_bytes(good[0].read_bytes()[: 60 + i] if i % 2 else b"this is text, not an image")
        broken.append(path)
    return {"good": good, "bad": broken}
