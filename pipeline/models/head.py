"""A classifier head: classes computed from the embedder's vectors, so no second network runs.

A head is a linear layer (or a one-hidden-layer MLP) over the unit-norm embeddings of one embedder,
fitted on the stored vectors and labels of an embedding output (``jobs.train_classifier``,
:mod:`pipeline.head_training`), its probabilities calibrated by a temperature fitted on held-out
rows. It is one safetensors file whose metadata holds its labels, temperature, the embedder it was
fitted on and its held-out accuracy; its spec is ``head:PATH``, usable wherever a classifier spec is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.files import replace_atomically
from pipeline.images import Preprocess
from pipeline.labels import LabelSpace
from pipeline.models.runtime import Runtime, select_runtime
from pipeline.models.spec import ModelSpec, as_spec

#: ``format`` metadata of a head file.
HEAD_FORMAT = "lookalike-head"


class HeadNet(torch.nn.Module):
    """Logits over ``classes`` from a ``dim``-d embedding: linear, or with a hidden ReLU layer."""

    def __init__(self, dim: int, classes: int, hidden: int = 0) -> None:
        super().__init__()
        self.dim, self.classes, self.hidden = dim, classes, hidden
        self.layers = (torch.nn.Sequential(torch.nn.Linear(dim, classes)) if hidden == 0 else
                       torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass
class ClassHead:
    """A fitted head, ready to classify embeddings.

    Attributes:
        net: the network (on ``runtime.device``, eval mode).
        spec: ``head:PATH``.
        labels: its classes: the gallery's labels (ids and names), by index.
        temperature: logits are divided by it before the softmax (calibrated probabilities).
        embedder: the embedder spec whose vectors it was fitted on (and only takes).
        accuracy: top-1 accuracy on the held-out rows it was calibrated on.
        runtime: device and precision.
        preprocess: the images' input size: the embedder's (set by ``load_image_models``), since
            the head sees only what the embedder sees.
    """

    net: HeadNet
    spec: ModelSpec
    labels: LabelSpace
    temperature: float
    embedder: str
    accuracy: float
    runtime: Runtime
    preprocess: Preprocess | None = None

    @property
    def dim(self) -> int:
        return self.net.dim

    def classify_vectors(self, vectors: np.ndarray | torch.Tensor, top_n: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Top-n classes of each embedding (N, dim): ``(indices, probabilities)``, int32 and float32
        (N, top_n), best first."""
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        x = torch.as_tensor(vectors, device=self.runtime.device).float()
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"the head takes ({self.dim},) embeddings, got shape {tuple(x.shape)}")
        with torch.inference_mode():
            probs = (self.net(x) / self.temperature).softmax(dim=-1)
            values, indices = probs.topk(min(top_n, len(self.labels)), dim=-1)
        return indices.cpu().numpy().astype(np.int32), values.cpu().numpy().astype(np.float32)

    def classify(self, images, top_n: int = 5):
        raise TypeError(f"{self.spec} classifies embeddings, not images: load it with its embedder "
                        f"(load_image_models) and use classify_and_embed")


def head_spec(path: str | Path) -> str:
    """The classifier spec of a head file."""
    return f"head:{Path(path).expanduser()}"


def save_head(path: str | Path, net: HeadNet, labels: list[str], temperature: float, embedder: str,
              accuracy: float, names: list[str] | None = None) -> str:
    """Writes a head file (atomically) and returns its spec."""
    path = Path(path).expanduser()
    metadata = {"format": HEAD_FORMAT, "labels": json.dumps(labels), "names": json.dumps(names or labels),
                "temperature": repr(float(temperature)), "embedder": embedder, "accuracy": repr(float(accuracy)),
                "dim": str(net.dim), "hidden": str(net.hidden)}
    with replace_atomically(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata=metadata)
    return head_spec(path)


def load_head(spec: str | ModelSpec, runtime: Runtime | None = None) -> ClassHead:
    """Loads a head from its spec ``head:PATH``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a head spec, or not a head file.
    """
    spec = as_spec(spec)
    if spec.library != "head":
        raise ValueError(f"not a head spec: {spec} (expected head:PATH)")
    path = spec.weight_file
    if path is None or not path.is_file():
        raise FileNotFoundError(f"head file {path} not found; fit one with `python -m jobs.train_classifier "
                                f"--embeddings OUT --output {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path} is not a head file ({exc})") from None
    if meta.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path} is not a head file (format {meta.get('format')!r}, not {HEAD_FORMAT!r})")
    labels, names = json.loads(meta["labels"]), json.loads(meta["names"])
    net = HeadNet(int(meta["dim"]), len(labels), int(meta["hidden"]))
    net.load_state_dict(state)
    runtime = runtime or select_runtime()
    net = net.to(runtime.device).eval()
    space = LabelSpace(name=f"head:{path.name}", ids=tuple(labels), names=tuple(names))
    return ClassHead(net, spec, space, float(meta["temperature"]), meta["embedder"], float(meta["accuracy"]), runtime)
