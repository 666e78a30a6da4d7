"""The query path, in steps every query path shares (``QueryEngine`` here, the service's Ingress in
``serve/app.py``, and through the engine ``jobs.search`` and ``jobs.evaluate``):

    QueryPreprocess.prepare        bytes -> decoded as the gallery was (its max_pixels) -> optional crop
                                   box -> the classifier's and the embedder's inputs (a Prepared)
    classify and embed             ImageModels.classify_and_embed (or the service's model replicas)
    class_answers                  top classes -> [{"index", "synset", "name", "probability"}]
    Strategy.plan                  the query order: class search, global search, answers
                                   (pipeline.strategy; driven over ShardedIndex here, over the
                                   retriever replicas in the service)
    merge_hits                     hits of several retrievers -> the best k
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Iterable

import numpy as np

from pipeline.images import DEFAULT_MAX_PIXELS, Preprocess, decode_image, resize_image
from pipeline.index import Hit, ShardedIndex
from pipeline.labels import LabelSpace
from pipeline.manifests import IndexManifest
from pipeline.models import Detector, ImageModels, Runtime, crop_image, load_image_models, select_runtime
from pipeline.strategy import Search, Strategy, run_plan


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

    def prepare(self, data: bytes, box_of: Callable[[np.ndarray], tuple | None] | None = None,
                box: tuple[int, int, int, int] | None = None) -> "Prepared":
        """Decodes a query once, crops it and resizes it for both models (one resize when both take
        the same input).

        Args:
            data: the encoded image.
            box_of: chooses the crop box of the decoded image (a detector), or None: no crop.
            box: crop to this ``(x0, y0, x1, y1)`` region instead (a box chosen elsewhere).

        Raises:
            ImageDecodeError: the image cannot be decoded.
        """
        image = self.decode(data)
        if box is None and box_of is not None:
            box = box_of(image)
        box = None if box is None else tuple(int(v) for v in box)
        cropped = crop_image(image, box)
        for_classifier = resize_image(cropped, self.classifier)
        for_embedder = for_classifier if self.embedder == self.classifier else resize_image(cropped, self.embedder)
        return Prepared(for_classifier, for_embedder, box, [int(v) for v in image.shape[:2]])


@dataclass(frozen=True)
class Prepared:
    """A query image ready for the models."""

    for_classifier: np.ndarray
    for_embedder: np.ndarray
    box: tuple[int, int, int, int] | None   # the crop searched; None: the whole image
    size: list[int]                         # [height, width] as decoded


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


def check_k(k: int) -> None:
    """Raises ValueError for a bad ``k``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


@dataclass(frozen=True)
class QueryResult:
    """The answer to one query image."""

    classes: list[dict]          # [{"index", "synset", "name", "probability"}], best first
    hits: list[Hit]
    crop_box: tuple[int, int, int, int] | None = None   # (x0, y0, x1, y1) searched, None: whole image
    strategy: str = "global"
    note: str | None = None      # why there are fewer than k results, or where some came from

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "crop_box": list(self.crop_box) if self.crop_box else None,
                "classes": self.classes, "results": [h.to_json() for h in self.hits], "note": self.note}


@dataclass(frozen=True)
class Encoded:
    """Query images after the models: top classes, embeddings and crop boxes (row per image)."""

    classes: np.ndarray          # (N, 5) class indices, best first
    probs: np.ndarray            # (N, 5)
    vectors: np.ndarray          # (N, dim), unit norm
    boxes: list                  # crop box or None per image


class QueryEngine:
    """The index and the models its manifest names, loaded together so that a query is processed
    like the gallery.

    Args:
        index: a loaded index.
        models: the classifier and embedder the index was built with.
        strategy: the default search strategy (default: the index manifest's, else global).
        detector: crops queries to "the largest box near the centre" when searching with ``crop=True``.
    """

    def __init__(self, index: ShardedIndex, models: ImageModels, strategy: Strategy | str | None = None,
                 detector: Detector | None = None) -> None:
        index.manifest.models.require({"classifier": str(models.classifier.spec),
                                       "embedder": str(models.embedder.spec)}, f"the index {index.root}")
        self.index = index
        self.models = models
        self.strategy = Strategy.resolve(strategy, index.manifest.strategy)
        self.detector = detector
        self.queries = QueryPreprocess.of(index.manifest)

    @classmethod
    def load(cls, index_dir: str, *, runtime: Runtime | None = None, strategy: Strategy | str | None = None,
             verify: bool = True, detector: Detector | None = None) -> "QueryEngine":
        """Loads the index and the models its manifest names (the detector is not the index's business)."""
        index = ShardedIndex.load(index_dir, verify=verify)
        specs = index.manifest.models.specs()
        models = load_image_models(specs["classifier"], specs["embedder"], runtime or select_runtime())
        return cls(index, models, strategy=strategy, detector=detector)

    def prepare(self, data: bytes, crop: bool = False, box: tuple[int, int, int, int] | None = None) -> Prepared:
        """Decodes once, optionally crops (``crop``: to the detector's box; ``box``: to this one) and
        resizes for both models.

        Raises:
            ImageDecodeError: the image cannot be decoded.
            ValueError: ``crop`` without a detector.
        """
        if crop and box is None and self.detector is None:
            raise ValueError("crop needs a detector (QueryEngine.load(..., detector=load_detector(...)))")
        box_of = (lambda image: self.detector.crop_boxes([image])[0]) if crop else None
        return self.queries.prepare(data, box_of, box)

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
            np.stack([p.for_classifier for p in prepared]), np.stack([p.for_embedder for p in prepared]), top_n=5)
        return Encoded(indices, probs, vectors, [p.box for p in prepared])

    def answer(self, encoded: Encoded, k: int = 5, strategy: Strategy | str | None = None, *,
               min_score: float | None = None) -> list[QueryResult]:
        """Searches the index for encoded queries with ``strategy`` (a :class:`Strategy` or its name;
        default: the engine's), in the one query order (:meth:`Strategy.plan`).

        Raises:
            ValueError: a bad ``k`` or strategy name.
        """
        check_k(k)
        strategy = Strategy.resolve(strategy, self.strategy)
        classes = class_answers(self.models.classifier.labels, encoded.classes, encoded.probs)

        def search(request: Search) -> list[list[Hit]]:
            vectors = encoded.vectors[request.rows]
            if request.classes is None:
                return self.index.search_global(vectors, request.k, min_score=min_score)
            return self.index.search_class(vectors, request.classes, request.k, min_score=min_score)

        answers = run_plan(strategy.plan(classes, k, self.index.manifest.class_size), search)
        return [QueryResult(row, hits, box, str(strategy), note)
                for row, (hits, note), box in zip(classes, answers, encoded.boxes)]

    def search(self, images: list[bytes], k: int = 5, strategy: Strategy | str | None = None, *,
               min_score: float | None = None, crop: bool = False) -> list[QueryResult]:
        """Answers a batch of encoded query images (``crop``: search the detector's crop of each).

        Raises:
            ImageDecodeError: an image cannot be decoded.
            ValueError: a bad ``k`` or strategy, or ``crop`` without a detector.
        """
        check_k(k)  # before the models run
        strategy = Strategy.resolve(strategy, self.strategy)
        return self.answer(self.encode(images, crop), k, strategy, min_score=min_score)
