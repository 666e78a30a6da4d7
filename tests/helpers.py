"""Helpers the test modules share (``from helpers import ...``; pyproject puts tests/ on the path):
the tiny model specs, free ports, generated images, ranking comparisons, synthetic embedding
outputs. Fixtures live in conftest.py."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np

from pipeline.batch import WriteParts
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.manifests import EmbeddingManifest, ModelSet

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


# ---- synthetic embedding outputs (no model runs) ----------------------------------------------

DIM = 16
PREPROCESS = {"size": [32, 32]}
MODELS = {"classifier": {"spec": "timm:test_efficientnet@random", "preprocess": PREPROCESS},
          "embedder": {"spec": "timm:test_efficientnet@random", "dim": DIM, "preprocess": PREPROCESS}}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic(n: int, classes: int, seed: int, id_offset: int = 0) -> dict[str, np.ndarray]:
    """Clustered vectors: each class has a centre, members scatter around it."""
    rng = np.random.default_rng(seed)
    centres = unit(np.random.default_rng(99).normal(size=(classes, DIM)))
    cls = rng.integers(0, classes, n)
    vectors = unit(centres[cls] + 0.35 * rng.normal(size=(n, DIM)))
    return {"id": np.arange(id_offset, id_offset + n, dtype=np.int64),
            "uri": np.array([f"/img/{id_offset + i}.jpg" for i in range(n)], dtype=object),
            "label": np.array([f"c{c}" for c in cls], dtype=object),
            "classes": np.stack([cls, (cls + 1) % classes], axis=1).astype(np.int32),
            "class_probs": np.tile(np.array([[0.9, 0.1]], np.float32), (n, 1)),
            "embedding": vectors}


def write_embeddings(out: Path, data: dict[str, np.ndarray], parts: int = 3,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    """An embedding-job output folder (parts + manifest) holding ``data``."""
    writer = WriteParts(out / "embeddings", DIM)
    entries = []
    for chunk in np.array_split(np.arange(len(data["id"])), parts):
        batch = {k: v[chunk] for k, v in data.items()}
        batch.update(read_s=np.zeros(len(chunk)), decode_s=np.zeros(len(chunk)), model_s=np.zeros(len(chunk)))
        name = writer(batch)["part"][0]
        entries.append({"path": f"embeddings/{name}", "rows": len(chunk)})
    EmbeddingManifest(models=ModelSet(**MODELS), inputs=[], top_n=2, embedding_dtype="float32", max_pixels=max_pixels,
                      counts={"embedded": len(data["id"])}, parts=entries).write(out)
    return out


def in_process(target, *args) -> tuple[float, float]:
    """The benchmarks' ``_in_child`` without the child (each would import the whole pipeline again,
    seconds per call): (seconds, no peak memory measured)."""
    start = time.perf_counter()
    target(*args)
    return time.perf_counter() - start, 0.0
