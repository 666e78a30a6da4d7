"""The output folder of an embedding run, and the run's settings.

    OUT/config.json        the settings of the last run (the output-defining ones must not change)
    OUT/embeddings/part-*.parquet, OUT/errors/part-*.parquet   one part per batch, each committed by
                           its record part-*.json (pipeline.parts)
    OUT/manifest.json      pipeline.manifests.EmbeddingManifest: the committed parts, written last
    OUT/summary.json       throughput and counts of the last run

OUT is a local (or shared) folder or an object store URI (``s3://bucket/prefix``,
:mod:`pipeline.storage`). Re-running into the same folder resumes: ids in committed parts are
skipped, parts without a record are deleted and done again. The Ray job that fills the folder is
:mod:`pipeline.embed_job`; everything here runs without Ray.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.manifests import EmbeddingManifest, ModelSet
from pipeline.models import (
    DEFAULT_CLASSIFIER,
    DEFAULT_EMBEDDER,
    NO_CLASSIFIER,
    as_spec,
    head_for,
    load_classifier,
    load_embedder,
    locate_weights,
    select_runtime,
    trained_embedding_metadata,
)
from pipeline.batch import load_listing
from pipeline.parts import READ_THREADS, committed_parts, read_column, remove_uncommitted
from pipeline.sources import Shard
from pipeline.storage import Location


@dataclass(frozen=True)
class EmbedConfig:
    """The resolved settings of one embedding run (written to ``OUT/config.json``).

    The fields in :attr:`OUTPUT_FIELDS` decide what the outputs contain; a re-run into the same
    folder must keep them, the rest (parallelism, limits) may change between runs.
    """

    inputs: tuple[str, ...]
    output: str
    classifier: str = DEFAULT_CLASSIFIER
    embedder: str = DEFAULT_EMBEDDER
    top_n: int = 5
    embedding_dtype: str = "float32"
    max_pixels: int = DEFAULT_MAX_PIXELS
    limit: int | None = None
    batch_size: int | str = "auto"
    decode_batch_size: int = 32
    files_per_shard: int = 256
    num_gpus: float | None = None
    num_actors: int | None = None
    model_cpus: float | None = None
    model_threads: int | None = None
    model_memory_gb: float = 2.0
    actor_start_timeout_s: int = 600
    stages: str = "fused"
    decode: str = "cpu"
    compile: str | None = None
    device: str = "auto"
    precision: str = "auto"

    OUTPUT_FIELDS = ("classifier", "embedder", "top_n", "embedding_dtype", "max_pixels")

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("give at least one --input")
        if self.top_n < 1:
            raise ValueError(f"--top-n must be >= 1, got {self.top_n}")
        if self.embedding_dtype not in ("float32", "float16"):
            raise ValueError(f"--embedding-dtype must be float32 or float16, got {self.embedding_dtype}")
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"--batch-size must be >= 1 or auto, got {self.batch_size}")
        for name in ("decode_batch_size", "files_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"--num-gpus must be >= 0, got {self.num_gpus}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"--num-actors must be >= 1, got {self.num_actors}")
        if self.actor_start_timeout_s < 1:
            raise ValueError(f"--actor-start-timeout must be >= 1 s, got {self.actor_start_timeout_s}")
        if self.model_threads is not None and self.model_threads < 1:
            raise ValueError(f"--model-threads must be >= 1, got {self.model_threads}")
        if self.model_memory_gb <= 0:
            raise ValueError(f"--model-memory-gb must be > 0, got {self.model_memory_gb}")
        if self.stages not in ("fused", "separate"):
            raise ValueError(f"--stages must be fused or separate, got {self.stages}")
        if self.decode not in ("cpu", "device"):
            raise ValueError(f"--decode must be cpu or device, got {self.decode}")
        if self.decode == "device" and self.stages != "fused":
            raise ValueError("--decode device needs --stages fused (decoded images stay on the model's device)")
        if self.classifier == NO_CLASSIFIER:
            if self.stages != "fused":
                raise ValueError("--classifier none (embeddings only) runs one model stage: use --stages fused")
        elif as_spec(self.classifier).library == "head" and self.stages != "fused":
            raise ValueError("a classifier head (head:PATH) runs inside the embedder: use --stages fused")
        as_spec(self.embedder)
        if self.compile is not None:
            select_runtime("cpu", compile=self.compile)  # checks the backend name before any actor starts

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def check_config(out: Location, config: EmbedConfig) -> None:
    """Refuses to mix outputs of different models in one folder; records the config otherwise."""
    path = out / "config.json"
    if path.is_file():
        previous = path.read_json()
        changed = {k: (previous.get(k), getattr(config, k)) for k in EmbedConfig.OUTPUT_FIELDS
                   if previous.get(k) != getattr(config, k)}
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{out} holds outputs made with other settings ({details}); "
                             f"use a new --output folder, or delete {out} to start over")
    out.make_folder()
    path.write_json(config.to_json())


def _listed(out: Location) -> dict[str, dict[str, dict]]:
    """The parts the folder's manifest lists, per folder (none when there is no manifest yet)."""
    if not (out / "manifest.json").is_file():
        return {"embeddings": {}, "errors": {}}
    manifest = EmbeddingManifest.read(out)
    listed: dict[str, dict[str, dict]] = {"embeddings": {}, "errors": {}}
    for part in manifest.parts + manifest.error_parts:
        folder, name = part["path"].split("/", 1)
        listed[folder][name] = {k: v for k, v in part.items() if k != "path"}
    return listed


def committed(out: Location) -> dict[str, dict[str, dict]]:
    """The committed parts of an output folder: ``{"embeddings": {name: record}, "errors": {...}}``."""
    listed = _listed(out)
    return {folder: committed_parts(out / folder, listed[folder]) for folder in ("embeddings", "errors")}


def remove_partial_files(out: Location, parts: dict[str, dict[str, dict]]) -> int:
    """Deletes what an interrupted run left that no record names (``parts``: :func:`committed`)."""
    return sum(remove_uncommitted(out / folder, parts[folder]) for folder in ("embeddings", "errors"))


def done_ids(out: Location, parts: dict[str, dict[str, dict]] | None = None) -> np.ndarray:
    """Ids already present in the committed embedding and error parts (sorted)."""
    parts = parts or committed(out)
    ids = [c for folder in ("embeddings", "errors") for c in read_column(out / folder, list(parts[folder]), "id")]
    return np.sort(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)


def pending_shards(listings: Location, shards: list[Shard], done: np.ndarray) -> tuple[list[Shard], np.ndarray]:
    """The shards a resumed run still has to read, and the done ids that lie in them.

    A tar or parquet shard whose listing (saved when it was read, :class:`pipeline.batch.ReadShards`)
    names only done ids is complete and is not read again; at ImageNet-22k scale that is 1.3 TB of
    tars a resume does not re-read to find nothing to do. Other shards are read, skipping done ids.

    Args:
        listings: the output's ``listings`` folder.
        shards: the shards of the inputs.
        done: sorted ids in committed parts (:func:`done_ids`).
    """
    present = set(listings.list("*.npy"))
    keys = [s.listing_key for s in shards if s.listing_key and f"{s.listing_key}.npy" in present]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        listed = dict(zip(keys, pool.map(lambda key: load_listing(listings, key), keys)))
    complete = {key for key, ids in listed.items() if _all_in(ids, done)}
    pending = [s for s in shards if s.listing_key not in complete]
    covered = [listed[key] for key in complete]
    rest = np.setdiff1d(done, np.concatenate(covered), assume_unique=True) if covered else done
    return pending, rest


def _all_in(values: np.ndarray, sorted_pool: np.ndarray) -> bool:
    if not len(values):
        return True
    if not len(sorted_pool):
        return False
    pos = np.searchsorted(sorted_pool, values).clip(max=len(sorted_pool) - 1)
    return bool(np.all(sorted_pool[pos] == values))


def write_manifest(out: Location, config: EmbedConfig, models: ModelSet) -> EmbeddingManifest:
    """Lists the committed parts in ``manifest.json`` (written last: it commits the run).

    Raises:
        RuntimeError: an id appears twice (outputs are inconsistent; a bug, never expected).
    """
    parts = committed(out)
    ids = done_ids(out, parts)
    if len(ids) != len(np.unique(ids)):
        raise RuntimeError(f"{out}: {len(ids) - len(np.unique(ids))} ids appear twice in the outputs")
    failures = Counter(t for c in read_column(out / "errors", list(parts["errors"]), "error_type") for t in c)
    entries = {folder: [{"path": f"{folder}/{name}", **record} for name, record in parts[folder].items()]
               for folder in parts}
    embedded = sum(p["rows"] for p in entries["embeddings"])
    failed = sum(p["rows"] for p in entries["errors"])
    manifest = EmbeddingManifest(
        models=models, inputs=list(config.inputs), top_n=config.top_n, embedding_dtype=config.embedding_dtype,
        max_pixels=config.max_pixels, parts=entries["embeddings"], error_parts=entries["errors"],
        counts={"seen": embedded + failed, "embedded": embedded, "failed": failed,
                "failed_by_type": dict(sorted(failures.items()))})
    manifest.write(out)
    return manifest


def describe_models(config: EmbedConfig) -> ModelSet:
    """Model facts the driver needs (preprocessing, label space, dimension) without real weights.

    The weights are only located here (a missing file fails now, not in every actor); the models
    are built with random weights on the CPU to read their configuration.
    """
    none = config.classifier == NO_CLASSIFIER
    for spec in (config.embedder,) if none else (config.classifier, config.embedder):
        locate_weights(spec)
    emb_spec = as_spec(config.embedder)
    cpu = select_runtime("cpu")
    # A triplet-trained embedder's size and resolution live in its file (small, so load it).
    embedder = load_embedder(emb_spec if trained_embedding_metadata(emb_spec)
                             else dataclasses.replace(emb_spec, weights="random"), cpu)
    if none:
        facts = {"spec": NO_CLASSIFIER, "label_space": None, "num_classes": 0,
                 "preprocess": dataclasses.asdict(embedder.preprocess)}
    else:
        cls_spec = as_spec(config.classifier)
        if cls_spec.library == "head":  # small: load it, and check it takes this embedder's vectors
            classifier = head_for(cls_spec, embedder, embedder_spec=str(emb_spec))
        else:
            classifier = load_classifier(dataclasses.replace(cls_spec, weights="random"), cpu)
        facts = {"spec": str(cls_spec), "label_space": classifier.labels.name, "num_classes": len(classifier.labels),
                 "preprocess": dataclasses.asdict(classifier.preprocess)}
    return ModelSet(
        classifier=facts,
        embedder={"spec": str(emb_spec), "dim": embedder.dim, "metric": "inner_product", "normalized": True,
                  "preprocess": dataclasses.asdict(embedder.preprocess)})


def summarize(rows: list[dict], wall: float, manifest: EmbeddingManifest) -> dict:
    """The run's throughput (overall, steady state, per stage) and the folder's counts."""
    embedded_now = int(sum(r["rows"] for r in rows))

    def rate(key: str) -> float | None:
        busy = sum(float(r[key]) for r in rows)
        return round(embedded_now / busy, 1) if busy > 0 else None

    # Steady state: images written between the moments 10% and 90% of this run's images were
    # written (worker clocks at write time), leaving out start-up and the drain at the end.
    steady = None
    if len(rows) >= 5:
        ordered = sorted(rows, key=lambda r: float(r["written_at"]))
        done = np.cumsum([int(r["rows"]) for r in ordered])
        lo = int(np.searchsorted(done, 0.1 * done[-1]))
        hi = int(np.searchsorted(done, 0.9 * done[-1]))
        span = float(ordered[hi]["written_at"]) - float(ordered[lo]["written_at"])
        steady = round(float(done[hi] - done[lo]) / span, 1) if hi > lo and span > 0 else None
    return {
        "wall_s": round(wall, 2),
        "embedded_this_run": embedded_now,
        "images_per_s": round(embedded_now / wall, 1) if wall > 0 else None,
        "steady_images_per_s": steady,
        # Busy time per stage summed over its workers: images/s one worker of that stage sustains.
        "per_worker_images_per_s": {"read": rate("read_s"), "decode": rate("decode_s"),
                                    "model": rate("model_s"), "write": rate("write_s")},
        "counts": manifest.counts,
        "failures_by_type": manifest.counts["failed_by_type"],
    }
