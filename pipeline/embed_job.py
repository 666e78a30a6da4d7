"""The embedding job on Ray: images -> predicted classes + embeddings, sharded across a cluster.

:func:`prepare` checks what it can before Ray starts (the output's bucket, the models, the inputs);
:func:`run` wires the stages with Ray Data on the current cluster, fills the output folder
(:mod:`pipeline.embed_output`) and returns the summary it writes to ``OUT/summary.json``. The
resources each model actor gets are decided once, by :func:`plan_resources`. The command line is
``python -m jobs.embed``; ``jobs.evaluate`` and ``jobs.benchmark batch`` call :func:`run` directly.

This is the one module of ``pipeline/`` that uses Ray: the rest of the library runs without it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import ray
from ray.data import ActorPoolStrategy, Dataset

from pipeline.batch import DecodeImages, ReadShards, WriteParts, shard_to_row
from pipeline.embed_output import (
    EmbedConfig,
    change_summary,
    check_config,
    committed,
    describe_models,
    finish_run,
    load_history,
    plan_run,
    present_after,
    remove_partial_files,
    resolve_inputs,
    run_state,
    summarize,
    write_manifest,
)
from pipeline.images import Preprocess
from pipeline.job_metrics import JobMetrics
from pipeline.manifests import EmbeddingManifest, ModelSet
from pipeline.model_stages import (
    ClassifyAndEmbed,
    ClassifyImages,
    EmbedImages,
    ModelSettings,
    classify_and_embed_on_device,
)
from pipeline.sources import Shard, discover_shards
from pipeline.storage import Location
from pipeline.tuning import choose_batch_size, model_batch_runner

__all__ = ["ActorResources", "EmbedConfig", "ModelActor", "Prepared", "Progress", "plan_resources", "prepare", "run"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` checked before Ray starts.

    Attributes:
        out: the output folder (built once, used by every step of the run).
        models: the models' facts (preprocessing, label space, dimension).
        shards: the inputs, listed into shards.
    """

    out: Location
    models: ModelSet
    shards: list[Shard]


@dataclass(frozen=True)
class ActorResources:
    """What every model actor gets, decided once by the driver.

    Attributes:
        actors: model actors per pool.
        num_gpus: GPUs per actor (0: none, a fraction: actors share a GPU).
        num_cpus: CPUs per actor.
        threads: torch CPU threads per actor (None: torch's own choice).
        device: the model device inside the actors.
    """

    actors: int
    num_gpus: float
    num_cpus: float
    threads: int | None
    device: str


def plan_resources(config: EmbedConfig, cluster: dict[str, float], node_cpus: float) -> ActorResources:
    """The resource policy: actors, GPUs, CPUs and threads per model actor.

    Args:
        config: the run's settings (its explicit choices win).
        cluster: the cluster's resources (``ray.cluster_resources()``).
        node_cpus: CPUs of the smallest live node.

    Raises:
        ValueError: more GPUs per actor than the cluster has.
    """
    cluster_gpus = cluster.get("GPU", 0.0)
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
    num_cpus = config.model_cpus if config.model_cpus is not None else (
        1.0 if num_gpus > 0 else max(0.25, cluster.get("CPU", 2.0) / 2 / pools / actors))
    # Without GPUs the model is the bottleneck and decoding is light: let torch use every core of
    # the node even though the actor reserves only part of them (Ray would give it num_cpus).
    threads = config.model_threads or (None if num_gpus > 0 else max(1, int(node_cpus)))
    device = config.device if num_gpus > 0 or config.device != "auto" else "cpu"
    return ActorResources(actors=actors, num_gpus=num_gpus, num_cpus=num_cpus, threads=threads, device=device)


def build_dataset(config: EmbedConfig, out: Location, shards: list[Shard], skip_ids: np.ndarray,
                  inputs: dict[str, Preprocess], dim: int, run: int | None = None,
                  skip_versions: np.ndarray | None = None) -> tuple[int, Dataset]:
    """Wires the stages with Ray Data; returns the model batch size (resolved when ``auto``) and
    the dataset of per-part write summaries.

    Args:
        skip_ids, skip_versions: images done at these versions (:class:`pipeline.batch.ReadShards`).
        run: the run the parts are recorded under.
    """
    cluster = ray.cluster_resources()
    node_cpus = min((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n.get("Alive")), default=1.0)
    res = plan_resources(config, cluster, node_cpus)
    logger.info("model actors: %d x (%.2f GPU, %.1f CPU); cluster has %.0f GPUs, %.0f CPUs",
                res.actors, res.num_gpus, res.num_cpus, cluster.get("GPU", 0.0), cluster.get("CPU", 0))

    # Start every model actor before feeding any: all GPUs share the work from the first batch, and
    # a cluster that cannot host the pool fails with a clear timeout instead of waiting forever.
    context = ray.data.DataContext.get_current()
    context.wait_for_min_actors_s = config.actor_start_timeout_s
    context.enable_progress_bars = False  # the job logs its own progress line (Progress)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    ds = ray.data.from_items([shard_to_row(s) for s in shards], override_num_blocks=max(1, len(shards)))
    ds = ds.map_batches(ReadShards(skip_ids, listings=out / "listings", done_versions=skip_versions), batch_size=1)
    if config.limit:
        ds = ds.limit(config.limit)
    if config.decode == "cpu":
        ds = ds.map_batches(DecodeImages(inputs, out / "errors", config.max_pixels, run=run),
                            batch_size=config.decode_batch_size)
    settings = ModelSettings(device=res.device, precision=config.precision, threads=res.threads,
                             compile=config.compile, embedding_dtype=config.embedding_dtype, top_n=config.top_n)
    batch_size = resolve_batch_size(config, settings, res, inputs)
    # The memory request reserves room for the models. Being set only here, it also keeps Ray Data
    # from fusing the decode tasks into the model actors (fusion needs identical resource
    # requests), so decoding stays spread over all CPUs instead of running inside the actors.
    # Two calls at a time per model actor: while one batch computes, the next one is copied (or
    # decoded) to the device and the previous one written (pipeline.model_stages.ModelStage keeps the
    # computes one at a time, so memory holds one batch's activations).
    pool = ActorPoolStrategy(size=res.actors, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    model_args = dict(batch_size=batch_size, num_gpus=res.num_gpus, num_cpus=res.num_cpus,
                      memory=config.model_memory_gb * 2**30, compute=pool)
    write_to = dict(out_dir=str(out / "embeddings"), dim=dim, embedding_dtype=config.embedding_dtype, run=run)
    models = dict(classifier=config.classifier, embedder=config.embedder, settings=settings)
    if config.decode == "device":
        stage = (classify_and_embed_on_device, dict(models, inputs=inputs, errors_dir=str(out / "errors"),
                                                    max_pixels=config.max_pixels, run=run))
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


def resolve_batch_size(config: EmbedConfig, settings: ModelSettings, res: ActorResources,
                       inputs: dict[str, Preprocess]) -> int:
    """``--batch-size auto``: measured before the job starts by a probe task placed like one model
    actor (one GPU, or its CPUs and threads), with :func:`pipeline.tuning.choose_batch_size`."""
    if config.batch_size != "auto":
        return int(config.batch_size)

    @ray.remote(num_gpus=res.num_gpus, num_cpus=res.num_cpus)
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
    progress blocks are turned off: a dozen lines every 10 s in a log), and the run's metrics
    (:class:`pipeline.job_metrics.JobMetrics`: every part at once, failures at each line)."""

    def __init__(self, done_before: int, metrics: JobMetrics | None = None, every_s: float = 10.0) -> None:
        self.start = self.last = time.perf_counter()
        self.done_before, self.images, self.every_s = done_before, 0, every_s
        self.metrics = metrics

    def add(self, part: dict) -> None:
        """One committed part: its write summary."""
        self.images += int(part["rows"])
        if self.metrics:
            self.metrics.part(part)
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.images / (now - self.start)
            logger.info("progress: %d images embedded in this run (%.1f images/s)%s", self.images, rate,
                        f", {self.done_before} done before" if self.done_before else "")
            if self.metrics:
                self.metrics.sweep_errors()

    def finish(self) -> None:
        """Counts the failures since the last line."""
        if self.metrics:
            self.metrics.sweep_errors()


def prepare(config: EmbedConfig) -> Prepared:
    """What can be checked before Ray starts: an object-store output's bucket, the model names and
    weights (``describe_models``) and the inputs (listed into shards). Raises ValueError or
    FileNotFoundError; writes nothing."""
    out = Location(config.output)
    out.check_reachable()
    return Prepared(out=out, models=describe_models(config),
                    shards=discover_shards(list(config.inputs), config.files_per_shard))


def job_summary(rows: list[dict], wall: float, manifest: EmbeddingManifest, config: EmbedConfig,
                batch_size: int | None, shards: int, read: int) -> dict:
    """``OUT/summary.json``: the throughput and counts (:func:`pipeline.embed_output.summarize`),
    the images each worker embedded, the settings, the batch size as run and the shards read.

    Args:
        rows: the per-part write summaries of this run.
        wall: this run's seconds.
        manifest: the output's manifest after this run.
        config: the run's settings.
        batch_size: the model batch size as run (``auto`` resolved); None when nothing was left to do.
        shards: the shards of the inputs.
        read: the shards read by this run (the rest were complete).
    """
    summary = summarize(rows, wall, manifest)
    by_worker: Counter[str] = Counter()
    for r in rows:
        by_worker[str(r.get("worker", "-"))] += int(r["rows"])
    summary["images_by_worker"] = dict(sorted(by_worker.items()))
    summary["config"] = config.to_json()
    summary["batch_size"] = batch_size
    summary["shards"] = {"total": shards, "read": read, "complete_not_read": shards - read}
    return summary


def ensure_ray() -> None:
    """Connects to the cluster (``ray job submit``, ``RAY_ADDRESS``) or starts a local Ray, unless
    the caller already did."""
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)


def run(config: EmbedConfig, prepared: Prepared | None = None) -> dict:
    """Runs the job; returns the summary. ``prepared``: what ``prepare(config)`` returned, when the
    caller checked it first.

    The driver lists what changed first (:func:`pipeline.embed_output.plan_run`): Ray is started
    (``ensure_ray``, or the caller's ``ray.init``) only when there is something to read, so a
    re-run over unchanged inputs embeds nothing and starts nothing. The run's number is the latest
    finished one + 1; an interrupted run is finished under its own number.
    """
    prepared = prepared or prepare(config)
    out, models, shards = prepared.out, prepared.models, prepared.shards
    check_config(out, config)
    parts = committed(out)
    removed = remove_partial_files(out, parts)
    if removed:
        logger.info("removed %d unfinished files (parts without a record) from an interrupted run", removed)
    inputs = {"cls": models.preprocess("classifier"), "emb": models.preprocess("embedder")}
    history = load_history(out, parts)
    state = run_state(history)
    plan = plan_run(out, shards, state)
    logger.info("run %d%s: %d shards from %d inputs; %d images done before%s", state.run,
                " (resumed)" if len(state.current) else "", len(shards), len(config.inputs), len(state.done_ids),
                f"; {len(shards) - len(plan.shards)} shards complete, not read again"
                if len(plan.shards) < len(shards) else "")

    start = time.perf_counter()
    rows: list[dict] = []
    batch_size = None
    if plan.shards:
        ensure_ray()
        batch_size, dataset = build_dataset(config, out, plan.shards, plan.skip_ids, inputs,
                                            int(models.embedder["dim"]), run=state.run,
                                            skip_versions=plan.skip_versions)
        progress = Progress(len(state.done_ids), JobMetrics(out, set(parts["errors"])))
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["rows"])):
                rows.append({k: batch[k][i] for k in batch})
                progress.add(rows[-1])
        progress.finish()
    wall = time.perf_counter() - start
    parts = committed(out)
    now_inputs = resolve_inputs(config.inputs)
    missing = [i for i in history.inputs if i not in now_inputs]
    present, note = None, None
    if not (len(state.live) or len(state.held)):
        present = np.zeros(0, dtype=np.int64)  # nothing stood before: nothing can have gone
    elif missing:
        note = (f"deletions not checked: earlier input{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} not among this run's inputs")
    elif (present := present_after(out, plan)) is None:
        note = "deletions not checked: some tars or parquet row groups were not read whole (--limit?)"
    after = load_history(out, parts, previous=history)  # reads this run's parts only
    log = finish_run(out, state, after, now_inputs, present)
    manifest = write_manifest(out, config, models, parts, history=after)
    summary = job_summary(rows, wall, manifest, config, batch_size, len(shards), len(plan.shards))
    summary["changes"] = change_summary(state, log, note)
    (out / "summary.json").write_json(summary)
    return summary
