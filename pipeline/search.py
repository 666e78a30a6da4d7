"""The query path: image bytes -> decode -> (optional detection crop) -> classify -> embed -> search,
exactly as the gallery was processed (the index manifest names the models and their preprocessing)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.images import DEFAULT_MAX_PIXELS, decode_image, resize_image
from pipeline.index import Hit, ShardedIndex
from pipeline.models import (Classifier, Detector, Embedder, Runtime, crop_image, load_classifier, load_embedder,
                             select_runtime)

SEARCH_MODES = ("class", "global")


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
    """Classifier + embedder + index, loaded together so a query is processed like the gallery.

    Args:
        index: a loaded index.
        classifier: the classifier (must be the one the index was built with).
        embedder: the embedder (likewise).
        top_n: predicted classes searched in ``class`` mode.
        max_pixels: decode guard.
        detector: crops queries to "the largest box near the centre" when searching with ``crop=True``.
    """

    def __init__(self, index: ShardedIndex, classifier: Classifier, embedder: Embedder, top_n: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS, detector: Detector | None = None) -> None:
        self.index = index
        self.classifier = classifier
        self.embedder = embedder
        self.top_n = top_n
        self.max_pixels = max_pixels
        self.detector = detector

    @classmethod
    def load(cls, index_dir: str, *, runtime: Runtime | None = None, top_n: int = 1, verify: bool = True,
             detector: Detector | None = None) -> "QueryEngine":
        """Loads the index and the models its manifest names (the detector is not the index's business)."""
        index = ShardedIndex.load(index_dir, verify=verify)
        manifest = index.manifest
        specs = {role: manifest["models"][role]["spec"] for role in ("classifier", "embedder")}
        runtime = runtime or select_runtime()
        return cls(index, load_classifier(specs["classifier"], runtime), load_embedder(specs["embedder"], runtime),
                   top_n=top_n, max_pixels=int(manifest.get("max_pixels", DEFAULT_MAX_PIXELS)), detector=detector)

    def decode(self, data: bytes) -> np.ndarray:
        """Decodes a query image as the gallery was decoded (raises ImageDecodeError)."""
        draft = max(self.classifier.preprocess.draft_size, self.embedder.preprocess.draft_size)
        return decode_image(data, max_pixels=self.max_pixels, draft_size=draft)

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
        if box is not None:
            box = tuple(int(v) for v in box)
            image = crop_image(image, box)
        return resize_image(image, self.classifier.preprocess), resize_image(image, self.embedder.preprocess), box

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
        indices, probs = self.classifier.classify(np.stack([p[0] for p in prepared]), top_n=max(self.top_n, 5))
        vectors = self.embedder.embed_images(np.stack([p[1] for p in prepared]))
        return Encoded(indices, probs, vectors, [p[2] for p in prepared])

    def answer(self, encoded: Encoded, k: int = 5, mode: str = "class", *, min_score: float | None = None,
               fallback_global: bool = False, top_n: int | None = None) -> list[QueryResult]:
        """Searches the index for encoded queries (``top_n``: classes searched, default the engine's).

        Raises:
            ValueError: bad ``mode``, ``k`` or ``top_n``.
        """
        top_n = top_n or self.top_n
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        if k < 1 or top_n < 1:
            raise ValueError(f"k and top_n must be >= 1, got {k} and {top_n}")
        if mode == "class":
            hits = self.index.search_class(encoded.vectors, encoded.classes[:, :top_n], k, min_score=min_score,
                                           fallback_global=fallback_global)
        else:
            hits = self.index.search_global(encoded.vectors, k, min_score=min_score)
        labels = self.classifier.labels
        return [QueryResult([{"index": int(i), "synset": labels.id_of(int(i)), "name": labels.name_of(int(i)),
                              "probability": round(float(p), 4)} for i, p in zip(row_i, row_p)], row_hits, box)
                for row_i, row_p, row_hits, box in zip(encoded.classes, encoded.probs, hits, encoded.boxes)]

    def search(self, images: list[bytes], k: int = 5, mode: str = "class", *, min_score: float | None = None,
               fallback_global: bool = False, crop: bool = False) -> list[QueryResult]:
        """Answers a batch of encoded query images (``crop``: search the detector's crop of each).

        Raises:
            ImageDecodeError: an image cannot be decoded.
            ValueError: bad ``mode`` or ``k``, or ``crop`` without a detector.
        """
        if mode not in SEARCH_MODES or k < 1:  # checked before the models run
            raise ValueError(f"mode must be one of {SEARCH_MODES} and k >= 1, got {mode!r} and {k}")
        return self.answer(self.encode(images, crop), k, mode, min_score=min_score, fallback_global=fallback_global)
