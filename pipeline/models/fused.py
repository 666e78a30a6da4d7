"""Classify and embed the same images together: one forward pass for both outputs when the
classifier and the embedder are the same timm model; with a classifier head (``head:PATH``) the
embedder's forward pass and the head over its vectors; else the two models one after the other."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.images import Preprocess
from pipeline.models.classifier import Classifier, load_classifier
from pipeline.models.embedder import Embedder, load_embedder, pooled_dim
from pipeline.models.head import ClassHead, load_head
from pipeline.models.runtime import Runtime, select_runtime, to_model_input
from pipeline.models.spec import NO_CLASSIFIER, ModelSpec, as_spec


class _PreLogits(torch.nn.Module):
    """A timm classifier seen as its pooled pre-logits features: what the same model gives with
    ``num_classes=0``, computed by the classifier's own (already prepared) network, not a copy."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


@dataclass(frozen=True)
class ImageModels:
    """The classifier and the embedder of a batch job or a service, run on the same images.

    Attributes:
        classifier: the classifier.
        embedder: the embedder. When ``shared``, a view over the classifier's network whose
            ``embed_images`` gives the normalised pre-logits features (what :func:`load_embedder`
            of the same spec gives).
        shared: the classifier and the embedder are one timm network, so one forward pass gives
            both outputs (half the compute of two passes).
    """

    classifier: Classifier | ClassHead | None   # None: embeddings only (NO_CLASSIFIER)
    embedder: Embedder
    shared: bool = False

    @property
    def head(self) -> bool:
        """The classifier is a head over the embedder's vectors (one network, one input)."""
        return isinstance(self.classifier, ClassHead)

    @property
    def one_input(self) -> bool:
        """Both outputs come from the images at ``inputs["cls"]`` (``image_emb`` is not read)."""
        return self.shared or self.head or self.classifier is None

    def __post_init__(self) -> None:
        if self.shared and (self.classifier.spec != self.embedder.spec or self.classifier.spec.library != "timm"):
            raise ValueError(f"shared models must be one timm model; got classifier {self.classifier.spec} "
                             f"and embedder {self.embedder.spec}")

    @property
    def inputs(self) -> dict[str, Preprocess]:
        """Model input name -> the preprocess of its images: ``cls`` (classifier), ``emb`` (embedder)."""
        return {"cls": self.embedder.preprocess if self.classifier is None else self.classifier.preprocess,
                "emb": self.embedder.preprocess}

    @property
    def runtime(self) -> Runtime:
        """Device and precision of both models."""
        return self.embedder.runtime

    def classify_and_embed(self, images_cls: np.ndarray | torch.Tensor, images_emb: np.ndarray | torch.Tensor | None,
                           top_n: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-n classes and the embedding of each image.

        Args:
            images_cls: ``uint8`` batch (N, H, W, 3) at ``inputs["cls"].size``: a numpy array, or a
                tensor already on the device (:mod:`pipeline.device_decode`).
            images_emb: the same images at ``inputs["emb"].size``. Not needed when ``one_input``
                (both inputs are the same; None is accepted then).
            top_n: how many classes to return per image.

        Returns:
            ``(indices, probabilities, vectors)``: int32 and float32 arrays of shape (N, top_n), best
            first, and float32 (N, embedder.dim) rows of unit L2 norm.

        Raises:
            ValueError: ``top_n`` below 1, images at the wrong size, or no ``images_emb`` for two models.
        """
        if self.head or self.classifier is None:
            vectors = self.embedder.embed_images(images_cls if images_emb is None else images_emb)
            if self.classifier is None:  # embeddings only: no classes
                return np.zeros((len(vectors), 0), np.int32), np.zeros((len(vectors), 0), np.float32), vectors
            return (*self.classifier.classify_vectors(vectors, top_n), vectors)
        if not self.shared:
            if images_emb is None:
                raise ValueError("images_emb is needed: the classifier and the embedder are different models")
            indices, probs = self.classifier.classify(images_cls, top_n)
            return indices, probs, self.embedder.embed_images(images_emb)
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        classifier = self.classifier
        with self.runtime.inference():
            x = to_model_input(images_cls, classifier.preprocess, classifier.runtime)
            pooled = self.embedder.model(x)
            probs = classifier.model.get_classifier()(pooled).float().softmax(dim=-1)
            values, indices = probs.topk(min(top_n, len(classifier.labels)), dim=-1)
            vectors = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return (indices.cpu().numpy().astype(np.int32), values.cpu().numpy().astype(np.float32),
                vectors.cpu().numpy().astype(np.float32))


def load_image_models(classifier_spec: str | ModelSpec, embedder_spec: str | ModelSpec,
                      runtime: Runtime | None = None) -> ImageModels:
    """Loads the classifier and the embedder; one network for both when the specs name the same
    timm model.

    Args:
        classifier_spec: a ``timm:`` classifier spec (see :func:`load_classifier`), or a head
            (``head:PATH``) fitted on this embedder's vectors, or ``none`` (:data:`NO_CLASSIFIER`:
            embeddings only, no classes).
        embedder_spec: an embedder spec (see :func:`load_embedder`).
        runtime: device and precision of both; :func:`select_runtime` by default.

    Raises:
        ValueError: a spec the loaders cannot use.
        FileNotFoundError: no weights found.
    """
    runtime = runtime or select_runtime()
    if classifier_spec == NO_CLASSIFIER:
        return ImageModels(None, load_embedder(embedder_spec, runtime))
    classifier_spec, embedder_spec = as_spec(classifier_spec), as_spec(embedder_spec)
    if classifier_spec.library == "head":
        embedder = load_embedder(embedder_spec, runtime)
        return ImageModels(head_for(classifier_spec, embedder), embedder)
    classifier = load_classifier(classifier_spec, runtime)
    if classifier_spec == embedder_spec and classifier_spec.library == "timm":
        view = _PreLogits(classifier.model).eval()
        embedder = Embedder(view, classifier_spec, classifier.preprocess, pooled_dim(classifier.model), runtime)
        return ImageModels(classifier, embedder, shared=True)
    return ImageModels(classifier, load_embedder(embedder_spec, runtime), shared=False)


def head_for(spec: str | ModelSpec, embedder: Embedder, embedder_spec: str | None = None) -> ClassHead:
    """Loads a classifier head for an embedder: it takes the embedder's images and vectors.

    Args:
        spec: ``head:PATH``.
        embedder: the embedder.
        embedder_spec: the embedder's spec when ``embedder`` stands in for it (random weights).

    Raises:
        ValueError: the head was fitted on another embedder's vectors.
        FileNotFoundError: no head file.
    """
    head = load_head(spec, embedder.runtime)
    expected = embedder_spec or str(embedder.spec)
    if head.embedder != expected or head.dim != embedder.dim:
        raise ValueError(f"{head.spec} was fitted on the vectors of {head.embedder} ({head.dim}-d), not of "
                         f"{expected} ({embedder.dim}-d); fit a head on an output of this embedder "
                         f"(python -m jobs.train_classifier)")
    head.preprocess = embedder.preprocess
    return head
