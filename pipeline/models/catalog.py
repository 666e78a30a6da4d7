"""Which model names each library knows: the check every loader (and the drivers, before they
start workers) runs on a spec, with the closest known names when one is misspelt."""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

import open_clip
import timm
from torchvision.models import list_models

from pipeline.models.spec import LIBRARIES, ModelSpec, as_spec

#: open_clip architectures this project adds (a tiny one for tests); every process registers them
#: on first use, so Ray workers know them too.
MODEL_CONFIG_DIR = Path(__file__).parents[1] / "model_configs"


@functools.cache
def register_project_open_clip_configs() -> None:
    """Adds the architectures in :data:`MODEL_CONFIG_DIR` to open_clip (once per process)."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)


def require_known(spec: str | ModelSpec) -> ModelSpec:
    """The parsed spec, if its library has a model of that name.

    Raises:
        ValueError: an unknown library or model name (with the closest known names).
    """
    spec = as_spec(spec)
    if spec.library == "head":  # a file: pipeline.models.head checks it when loading
        return spec
    if spec.library == "timm":
        if timm.is_model(spec.name):
            return spec
        known = timm.list_models()
    elif spec.library == "open_clip":
        register_project_open_clip_configs()
        known = open_clip.list_models()
        if spec.name in known:
            return spec
    elif spec.library == "torchvision":
        known = list_models()
        if spec.name in known:
            return spec
    else:
        raise ValueError(f"bad model spec {str(spec)!r}: the library must be one of {', '.join(LIBRARIES)}")
    close = difflib.get_close_matches(spec.name.split(".")[0], known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {str(spec)!r}: {spec.library} has no model named {spec.name!r}{hint}")
