"""Decode image bytes into RGB arrays, robustly, and resize them the way each model expects.

Every decode failure raises :class:`ImageDecodeError` whose ``reason`` is one of
:data:`DECODE_REASONS`, so a batch job can turn it into an error row and go on.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

#: Reasons an image can fail to decode; ``ImageDecodeError.reason`` is always one of them.
DECODE_REASONS = ("empty", "truncated", "not an image", "too large", "unsupported format", "corrupt")

#: Default pixel budget: ImageNet-22k's largest photos are well under this; a decompression bomb is not.
DEFAULT_MAX_PIXELS = 100_000_000

#: Alpha is composited onto this colour so transparent regions look the same for every model.
DEFAULT_BACKGROUND = (255, 255, 255)

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image.

    Attributes:
        reason: one of :data:`DECODE_REASONS`.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in DECODE_REASONS:
            raise ValueError(f"unknown decode reason {reason!r}; expected one of {DECODE_REASONS}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def _sniff_unsupported(data: bytes) -> str | None:
    """Names well-known formats PIL cannot rasterise, so the error says more than 'not an image'."""
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "SVG (vector graphics) is not supported; rasterise it to PNG first"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIC/AVIF is not supported by this build; convert it to JPEG or PNG"
    if head.startswith(b"%pdf"):
        return "PDF is not an image"
    return None


def _os_error(exc: OSError, where: str) -> ImageDecodeError:
    """Maps PIL's OSErrors (its way of reporting bad data) to a decode reason."""
    message = str(exc)
    lowered = message.lower()
    if "truncated" in lowered or "broken data stream" in lowered or "premature end" in lowered:
        return ImageDecodeError("truncated", f"{where}: {message}")
    if "decoder" in lowered and "not available" in lowered:
        return ImageDecodeError("unsupported format", f"{where}: {message}")
    return ImageDecodeError("corrupt", f"{where}: {message}")


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB, compositing alpha onto ``background``."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert("L") clips 16-bit and float data instead of rescaling it.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        elif img.mode == "I":
            arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        else:
            arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> np.ndarray:
    """Decodes encoded image bytes into an RGB array.

    EXIF orientation is applied, any mode (grayscale, palette, CMYK, 16-bit, alpha) becomes 8-bit
    RGB, animated images yield their first frame.

    Args:
        data: the encoded file contents.
        max_pixels: images whose header claims more pixels are rejected before any pixel is decoded.
        draft_size: when set, JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8) that still keeps
            both sides at least this large; much faster for big photos headed to a small model input.
        background: RGB colour that transparent regions are composited onto.

    Returns:
        ``uint8`` array of shape (height, width, 3).

    Raises:
        ImageDecodeError: the bytes are empty, truncated, not an image, too large or unsupported.
    """
    if not data:
        raise ImageDecodeError("empty", "0 bytes")
    unsupported = _sniff_unsupported(data)
    if unsupported:
        raise ImageDecodeError("unsupported format", unsupported)
    try:
        with warnings.catch_warnings():
            # Our own pixel budget below replaces PIL's global one (which only warns below 2x).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too large", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image", f"unrecognised content ({len(data)} bytes)") from None
    except OSError as exc:
        raise _os_error(exc, "header") from None
    except (SyntaxError, ValueError) as exc:
        # Headers that identify a format but then fail to parse.
        raise ImageDecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None

    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("corrupt", f"{img.format} header claims {width}x{height} pixels")
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too large", f"{img.format} header claims {width}x{height} pixels (limit {max_pixels:,})"
        )
    try:
        if draft_size and img.format == "JPEG":
            # draft() only ever picks a scale whose result is still >= the requested size.
            img.draft("RGB", (draft_size, draft_size))
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img, background)
        return np.asarray(rgb, dtype=np.uint8).copy()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too large", str(exc)) from None
    except OSError as exc:
        raise _os_error(exc, img.format or "image") from None
    except (SyntaxError, ValueError, IndexError, EOFError) as exc:
        raise ImageDecodeError("corrupt", f"{img.format}: {type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its input: resize, crop, normalise.

    Mirrors timm's eval transform (resize the shorter side to ``size / crop_pct``, centre crop) and
    open_clip's (``crop_pct=1``; ``squash`` for models trained that way), so that resizing here gives
    the same pixels as the reference transforms.

    Attributes:
        size: output (height, width).
        crop_pct: fraction of the resized image kept by the centre crop.
        crop_mode: ``center`` (keep aspect, crop) or ``squash`` (stretch to the scaled size, crop).
        interpolation: PIL resampling filter name.
        mean: per-channel mean on the 0..1 scale.
        std: per-channel standard deviation on the 0..1 scale.
    """

    size: tuple[int, int] = (224, 224)
    crop_pct: float = 1.0
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) with positive sides, got {self.size}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.crop_mode not in ("center", "squash"):
            raise ValueError(f"crop_mode must be 'center' or 'squash', got {self.crop_mode!r}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 channels and std > 0, got {self.mean} / {self.std}")

    @property
    def draft_size(self) -> int:
        """The smallest side a decoded image needs before resizing (for JPEG draft decoding)."""
        return math.floor(max(self.size) / self.crop_pct)


def header_pixels(data: bytes) -> int:
    """The pixel count an image's header claims (width x height), read without decoding a pixel;
    0 when there is no readable header (decoding then fails at once)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Exception:  # noqa: BLE001 - any unreadable header costs nothing to decode
        return 0
    return int(width) * int(height)


def resize_geometry(width: int, height: int, preprocess: Preprocess) -> tuple[int, int]:
    """The (width, height) an image is resized to before the centre crop (shared with the device path)."""
    scale_h = math.floor(preprocess.size[0] / preprocess.crop_pct)
    scale_w = math.floor(preprocess.size[1] / preprocess.crop_pct)
    if preprocess.crop_mode == "squash" or scale_h != scale_w:
        return scale_w, scale_h
    # Same rounding as torchvision's Resize(int): shorter side to the target, longer truncated.
    if width <= height:
        return scale_h, int(scale_h * height / width)
    return int(scale_h * width / height), scale_h


def center_crop_box(new_h: int, new_w: int, preprocess: Preprocess) -> tuple[int, int, int, int]:
    """Padding (top, left) of a too-small resized image, then the crop's (top, left)."""
    out_h, out_w = preprocess.size
    pad_h, pad_w = max(out_h - new_h, 0), max(out_w - new_w, 0)
    new_h, new_w = new_h + pad_h, new_w + pad_w
    return pad_h, pad_w, int(round((new_h - out_h) / 2.0)), int(round((new_w - out_w) / 2.0))


def resize_image(image: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """Resizes and centre-crops one RGB image to the model's input size.

    Args:
        image: ``uint8`` array (height, width, 3).
        preprocess: the model's preprocessing.

    Returns:
        ``uint8`` array of shape ``preprocess.size + (3,)``.
    """
    out_h, out_w = preprocess.size
    pil = Image.fromarray(image)
    new_w, new_h = resize_geometry(pil.size[0], pil.size[1], preprocess)
    if (new_w, new_h) != pil.size:
        pil = pil.resize((new_w, new_h), _INTERPOLATION[preprocess.interpolation])
    arr = np.asarray(pil)
    pad_h, pad_w, top, left = center_crop_box(new_h, new_w, preprocess)
    if pad_h or pad_w:
        # Only possible for extreme aspect ratios: pad symmetrically with zeros like CenterCrop does.
        arr = np.pad(arr, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    return np.ascontiguousarray(arr[top : top + out_h, left : left + out_w])


def load_image(data: bytes, preprocess: Preprocess, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes bytes and resizes them for one model (JPEG draft decoding on).

    Raises:
        ImageDecodeError: as :func:`decode_image`.
    """
    return resize_image(decode_image(data, max_pixels=max_pixels, draft_size=preprocess.draft_size), preprocess)
