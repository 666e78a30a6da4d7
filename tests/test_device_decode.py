"""The device decode path (GPU fast path) against the CPU path; runs on CPU here, on CUDA when present."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import TINY_CLIP_SPEC
from PIL import Image

from pipeline.device_decode import decode_batch, prepare_batch, resize_on_device
from pipeline.images import Preprocess, decode_image, resize_image
from pipeline.models import load_embedder, select_runtime

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth gradients plus some texture: closer to photographs than uniform noise."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width * 200, y / height * 200, (x + y) / (width + height) * 255], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **kwargs)
    return out.getvalue()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preprocess", [Preprocess(size=(224, 224), crop_pct=0.875, interpolation="bicubic"),
                                        Preprocess(size=(64, 64), crop_pct=1.0, interpolation="bilinear"),
                                        Preprocess(size=(48, 48), crop_pct=1.0, crop_mode="squash")])
def test_device_resize_matches_the_cpu_path(device: str, preprocess: Preprocess, rng) -> None:
    for height, width in ((300, 451), (480, 200), (100, 100)):
        data = encode(photo_like(rng, height, width), quality=95)
        expected = resize_image(decode_image(data), preprocess).astype(np.float64)
        images, errors = decode_batch([data], device)
        assert errors == [None]
        got = resize_on_device(images[0], preprocess).cpu().numpy().astype(np.float64)
        assert got.shape == expected.shape
        # Decoders and resize kernels differ in rounding only: a few levels at most, ~1 on average.
        assert np.abs(got - expected).mean() < 1.5 and np.abs(got - expected).max() <= 24


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_falls_back_and_reports_bad_files(device: str, rng) -> None:
    good_jpeg = encode(photo_like(rng, 60, 80))
    png = encode(photo_like(rng, 50, 50), "PNG")
    gray = encode(photo_like(rng, 40, 40)[..., 0])
    cmyk = io.BytesIO()
    Image.fromarray(photo_like(rng, 30, 30)).convert("CMYK").save(cmyk, format="JPEG")
    broken = good_jpeg[: len(good_jpeg) // 3]
    datas = [good_jpeg, png, b"not an image", gray, cmyk.getvalue(), broken]
    pre = Preprocess(size=(32, 32))
    batches, ok, errors = prepare_batch(datas, {"a": pre, "b": Preprocess(size=(16, 16))}, device)
    assert ok.tolist() == [0, 1, 3, 4]
    assert [(i, e.reason) for i, e in errors] == [(2, "not an image"), (5, "truncated")]
    assert batches["a"].shape == (4, 32, 32, 3) and batches["b"].shape == (4, 16, 16, 3)
    for row, i in enumerate(ok):  # every kept image, whichever decoder took it, matches the CPU path
        expected = resize_image(decode_image(datas[i]), pre).astype(float)
        assert np.abs(batches["a"][row].cpu().numpy().astype(float) - expected).mean() < 3.0


def test_too_large_jpeg_is_refused_before_decoding(rng) -> None:
    data = encode(photo_like(rng, 100, 100))
    _, errors = decode_batch([data], "cpu", max_pixels=50 * 50)
    assert errors[0].reason == "too large"


def test_embeddings_from_device_decoded_images_match(rng) -> None:
    embedder = load_embedder(TINY_CLIP_SPEC, select_runtime("cpu"))
    datas = [encode(photo_like(rng, 90 + 10 * i, 120), quality=95) for i in range(3)]
    batches, ok, _ = prepare_batch(datas, {"emb": embedder.preprocess}, "cpu")
    on_device = embedder.embed_images(batches["emb"])
    on_cpu = embedder.embed_images(np.stack([resize_image(decode_image(d), embedder.preprocess) for d in datas]))
    assert (np.sum(on_device * on_cpu, axis=1) > 0.99).all()
