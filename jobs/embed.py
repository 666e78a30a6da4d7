"""The main job: images -> predicted classes + embeddings, sharded across a Ray cluster.

    python -m jobs.embed --input DIR_OR_URI [...] --output OUT [--classifier SPEC] [--embedder SPEC]
                         [--limit N] [--batch-size B] [--num-gpus G] [--num-actors A] ...

Runs against the Ray cluster it finds (``ray job submit``, ``RAY_ADDRESS``) or starts a local one.
Writes ``OUT/embeddings/*.parquet``, ``OUT/errors/*.parquet``, ``OUT/manifest.json``,
``OUT/summary.json`` and ``OUT/config.json``. Re-running the same command resumes: images whose
ids are already in the outputs are skipped, so an interrupted run finishes without redoing work.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.batch import (
    SCHEMA_VERSION,
    ClassifyAndEmbed,
    ClassifyAndEmbedOnDevice,
    ClassifyImages,
    DecodeImages,
    EmbedImages,
    ReadShards,
    WriteParts,
    shard_to_row,
)
from pipeline.files import sha256_file, write_json_atomically
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.models import (DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER, as_spec, find_weights, load_classifier,
                             load_embedder, trained_embedding_metadata)
from pipeline.sources import discover_shards

logger = logging.getLogger("jobs.embed")


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
            from pipeline.models import select_runtime

            select_runtime("cpu", compile=self.compile)  # checks the backend name before any actor starts

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def parse_args(argv: list[str] | None) -> EmbedConfig:
    parser = argparse.ArgumentParser(prog="python -m jobs.embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", action="append", required=True, metavar="PATH_OR_URI",
                        help="folder (flat or class sub-folders), tar, webdataset shard or parquet; repeatable")
    parser.add_argument("--output", required=True, help="output folder (a shared filesystem on a cluster)")
    parser.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help=f"default: {DEFAULT_CLASSIFIER}")
    parser.add_argument("--embedder", default=DEFAULT_EMBEDDER, help=f"default: {DEFAULT_EMBEDDER}")
    parser.add_argument("--top-n", type=int, default=5, help="predicted classes kept per image (default: 5)")
    parser.add_argument("--embedding-dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="reject images claiming more pixels (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="process at most N new images (trial runs)")
    parser.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v), default="auto",
                        help="images per model forward pass, or auto (default): measured before the job "
                             "starts, on one GPU (or one actor's CPUs): the smallest size within 5%% of the "
                             "best throughput that fits in memory")
    parser.add_argument("--decode-batch-size", type=int, default=32, help="images per decode task batch")
    parser.add_argument("--files-per-shard", type=int, default=256, help="loose files per read task")
    parser.add_argument("--num-gpus", type=float,
                        help="GPUs per model actor, 1 or a fraction (default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--num-actors", type=int,
                        help="model actors (default: GPUs in the cluster / --num-gpus; 1 without GPUs)")
    parser.add_argument("--model-cpus", type=float,
                        help="CPUs per model actor (default: 1 with GPUs; without, half the cluster's CPUs)")
    parser.add_argument("--model-threads", type=int,
                        help="torch CPU threads per model actor (default: all of a node's CPUs when "
                             "running without GPUs, torch's own choice with GPUs)")
    parser.add_argument("--model-memory-gb", type=float, default=2.0,
                        help="host memory reserved per model actor (default: 2; torch alone takes ~1.6)")
    parser.add_argument("--actor-start-timeout", type=int, default=600,
                        help="seconds to wait for all model actors to start (default: 600)")
    parser.add_argument("--stages", default="fused", choices=["fused", "separate"],
                        help="one actor pool for classify+embed (default) or two pools")
    parser.add_argument("--decode", default="cpu", choices=["cpu", "device"],
                        help="cpu: decode+resize in CPU tasks (default); device: send the encoded bytes to the "
                             "model actor and decode JPEGs on its GPU (nvJPEG), other formats on its CPU")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile the models' backbones (default backend: inductor); the first "
                             "batch of each actor pays the compilation")
    parser.add_argument("--device", default="auto", help="model device inside actors: auto, cpu, cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    args = parser.parse_args(argv)
    try:
        return EmbedConfig(
            inputs=tuple(args.input), output=args.output, classifier=args.classifier, embedder=args.embedder,
            top_n=args.top_n, embedding_dtype=args.embedding_dtype, max_pixels=args.max_pixels,
            limit=args.limit, batch_size=args.batch_size, decode_batch_size=args.decode_batch_size,
            files_per_shard=args.files_per_shard, num_gpus=args.num_gpus, num_actors=args.num_actors,
            model_cpus=args.model_cpus, model_memory_gb=args.model_memory_gb, model_threads=args.model_threads,
            actor_start_timeout_s=args.actor_start_timeout, stages=args.stages, decode=args.decode,
            compile=args.compile, device=args.device, precision=args.precision)
    except ValueError as exc:
        parser.error(str(exc))


# --------------------------------------------------------------------------------------------
# Output folder: config check, resume state, manifest


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


def write_manifest(out: Path, config: EmbedConfig, classifier_info: dict, embedder_info: dict) -> dict:
    """Scans the output folder and writes ``manifest.json`` (DESIGN.md §4).

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
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": list(config.inputs),
        "models": {"classifier": classifier_info, "embedder": embedder_info},
        "top_n": config.top_n,
        "embedding_dtype": config.embedding_dtype,
        "max_pixels": config.max_pixels,
        "counts": {"seen": embedded + failed, "embedded": embedded, "failed": failed,
                   "failed_by_type": dict(sorted(failures.items()))},
        "parts": embedding_parts,
        "error_parts": error_parts,
    }
    write_json_atomically(manifest, out / "manifest.json")
    return manifest


def describe_models(config: EmbedConfig) -> tuple[dict, dict, dict]:
    """Model facts the driver needs (preprocessing, label space, dimension) without real weights.

    The weights are only located here (a missing file fails now, not in every actor); the models
    are built with random weights on the CPU to read their configuration.
    """
    for spec in (config.classifier, config.embedder):
        find_weights(spec)
    cls_spec, emb_spec = as_spec(config.classifier), as_spec(config.embedder)
    classifier = load_classifier(dataclasses.replace(cls_spec, weights="random"), _cpu())
    # A triplet-trained embedder's size and resolution live in its file (small, so load it).
    embedder = load_embedder(emb_spec if trained_embedding_metadata(emb_spec)
                             else dataclasses.replace(emb_spec, weights="random"), _cpu())
    classifier_info = {"spec": str(cls_spec), "label_space": classifier.labels.name,
                       "num_classes": len(classifier.labels), "preprocess": dataclasses.asdict(classifier.preprocess)}
    embedder_info = {"spec": str(emb_spec), "dim": embedder.dim, "metric": "inner_product",
                     "normalized": True, "preprocess": dataclasses.asdict(embedder.preprocess)}
    inputs = {"cls": classifier.preprocess, "emb": embedder.preprocess}
    return classifier_info, embedder_info, inputs


def _cpu():
    from pipeline.models import select_runtime

    return select_runtime("cpu")


# --------------------------------------------------------------------------------------------
# The Ray Data pipeline


def build_dataset(config: EmbedConfig, shards: list, skip_ids: np.ndarray, inputs: dict, dim: int):
    """Wires the stages with Ray Data; returns the dataset of per-part write summaries and the
    model batch size (resolved when ``auto``)."""
    import ray
    from ray.data import ActorPoolStrategy

    resources = ray.cluster_resources()
    cluster_gpus = resources.get("GPU", 0.0)
    num_gpus = config.num_gpus if config.num_gpus is not None else (1.0 if cluster_gpus else 0.0)
    if num_gpus > 0 and cluster_gpus < num_gpus:
        raise ValueError(f"--num-gpus {num_gpus} per actor but the cluster has {cluster_gpus} GPUs")
    if config.num_actors is not None:
        actors = config.num_actors
    elif num_gpus > 0:
        actors = max(1, int(cluster_gpus / num_gpus))
    else:
        actors = 1
    pools = 1 if config.stages == "fused" else 2
    # Without GPUs, model actors reserve half the CPUs and decode tasks get the rest (a pool that
    # reserved every CPU would starve the decoding that feeds it).
    model_cpus = config.model_cpus if config.model_cpus is not None else (
        1.0 if num_gpus > 0 else max(0.25, resources.get("CPU", 2.0) / 2 / pools / actors))
    # Without GPUs the model is the bottleneck and decoding is light: let torch use every core of
    # the node even though the actor reserves only part of them (Ray would give it model_cpus).
    node_cpus = min((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n.get("Alive")), default=1.0)
    threads = config.model_threads or (None if num_gpus > 0 else max(1, int(node_cpus)))
    logger.info("model actors: %d x (%.2f GPU, %.1f CPU); cluster has %.0f GPUs, %.0f CPUs",
                actors, num_gpus, model_cpus, cluster_gpus, resources.get("CPU", 0))

    # Start every model actor before feeding any: all GPUs share the work from the first batch, and
    # a cluster that cannot host the pool fails with a clear timeout instead of waiting forever.
    ray.data.DataContext.get_current().wait_for_min_actors_s = config.actor_start_timeout_s
    out = Path(config.output)
    ds = ray.data.from_items([shard_to_row(s) for s in shards], override_num_blocks=max(1, len(shards)))
    ds = ds.map_batches(ReadShards(skip_ids), batch_size=1)
    if config.limit:
        ds = ds.limit(config.limit)
    if config.decode == "cpu":
        ds = ds.map_batches(DecodeImages(inputs, out / "errors", config.max_pixels),
                            batch_size=config.decode_batch_size)
    device = config.device if num_gpus > 0 or config.device != "auto" else "cpu"
    batch_size = resolve_batch_size(config, num_gpus, model_cpus, threads, inputs, device)
    # The memory request reserves room for the models. Being set only here, it also keeps Ray Data
    # from fusing the decode tasks into the model actors (fusion needs identical resource
    # requests), so decoding stays spread over all CPUs instead of running inside the actors.
    # Two calls at a time per model actor: while one batch computes, the next one is copied (or
    # decoded) to the device and the previous one written (pipeline.batch.ModelStage keeps the
    # computes one at a time, so memory holds one batch's activations).
    pool = ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    model_args = dict(batch_size=batch_size, num_gpus=num_gpus, num_cpus=model_cpus,
                      memory=config.model_memory_gb * 2**30, compute=pool)
    write_to = dict(out_dir=str(out / "embeddings"), dim=dim, embedding_dtype=config.embedding_dtype)
    if config.decode == "device":
        return batch_size, ds.map_batches(_on_ray(ClassifyAndEmbedOnDevice, writes=True), fn_constructor_kwargs=dict(
            inputs=inputs, errors_dir=str(out / "errors"), max_pixels=config.max_pixels,
            write_to=write_to, classifier=config.classifier, embedder=config.embedder, top_n=config.top_n,
            device=device, precision=config.precision, embedding_dtype=config.embedding_dtype, threads=threads,
            compile=config.compile), **model_args)
    if config.stages == "fused":
        return batch_size, ds.map_batches(_on_ray(ClassifyAndEmbed, writes=True), fn_constructor_kwargs=dict(
            write_to=write_to, classifier=config.classifier, embedder=config.embedder, top_n=config.top_n,
            device=device, precision=config.precision, embedding_dtype=config.embedding_dtype, threads=threads,
            compile=config.compile), **model_args)
    ds = ds.map_batches(_on_ray(ClassifyImages), fn_constructor_kwargs=dict(
        classifier=config.classifier, top_n=config.top_n, device=device, precision=config.precision,
        threads=threads, compile=config.compile), **model_args)
    return batch_size, ds.map_batches(_on_ray(EmbedImages, writes=True), fn_constructor_kwargs=dict(
        write_to=write_to, embedder=config.embedder, device=device, precision=config.precision,
        embedding_dtype=config.embedding_dtype, threads=threads, compile=config.compile), **model_args)


def resolve_batch_size(config: EmbedConfig, num_gpus: float, model_cpus: float, threads: int | None,
                       inputs: dict, device: str) -> int:
    """``--batch-size auto``: measured before the job starts by a probe task placed like one model
    actor (one GPU, or its CPUs and threads), with :func:`pipeline.tuning.choose_batch_size`."""
    if config.batch_size != "auto":
        return int(config.batch_size)
    import ray

    @ray.remote(num_gpus=num_gpus, num_cpus=model_cpus)
    def probe() -> tuple[int, list[dict], str]:
        from pipeline.tuning import choose_batch_size, model_batch_runner

        stage = ClassifyAndEmbed(config.classifier, config.embedder, top_n=config.top_n, device=device,
                                 precision=config.precision, threads=threads, compile=config.compile)
        actual = stage.classify.classifier.runtime.device
        sizes = {f"image_{name}": pre.size for name, pre in inputs.items()}
        return *choose_batch_size(model_batch_runner(stage, sizes, actual)), actual

    size, tried, where = ray.get(probe.remote())
    logger.info("--batch-size auto: %d on %s (measured images/s: %s)", size, where,
                ", ".join(f"{r['batch_size']}: {r.get('images_per_s', r.get('error'))}" for r in tried))
    return size


def _on_ray(stage: type, writes: bool = False) -> type:
    """Subclass of a model stage that records which node and GPUs each batch ran on and, for the
    last model stage, writes the batch's part itself.

    Writing in the actor persists every batch as soon as it is computed (separate write tasks
    would wait for free CPUs, which the decode tasks hold until the input runs out, so an
    interrupted run would lose everything) and keeps the embeddings out of the object store.
    """

    class OnRay(stage):
        def __init__(self, write_to: dict | None = None, **kwargs) -> None:
            import ray

            super().__init__(**kwargs)
            context = ray.get_runtime_context()
            self._where = f"{context.get_node_id()[:8]}/gpu{','.join(map(str, ray.get_gpu_ids())) or '-'}"
            self._write = WriteParts(**write_to) if write_to else None

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = super().__call__(batch)
            if not out:
                return out
            out["worker"] = np.full(len(out["id"]), self._where, dtype=object)
            return self._write(out) if self._write else out

    OnRay.__name__ = OnRay.__qualname__ = stage.__name__ + ("AndWrite" if writes else "")
    return OnRay


def _summarize(rows: list[dict], wall: float, manifest: dict) -> dict:
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
        "counts": manifest["counts"],
        "failures_by_type": manifest["counts"]["failed_by_type"],
    }


def run(config: EmbedConfig) -> dict:
    """Runs the job on the current Ray cluster (``ray.init`` must have been called); returns the summary."""
    out = Path(config.output)
    check_config(out, config)
    removed = remove_partial_files(out)
    if removed:
        logger.info("removed %d partial files from an interrupted run", removed)
    classifier_info, embedder_info, inputs = describe_models(config)
    skip = done_ids(out)
    shards = discover_shards(list(config.inputs), config.files_per_shard)
    logger.info("%d shards from %d inputs; %d images already done", len(shards), len(config.inputs), len(skip))

    start = time.perf_counter()
    rows: list[dict] = []
    batch_size = None
    if shards:
        batch_size, dataset = build_dataset(config, shards, skip, inputs, embedder_info["dim"])
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            rows.extend({k: batch[k][i] for k in batch} for i in range(len(batch["rows"])))
    wall = time.perf_counter() - start
    manifest = write_manifest(out, config, classifier_info, embedder_info)
    summary = _summarize(rows, wall, manifest)
    by_worker: Counter[str] = Counter()
    for r in rows:
        by_worker[str(r.get("worker", "-"))] += int(r["rows"])
    summary["images_by_worker"] = dict(sorted(by_worker.items()))
    summary["config"] = config.to_json()
    summary["batch_size"] = batch_size  # as run (``auto`` resolved), None when nothing was left to do
    write_json_atomically(summary, out / "summary.json")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Parses flags, connects to (or starts) Ray, runs the job and prints the summary."""
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    if not ray.is_initialized():
        # Connects to the cluster under `ray job submit` / RAY_ADDRESS, else starts a local one.
        ray.init(logging_level=logging.WARNING)
    try:
        summary = run(config)
    except (ValueError, FileNotFoundError) as exc:
        # The user's mistake (bad flags, paths, weights): one clear line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = summary["counts"]
    print(f"\nembedded {counts['embedded']} images, {counts['failed']} failed "
          f"({', '.join(f'{k}: {v}' for k, v in counts['failed_by_type'].items()) or 'none'}); "
          f"this run: {summary['embedded_this_run']} images in {summary['wall_s']} s "
          f"({summary['images_per_s']} images/s)")
    print(f"outputs: {Path(config.output).resolve()}/{{embeddings,errors,manifest.json,summary.json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
