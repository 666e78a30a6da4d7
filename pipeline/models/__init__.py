"""Load the classifier, the embedder and the detector the same way everywhere.

Models are named by spec strings, ``library:name[/tag][@weights]`` (examples in
:mod:`pipeline.models.spec`). Nothing is downloaded unless the spec says ``@hub``: a missing weight
file is a ``FileNotFoundError`` that says where it looked and how to provide the weights
(:func:`pipeline.models.weights.locate_weights`).
"""

from __future__ import annotations

from pipeline.models.catalog import MODEL_CONFIG_DIR, register_project_open_clip_configs, require_known
from pipeline.models.classifier import Classifier, load_classifier
from pipeline.models.crop import CropPolicy, Detections, choose_crop, crop_image
from pipeline.models.detector import Detector, load_detector
from pipeline.models.embedder import Embedder, create_open_clip_model, load_embedder, open_clip_preprocess
from pipeline.models.fused import ImageModels, head_for, load_image_models
from pipeline.models.head import ClassHead, HeadNet, head_spec, load_head, save_head
from pipeline.models.runtime import Runtime, prepare_model, select_runtime, to_model_input
from pipeline.models.spec import (
    DEFAULT_CLASSIFIER,
    DEFAULT_EMBEDDER,
    EMBEDDING_FORMAT,
    LIBRARIES,
    NO_CLASSIFIER,
    ModelSpec,
    as_spec,
)
from pipeline.models.timm_models import create_timm_model, timm_preprocess
from pipeline.models.weights import (
    WeightSources,
    convert_efficientnet_pytorch,
    locate_weights,
    offline_package_file,
    open_clip_pretrained_cfg,
    read_state_dict,
    seeded,
    trained_embedding_metadata,
)

__all__ = [
    "DEFAULT_CLASSIFIER", "DEFAULT_EMBEDDER", "EMBEDDING_FORMAT", "LIBRARIES", "MODEL_CONFIG_DIR", "NO_CLASSIFIER",
    "ClassHead", "Classifier", "CropPolicy", "Detections", "Detector", "Embedder", "ImageModels", "ModelSpec", "Runtime",
    "WeightSources", "as_spec", "choose_crop", "convert_efficientnet_pytorch", "create_open_clip_model",
    "HeadNet", "create_timm_model", "crop_image", "head_for", "head_spec", "load_head", "save_head", "load_classifier", "load_detector", "load_embedder",
    "load_image_models", "locate_weights", "offline_package_file", "open_clip_preprocess",
    "open_clip_pretrained_cfg", "prepare_model", "read_state_dict", "register_project_open_clip_configs",
    "require_known", "seeded", "select_runtime", "timm_preprocess", "to_model_input",
    "trained_embedding_metadata",
]
