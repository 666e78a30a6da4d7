"""The crop policy: which detected box ("largest box near the centre") an image is searched by."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Boxes found in one image, in pixel coordinates (x0, y0, x1, y1)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class CropPolicy:
    """"Largest box near the centre", with its thresholds.

    Attributes:
        min_score: ignore boxes the detector is less sure of.
        max_center_offset: a box's centre must lie within this fraction of the image's half
            diagonal from the image centre.
        min_area: ignore boxes smaller than this fraction of the image.
        margin: grow the chosen box by this fraction of its size on each side (tight boxes hurt).
    """

    min_score: float = 0.5
    max_center_offset: float = 0.5
    min_area: float = 0.05
    margin: float = 0.1

    def __post_init__(self) -> None:
        for name in ("min_score", "max_center_offset", "min_area"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"CropPolicy.{name} must be in [0, 1], got {value}")
        if self.margin < 0:
            raise ValueError(f"CropPolicy.margin must be >= 0, got {self.margin}")


def choose_crop(detections: Detections, image_size: tuple[int, int],
                policy: CropPolicy = CropPolicy()) -> tuple[int, int, int, int] | None:
    """Picks the crop box: the largest confident box whose centre is near the image centre.

    Args:
        detections: the detector's boxes for the image.
        image_size: (height, width) of the image.
        policy: the thresholds.

    Returns:
        ``(x0, y0, x1, y1)`` in integer pixels (margin applied, clipped to the image), or None when
        no box qualifies (the caller then searches with the whole image).
    """
    height, width = image_size
    boxes = np.asarray(detections.boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(detections.scores, dtype=np.float64).reshape(-1)
    if len(boxes) == 0:
        return None
    box_w = (boxes[:, 2] - boxes[:, 0]).clip(min=0)
    box_h = (boxes[:, 3] - boxes[:, 1]).clip(min=0)
    area = box_w * box_h / float(height * width)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 - width / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 - height / 2
    offset = np.hypot(cx, cy) / (0.5 * np.hypot(width, height))
    ok = (scores >= policy.min_score) & (area >= policy.min_area) & (offset <= policy.max_center_offset)
    if not ok.any():
        return None
    best = int(np.flatnonzero(ok)[np.argmax(area[ok])])
    x0, y0, x1, y1 = boxes[best]
    dx, dy = box_w[best] * policy.margin, box_h[best] * policy.margin
    x0, y0 = max(0, int(np.floor(x0 - dx))), max(0, int(np.floor(y0 - dy)))
    x1, y1 = min(width, int(np.ceil(x1 + dx))), min(height, int(np.ceil(y1 + dy)))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return x0, y0, x1, y1


def crop_image(image: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """Returns the image region inside ``box`` (the whole image when box is None)."""
    if box is None:
        return image
    x0, y0, x1, y1 = box
    return image[y0:y1, x0:x1]
