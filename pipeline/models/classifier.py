"""The classifier: a timm model (see :mod:`pipeline.models.timm_models`) predicting the top classes."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.images import Preprocess
from pipeline.labels import LabelSpace, label_space_for, load_label_space
from pipeline.models.catalog import require_known
from pipeline.models.runtime import Runtime, prepare_model, select_runtime, to_model_input
from pipeline.models.spec import ModelSpec, as_spec
from pipeline.models.timm_models import create_timm_model, timm_preprocess


class Classifier:
    """Predicts the top classes of a batch of images.

    Attributes:
        spec: the model spec it was loaded from.
        preprocess: the input each image must be resized to (:func:`pipeline.images.resize_image`).
        labels: the label space of its outputs.
        runtime: device and precision.
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, preprocess: Preprocess,
                 labels: LabelSpace, runtime: Runtime) -> None:
        self.model = model
        self.spec = spec
        self.preprocess = preprocess
        self.labels = labels
        self.runtime = runtime

    def logits(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw class scores (float32, on the model's device) for a uint8 batch (N, H, W, 3)."""
        with self.runtime.inference():
            return self.model(to_model_input(images, self.preprocess, self.runtime)).float()

    def classify(self, images: np.ndarray | torch.Tensor, top_n: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Top-n classes of each image.

        Args:
            images: ``uint8`` batch (N, H, W, 3) at ``self.preprocess.size``.
            top_n: how many classes to return per image.

        Returns:
            ``(indices, probabilities)``, int32 and float32 arrays of shape (N, top_n), best first.

        Raises:
            ValueError: ``top_n`` below 1, or images not at ``self.preprocess.size``.
        """
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        top_n = min(top_n, len(self.labels))
        with self.runtime.inference():
            probs = self.logits(images).softmax(dim=-1)
            values, indices = probs.topk(top_n, dim=-1)
        return indices.cpu().numpy().astype(np.int32), values.cpu().numpy().astype(np.float32)


def load_classifier(spec: str | ModelSpec, runtime: Runtime | None = None, *,
                    label_space: str | None = None, cache_dir: str | None = None) -> Classifier:
    """Loads a timm classifier.

    Args:
        spec: a ``timm:`` model spec.
        runtime: device and precision; :func:`select_runtime` by default.
        label_space: name of the label space (see :mod:`pipeline.labels`); inferred from the
            class count by default.
        cache_dir: the hub cache to look in (default: the standard one).

    Raises:
        ValueError: not a timm spec, or a model without a classification head.
        FileNotFoundError: no weights found.
    """
    spec = as_spec(spec)
    if spec.library != "timm":
        raise ValueError(f"classifiers are timm models; got {spec} (use 'timm:<model>')")
    require_known(spec)
    runtime = runtime or select_runtime()
    model = create_timm_model(spec, cache_dir)
    if not getattr(model, "num_classes", 0):
        raise ValueError(f"{spec} has no classification head (num_classes=0); pick a classifier model")
    labels = load_label_space(label_space) if label_space else label_space_for(model.num_classes)
    if len(labels) != model.num_classes:
        raise ValueError(f"label space {labels.name} has {len(labels)} classes but {spec} predicts {model.num_classes}")
    return Classifier(prepare_model(model, runtime), spec, timm_preprocess(model), labels, runtime)
