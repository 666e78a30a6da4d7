"""timm models: created with their weights as the spec says, and their eval preprocessing (the
classifier, a timm embedder and the fine-tuning backbone all start here)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import timm
import torch

from pipeline.images import Preprocess
from pipeline.models.spec import ModelSpec, as_spec
from pipeline.models.weights import convert_efficientnet_pytorch, locate_weights, read_state_dict, seeded

logger = logging.getLogger(__name__)


def create_timm_model(spec: str | ModelSpec, cache_dir: str | None = None, *,
                      num_classes: int | None = None) -> torch.nn.Module:
    """Creates a timm model with its weights resolved as the spec says (see :func:`locate_weights`).

    Args:
        spec: a ``timm:`` model spec.
        cache_dir: the hub cache to look in (default: the standard one).
        num_classes: replace the head by one with this many outputs (0: no head, pooled features);
            None keeps the pretrained head.

    Raises:
        FileNotFoundError: no weights found.
    """
    spec = as_spec(spec)
    head = {} if num_classes is None else {"num_classes": num_classes}
    if spec.weights == "hub":
        return timm.create_model(spec.name, pretrained=True, **head)
    with seeded():
        model = timm.create_model(spec.name, pretrained=False)
    source = locate_weights(spec, cache_dir)
    if isinstance(source, Path):
        state = read_state_dict(source)
        if any(k.startswith("_blocks.") for k in state):
            state = convert_efficientnet_pytorch(state, model)
        model.load_state_dict(state, strict=True)
        logger.info("loaded %s weights from %s", spec, source)
    if num_classes is not None:
        model.reset_classifier(num_classes)
    return model


def timm_preprocess(model: torch.nn.Module, input_size: int | None = None) -> Preprocess:
    """The timm model's eval preprocess (at ``input_size`` pixels square when given)."""
    cfg = timm.data.resolve_model_data_config(model)
    preprocess = Preprocess(
        size=tuple(cfg["input_size"][1:]),
        crop_pct=float(cfg.get("crop_pct") or 0.875),
        crop_mode=cfg.get("crop_mode") or "center",
        interpolation=cfg.get("interpolation") or "bicubic",
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )
    return dataclasses.replace(preprocess, size=(input_size, input_size)) if input_size else preprocess
