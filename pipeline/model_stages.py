"""The model stages of the embedding job: a batch of images -> classes, class_probs, embedding.

    ClassifyAndEmbed     both models in one actor (one forward pass when they are one timm model)
    ClassifyImages, EmbedImages    one model each (the job's ``--stages separate``)
    DecodeOnDevice       wraps a stage to take encoded bytes and decode them on its device

A model stage stages a batch onto its device and then computes, one compute at a time, so that two
concurrent calls overlap one batch's copy or decode with the other's compute. ``ModelSettings``
(device, precision, threads, compile, output dtype, top-n) is decided once by the driver.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.batch import write_errors
from pipeline.device_decode import prepare_batch
from pipeline.images import DEFAULT_MAX_PIXELS, Preprocess
from pipeline.models import Runtime, load_classifier, load_embedder, load_image_models, select_runtime
from pipeline.staging import Staging


@dataclass(frozen=True)
class ModelSettings:
    """How the model stages run: built once by the driver, handed to every model actor.

    Attributes:
        device: ``auto``, ``cpu`` or ``cuda[:N]`` (see :func:`pipeline.models.select_runtime`).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        threads: torch CPU threads of the process (None: leave as is).
        compile: a ``torch.compile`` backend (e.g. ``inductor``), or None.
        embedding_dtype: ``float32`` or ``float16`` in the output.
        top_n: classes kept per image.
    """

    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    compile: str | None = None
    embedding_dtype: str = "float32"
    top_n: int = 5

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.embedding_dtype not in ("float32", "float16"):
            raise ValueError(f"embedding_dtype must be float32 or float16, got {self.embedding_dtype!r}")
        if self.top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {self.top_n}")

    def runtime(self) -> Runtime:
        """Sets this process's torch threads and picks the runtime (once per actor)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return select_runtime(self.device, self.precision, self.compile)


def _strip_images(batch: dict[str, np.ndarray], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {k: v for k, v in batch.items() if k not in names}


class ModelStage:
    """Base of the model stages: a call stages its images, then computes, one compute at a time.

    *Staging* puts the ``image_*`` columns on the model's device (pinned, non-blocking copies on a
    side stream, :class:`pipeline.staging.Staging`); *compute* runs the models under
    ``compute_lock``. The job's model actors take two calls at a time, so the next batch's copy
    (or, with :class:`DecodeOnDevice`, its decoding) runs while this batch computes. ``model_s``
    counts the compute only. On a CPU the staging is a pass-through.
    """

    image_columns: tuple[str, ...] = ()

    def __init__(self, device: str) -> None:
        self.staging = Staging(device)
        self.compute_lock = threading.Lock()

    def stage(self, batch: dict[str, np.ndarray]):
        """The batch with its image columns on the device, and the event that marks their arrival."""
        columns = [name for name in self.image_columns if name in batch]
        moved, event = self.staging.run(lambda: {name: self.staging.to_device(batch[name]) for name in columns})
        return {**batch, **moved}, event

    def compute(self, batch: dict) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not len(batch.get("id", ())):
            return {}
        staged, event = self.stage(batch)
        if not len(staged.get("id", ())):
            return {}
        with self.compute_lock:
            start = time.perf_counter()
            self.staging.ready(event, [staged[name] for name in self.image_columns if name in staged])
            out = self.compute(staged)
            spent = np.float32((time.perf_counter() - start) / max(len(out["id"]), 1))
            out["model_s"] = out["model_s"] + spent if "model_s" in out else np.full(len(out["id"]), spent)
        return out


class ClassifyImages(ModelStage):
    """Adds ``classes`` and ``class_probs`` (top-n) from ``image_cls`` (the job's ``--stages separate``)."""

    image_columns = ("image_cls",)

    def __init__(self, classifier: str, settings: ModelSettings = ModelSettings()) -> None:
        self.classifier = load_classifier(classifier, settings.runtime())
        self.top_n = settings.top_n
        super().__init__(self.classifier.runtime.device)

    def compute(self, batch: dict) -> dict[str, np.ndarray]:
        out = _strip_images(batch, ("image_cls",))
        out["classes"], out["class_probs"] = self.classifier.classify(batch["image_cls"], self.top_n)
        return out


class EmbedImages(ModelStage):
    """Adds ``embedding`` (L2-normalised) from ``image_emb`` (the job's ``--stages separate``)."""

    image_columns = ("image_emb",)

    def __init__(self, embedder: str, settings: ModelSettings = ModelSettings()) -> None:
        self.embedder = load_embedder(embedder, settings.runtime())
        self.embedding_dtype = np.dtype(settings.embedding_dtype)
        super().__init__(self.embedder.runtime.device)

    def compute(self, batch: dict) -> dict[str, np.ndarray]:
        out = _strip_images(batch, ("image_emb",))
        out["embedding"] = self.embedder.embed_images(batch["image_emb"]).astype(self.embedding_dtype)
        return out


class ClassifyAndEmbed(ModelStage):
    """Classifies and embeds a batch in one actor: one runtime, one copy of the images per device,
    and :meth:`pipeline.models.ImageModels.classify_and_embed` (one forward pass when the
    classifier and the embedder are the same timm model)."""

    image_columns = ("image_cls", "image_emb")

    def __init__(self, classifier: str, embedder: str, settings: ModelSettings = ModelSettings()) -> None:
        self.models = load_image_models(classifier, embedder, settings.runtime())
        self.top_n = settings.top_n
        self.embedding_dtype = np.dtype(settings.embedding_dtype)
        super().__init__(self.models.runtime.device)

    @property
    def shared(self) -> bool:
        return self.models.one_input

    def stage(self, batch: dict[str, np.ndarray]):
        # One network (shared, or the embedder under a head) reads image_cls for both outputs: copy only that.
        return super().stage(_strip_images(batch, ("image_emb",)) if self.shared else batch)

    def compute(self, batch: dict) -> dict[str, np.ndarray]:
        # One input: image_cls serves both outputs (image_emb was not even staged).
        indices, probs, vectors = self.models.classify_and_embed(batch["image_cls"], batch.get("image_emb"),
                                                                 self.top_n)
        out = _strip_images(batch, ("image_cls", "image_emb"))
        out["classes"], out["class_probs"] = indices, probs
        out["embedding"] = vectors.astype(self.embedding_dtype)
        return out


class DecodeOnDevice(ModelStage):
    """The GPU fast path: runs a model stage on raw image bytes, decoding them on its device.

    Takes :class:`ReadShards` batches (``data`` bytes) instead of :class:`DecodeImages` output:
    JPEGs are decoded and resized on the model's device (:mod:`pipeline.device_decode`), other
    formats and rejected files on the CPU; failures become error rows exactly as in DecodeImages.
    The decoding is this stage's staging, so it overlaps the previous batch's compute. It shares the
    wrapped stage's staging stream and compute lock (one of each per actor).

    Args:
        stage: the model stage (ClassifyAndEmbed, ClassifyImages or EmbedImages instance).
        inputs: model input name -> preprocessing, as for DecodeImages.
        errors_dir: where error parts go.
        max_pixels: decode guard.
        run: the embedding run its error parts are recorded under (None: none recorded).
    """

    def __init__(self, stage: ModelStage, inputs: dict[str, Preprocess], errors_dir: str | Path,
                 max_pixels: int = DEFAULT_MAX_PIXELS, run: int | None = None) -> None:
        self.model_stage = stage
        self.inputs = {f"image_{name}": pre for name, pre in inputs.items()}
        self.image_columns = tuple(self.inputs)
        self.errors_dir = str(errors_dir)
        self.max_pixels = max_pixels
        self.run = run
        self.staging, self.compute_lock = stage.staging, stage.compute_lock

    def stage(self, batch: dict[str, np.ndarray]):
        start = time.perf_counter()
        readable = [i for i, error in enumerate(batch["read_error"]) if not error]
        versions = batch["version"] if "version" in batch else np.full(len(batch["id"]), "", dtype=object)
        failures = [(int(batch["id"][i]), str(batch["uri"][i]), "read", "unreadable", str(batch["read_error"][i]),
                     str(versions[i])) for i in range(len(batch["id"])) if batch["read_error"][i]]
        (images, ok, errors), event = self.staging.run(lambda: prepare_batch(
            [bytes(batch["data"][i]) for i in readable], self.inputs, self.staging.device,
            max_pixels=self.max_pixels))
        failures += [(int(batch["id"][readable[i]]), str(batch["uri"][readable[i]]), "decode", exc.reason, str(exc),
                      str(versions[readable[i]])) for i, exc in errors]
        write_errors(failures, self.errors_dir, self.run)
        idx = np.array(readable, dtype=np.int64)[ok]
        seconds = np.float32((time.perf_counter() - start) / max(len(batch["id"]), 1))
        decoded = {"id": batch["id"][idx], "uri": batch["uri"][idx], "label": batch["label"][idx],
                   "version": versions[idx],
                   "read_s": batch["read_s"][idx], "decode_s": np.full(len(idx), seconds, np.float32), **images}
        return decoded, event

    def compute(self, batch: dict) -> dict[str, np.ndarray]:
        return self.model_stage.compute(batch)


def classify_and_embed_on_device(classifier: str, embedder: str, settings: ModelSettings,
                                 inputs: dict[str, Preprocess], errors_dir: str | Path,
                                 max_pixels: int = DEFAULT_MAX_PIXELS, run: int | None = None) -> DecodeOnDevice:
    """:class:`ClassifyAndEmbed` fed with raw bytes, decoded on its device (the job's ``--decode device``)."""
    return DecodeOnDevice(ClassifyAndEmbed(classifier, embedder, settings), inputs, errors_dir, max_pixels, run)
