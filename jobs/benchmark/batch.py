"""``batch``: the embedding job's throughput against the model-only ceiling, on the same images.

  (a) model-only ceiling: forward passes on pre-decoded, pre-resized images already on the model's
      device, one process; also per batch size (``--sweep-batch-sizes``);
  (b) plain loop: decode + resize + forward, one process, batch by batch;
  (b') with ``--decode cpu device``: the same loop decoding JPEGs on the model's device;
  (d) pipelined, one process, like a job's model actor: decoding threads work ahead and the stage
      takes two calls at a time, so one batch's copy to the device overlaps the other's compute;
  (d') with ``--decode cpu device``: the same, decoding on the device (decode overlaps compute);
  (c) the Ray Data job (``jobs.embed``), steady state and end to end, for each --stages choice
      (and ``--decode device``), and per number of model actors (``--sweep-actors``);
and prints images/s and the ratios to (a) and (b); ``--plot FILE.png`` draws the two sweeps.
``--compare-classifiers`` adds, in the same run, what the classes cost: the embedder alone
(``--classifier none``), the embedder with a classifier head (a linear head over its vectors with
``--head-classes`` classes and random weights: a head's cost depends only on its size), and the
embedder with ``--classifier`` (a second network unless it is the embedder's own timm model), each
(d) pipelined in turn, rounds interleaved, and (c) as a Ray Data job.
``--skip-ray`` measures (a), (b), (b'), (d) and (d') only: the pipeline stages directly, where Ray
is absent (ray and pipeline.embed_job are imported only for (c)). (d)/(a) and (d')/(a) are the end-to-end-from-JPEG-bytes ratios of one model device.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from jobs.benchmark.runner import batch_slices, machine
from pipeline.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, resize_image
from pipeline.model_stages import ClassifyAndEmbed, DecodeOnDevice, ModelSettings
from pipeline.models import (
    DEFAULT_CLASSIFIER,
    DEFAULT_EMBEDDER,
    NO_CLASSIFIER,
    HeadNet,
    as_spec,
    save_head,
    seeded,
    select_runtime,
)
from pipeline.sources import discover_shards, read_shard


def _images(inputs: list[str], limit: int) -> list[bytes]:
    """The first ``limit`` decodable inputs' bytes, in discovery order."""
    out: list[bytes] = []
    for shard in discover_shards(inputs):
        for item in read_shard(shard):
            if item.data:
                try:
                    decode_image(item.data)
                except ImageDecodeError:
                    continue
                out.append(item.data)
                if len(out) >= limit:
                    return out
    return out


def _images_per_s(stage, batches: list[dict], n: int) -> float:
    """Model only: ``stage`` over ready batches of ``n`` images in all."""
    start = time.perf_counter()
    for batch in batches:
        stage(batch)
    return n / (time.perf_counter() - start)


def _busy_seconds(out: dict) -> tuple[float, float]:
    """(decode, model) seconds a stage's output reports (no decode column: decoded elsewhere)."""
    decode = float(out["decode_s"].sum()) if "decode_s" in out else 0.0
    return decode, float(out["model_s"].sum())


def bench_batch(args: argparse.Namespace) -> dict:
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    data = _images(args.input, args.limit)
    if len(data) < args.limit:
        print(f"note: only {len(data)} decodable images found (asked for {args.limit})", file=sys.stderr)
    n = len(data)
    runtime = select_runtime(args.device)
    stage = ClassifyAndEmbed(args.classifier, args.embedder,
                             ModelSettings(device=runtime.device, precision=args.precision, compile=args.compile))
    cls_pre, emb_pre = stage.models.inputs["cls"], stage.models.inputs["emb"]

    decode_batch = _decoder(cls_pre, emb_pre)

    results: dict = {"images": n, "batch_size": args.batch_size, "threads": threads, "compile": args.compile,
                     "classifier": args.classifier, "embedder": args.embedder, "device": runtime.device,
                     "machine": machine(), "stage_split_s": {}}

    # (a) model only: everything decoded beforehand and already on the device, untimed.
    predecoded = [decode_batch(data[s]) for s in batch_slices(n, args.batch_size)]
    on_device = [{k: v if k == "id" else stage.staging.to_device(v) for k, v in b.items()} for b in predecoded]

    # (b) and (b'): one batch after the other; a step gives its (decode, model) busy seconds.
    def loop(step) -> tuple[float, dict]:
        decode_s = model_s = 0.0
        start = time.perf_counter()
        for s in batch_slices(n, args.batch_size):
            decode, model = step(data[s])
            decode_s += decode
            model_s += model
        return n / (time.perf_counter() - start), {"decode": round(decode_s, 2), "model": round(model_s, 2)}

    def cpu_decode_step(chunk: list[bytes]) -> tuple[float, float]:
        t0 = time.perf_counter()
        batch = decode_batch(chunk)
        t1 = time.perf_counter()
        stage(batch)
        return t1 - t0, time.perf_counter() - t1

    # (b') decoding and resizing on the model's device (the GPU fast path).
    errors = tempfile.TemporaryDirectory()
    on_device_decode = DecodeOnDevice(stage, stage.models.inputs, errors.name)

    def raw_batch(chunk: list[bytes]) -> dict[str, np.ndarray]:
        """What ReadShards gives the model actor with --decode device: the encoded bytes."""
        blank = np.array([""] * len(chunk), dtype=object)
        return {"id": np.arange(len(chunk)), "uri": blank, "label": blank, "read_error": blank,
                "data": np.array(chunk, dtype=object), "read_s": np.zeros(len(chunk), np.float32)}

    def device_decode_step(chunk: list[bytes]) -> tuple[float, float]:
        return _busy_seconds(on_device_decode(raw_batch(chunk)))

    # (d) pipelined like a job's model actor, in one process: decoding threads work ahead, and the
    # stage takes two calls at a time (one stages its batch while the other computes).
    def pipelined(make_batch, call, workers: int) -> tuple[float, dict]:
        split = {"decode": 0.0, "model": 0.0}

        def timed(chunk):
            t0 = time.perf_counter()
            return make_batch(chunk), time.perf_counter() - t0

        def done(out: dict) -> None:
            decode, model = _busy_seconds(out)
            split["model"] += model
            split["decode"] += decode

        start = time.perf_counter()
        slices, decodes, calls = deque(batch_slices(n, args.batch_size)), deque(), deque()
        with ThreadPoolExecutor(workers) as decoders, ThreadPoolExecutor(2) as callers:
            while slices or decodes:
                while slices and len(decodes) < 2 * workers:  # decode ahead
                    decodes.append(decoders.submit(timed, data[slices.popleft()]))
                batch, seconds = decodes.popleft().result()
                split["decode"] += seconds
                if len(calls) == 2:  # at most two calls in the stage, as in a job's model actor
                    done(calls.popleft().result())
                calls.append(callers.submit(call, batch))
            for future in calls:
                done(future.result())
        return n / (time.perf_counter() - start), {k: round(v, 2) for k, v in split.items()}

    workers = args.decode_workers or os.cpu_count() or 1
    measures = {"model_only": lambda: (_images_per_s(stage, on_device, n), {}),
                "plain_loop": lambda: loop(cpu_decode_step),
                "pipelined": lambda: pipelined(decode_batch, stage, workers)}
    if "device" in args.decode:
        measures["device_decode_loop"] = lambda: loop(device_decode_step)
        measures["pipelined_device_decode"] = lambda: pipelined(raw_batch, on_device_decode, 1)
    for batch in on_device[:5]:  # warm-up: allocator, thread pools, cuDNN/oneDNN plans
        stage(batch)
    # Rounds of (a), (b), (b') in turn, so that a drift of the machine's speed hits all of them;
    # the median of the rounds is reported, every round is kept in the JSON.
    rounds: dict[str, list] = {name: [] for name in measures}
    for _ in range(args.rounds):
        for name, measure in measures.items():
            rounds[name].append(measure())
    for name, runs in rounds.items():
        rates = sorted(rate for rate, _ in runs)
        results[f"{name}_images_per_s"] = rates[len(rates) // 2]
        results[f"{name}_rounds"] = [round(rate, 2) for rate, _ in runs]
        if runs[0][1]:
            results["stage_split_s"][name] = {**runs[-1][1], "wall": round(n / runs[-1][0], 2)}  # last round
    predecoded.clear()
    on_device.clear()
    errors.cleanup()
    results["decode_workers"] = workers
    results["batch_size_sweep"] = _batch_size_sweep(stage, decode_batch, data, args.sweep_batch_sizes)
    with tempfile.TemporaryDirectory() as scratch:
        classifiers = _classifier_settings(args, stage.models.embedder.dim, Path(scratch)) \
            if args.compare_classifiers else []
        if classifiers:
            results["classifiers"] = {"head_classes": args.head_classes, "pipelined_images_per_s": {},
                                      "pipelined_rounds": {}}
            stages = {name: ClassifyAndEmbed(spec, args.embedder, ModelSettings(
                device=runtime.device, precision=args.precision, compile=args.compile)) for name, spec in classifiers}
            decoders = {name: _decoder(s.models.inputs["cls"], s.models.inputs["emb"]) for name, s in stages.items()}
            for name, s in stages.items():  # warm-up
                s(decoders[name](data[: args.batch_size]))
            runs: dict[str, list[float]] = {name: [] for name in stages}
            for _ in range(args.rounds):  # in turn, so that a drift of the machine's speed hits all of them
                for name, s in stages.items():
                    runs[name].append(pipelined(decoders[name], s, workers)[0])
            for name, rates in runs.items():
                results["classifiers"]["pipelined_images_per_s"][name] = sorted(rates)[len(rates) // 2]
                results["classifiers"]["pipelined_rounds"][name] = [round(r, 2) for r in rates]
        if not args.skip_ray:
            results.update(_ray_jobs(args, data, cpu_threads=None if runtime.device != "cpu" else threads,
                                     classifiers=classifiers))
    return results


def _decoder(cls_pre, emb_pre):
    """Decodes and resizes a chunk of encoded images for a stage's two inputs (one resize when equal)."""
    def decode_batch(chunk: list[bytes]) -> dict[str, np.ndarray]:
        draft = max(cls_pre.draft_size, emb_pre.draft_size)
        decoded = [decode_image(d, max_pixels=DEFAULT_MAX_PIXELS, draft_size=draft) for d in chunk]
        cls = np.stack([resize_image(im, cls_pre) for im in decoded])
        emb = cls if emb_pre == cls_pre else np.stack([resize_image(im, emb_pre) for im in decoded])
        return {"id": np.arange(len(chunk)), "image_cls": cls, "image_emb": emb}

    return decode_batch


def _classifier_settings(args: argparse.Namespace, dim: int, scratch: Path) -> list[tuple[str, str]]:
    """``(name, classifier spec)`` of --compare-classifiers: none, a random-weight linear head of
    ``--head-classes`` classes over the embedder's vectors (written to ``scratch``), ``--classifier``."""
    with seeded(0):
        net = HeadNet(dim, args.head_classes)
    labels = [f"class_{i}" for i in range(args.head_classes)]
    head = save_head(scratch / "head.safetensors", net, labels, 1.0, str(as_spec(args.embedder)), 0.0)
    return [("embed only", NO_CLASSIFIER), ("embed + head", head), (f"embed + {args.classifier}", args.classifier)]


def _batch_size_sweep(stage, decode_batch, data: list[bytes], sizes: list[int]) -> list[dict]:
    """Model-only images/s per batch size (pre-decoded images, one warm-up batch each)."""
    rows = []
    for size in sizes:
        batches = [decode_batch(data[s]) for s in batch_slices(len(data), size)]
        for batch in batches[:3]:
            stage(batch)
        rate = round(_images_per_s(stage, batches, len(data)), 2)
        rows.append({"batch_size": size, "model_only_images_per_s": rate})
    return rows


def _ray_jobs(args: argparse.Namespace, data: list[bytes], cpu_threads: int | None,
              classifiers: list[tuple[str, str]] = ()) -> dict:
    """(c) the Ray Data job on a fresh output folder, once per stage layout, ``--decode device`` and
    actor count, and per ``classifiers`` setting, on the very same images as (a) and (b), copied to
    one folder the job reads. ``cpu_threads``: the torch threads to split between the actors (None:
    not on CPUs)."""
    # Lazy: ray is needed only here; --skip-ray runs on a machine without Ray installed (a bare GPU box).
    import ray

    from pipeline.embed_job import EmbedConfig, run

    n = len(data)
    results: dict = {}
    ray.init(address=args.address, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as scratch:
        images = Path(scratch) / "images"
        images.mkdir()
        for i, blob in enumerate(data):
            (images / f"{i:06d}.img").write_bytes(blob)

        def job(name: str, classifier: str = args.classifier, **kwargs) -> dict:
            summary = run(EmbedConfig(inputs=(str(images),), output=str(Path(scratch) / f"out-{name}"),
                                      classifier=classifier, embedder=args.embedder,
                                      precision=args.precision, compile=args.compile, **kwargs))
            if summary["counts"]["embedded"] != n:
                raise RuntimeError(f"the job embedded {summary['counts']['embedded']} of {n} images")
            return {"steady_images_per_s": summary["steady_images_per_s"],
                    "end_to_end_images_per_s": summary["images_per_s"], "wall_s": summary["wall_s"],
                    "per_worker_images_per_s": summary["per_worker_images_per_s"]}

        for layout in args.stages:
            results[f"ray_{layout}"] = job(layout, batch_size=args.batch_size, stages=layout)
        if "device" in args.decode:
            results["ray_fused_device_decode"] = job("device", batch_size=args.batch_size, decode="device")
        for i, (name, spec) in enumerate(classifiers):
            results.setdefault("classifiers_ray", {})[name] = job(f"classifier{i}", classifier=spec,
                                                                  batch_size=args.batch_size)
        # Throughput vs the number of model actors (threads split evenly between them on CPUs).
        results["actors_sweep"] = [
            {"actors": a, **job(f"actors{a}", batch_size=args.batch_size, num_actors=a,
                                model_threads=None if cpu_threads is None else max(1, cpu_threads // a))}
            for a in args.sweep_actors]
    ray.shutdown()
    return results


def plot_batch(results: dict, path: Path) -> None:
    """PNG: model-only throughput vs batch size, and the job's throughput vs model actors."""
    # Lazy: matplotlib is optional (the demo extra) and only --plot needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sweep = results.get("batch_size_sweep", [])
    left.plot([r["batch_size"] for r in sweep], [r["model_only_images_per_s"] for r in sweep], "o-")
    left.set_xscale("log", base=2)
    left.set(xlabel="batch size", ylabel="images/s", title="(a) model only vs batch size")
    actors = results.get("actors_sweep", [])
    for key, label in (("steady_images_per_s", "steady"), ("end_to_end_images_per_s", "end to end")):
        right.plot([r["actors"] for r in actors], [r[key] or 0 for r in actors], "o-", label=label)
    right.axhline(results["model_only_images_per_s"], color="grey", linestyle="--", label="(a) one process")
    right.set_xticks([r["actors"] for r in actors])
    right.set(xlabel="model actors", ylabel="images/s", title="(c) Ray Data job vs model actors")
    right.legend()
    fig.suptitle(f"{results['classifier']} + {results['embedder']} on {results['device']} ({results['machine']})",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_batch(results: dict) -> None:
    a, b = results["model_only_images_per_s"], results["plain_loop_images_per_s"]

    def row(label: str, rate: float) -> None:  # images/s side by side with its ratios to (a) and (b)
        print(f"{label:<34}{rate:>10.1f}{rate / a:>9.2f}{rate / b:>9.2f}")

    print(f"\nbatch benchmark: {results['images']} images, batch {results['batch_size']}, "
          f"{results['classifier']} + {results['embedder']} on {results['device']} ({results['machine']})")
    print(f"{'measurement':<34}{'images/s':>10}{'vs (a)':>9}{'vs (b)':>9}")
    for key, label in (("model_only", "(a) model only (pre-decoded)"),
                       ("plain_loop", "(b) plain loop (decode + model)"),
                       ("device_decode_loop", "(b') plain loop, device decode"),
                       ("pipelined", "(d) pipelined, CPU decode"),
                       ("pipelined_device_decode", "(d') pipelined, device decode")):
        if f"{key}_images_per_s" in results:
            row(label, results[f"{key}_images_per_s"])
    for key, value in results.items():
        if key.startswith("ray_"):
            for kind in ("steady", "end_to_end"):
                if value[f"{kind}_images_per_s"]:
                    row(f"(c) Ray Data, {key[4:]}, {kind.replace('_', ' ')}", value[f"{kind}_images_per_s"])
    for loop, split in results["stage_split_s"].items():  # busy seconds; (d) overlaps them
        print(f"{loop.replace('_', ' ')}, last round: decode {split['decode']} s, model {split['model']} s busy; "
              f"{split['wall']} s wall")
    for sweep_row in results.get("batch_size_sweep", []):
        print(f"(a) model only, batch {sweep_row['batch_size']:<4}{sweep_row['model_only_images_per_s']:>20.1f}")
    for actors_row in results.get("actors_sweep", []):
        steady = actors_row["steady_images_per_s"] or 0
        print(f"(c) Ray Data, {actors_row['actors']} model actor(s), steady "
              f"{steady:>9.1f}{steady / a:>9.2f}{steady / b:>9.2f}")
    compared = results.get("classifiers")
    if compared:
        print(f"\nwhat the classes cost (embedder {results['embedder']}; head: linear, {compared['head_classes']} "
              f"classes), images/s and the ratio to embed only, same run:")
        piped = compared["pipelined_images_per_s"]
        ray_rows = results.get("classifiers_ray", {})
        base, ray_base = piped.get("embed only"), (ray_rows.get("embed only") or {}).get("steady_images_per_s")
        for name, rate in piped.items():
            line = f"  {name:<40}(d) {rate:>8.1f} {rate / base:>6.2f}x"
            steady = (ray_rows.get(name) or {}).get("steady_images_per_s")
            if steady and ray_base:
                line += f"   (c) Ray Data steady {steady:>8.1f} {steady / ray_base:>6.2f}x"
            print(line)


def report_batch(results: dict, args: argparse.Namespace) -> None:
    print_batch(results)
    if args.plot:
        plot_batch(results, args.plot)
        print(f"plot: {args.plot}")


def check_batch(args: argparse.Namespace) -> str | None:
    if args.limit < 1 or args.batch_size < 1:
        return "--limit and --batch-size must be >= 1"
    if min([*args.sweep_batch_sizes, *args.sweep_actors, args.rounds]) < 1:
        return "sweep values must be >= 1"
    if args.head_classes < 2:
        return "--head-classes must be >= 2"
    return None


def add_arguments(batch: argparse.ArgumentParser) -> None:
    """Adds ``batch``'s arguments and functions to its subcommand parser (``jobs.benchmark.cli``)."""
    batch.set_defaults(check=check_batch, bench=bench_batch, report=report_batch)
    batch.add_argument("--input", action="append", required=True, help="images (any jobs.embed input)")
    batch.add_argument("--limit", type=int, default=2000, help="images to use (default: 2000)")
    batch.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help=f"default: {DEFAULT_CLASSIFIER}")
    batch.add_argument("--embedder", default=DEFAULT_EMBEDDER, help=f"default: {DEFAULT_EMBEDDER}")
    batch.add_argument("--batch-size", type=int, default=64)
    batch.add_argument("--threads", type=int, help="torch threads for (a) and (b) (default: all CPUs)")
    batch.add_argument("--device", default="auto")
    batch.add_argument("--precision", default="auto")
    batch.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="torch.compile the models (warm-up batches absorb the compilation)")
    batch.add_argument("--stages", nargs="+", default=["fused", "separate"], choices=["fused", "separate"])
    batch.add_argument("--address", default="local", help="Ray address for (c) (default: a new local Ray)")
    batch.add_argument("--rounds", type=int, default=3, help="rounds of every measurement in turn (default: 3)")
    batch.add_argument("--decode-workers", type=int,
                       help="decoding threads of the pipelined loop (d) (default: one per CPU)")
    batch.add_argument("--decode", nargs="+", default=["cpu"], choices=["cpu", "device"],
                       help="also measure decoding on the model's device (b') and in the job (default: cpu)")
    batch.add_argument("--skip-ray", action="store_true",
                       help="measure (a) and (b) only: for machines without Ray (the pipeline stages directly)")
    batch.add_argument("--sweep-batch-sizes", type=int, nargs="*", default=[8, 16, 32, 64],
                       help="batch sizes for the model-only sweep (default: 8 16 32 64)")
    batch.add_argument("--sweep-actors", type=int, nargs="*", default=[1, 2],
                       help="model actor counts for the job sweep (default: 1 2)")
    batch.add_argument("--plot", type=Path, help="write the sweeps as a PNG plot")
    batch.add_argument("--compare-classifiers", action="store_true",
                       help="also measure embed only / embed + a classifier head / embed + --classifier, same run")
    batch.add_argument("--head-classes", type=int, default=1000,
                       help="classes of the head in --compare-classifiers (default: 1000)")
