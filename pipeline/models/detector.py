"""The detector: a torchvision detection model plus the crop policy that picks each image's box."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.models import get_model, get_model_weights, list_models

from pipeline.models.crop import CropPolicy, Detections, choose_crop
from pipeline.models.runtime import Runtime, host_tensor, prepare_model, select_runtime
from pipeline.models.spec import ModelSpec, as_spec
from pipeline.models.weights import locate_weights, read_state_dict, seeded


class Detector:
    """A torchvision detection model plus the crop policy.

    Attributes:
        spec: the model spec it was loaded from.
        categories: the detector's class names (COCO for torchvision's models).
        policy: the crop thresholds.
        runtime: device and precision.
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, categories: list[str],
                 policy: CropPolicy, runtime: Runtime) -> None:
        self.model = model
        self.spec = spec
        self.categories = categories
        self.policy = policy
        self.runtime = runtime

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        """Runs the detector on RGB images of any sizes (one forward pass for the batch)."""
        if not images:
            return []
        tensors = [host_tensor(im).to(self.runtime.device).permute(2, 0, 1).float() / 255
                   for im in images]
        with self.runtime.inference():
            outputs = self.model(tensors)
        return [Detections(boxes=o["boxes"].float().cpu().numpy(), scores=o["scores"].float().cpu().numpy(),
                           labels=o["labels"].cpu().numpy()) for o in outputs]

    def crop_boxes(self, images: list[np.ndarray]) -> list[tuple[int, int, int, int] | None]:
        """The crop box of each image under this detector's policy (None: keep the whole image)."""
        return [choose_crop(d, im.shape[:2], self.policy) for d, im in zip(self.detect(images), images)]


def load_detector(spec: str | ModelSpec, runtime: Runtime | None = None, *,
                  policy: CropPolicy = CropPolicy()) -> Detector:
    """Loads a torchvision detection model.

    Weights: ``@random`` (tests), ``@/path`` (a state dict), ``@hub`` (download allowed), or by
    default torchvision's own cache (``$TORCH_HOME/hub/checkpoints``).

    Raises:
        ValueError: not a torchvision detector spec.
        FileNotFoundError: no weights found.
    """
    spec = as_spec(spec)
    known = list_models(module=torchvision.models.detection)
    if spec.library != "torchvision" or spec.name not in known:
        raise ValueError(f"detectors are torchvision detection models ({', '.join(known)}); got {spec}")
    runtime = runtime or select_runtime()
    weights_enum = get_model_weights(spec.name).DEFAULT
    categories = list(weights_enum.meta["categories"])
    if spec.weights == "hub":
        model = get_model(spec.name, weights=weights_enum)
    else:
        with seeded():
            model = get_model(spec.name, weights=None, weights_backbone=None, num_classes=len(categories))
        source = locate_weights(spec)
        if isinstance(source, Path):
            model.load_state_dict(read_state_dict(source), strict=True)
    # The model's own score cut-off (0.05 for torchvision's) must not hide boxes the policy accepts.
    thresholded = getattr(model, "roi_heads", model)
    if hasattr(thresholded, "score_thresh"):
        thresholded.score_thresh = min(float(thresholded.score_thresh), policy.min_score)
    return Detector(prepare_model(model, runtime), spec, categories, policy, runtime)
