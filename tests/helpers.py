"""Helpers the test modules share (``from helpers import ...``; pyproject puts tests/ on the path):
the tiny model specs, free ports, generated images, ranking comparisons. Fixtures live in
conftest.py."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np

TINY_CLIP = "lookalike-tiny-clip"  # pipeline/model_configs/lookalike-tiny-clip.json
TINY_CLASSIFIER = "timm:test_efficientnet@random"
TINY_CLIP_SPEC = f"open_clip:{TINY_CLIP}@random"


def free_port() -> int:
    """A port nothing on 127.0.0.1 listens on now (tests never use fixed ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def assert_same_ranking(got_ids, got_scores, want_ids, want_scores, atol: float = 1e-5) -> None:
    """Two ranked lists (best first) agree up to ties.

    Scores must agree position by position within ``atol``. Ids must agree too, except where two
    candidates score within ``2 * atol`` of each other: another process, thread count or CPU rounds
    differently and may break such a tie either way (or, at the end of the list, let in a candidate
    that ties with the last one). A real disagreement (another region, another class searched,
    another model) moves scores by far more than ``atol`` and fails.
    """
    got_ids, want_ids = list(got_ids), list(want_ids)
    got_scores, want_scores = np.asarray(got_scores, np.float64), np.asarray(want_scores, np.float64)
    assert len(got_ids) == len(want_ids) == len(got_scores) == len(want_scores), (got_ids, want_ids)
    assert len(set(got_ids)) == len(got_ids), f"repeated ids in {got_ids}"
    np.testing.assert_allclose(got_scores, want_scores, atol=atol, rtol=0)
    score_of = dict(zip(want_ids, want_scores))
    for position, (got, want) in enumerate(zip(got_ids, want_ids)):
        if got == want:
            continue
        # The id that took this position must have tied with the one expected there.
        theirs = score_of.get(got, got_scores[position])
        assert got in score_of or abs(theirs - want_scores[-1]) <= 2 * atol, \
            f"position {position}: {got} is not in {want_ids} and does not tie with its last score"
        assert abs(theirs - want_scores[position]) <= 2 * atol, \
            f"position {position}: {got} (score {theirs:.6f}) instead of {want} ({want_scores[position]:.6f})"
