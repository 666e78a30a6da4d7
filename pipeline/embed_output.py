"""The output folder of an embedding run, and the run's settings.

    OUT/config.json        the settings of the last run (the output-defining ones must not change)
    OUT/embeddings/*.parquet, OUT/errors/*.parquet   one part per batch, written atomically
    OUT/manifest.json      pipeline.manifests.EmbeddingManifest
    OUT/summary.json       throughput and counts of the last run

Re-running into the same folder resumes: ids already in the parts are skipped. The Ray wiring that
fills the folder is ``jobs/embed.py``; everything here runs without Ray.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.files import sha256_file, write_json_atomically
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.manifests import EmbeddingManifest, ModelSet
from pipeline.models import (
    DEFAULT_CLASSIFIER,
    DEFAULT_EMBEDDER,
    as_spec,
    find_weights,
    load_classifier,
    load_embedder,
    select_runtime,
    trained_embedding_metadata,
)


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
        as_spec(self.classifier), as_spec(self.embedder)
        if self.compile is not None:
            select_runtime("cpu", compile=self.compile)  # checks the backend name before any actor starts

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def check_config(out: Path, config: EmbedConfig) -> None:
    """Refuses to mix outputs of different models in one folder; records the config otherwise."""
    path = out / "config.json"
    if path.exists():
        previous = json.loads(path.read_text())
        changed = {k: (previous.get(k), getattr(config, k)) for k in EmbedConfig.OUTPUT_FIELDS
                   if previous.get(k) != getattr(config, k)}
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{out} holds outputs made with other settings ({details}); "
                             f"use a new --output folder, or delete {out} to start over")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(config.to_json(), path)


def remove_partial_files(out: Path) -> int:
    """Deletes temporary files an interrupted run left behind (parts are renamed only when complete)."""
    removed = 0
    for folder in (out / "embeddings", out / "errors"):
        for tmp in folder.glob(".tmp-*"):
            tmp.unlink()
            removed += 1
    return removed


def done_ids(out: Path) -> np.ndarray:
    """Ids already present in the embedding and error parts (sorted)."""
    ids = [pq.read_table(p, columns=["id"])["id"].to_numpy()
           for folder in ("embeddings", "errors") for p in sorted((out / folder).glob("part-*.parquet"))]
    return np.sort(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)


def _parts(folder: Path) -> list[dict]:
    paths = sorted(folder.glob("part-*.parquet"))
    with ThreadPoolExecutor(max_workers=8) as pool:
        hashes = list(pool.map(sha256_file, paths))
    return [{"path": f"{folder.name}/{p.name}", "rows": pq.ParquetFile(p).metadata.num_rows, "sha256": h}
            for p, h in zip(paths, hashes)]


def write_manifest(out: Path, config: EmbedConfig, models: ModelSet) -> EmbeddingManifest:
    """Scans the output folder and writes ``manifest.json``.

    Raises:
        RuntimeError: an id appears twice (outputs are inconsistent; a bug, never expected).
    """
    embedding_parts, error_parts = _parts(out / "embeddings"), _parts(out / "errors")
    ids = done_ids(out)
    if len(ids) != len(np.unique(ids)):
        raise RuntimeError(f"{out}: {len(ids) - len(np.unique(ids))} ids appear twice in the outputs")
    failures: Counter[str] = Counter()
    for part in (out / "errors").glob("part-*.parquet"):
        failures.update(pq.read_table(part, columns=["error_type"])["error_type"].to_pylist())
    embedded = sum(p["rows"] for p in embedding_parts)
    failed = sum(p["rows"] for p in error_parts)
    manifest = EmbeddingManifest(
        models=models, inputs=list(config.inputs), top_n=config.top_n, embedding_dtype=config.embedding_dtype,
        max_pixels=config.max_pixels, parts=embedding_parts, error_parts=error_parts,
        counts={"seen": embedded + failed, "embedded": embedded, "failed": failed,
                "failed_by_type": dict(sorted(failures.items()))})
    manifest.write(out)
    return manifest


def describe_models(config: EmbedConfig) -> ModelSet:
    """Model facts the driver needs (preprocessing, label space, dimension) without real weights.

    The weights are only located here (a missing file fails now, not in every actor); the models
    are built with random weights on the CPU to read their configuration.
    """
    for spec in (config.classifier, config.embedder):
        find_weights(spec)
    cls_spec, emb_spec = as_spec(config.classifier), as_spec(config.embedder)
    cpu = select_runtime("cpu")
    classifier = load_classifier(dataclasses.replace(cls_spec, weights="random"), cpu)
    # A triplet-trained embedder's size and resolution live in its file (small, so load it).
    embedder = load_embedder(emb_spec if trained_embedding_metadata(emb_spec)
                             else dataclasses.replace(emb_spec, weights="random"), cpu)
    return ModelSet(
        classifier={"spec": str(cls_spec), "label_space": classifier.labels.name,
                    "num_classes": len(classifier.labels), "preprocess": dataclasses.asdict(classifier.preprocess)},
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
