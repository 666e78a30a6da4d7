"""The embedder: open_clip models (image and text towers) or a timm backbone's pooled features,
mapping images (and texts) to L2-normalised vectors."""

from __future__ import annotations


import numpy as np
import open_clip
import timm
import torch

from pipeline.images import Preprocess
from pipeline.models.catalog import register_project_open_clip_configs, require_known
from pipeline.models.runtime import Runtime, prepare_model, select_runtime, to_model_input
from pipeline.models.spec import ModelSpec, as_spec
from pipeline.models.timm_models import create_timm_model, timm_preprocess
from pipeline.models.weights import (
    locate_weights,
    open_clip_pretrained_cfg,
    read_state_dict,
    seeded,
    trained_embedding_metadata,
)

_OPEN_CLIP_PREPROCESS_KEYS = ("size", "mean", "std", "interpolation", "resize_mode")


class Embedder:
    """Maps images (and, for CLIP models, texts) to L2-normalised vectors.

    Attributes:
        spec: the model spec it was loaded from.
        preprocess: the input each image must be resized to.
        dim: the embedding dimension.
        runtime: device and precision.
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, preprocess: Preprocess, dim: int,
                 runtime: Runtime, tokenizer=None) -> None:
        self.model = model
        self.spec = spec
        self.preprocess = preprocess
        self.dim = dim
        self.runtime = runtime
        self._tokenizer = tokenizer

    @property
    def has_text(self) -> bool:
        """Whether :meth:`embed_texts` is available (open_clip models)."""
        return self._tokenizer is not None

    def embed_images(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embeds a uint8 batch (N, H, W, 3) at ``self.preprocess.size``.

        Returns:
            float32 array (N, dim), each row of unit L2 norm.
        """
        x = to_model_input(images, self.preprocess, self.runtime)
        with self.runtime.inference():
            if self.spec.library == "open_clip":
                features = self.model.encode_image(x)
            else:
                features = self.model(x)
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embeds texts into the same space as the images (open_clip models only).

        Raises:
            ValueError: the model has no text tower.
        """
        if not self.has_text:
            raise ValueError(f"{self.spec} has no text tower; text queries need an open_clip embedder")
        tokens = self._tokenizer(list(texts)).to(self.runtime.device)
        with self.runtime.inference():
            features = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return features.cpu().numpy().astype(np.float32)


def open_clip_preprocess(model: torch.nn.Module) -> Preprocess:
    """The open_clip model's image preprocess (from its visual tower's preprocess config).

    Raises:
        ValueError: a resize mode this project does not implement.
    """
    cfg = dict(model.visual.preprocess_cfg)
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mode = cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ValueError(f"open_clip resize_mode {mode!r} is not supported (only 'shortest' and 'squash')")
    return Preprocess(size=size, crop_pct=1.0, crop_mode="center" if mode == "shortest" else "squash",
                      interpolation=cfg.get("interpolation", "bicubic"),
                      mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def create_open_clip_model(spec: str | ModelSpec, cache_dir: str | None = None) -> torch.nn.Module:
    """Creates an open_clip model with its weights resolved as the spec says (see :func:`locate_weights`).

    Args:
        spec: an ``open_clip:`` model spec.
        cache_dir: the hub cache to look in (default: the standard one).

    Raises:
        ValueError: no or an unknown pretrained tag where one is needed.
        FileNotFoundError: no weights found.
    """
    spec = as_spec(spec)
    register_project_open_clip_configs()
    if spec.weights == "hub":
        if not spec.tag:
            raise ValueError(f"{spec}: '@hub' needs a pretrained tag, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k@hub")
        return open_clip.create_model(spec.name, pretrained=spec.tag, cache_dir=cache_dir)
    # A tag's preprocessing (mean, std, resize) applies whatever the weights' source is.
    cfg = open_clip_pretrained_cfg(spec)
    force = {k: cfg[k] for k in _OPEN_CLIP_PREPROCESS_KEYS if k in cfg}
    source = locate_weights(spec, cache_dir)
    if source == "random":
        with seeded():
            return open_clip.create_model(spec.name, pretrained=None, force_preprocess_cfg=force)
    return open_clip.create_model(spec.name, pretrained=str(source), force_preprocess_cfg=force)


def pooled_dim(model: torch.nn.Module) -> int:
    """Width of a timm model's pre-logits features (after any projection past the pooling, as in
    MobileNetV3, where it differs from ``num_features``)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def load_embedder(spec: str | ModelSpec, runtime: Runtime | None = None, *,
                  cache_dir: str | None = None) -> Embedder:
    """Loads an embedder: an open_clip model, or a timm backbone's pooled features.

    Args:
        spec: ``open_clip:<arch>/<tag>`` or ``timm:<model>`` (weights as in :class:`ModelSpec`).
        runtime: device and precision; :func:`select_runtime` by default.
        cache_dir: the hub cache to look in (default: the standard one).

    Raises:
        ValueError: a spec this loader cannot use.
        FileNotFoundError: no weights found.
    """
    spec = require_known(spec)
    runtime = runtime or select_runtime()
    if spec.library == "open_clip":
        model = create_open_clip_model(spec, cache_dir)
        dim = int(model.text_projection.shape[-1]) if getattr(model, "text_projection", None) is not None \
            else int(model.visual.output_dim)
        tokenizer = open_clip.get_tokenizer(spec.name)
        return Embedder(prepare_model(model, runtime), spec, open_clip_preprocess(model), dim, runtime, tokenizer)
    if spec.library == "timm":
        trained = trained_embedding_metadata(spec)
        if trained is None:
            model = create_timm_model(spec, cache_dir, num_classes=0)
            return Embedder(prepare_model(model, runtime), spec, timm_preprocess(model), pooled_dim(model), runtime)
        # A triplet-trained model (pipeline.training): its head is the embedding.
        with seeded():
            model = timm.create_model(spec.name, pretrained=False, num_classes=int(trained["dim"]))
        model.load_state_dict(read_state_dict(spec.weight_file), strict=True)
        preprocess = timm_preprocess(model, int(trained["input_size"]))
        return Embedder(prepare_model(model, runtime), spec, preprocess, int(trained["dim"]), runtime)
    raise ValueError(f"embedders are open_clip or timm models; got {spec}")
