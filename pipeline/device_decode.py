"""The GPU fast path's input side: JPEGs decoded and resized on the model's device.

``torchvision.io.decode_jpeg`` decodes a whole batch on a CUDA device (nvJPEG); the resize and
centre crop then run there too, with the same geometry as :func:`pipeline.images.resize_image`
(antialiased bicubic, so results match the CPU path within a few intensity levels). Only the
encoded bytes cross to the device. Everything else — other formats, JPEGs the device decoder
rejects (CMYK, some progressive files), inputs over the pixel budget — takes the CPU path
(:func:`pipeline.images.decode_image`), so a bad file still becomes an ``ImageDecodeError`` and
an error row. On a CPU device this is the same code, decoded by libjpeg-turbo (used in tests).
"""

from __future__ import annotations

import io
import logging

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    Preprocess,
    center_crop_box,
    decode_image,
    resize_geometry,
)

logger = logging.getLogger(__name__)
JPEG_MAGIC = b"\xff\xd8\xff"
_TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG header without decoding pixels; None if not a readable JPEG."""
    if not data.startswith(JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size if img.format == "JPEG" and img.mode in ("RGB", "L") else None
    except Exception:  # noqa: BLE001 - anything unreadable goes to the CPU path, which names the error
        return None


def decode_batch(datas: list[bytes], device: str | torch.device, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[torch.Tensor | None], list[ImageDecodeError | None]]:
    """Decodes a batch into (3, H, W) uint8 tensors on ``device``.

    Returns:
        The images (None where decoding failed) and the errors (None where it worked), in order.
    """
    images: list[torch.Tensor | None] = [None] * len(datas)
    errors: list[ImageDecodeError | None] = [None] * len(datas)
    sizes = [_jpeg_size(d) for d in datas]
    on_device = [i for i, size in enumerate(sizes) if size and size[0] * size[1] <= max_pixels]
    if on_device:
        encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in on_device]
        try:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        except RuntimeError:
            decoded = []
            for tensor in encoded:  # one bad file fails the batched call: find it
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device,
                                               apply_exif_orientation=True))
                except RuntimeError:
                    decoded.append(None)
        for i, image in zip(on_device, decoded):
            images[i] = image
    for i, data in enumerate(datas):
        if images[i] is None:
            try:
                array = decode_image(data, max_pixels=max_pixels)
            except ImageDecodeError as exc:
                errors[i] = exc
                continue
            images[i] = torch.from_numpy(array).permute(2, 0, 1).to(device)
    return images, errors


def resize_on_device(image: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """Resizes and centre-crops a (3, H, W) uint8 tensor like :func:`pipeline.images.resize_image`.

    Returns:
        uint8 tensor (out_h, out_w, 3) on the image's device.
    """
    height, width = image.shape[1:]
    new_w, new_h = resize_geometry(width, height, preprocess)
    x = image.unsqueeze(0)
    if (new_w, new_h) != (width, height):
        mode = _TORCH_MODES.get(preprocess.interpolation, "bicubic")
        x = torch.nn.functional.interpolate(x.float(), size=(new_h, new_w), mode=mode,
                                            antialias=mode != "nearest",
                                            align_corners=False if mode != "nearest" else None)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    pad_h, pad_w, top, left = center_crop_box(new_h, new_w, preprocess)
    if pad_h or pad_w:
        x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    out_h, out_w = preprocess.size
    return x[0, :, top: top + out_h, left: left + out_w].permute(1, 2, 0).contiguous()


def prepare_batch(datas: list[bytes], preprocesses: dict[str, Preprocess], device: str | torch.device, *,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[dict[str, torch.Tensor], np.ndarray,
                                                                 list[tuple[int, ImageDecodeError]]]:
    """Decodes once and resizes for every model, on ``device``.

    Args:
        preprocesses: e.g. ``{"image_cls": classifier.preprocess, "image_emb": embedder.preprocess}``.

    Returns:
        uint8 (N_ok, H, W, 3) batches per name, the indices of the images that decoded, and
        ``(index, error)`` for those that did not.
    """
    images, errors = decode_batch(datas, device, max_pixels=max_pixels)
    ok = np.array([i for i, image in enumerate(images) if image is not None], dtype=np.int64)
    by_preprocess: dict[Preprocess, torch.Tensor] = {}  # models that share a preprocess share a batch
    for preprocess in preprocesses.values():
        if preprocess not in by_preprocess:
            resized = [resize_on_device(images[i], preprocess) for i in ok]
            by_preprocess[preprocess] = torch.stack(resized) if resized else torch.zeros(
                (0, *preprocess.size, 3), dtype=torch.uint8, device=device)
    batches = {name: by_preprocess[preprocess] for name, preprocess in preprocesses.items()}
    return batches, ok, [(i, e) for i, e in enumerate(errors) if e is not None]
