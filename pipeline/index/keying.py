"""How each gallery row gets its class: the index's class partition, which class searches search.

``labels`` (the research's Approach 2 as written): a row's class is its own label (folder name,
synset tar name, webdataset ``.cls``) looked up in the query classifier's classes, so a query
classified as C searches the gallery images labelled C. Rows without a label, or with one the
classifier does not know, form the bucket :data:`UNLABELLED`, which only the global search reaches.

``predicted``: a row's class is the classifier's top-1 prediction for it (stored by the embedding
job, or computed from the stored vectors by a classifier head that re-keys the output).

The query classifier decides the label space either way: a timm ImageNet classifier predicts
synsets (ImageNet class tars are named by them), a head (``head:PATH``) predicts the labels it was
fitted on. :func:`resolve_keying` chooses the source by the rule ``jobs.build_index --help`` states.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.labels import LabelSpace, load_label_space
from pipeline.manifests import ModelSet
from pipeline.models import NO_CLASSIFIER, ClassHead, load_head
from pipeline.storage import Location

#: The class of rows that no class search reaches (no label, or one the classifier does not know).
UNLABELLED = -1
CLASS_SOURCES = ("labels", "predicted")


@dataclass(frozen=True)
class Keying:
    """The class of every row of an embedding output.

    Attributes:
        source: ``labels`` or ``predicted``.
        vocabulary: the query classifier's classes (class index -> label id); None when the
            output does not name its classifier's label space (then only ``predicted``).
        head: re-keys predicted classes from the stored vectors (its classes replace the stored ones).
        known: with ``labels``: distinct gallery labels that are classes; unknown: those that are not.
    """

    source: str
    vocabulary: LabelSpace | None
    head: ClassHead | None = None
    known: int = 0
    unknown: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        """The output columns :meth:`classes` reads."""
        if self.source == "labels":
            return ["label"]
        return ["embedding"] if self.head else ["classes", "class_probs"]

    def classes(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Each row's class (int32) and its probability (float32; 1 for a label, 0 for the
        unlabelled bucket)."""
        if self.source == "labels":
            labels = table.column("label").to_pylist()
            cls = np.array([UNLABELLED if label is None else self.vocabulary.get(label, UNLABELLED)
                            for label in labels], dtype=np.int32)
            return cls, (cls != UNLABELLED).astype(np.float32)
        if self.head is not None:
            emb = table.column("embedding").combine_chunks()
            vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size)
            if not len(vectors):
                return np.zeros(0, np.int32), np.zeros(0, np.float32)
            top, prob = self.head.classify_vectors(vectors.astype(np.float32), 1)
            return top[:, 0], prob[:, 0]
        first = pc.list_element(table.column("classes").combine_chunks(), 0)
        probs = pc.list_element(table.column("class_probs").combine_chunks(), 0)
        return (first.to_numpy(zero_copy_only=False).astype(np.int32),
                probs.to_numpy(zero_copy_only=False).astype(np.float32))

    def to_json(self) -> dict:
        """What the index manifest records (``class_source``)."""
        out = {"source": self.source, "label_space": self.vocabulary.name if self.vocabulary else None,
               "labels": list(self.vocabulary.ids) if self.vocabulary else None}
        if self.source == "labels":
            out |= {"gallery_labels_known": self.known, "gallery_labels_unknown": list(self.unknown[:20])}
        return out


def gallery_labels(parts: list[Location]) -> list[str]:
    """The distinct labels of an embedding output's rows, sorted (reads the label column only)."""
    seen: set[str] = set()
    for part in parts:
        seen.update(v for v in pc.unique(part.read_parquet(["label"]).column("label")).to_pylist() if v is not None)
    return sorted(seen)


def classifier_facts(head: ClassHead, embedder: dict) -> dict:
    """A head's entry in a ModelSet: it takes the embedder's input."""
    return {"spec": str(head.spec), "label_space": head.labels.name, "num_classes": len(head.labels),
            "preprocess": embedder["preprocess"], "accuracy": head.accuracy}


def resolve_keying(models: ModelSet, parts: list[Location], source: str | None = None,
                   classifier: str | None = None, require_labels: bool = True) -> tuple[Keying, ModelSet]:
    """The keying of an output and the models its index records.

    Args:
        models: the embedding output's models.
        parts: its parts.
        source: ``labels``, ``predicted`` or None: ``labels`` when the rows have labels and at least
            half of the distinct labels are classes of the query classifier, else ``predicted``.
        classifier: a classifier head (``head:PATH``) that becomes the index's query classifier
            (fitted on this output's embedder); None: the output's own classifier.
        require_labels: with ``labels``, refuse an output none of whose labels is a class (an append
            of unlabelled images passes False: they go to the unlabelled bucket).

    Raises:
        ValueError: an unknown source, a classifier that is not a head of this embedder, or
            ``labels`` when no gallery label is a class of the query classifier.
        FileNotFoundError: no head file.
    """
    if source is not None and source not in CLASS_SOURCES:
        raise ValueError(f"--classes must be one of {CLASS_SOURCES}, got {source!r}")
    head, rekey = None, False
    if classifier is not None and classifier != models.spec("classifier"):
        rekey = True
        if not classifier.startswith("head:"):
            raise ValueError(f"an index can be re-keyed by a classifier head (head:PATH) only, got {classifier!r}: "
                             f"another image classifier means running the embedding job again")
        head = load_head(classifier)
        if head.embedder != models.spec("embedder"):
            raise ValueError(f"{classifier} was fitted on the vectors of {head.embedder}, not of "
                             f"{models.spec('embedder')} (this output's embedder)")
        models = dataclasses.replace(models, classifier=classifier_facts(head, models.embedder))
    elif models.spec("classifier").startswith("head:"):
        head = load_head(models.spec("classifier"))
    elif models.spec("classifier") == NO_CLASSIFIER:
        raise ValueError("the output was embedded without a classifier (--classifier none): give the index a query "
                         "classifier, a head fitted on it (python -m jobs.train_classifier; --classifier head:PATH)")
    space = models.classifier.get("label_space")
    vocabulary = head.labels if head else load_label_space(space) if space else None
    labels = gallery_labels(parts) if source != "predicted" else []
    known = [label for label in labels if vocabulary is not None and label in vocabulary]
    unknown = tuple(sorted(set(labels) - set(known)))
    if source is None:
        source = "labels" if labels and len(known) * 2 >= len(labels) else "predicted"
    if source == "labels" and not known and require_labels:
        what = "its rows have no labels" if not labels else \
            f"none of its {len(labels)} labels (e.g. {', '.join(repr(x) for x in labels[:3])}) is a class of " \
            f"{vocabulary.name if vocabulary else 'the classifier'}, the query classifier's label space"
        raise ValueError(f"--classes labels: {what}; fit a classifier head on the gallery (python -m "
                         f"jobs.train_classifier) and pass --classifier head:PATH, or use --classes predicted")
    # Predicted classes stored by the job are already the output classifier's; another head re-keys them.
    return Keying(source, vocabulary, head if rekey and source == "predicted" else None, len(known), unknown), models
