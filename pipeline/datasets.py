"""Real images that ship inside installed packages, for demos and evaluations without downloads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
