"""The query path, in pure steps every query path shares (``QueryEngine`` here, the service's
Ingress in ``serve/app.py``, and through the engine ``jobs.search`` and ``jobs.evaluate``):

    QueryPreprocess.decode         bytes -> RGB image, decoded as the gallery was (its max_pixels)
    QueryPreprocess.model_inputs   (optional crop box) -> the classifier's and the embedder's inputs
    classify and embed             ImageModels.classify_and_embed (or the service's model replicas)
    class_answers                  top classes -> [{"index", "synset", "name", "probability"}]
    search                         ShardedIndex.search_class / search_global (or the retrievers)
    merge_hits                     hits of several retrievers -> the best k
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from pipeline.images import DEFAULT_MAX_PIXELS, Preprocess, decode_image, resize_image
from pipeline.index import Hit, ShardedIndex
from pipeline.labels import LabelSpace
from pipeline.manifests import IndexManifest
from pipeline.models import Detector, ImageModels, Runtime, crop_image, load_image_models, select_runtime

SEARCH_MODES = ("class", "global")


@dataclass(frozen=True)
class QueryPreprocess:
    """How a query image is decoded and resized: exactly as the index's gallery was."""

    classifier: Preprocess
    embedder: Preprocess
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def of(cls, manifest: IndexManifest) -> "QueryPreprocess":
        """The index's preprocessing and decode limit (both recorded in its manifest)."""
        return cls(manifest.models.preprocess("classifier"), manifest.models.preprocess("embedder"),
                   manifest.max_pixels)

    def decode(self, data: bytes) -> np.ndarray:
        """Decodes a query image (raises ImageDecodeError: empty, truncated, too large, ...)."""
        draft = max(self.classifier.draft_size, self.embedder.draft_size)
        return decode_image(data, max_pixels=self.max_pixels, draft_size=draft)

    def model_inputs(self, image: np.ndarray,
                     box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The classifier's and the embedder's inputs of an image, cropped to ``box`` first if given
        (one resize when both models take the same input)."""
        image = crop_image(image, box)
        for_classifier = resize_image(image, self.classifier)
        return for_classifier, (for_classifier if self.embedder == self.classifier
                                else resize_image(image, self.embedder))


def class_answers(labels: LabelSpace, indices: np.ndarray, probs: np.ndarray) -> list[list[dict]]:
    """Per image, its top classes as the API returns them (probabilities rounded to 4 decimals)."""
    return [[{"index": int(i), "synset": labels.id_of(int(i)), "name": labels.name_of(int(i)),
              "probability": round(float(p), 4)} for i, p in zip(row_i, row_p)]
            for row_i, row_p in zip(indices, probs)]


def merge_hits(hit_lists: Iterable[list[dict]], k: int) -> list[dict]:
    """The best ``k`` of several retrievers' hits (``Hit.to_json`` dicts), best first."""
    merged = [hit for hits in hit_lists for hit in hits]
    merged.sort(key=lambda h: -h["score"])
    return merged[:k]


def check_request(k: int, mode: str, top_n: int = 1) -> None:
    """Raises ValueError for a bad ``k``, ``mode`` or ``top_n``."""
    if mode not in SEARCH_MODES:
        raise ValueError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
    if k < 1 or top_n < 1:
        raise ValueError(f"k and top_n must be >= 1, got {k} and {top_n}")


@dataclass(frozen=True)
class QueryResult:
    """The answer to one query image."""

    classes: list[dict]          # [{"index", "synset", "name", "probability"}], best first
    hits: list[Hit]
    crop_box: tuple[int, int, int, int] | None = None   # (x0, y0, x1, y1) searched, None: whole image

    def to_json(self) -> dict:
        return {"crop_box": list(self.crop_box) if self.crop_box else None, "classes": self.classes,
                "results": [h.to_json() for h in self.hits]}


@dataclass(frozen=True)
class Encoded:
    """Query images after the models: top classes, embeddings and crop boxes (row per image)."""

    classes: np.ndarray          # (N, >= top_n) class indices, best first
    probs: np.ndarray            # (N, >= top_n)
    vectors: np.ndarray          # (N, dim), unit norm
    boxes: list                  # crop box or None per image


class QueryEngine:
    """The index and the models its manifest names, loaded together so that a query is processed
    like the gallery.

    Args:
        index: a loaded index.
        models: the classifier and embedder the index was built with.
        top_n: predicted classes searched in ``class`` mode.
        detector: crops queries to "the largest box near the centre" when searching with ``crop=True``.
    """

    def __init__(self, index: ShardedIndex, models: ImageModels, top_n: int = 1,
                 detector: Detector | None = None) -> None:
        index.manifest.models.require({"classifier": str(models.classifier.spec),
                                       "embedder": str(models.embedder.spec)}, f"the index {index.root}")
        self.index = index
        self.models = models
        self.top_n = top_n
        self.detector = detector
        self.queries = QueryPreprocess.of(index.manifest)

    @classmethod
    def load(cls, index_dir: str, *, runtime: Runtime | None = None, top_n: int = 1, verify: bool = True,
             detector: Detector | None = None) -> "QueryEngine":
        """Loads the index and the models its manifest names (the detector is not the index's business)."""
        index = ShardedIndex.load(index_dir, verify=verify)
        specs = index.manifest.models.specs()
        models = load_image_models(specs["classifier"], specs["embedder"], runtime or select_runtime())
        return cls(index, models, top_n=top_n, detector=detector)

    def decode(self, data: bytes) -> np.ndarray:
        """Decodes a query image as the gallery was decoded (raises ImageDecodeError)."""
        return self.queries.decode(data)

    def prepare(self, data: bytes, crop: bool = False,
                box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray, tuple | None]:
        """Decodes once, optionally crops, and resizes for both models (raises ImageDecodeError).

        Args:
            data: the encoded image.
            crop: crop to the detector's box.
            box: crop to this ``(x0, y0, x1, y1)`` region instead (a box chosen elsewhere).

        Returns:
            The classifier input, the embedder input and the crop box (None: the whole image).
        """
        image = self.decode(data)
        if box is None and crop:
            if self.detector is None:
                raise ValueError("crop needs a detector (QueryEngine.load(..., detector=load_detector(...)))")
            box = self.detector.crop_boxes([image])[0]
        box = None if box is None else tuple(int(v) for v in box)
        return *self.queries.model_inputs(image, box), box

    def encode(self, images: list[bytes], crop: bool = False, boxes: list | None = None) -> Encoded:
        """Decodes, optionally crops, classifies and embeds a batch of encoded query images.

        Args:
            images: encoded images.
            crop: crop each to the detector's box.
            boxes: crop each to this box instead (None entries: as ``crop`` says).

        Raises:
            ImageDecodeError: an image cannot be decoded (check them one by one with :meth:`prepare`
                to isolate bad ones).
        """
        boxes = boxes or [None] * len(images)
        prepared = [self.prepare(d, crop, box) for d, box in zip(images, boxes)]
        indices, probs, vectors = self.models.classify_and_embed(
            np.stack([p[0] for p in prepared]), np.stack([p[1] for p in prepared]), top_n=max(self.top_n, 5))
        return Encoded(indices, probs, vectors, [p[2] for p in prepared])

    def answer(self, encoded: Encoded, k: int = 5, mode: str = "class", *, min_score: float | None = None,
               fallback_global: bool = False, top_n: int | None = None) -> list[QueryResult]:
        """Searches the index for encoded queries (``top_n``: classes searched, default the engine's).

        Raises:
            ValueError: bad ``mode``, ``k`` or ``top_n``.
        """
        top_n = top_n or self.top_n
        check_request(k, mode, top_n)
        if mode == "class":
            hits = self.index.search_class(encoded.vectors, encoded.classes[:, :top_n], k, min_score=min_score,
                                           fallback_global=fallback_global)
        else:
            hits = self.index.search_global(encoded.vectors, k, min_score=min_score)
        classes = class_answers(self.models.classifier.labels, encoded.classes, encoded.probs)
        return [QueryResult(row_classes, row_hits, box)
                for row_classes, row_hits, box in zip(classes, hits, encoded.boxes)]

    def search(self, images: list[bytes], k: int = 5, mode: str = "class", *, min_score: float | None = None,
               fallback_global: bool = False, crop: bool = False) -> list[QueryResult]:
        """Answers a batch of encoded query images (``crop``: search the detector's crop of each).

        Raises:
            ImageDecodeError: an image cannot be decoded.
            ValueError: bad ``mode`` or ``k``, or ``crop`` without a detector.
        """
        check_request(k, mode)  # before the models run
        return self.answer(self.encode(images, crop), k, mode, min_score=min_score, fallback_global=fallback_global)
