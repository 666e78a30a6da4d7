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
import logging
import sys
import time
from collections import Counter

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from pipeline.batch import DecodeImages, ReadShards, WriteParts, shard_to_row
from pipeline.embed_output import (
    EmbedConfig,
    check_config,
    committed,
    describe_models,
    done_ids,
    pending_shards,
    remove_partial_files,
    summarize,
    write_manifest,
)
from pipeline.files import check_output_folder
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.manifests import ModelSet
from pipeline.model_stages import (
    ClassifyAndEmbed,
    ClassifyImages,
    EmbedImages,
    ModelSettings,
    classify_and_embed_on_device,
)
from pipeline.models import DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER
from pipeline.sources import discover_shards
from pipeline.storage import Location
from pipeline.tuning import choose_batch_size, model_batch_runner

logger = logging.getLogger("jobs.embed")


def parse_args(argv: list[str] | None) -> EmbedConfig:
    parser = argparse.ArgumentParser(prog="python -m jobs.embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", action="append", required=True, metavar="PATH_OR_URI",
                        help="folder (flat or class sub-folders), tar, webdataset shard or parquet; repeatable")
    parser.add_argument("--output", required=True,
                        help="output folder: on a cluster a shared filesystem or an object store (s3://bucket/prefix)")
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
    if problem := check_output_folder(args.output):
        parser.error(problem)
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
# The Ray Data pipeline


def build_dataset(config: EmbedConfig, shards: list, skip_ids: np.ndarray, inputs: dict, dim: int):
    """Wires the stages with Ray Data; returns the dataset of per-part write summaries and the
    model batch size (resolved when ``auto``)."""
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
    context = ray.data.DataContext.get_current()
    context.wait_for_min_actors_s = config.actor_start_timeout_s
    context.enable_progress_bars = False  # the job logs its own progress line (Progress)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    out = Location(config.output)
    ds = ray.data.from_items([shard_to_row(s) for s in shards], override_num_blocks=max(1, len(shards)))
    ds = ds.map_batches(ReadShards(skip_ids, listings=out / "listings"), batch_size=1)
    if config.limit:
        ds = ds.limit(config.limit)
    if config.decode == "cpu":
        ds = ds.map_batches(DecodeImages(inputs, out / "errors", config.max_pixels),
                            batch_size=config.decode_batch_size)
    device = config.device if num_gpus > 0 or config.device != "auto" else "cpu"
    settings = ModelSettings(device=device, precision=config.precision, threads=threads, compile=config.compile,
                             embedding_dtype=config.embedding_dtype, top_n=config.top_n)
    batch_size = resolve_batch_size(config, settings, num_gpus, model_cpus, inputs)
    # The memory request reserves room for the models. Being set only here, it also keeps Ray Data
    # from fusing the decode tasks into the model actors (fusion needs identical resource
    # requests), so decoding stays spread over all CPUs instead of running inside the actors.
    # Two calls at a time per model actor: while one batch computes, the next one is copied (or
    # decoded) to the device and the previous one written (pipeline.model_stages.ModelStage keeps the
    # computes one at a time, so memory holds one batch's activations).
    pool = ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    model_args = dict(batch_size=batch_size, num_gpus=num_gpus, num_cpus=model_cpus,
                      memory=config.model_memory_gb * 2**30, compute=pool)
    write_to = dict(out_dir=str(out / "embeddings"), dim=dim, embedding_dtype=config.embedding_dtype)
    models = dict(classifier=config.classifier, embedder=config.embedder, settings=settings)
    if config.decode == "device":
        stage = (classify_and_embed_on_device, dict(models, inputs=inputs, errors_dir=str(out / "errors"),
                                                    max_pixels=config.max_pixels))
    elif config.stages == "fused":
        stage = (ClassifyAndEmbed, models)
    else:
        ds = ds.map_batches(ModelActor, fn_constructor_kwargs=dict(
            make=ClassifyImages, kwargs=dict(classifier=config.classifier, settings=settings)), **model_args)
        stage = (EmbedImages, dict(embedder=config.embedder, settings=settings))
    return batch_size, ds.map_batches(ModelActor, fn_constructor_kwargs=dict(
        make=stage[0], kwargs=stage[1], write_to=write_to), **model_args)


class ModelActor:
    """A model stage inside a Ray Data actor. It records which node and GPUs each batch ran on and,
    as the last model stage (``write_to`` given), writes the batch's part itself.

    Writing in the actor persists every batch as soon as it is computed (separate write tasks
    would wait for free CPUs, which the decode tasks hold until the input runs out, so an
    interrupted run would lose everything) and keeps the embeddings out of the object store.

    Args:
        make: builds the stage (a :mod:`pipeline.model_stages` class or factory).
        kwargs: its arguments.
        write_to: :class:`pipeline.batch.WriteParts` arguments, or None (not the last stage).
    """

    def __init__(self, make, kwargs: dict, write_to: dict | None = None) -> None:
        self.stage = make(**kwargs)
        context = ray.get_runtime_context()
        self.where = f"{context.get_node_id()[:8]}/gpu{','.join(map(str, ray.get_gpu_ids())) or '-'}"
        self.write = WriteParts(**write_to) if write_to else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.stage(batch)
        if not out:
            return out
        out["worker"] = np.full(len(out["id"]), self.where, dtype=object)
        return self.write(out) if self.write else out


def resolve_batch_size(config: EmbedConfig, settings: ModelSettings, num_gpus: float, model_cpus: float,
                       inputs: dict) -> int:
    """``--batch-size auto``: measured before the job starts by a probe task placed like one model
    actor (one GPU, or its CPUs and threads), with :func:`pipeline.tuning.choose_batch_size`."""
    if config.batch_size != "auto":
        return int(config.batch_size)

    @ray.remote(num_gpus=num_gpus, num_cpus=model_cpus)
    def probe() -> tuple[int, list[dict], str]:
        stage = ClassifyAndEmbed(config.classifier, config.embedder, settings)
        actual = stage.models.runtime.device
        sizes = {f"image_{name}": pre.size for name, pre in inputs.items()}
        return *choose_batch_size(model_batch_runner(stage, sizes, actual)), actual

    size, tried, where = ray.get(probe.remote())
    logger.info("--batch-size auto: %d on %s (measured images/s: %s)", size, where,
                ", ".join(f"{r['batch_size']}: {r.get('images_per_s', r.get('error'))}" for r in tried))
    return size


class Progress:
    """One plain log line every ``every_s`` seconds while parts are written (Ray Data's own
    progress blocks are turned off: a dozen lines every 10 s in a log)."""

    def __init__(self, done_before: int, every_s: float = 10.0) -> None:
        self.start = self.last = time.perf_counter()
        self.done_before, self.images, self.every_s = done_before, 0, every_s

    def add(self, images: int) -> None:
        self.images += images
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            logger.info("progress: %d images embedded in this run (%.1f images/s)%s", self.images,
                        self.images / (now - self.start),
                        f", {self.done_before} done before" if self.done_before else "")


def prepare(config: EmbedConfig) -> tuple[ModelSet, list]:
    """What can be checked before Ray starts: an object-store output's bucket, the model names and
    weights (``describe_models``) and the inputs (listed into shards). Raises ValueError or
    FileNotFoundError; writes nothing."""
    Location(config.output).check_reachable()
    return describe_models(config), discover_shards(list(config.inputs), config.files_per_shard)


def run(config: EmbedConfig, prepared: tuple[ModelSet, list] | None = None) -> dict:
    """Runs the job on the current Ray cluster (``ray.init`` must have been called); returns the
    summary. ``prepared``: what ``prepare(config)`` returned, when the caller checked it first."""
    out = Location(config.output)
    models, shards = prepared or prepare(config)
    check_config(out, config)
    parts = committed(out)
    removed = remove_partial_files(out, parts)
    if removed:
        logger.info("removed %d unfinished files (parts without a record) from an interrupted run", removed)
    inputs = {"cls": models.preprocess("classifier"), "emb": models.preprocess("embedder")}
    skip = done_ids(out, parts)
    pending, skip_in_pending = pending_shards(out / "listings", shards, skip)
    logger.info("%d shards from %d inputs; %d images already done%s", len(shards), len(config.inputs), len(skip),
                f"; {len(shards) - len(pending)} shards complete, not read again" if len(pending) < len(shards) else "")

    start = time.perf_counter()
    rows: list[dict] = []
    batch_size = None
    if pending:
        batch_size, dataset = build_dataset(config, pending, skip_in_pending, inputs, int(models.embedder["dim"]))
        progress = Progress(len(skip))
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            rows.extend({k: batch[k][i] for k in batch} for i in range(len(batch["rows"])))
            progress.add(int(np.sum(batch["rows"])))
    wall = time.perf_counter() - start
    manifest = write_manifest(out, config, models)
    summary = summarize(rows, wall, manifest)
    by_worker: Counter[str] = Counter()
    for r in rows:
        by_worker[str(r.get("worker", "-"))] += int(r["rows"])
    summary["images_by_worker"] = dict(sorted(by_worker.items()))
    summary["config"] = config.to_json()
    summary["batch_size"] = batch_size  # as run (``auto`` resolved), None when nothing was left to do
    summary["shards"] = {"total": len(shards), "read": len(pending), "complete_not_read": len(shards) - len(pending)}
    (out / "summary.json").write_json(summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Parses flags, connects to (or starts) Ray, runs the job and prints the summary."""
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        prepared = prepare(config)  # bad model names, weights or inputs fail here, before Ray starts
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not ray.is_initialized():
        # Connects to the cluster under `ray job submit` / RAY_ADDRESS, else starts a local one.
        ray.init(logging_level=logging.WARNING)
    try:
        summary = run(config, prepared)
    except (ValueError, FileNotFoundError) as exc:
        # The user's mistake (bad flags, paths, weights): one clear line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = summary["counts"]
    print(f"\nembedded {counts['embedded']} images, {counts['failed']} failed "
          f"({', '.join(f'{k}: {v}' for k, v in counts['failed_by_type'].items()) or 'none'}); "
          f"this run: {summary['embedded_this_run']} images in {summary['wall_s']} s "
          f"({summary['images_per_s']} images/s)")
    print(f"outputs: {Location(config.output)}/{{embeddings,errors,manifest.json,summary.json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
