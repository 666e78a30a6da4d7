"""The query path: image bytes -> decode -> classify -> embed -> search, exactly as the gallery was
processed (the index manifest names the models and their preprocessing)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.images import DEFAULT_MAX_PIXELS, decode_image, resize_image
from pipeline.index import Hit, ShardedIndex
from pipeline.models import Classifier, Embedder, Runtime, load_classifier, load_embedder, select_runtime

SEARCH_MODES = ("class", "global")


@dataclass(frozen=True)
class QueryResult:
    """The answer to one query image."""

    classes: list[dict]          # [{"index", "synset", "name", "probability"}], best first
    hits: list[Hit]

    def to_json(self) -> dict:
        return {"classes": self.classes, "results": [h.to_json() for h in self.hits]}


class QueryEngine:
    """Classifier + embedder + index, loaded together so a query is processed like the gallery.

    Args:
        index: a loaded index.
        classifier: the classifier (must be the one the index was built with).
        embedder: the embedder (likewise).
        top_n: predicted classes searched in ``class`` mode.
        max_pixels: decode guard.
    """

    def __init__(self, index: ShardedIndex, classifier: Classifier, embedder: Embedder, top_n: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.index = index
        self.classifier = classifier
        self.embedder = embedder
        self.top_n = top_n
        self.max_pixels = max_pixels

    @classmethod
    def load(cls, index_dir: str, *, runtime: Runtime | None = None, top_n: int = 1,
             verify: bool = True) -> "QueryEngine":
        """Loads the index and the models its manifest names."""
        index = ShardedIndex.load(index_dir, verify=verify)
        manifest = index.manifest
        specs = {role: manifest["models"][role]["spec"] for role in ("classifier", "embedder")}
        runtime = runtime or select_runtime()
        return cls(index, load_classifier(specs["classifier"], runtime), load_embedder(specs["embedder"], runtime),
                   top_n=top_n, max_pixels=int(manifest.get("max_pixels", DEFAULT_MAX_PIXELS)))

    def prepare(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Decodes once and resizes for both models (raises ImageDecodeError)."""
        draft = max(self.classifier.preprocess.draft_size, self.embedder.preprocess.draft_size)
        image = decode_image(data, max_pixels=self.max_pixels, draft_size=draft)
        return resize_image(image, self.classifier.preprocess), resize_image(image, self.embedder.preprocess)

    def search(self, images: list[bytes], k: int = 5, mode: str = "class", *, min_score: float | None = None,
               fallback_global: bool = False) -> list[QueryResult]:
        """Answers a batch of encoded query images.

        Raises:
            ImageDecodeError: an image cannot be decoded (check them one by one with :meth:`prepare`
                to isolate bad ones).
            ValueError: bad ``mode`` or ``k``.
        """
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        prepared = [self.prepare(d) for d in images]
        cls_batch = np.stack([p[0] for p in prepared])
        emb_batch = np.stack([p[1] for p in prepared])
        indices, probs = self.classifier.classify(cls_batch, top_n=max(self.top_n, 5))
        vectors = self.embedder.embed_images(emb_batch)
        if mode == "class":
            hits = self.index.search_class(vectors, indices[:, : self.top_n], k, min_score=min_score,
                                           fallback_global=fallback_global)
        else:
            hits = self.index.search_global(vectors, k, min_score=min_score)
        labels = self.classifier.labels
        return [QueryResult([{"index": int(i), "synset": labels.id_of(int(i)), "name": labels.name_of(int(i)),
                              "probability": round(float(p), 4)} for i, p in zip(row_i, row_p)], row_hits)
                for row_i, row_p, row_hits in zip(indices, probs, hits)]
