"""The stages of the embedding job as plain callables over ``dict[str, np.ndarray]`` batches.

Ray Data maps them (``jobs/embed.py``); tests call them directly. Each stage adds its busy
seconds per row to a ``*_s`` column so the job can report throughput per stage.

    ReadShards  shard descriptions -> id, uri, label, data (bytes), read_error
    DecodeImages                   -> id, uri, label, image_<name> (uint8, per model input);
                                      failures are written as error parts and dropped
    ClassifyImages / EmbedImages / ClassifyAndEmbed
                                   -> classes, class_probs, embedding
    WriteParts                     -> one parquet part per batch; returns (part, rows, seconds)

The model stages (ModelStage) stage a batch onto their device and then compute, one compute at a
time, so that two concurrent calls overlap one batch's copy or decode with the other's compute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.device_decode import prepare_batch
from pipeline.files import write_table_atomically
from pipeline.images import DEFAULT_MAX_PIXELS, ImageDecodeError, Preprocess, decode_image, resize_image
from pipeline.models import Runtime, load_classifier, load_embedder, load_image_models, select_runtime
from pipeline.sources import Shard, read_shard, uri_id
from pipeline.staging import Staging

logger = logging.getLogger(__name__)

ERROR_SCHEMA = pa.schema([("id", pa.int64()), ("uri", pa.string()), ("stage", pa.string()),
                          ("error_type", pa.string()), ("message", pa.string())])


def embedding_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """The schema of embedding rows (docs/ARCHITECTURE.md, on-disk contracts)."""
    value_type = {"float32": pa.float32(), "float16": pa.float16()}[dtype]
    return pa.schema([
        ("id", pa.int64()), ("uri", pa.string()), ("label", pa.string()),
        ("classes", pa.list_(pa.int32())), ("class_probs", pa.list_(pa.float32())),
        ("embedding", pa.list_(value_type, dim)),
    ])


def part_name(ids: np.ndarray) -> str:
    """A part's file name from the ids it holds: a retried batch overwrites itself, never duplicates."""
    digest = hashlib.blake2b(np.sort(np.asarray(ids, dtype=np.int64)).tobytes(), digest_size=10).hexdigest()
    return f"part-{digest}.parquet"


# --------------------------------------------------------------------------------------------


class ReadShards:
    """Lists and reads the images of each shard; skips ids already done (resume).

    Args:
        done_ids: sorted int64 ids present in earlier outputs.
    """

    def __init__(self, done_ids: np.ndarray | None = None) -> None:
        self.done_ids = np.sort(np.asarray(done_ids if done_ids is not None else [], dtype=np.int64))

    def _done(self, item_id: int) -> bool:
        i = np.searchsorted(self.done_ids, item_id)
        return bool(i < len(self.done_ids) and self.done_ids[i] == item_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        ids, uris, labels, datas, errors = [], [], [], [], []
        for shard_json in batch["shard"]:
            shard = Shard(**json.loads(shard_json))
            for item in read_shard(shard):
                item_id = uri_id(item.uri)
                if self._done(item_id):
                    continue
                ids.append(item_id)
                uris.append(item.uri)
                # "" rather than None: Ray turns an all-None column into NaNs.
                labels.append(item.label or "")
                datas.append(item.data if item.data is not None else b"")
                errors.append(item.error or "")
        n = len(ids)
        seconds = (time.perf_counter() - start) / max(n, 1)
        return {
            "id": np.array(ids, dtype=np.int64), "uri": np.array(uris, dtype=object),
            "label": np.array(labels, dtype=object), "data": np.array(datas, dtype=object),
            "read_error": np.array(errors, dtype=object), "read_s": np.full(n, seconds, dtype=np.float32),
        }


def shard_to_row(shard: Shard) -> dict[str, str]:
    """The row that carries a shard into :class:`ReadShards`."""
    payload = asdict(shard)
    payload["members"] = list(shard.members)
    return {"shard": json.dumps(payload)}


def write_errors(failures: list[tuple[int, str, str, str, str]], errors_dir: Path) -> None:
    """Writes ``(id, uri, stage, error_type, message)`` rows as one error part (nothing if none)."""
    if not failures:
        return
    columns = list(zip(*failures))
    table = pa.table({field.name: pa.array(col, type=field.type) for field, col in zip(ERROR_SCHEMA, columns)})
    write_table_atomically(table, Path(errors_dir) / part_name(np.array(columns[0])))


class DecodeImages:
    """Decodes each image once and resizes it to every model's input.

    Failures (unreadable, undecodable) are written to ``errors_dir`` as one parquet part per batch
    and dropped from the output, so every input ends up in exactly one of the two outputs.

    Args:
        inputs: model input name -> its preprocessing (e.g. ``{"cls": ..., "emb": ...}``); names
            that share a preprocessing share one resized array.
        errors_dir: where error parts go.
        max_pixels: decode guard (see :func:`pipeline.images.decode_image`).
    """

    def __init__(self, inputs: dict[str, Preprocess], errors_dir: str | Path,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not inputs:
            raise ValueError("DecodeImages needs at least one model input")
        self.inputs = inputs
        self.errors_dir = Path(errors_dir)
        self.max_pixels = max_pixels
        self.draft_size = max(p.draft_size for p in inputs.values())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        keep: list[int] = []
        resized: dict[str, list[np.ndarray]] = {name: [] for name in self.inputs}
        failures: list[tuple[int, str, str, str, str]] = []
        for i, (item_id, uri, data, read_error) in enumerate(
                zip(batch["id"], batch["uri"], batch["data"], batch["read_error"])):
            if read_error:
                failures.append((int(item_id), str(uri), "read", "unreadable", str(read_error)))
                continue
            try:
                image = decode_image(bytes(data), max_pixels=self.max_pixels, draft_size=self.draft_size)
            except ImageDecodeError as exc:
                failures.append((int(item_id), str(uri), "decode", exc.reason, str(exc)))
                continue
            cache: dict[Preprocess, np.ndarray] = {}
            for name, pre in self.inputs.items():
                if pre not in cache:
                    cache[pre] = resize_image(image, pre)
                resized[name].append(cache[pre])
            keep.append(i)
        write_errors(failures, self.errors_dir)
        if not keep:
            return {}  # an empty block (a 0-row tensor column would not convert to Arrow)
        idx = np.array(keep, dtype=np.int64)
        seconds = (time.perf_counter() - start) / max(len(batch["id"]), 1)
        out = {"id": batch["id"][idx], "uri": batch["uri"][idx], "label": batch["label"][idx],
               "read_s": batch["read_s"][idx], "decode_s": np.full(len(idx), seconds, dtype=np.float32)}
        for name in self.inputs:
            out[f"image_{name}"] = np.stack(resized[name])
        return out


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
        return self.models.shared

    def stage(self, batch: dict[str, np.ndarray]):
        # One model reads image_cls for both outputs: copy only that.
        return super().stage(_strip_images(batch, ("image_emb",)) if self.shared else batch)

    def compute(self, batch: dict) -> dict[str, np.ndarray]:
        images_emb = batch["image_cls"] if self.shared else batch["image_emb"]
        indices, probs, vectors = self.models.classify_and_embed(batch["image_cls"], images_emb, self.top_n)
        out = _strip_images(batch, ("image_cls", "image_emb"))
        out["classes"], out["class_probs"] = indices, probs
        out["embedding"] = vectors.astype(self.embedding_dtype)
        return out


class WriteParts:
    """Writes each batch as one parquet part (atomically) and returns a one-row summary of it.

    Args:
        out_dir: the embeddings folder.
        dim: embedding dimension.
        embedding_dtype: ``float32`` or ``float16``.
    """

    def __init__(self, out_dir: str | Path, dim: int, embedding_dtype: str = "float32") -> None:
        self.out_dir = Path(out_dir)
        self.schema = embedding_schema(dim, embedding_dtype)
        self.dim = dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch.get("id", ()))
        if n == 0:
            return {}
        start = time.perf_counter()
        embedding = np.ascontiguousarray(batch["embedding"]).reshape(-1)
        value_type = self.schema.field("embedding").type.value_type
        table = pa.table({
            "id": pa.array(batch["id"], pa.int64()),
            "uri": pa.array([str(u) for u in batch["uri"]], pa.string()),
            "label": pa.array([str(v) if isinstance(v, str) and v else None for v in batch["label"]], pa.string()),
            "classes": pa.array(list(np.asarray(batch["classes"], np.int32)), pa.list_(pa.int32())),
            "class_probs": pa.array(list(np.asarray(batch["class_probs"], np.float32)), pa.list_(pa.float32())),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embedding, value_type), self.dim),
        }, schema=self.schema)
        name = part_name(batch["id"])
        write_table_atomically(table, self.out_dir / name)
        worker = str(batch["worker"][0]) if "worker" in batch else "-"
        return {"part": np.array([name], dtype=object), "rows": np.array([n], dtype=np.int64),
                "worker": np.array([worker], dtype=object),
                "read_s": np.array([float(np.sum(batch["read_s"]))]),
                "decode_s": np.array([float(np.sum(batch["decode_s"]))]),
                "model_s": np.array([float(np.sum(batch["model_s"]))]),
                "write_s": np.array([time.perf_counter() - start]),
                "written_at": np.array([time.time()])}


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
    """

    def __init__(self, stage: ModelStage, inputs: dict[str, Preprocess], errors_dir: str | Path,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.model_stage = stage
        self.inputs = {f"image_{name}": pre for name, pre in inputs.items()}
        self.image_columns = tuple(self.inputs)
        self.errors_dir = Path(errors_dir)
        self.max_pixels = max_pixels
        self.staging, self.compute_lock = stage.staging, stage.compute_lock

    def stage(self, batch: dict[str, np.ndarray]):
        start = time.perf_counter()
        readable = [i for i, error in enumerate(batch["read_error"]) if not error]
        failures = [(int(batch["id"][i]), str(batch["uri"][i]), "read", "unreadable", str(batch["read_error"][i]))
                    for i in range(len(batch["id"])) if batch["read_error"][i]]
        (images, ok, errors), event = self.staging.run(lambda: prepare_batch(
            [bytes(batch["data"][i]) for i in readable], self.inputs, self.staging.device,
            max_pixels=self.max_pixels))
        failures += [(int(batch["id"][readable[i]]), str(batch["uri"][readable[i]]), "decode", exc.reason, str(exc))
                     for i, exc in errors]
        write_errors(failures, self.errors_dir)
        idx = np.array(readable, dtype=np.int64)[ok]
        seconds = np.float32((time.perf_counter() - start) / max(len(batch["id"]), 1))
        decoded = {"id": batch["id"][idx], "uri": batch["uri"][idx], "label": batch["label"][idx],
                   "read_s": batch["read_s"][idx], "decode_s": np.full(len(idx), seconds, np.float32), **images}
        return decoded, event

    def compute(self, batch: dict) -> dict[str, np.ndarray]:
        return self.model_stage.compute(batch)


def classify_and_embed_on_device(classifier: str, embedder: str, settings: ModelSettings,
                                 inputs: dict[str, Preprocess], errors_dir: str | Path,
                                 max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodeOnDevice:
    """:class:`ClassifyAndEmbed` fed with raw bytes, decoded on its device (the job's ``--decode device``)."""
    return DecodeOnDevice(ClassifyAndEmbed(classifier, embedder, settings), inputs, errors_dir, max_pixels)
