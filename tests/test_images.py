"""Decoding: every failure mode gives the typed error with its reason; odd but valid files decode
to the right shape, colours and orientation; resizing matches timm's and open_clip's transforms."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.images import ImageDecodeError, Preprocess, decode_image, load_image, resize_image
from pipeline.models import Runtime, to_model_input


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def photo(rng: np.random.Generator, height: int = 64, width: int = 96) -> np.ndarray:
    """A smooth colourful image (compresses like a photo, unlike white noise)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     np.full_like(x, 128)], axis=-1)
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but holds only a few bytes of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b""))


# --- failures --------------------------------------------------------------------------------


def assert_reason(data: bytes, reason: str, **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    assert info.value.reason == reason, str(info.value)
    assert str(info.value).startswith(reason)
    return info.value


def test_empty_file() -> None:
    assert_reason(b"", "empty")


def test_truncated_jpeg(rng: np.random.Generator) -> None:
    data = encode(Image.fromarray(photo(rng, 256, 256)), "JPEG", quality=90)
    assert_reason(data[: len(data) // 2], "truncated")


def test_truncated_png(rng: np.random.Generator) -> None:
    data = encode(Image.fromarray(photo(rng, 256, 256)), "PNG")
    err = assert_reason(data[: len(data) // 2], "truncated")
    assert "PNG" in str(err)


def test_text_named_jpg(tmp_path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is a shopping list, not a photo\n")
    assert_reason(path.read_bytes(), "not an image")


def test_random_bytes(rng: np.random.Generator) -> None:
    assert_reason(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image")


def test_png_claiming_40000_squared_is_rejected_before_decoding(monkeypatch) -> None:
    # If any pixel were decoded, load() would run: make that fail loudly instead.
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
    err = assert_reason(png_claiming(40000, 40000), "too large")
    assert "1600000000 pixels" in str(err)


def test_pixel_budget_is_ours_not_pils(rng: np.random.Generator) -> None:
    # 12000 x 12000 is below PIL's hard limit (it only warns); our budget still rejects it.
    assert_reason(png_claiming(12000, 12000), "too large")
    small = encode(Image.fromarray(photo(rng, 100, 100)), "PNG")
    assert_reason(small, "too large", max_pixels=5000)
    assert decode_image(small, max_pixels=10000).shape == (100, 100, 3)


def test_svg_is_unsupported() -> None:
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">' \
          b'<rect width="10" height="10" fill="red"/></svg>'
    err = assert_reason(svg, "unsupported format")
    assert "SVG" in str(err)


def test_reason_must_be_known() -> None:
    with pytest.raises(ValueError):
        ImageDecodeError("mystery")


# --- odd but valid ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF"])
def test_common_formats(rng: np.random.Generator, fmt: str) -> None:
    src = photo(rng, 40, 60)
    out = decode_image(encode(Image.fromarray(src), fmt))
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    # Lossy or palette formats differ a little; a wrong channel order or transpose would not.
    assert np.abs(out.astype(int) - src.astype(int)).mean() < 12


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (30, 20), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(cmyk, "JPEG", quality=95))
    assert out.shape == (20, 30, 3)
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_rescaled_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 64 * 16).reshape(16, 64).astype(np.uint16)
    out = decode_image(encode(Image.fromarray(ramp), "PNG"))
    assert out.shape == (16, 64, 3)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert np.all(out[..., 0] == out[..., 1])
    # Mid-grey stays mid-grey (a clipping convert would saturate it to 255).
    assert 100 < out[8, 32, 0] < 160


def test_palette_png() -> None:
    img = Image.new("P", (8, 8))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))  # left half blue, right half red
    out = decode_image(encode(img, "PNG"))
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[0, 7]) == (255, 0, 0)


def test_palette_with_transparency_composites_on_background() -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 2, 4))
    out = decode_image(encode(img, "PNG", transparency=0))
    assert tuple(out[0, 3]) == (255, 255, 255) and tuple(out[0, 0]) == (200, 0, 0)


def test_alpha_composited_on_fixed_background() -> None:
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :5, 3] = 255  # left opaque red, right fully transparent
    data = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    out = decode_image(data)
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 9]) == (255, 255, 255)
    assert tuple(decode_image(data, background=(0, 0, 0))[0, 9]) == (0, 0, 0)


def test_grayscale_and_la() -> None:
    gray = Image.fromarray(np.full((5, 7), 77, np.uint8), "L")
    out = decode_image(encode(gray, "PNG"))
    assert out.shape == (5, 7, 3) and np.all(out == 77)
    la = Image.fromarray(np.dstack([np.full((5, 7), 77, np.uint8), np.full((5, 7), 255, np.uint8)]), "LA")
    assert np.all(decode_image(encode(la, "PNG")) == 77)


def test_animated_gif_gives_first_frame() -> None:
    red = Image.new("RGB", (12, 12), (255, 0, 0))
    blue = Image.new("RGB", (12, 12), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode_image(data)
    assert out.shape == (12, 12, 3) and tuple(out[6, 6]) == (255, 0, 0)


def test_exif_orientation_is_applied() -> None:
    # Stored 40 wide x 20 high with a red block top-left; orientation 6 means "rotate 90 degrees
    # clockwise to display", so it shows 20 wide x 40 high with the block top-right.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:8, :8] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    out = decode_image(encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)
    assert out[2, 17, 0] > 200 and out[2, 2, 0] < 50


@pytest.mark.parametrize("size", [(1, 1), (12, 4000), (4000, 12)])
def test_extreme_sizes(size: tuple[int, int]) -> None:
    height, width = size
    data = encode(Image.new("RGB", (width, height), (0, 128, 0)), "PNG")
    out = decode_image(data)
    assert out.shape == (height, width, 3)
    resized = resize_image(out, Preprocess(size=(32, 32), crop_pct=0.875))
    assert resized.shape == (32, 32, 3)


def test_jpeg_draft_decodes_big_photos_smaller_but_never_below_target(rng: np.random.Generator) -> None:
    data = encode(Image.fromarray(photo(rng, 1500, 2000)), "JPEG", quality=90)
    full = decode_image(data)
    drafted = decode_image(data, draft_size=224)
    assert full.shape == (1500, 2000, 3)
    assert min(drafted.shape[:2]) >= 224 and drafted.shape[0] < 1500
    # Same picture: compare both at a common small size.
    pre = Preprocess(size=(64, 64))
    diff = np.abs(resize_image(full, pre).astype(int) - resize_image(drafted, pre).astype(int)).mean()
    assert diff < 6


# --- preprocessing matches the reference transforms ------------------------------------------


def normalised(image: np.ndarray, pre: Preprocess) -> torch.Tensor:
    return to_model_input(resize_image(image, pre)[None], pre, Runtime())[0]


@pytest.mark.parametrize("shape", [(200, 300), (300, 200), (150, 150)])
def test_resize_matches_timm_eval_transform(rng: np.random.Generator, shape: tuple[int, int]) -> None:
    import timm
    from timm.data import create_transform, resolve_model_data_config

    from pipeline.models import timm_preprocess

    model = timm.create_model("test_efficientnet", pretrained=False)
    reference = create_transform(**resolve_model_data_config(model))
    image = photo(rng, *shape)
    pre = timm_preprocess(model)
    assert pre.crop_pct < 1.0  # the resize-then-crop path is exercised
    expected = reference(Image.fromarray(image))
    torch.testing.assert_close(normalised(image, pre), expected, atol=1e-4, rtol=0)


def test_resize_matches_open_clip_transform(rng: np.random.Generator) -> None:
    import open_clip

    from pipeline.models import open_clip_preprocess, register_project_open_clip_configs

    register_project_open_clip_configs()
    model, _, reference = open_clip.create_model_and_transforms("lookalike-tiny-clip", pretrained=None)
    image = photo(rng, 90, 140)
    pre = open_clip_preprocess(model)
    torch.testing.assert_close(normalised(image, pre), reference(Image.fromarray(image)), atol=1e-4, rtol=0)


def test_load_image_resizes_to_model_input(rng: np.random.Generator) -> None:
    data = encode(Image.fromarray(photo(rng, 480, 640)), "JPEG")
    out = load_image(data, Preprocess(size=(160, 160), crop_pct=0.95))
    assert out.shape == (160, 160, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("bad", [dict(size=(0, 10)), dict(crop_pct=0.0), dict(crop_mode="border"),
                                 dict(interpolation="cubic"), dict(std=(0.0, 1.0, 1.0))])
def test_preprocess_validates(bad: dict) -> None:
    with pytest.raises(ValueError):
        Preprocess(**bad)
