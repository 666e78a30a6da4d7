"""``scale``: the embedding job on an ImageNet-22k-shaped input, with a near-free model.

Builds (once; reused while its shape is the same) ``WORK/input``: ``--classes`` class tars
(default 21,841, named like ImageNet's ``nXXXXXXXX.tar``) of ``--per-class`` small JPEGs each.
Then it runs the real job (``python -m jobs.embed``, a child process with its own local Ray, as a
user runs it) into a fresh ``WORK/out`` (or ``--output``), and once more into the same folder: a
resume that finds everything done. It reports

- planning: ``discover_shards`` over the input, what the driver lists before Ray starts;
- per run: wall time, the job's own images/s (end to end and steady state), parts written, and
  the driver's peak resident memory (``VmHWM`` of the job process, read every 0.2 s);
- the resume's own bookkeeping: listing the committed parts and reading their ids.

With a near-free model the images/s is the orchestration's ceiling (read tasks, decode tasks,
actor calls, part writes), not a model's speed. The per-tar and per-image figures are what the
docs/PERFORMANCE.md extrapolates to ImageNet-22k's 14M images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.benchmark.runner import machine
from pipeline.embed_output import committed, done_ids
from pipeline.sources import discover_shards
from pipeline.storage import Location

#: A tiny timm model with random weights: the model costs next to nothing, the orchestration shows.
NEAR_FREE_MODEL = "timm:test_efficientnet@random"


def make_input(root: Path, classes: int, per_class: int, size: int = 48, seed: int = 0) -> dict:
    """``classes`` tars of ``per_class`` JPEGs each (64 distinct images, reused), written once;
    returns their shape. A folder of the same shape is reused."""
    shape = {"classes": classes, "per_class": per_class, "size": size}
    stamp = root / "_shape.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == shape:
        return shape | {"built_s": 0.0}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(64):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=80)
        pool.append(buffer.getvalue())
    start = time.perf_counter()
    for c in range(classes):
        synset = f"n{c:08d}"
        with tarfile.open(root / f"{synset}.tar", "w") as tar:
            for i in range(per_class):
                data = pool[(c * per_class + i) % len(pool)]
                info = tarfile.TarInfo(f"{synset}_{i}.JPEG")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stamp.write_text(json.dumps(shape))
    return shape | {"built_s": round(time.perf_counter() - start, 1)}


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_job(args: argparse.Namespace, output: str, log: Path) -> dict:
    """One ``python -m jobs.embed`` run: wall time, driver peak RSS, and its summary.json."""
    command = [sys.executable, "-m", "jobs.embed", "--input", str(args.work / "input"), "--output", output,
               "--classifier", args.model, "--embedder", args.model, "--batch-size", str(args.batch_size),
               "--decode-batch-size", str(args.decode_batch_size)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _peak_rss_mb(proc.pid) or 0.0)
            time.sleep(0.2)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the job failed (exit {proc.returncode}); its log: {log}")
    summary = (Location(output) / "summary.json").read_json()
    return {"wall_s": round(wall, 1), "driver_peak_rss_mb": round(peak), "job_wall_s": summary["wall_s"],
            "embedded_this_run": summary["embedded_this_run"], "images_per_s": summary["images_per_s"],
            "steady_images_per_s": summary["steady_images_per_s"],
            "per_worker_images_per_s": summary["per_worker_images_per_s"], "counts": summary["counts"]}


def bench_scale(args: argparse.Namespace) -> dict:
    args.work.mkdir(parents=True, exist_ok=True)
    shape = make_input(args.work / "input", args.classes, args.per_class)
    images = args.classes * args.per_class
    start = time.perf_counter()
    shards = discover_shards([str(args.work / "input")])
    planning = time.perf_counter() - start
    output = args.output or str(args.work / "out")
    out = Location(output)
    out.delete_tree()
    first = run_job(args, output, args.work / "job-first.log")
    start = time.perf_counter()
    parts = committed(out)
    listed = time.perf_counter() - start
    ids = done_ids(out, parts)
    bookkeeping = time.perf_counter() - start
    again = run_job(args, output, args.work / "job-resume.log")
    n_parts = len(parts["embeddings"]) + len(parts["errors"])
    return {
        "machine": machine(), "model": args.model, "batch_size": args.batch_size, "input": shape,
        "images": images, "tars": len(shards),
        "planning_s": round(planning, 2), "planning_ms_per_tar": round(1000 * planning / max(1, len(shards)), 3),
        "first_run": first, "parts": n_parts, "images_per_part": round(len(ids) / max(1, n_parts), 1),
        "resume_bookkeeping": {"list_parts_s": round(listed, 2), "list_and_read_ids_s": round(bookkeeping, 2),
                               "ids": int(len(ids))},
        "resume_all_done": again,
    }


def report_scale(results: dict, args: argparse.Namespace) -> None:
    first, again = results["first_run"], results["resume_all_done"]
    shape = results["input"]
    print(f"scale: {results['tars']:,} class tars x {shape['per_class']} JPEGs ({shape['size']} px) = "
          f"{results['images']:,} images; model {results['model']}, batch {results['batch_size']}; {results['machine']}")
    print(f"  planning (discover_shards):  {results['planning_s']:.2f} s ({results['planning_ms_per_tar']:.3f} ms per tar)")
    print(f"  first run:                   {first['wall_s']:.1f} s wall ({first['job_wall_s']:.1f} s in the job), "
          f"{first['images_per_s']} images/s end to end, {first['steady_images_per_s']} steady; "
          f"driver peak RSS {first['driver_peak_rss_mb']} MB; {results['parts']:,} parts "
          f"({results['images_per_part']} images each); counts {first['counts']['embedded']:,} embedded, "
          f"{first['counts']['failed']} failed")
    rates = first["per_worker_images_per_s"]
    print("  images/s one worker of each stage sustains (busy time): "
          + ", ".join(f"{stage} {rate}" for stage, rate in rates.items()))
    book = results["resume_bookkeeping"]
    print(f"  resume bookkeeping:          list committed parts {book['list_parts_s']:.2f} s, "
          f"+ read their {book['ids']:,} ids {book['list_and_read_ids_s']:.2f} s")
    print(f"  resume, everything done:     {again['wall_s']:.1f} s wall ({again['job_wall_s']:.1f} s in the job), "
          f"{again['embedded_this_run']} embedded; driver peak RSS {again['driver_peak_rss_mb']} MB")


def check_scale(args: argparse.Namespace) -> str | None:
    if min(args.classes, args.per_class, args.batch_size, args.decode_batch_size) < 1:
        return "--classes, --per-class, --batch-size and --decode-batch-size must be >= 1"
    return None


def add_arguments(scale: argparse.ArgumentParser) -> None:
    """Adds ``scale``'s arguments and functions to its subcommand parser (``jobs.benchmark.cli``)."""
    scale.set_defaults(check=check_scale, bench=bench_scale, report=report_scale)
    scale.add_argument("--classes", type=int, default=21_841, help="class tars (default: 21841, as ImageNet-22k)")
    scale.add_argument("--per-class", type=int, default=3, help="JPEGs per tar (default: 3)")
    scale.add_argument("--work", type=Path, default=Path("out/bench-scale"),
                       help="where the input and the output go (default: out/bench-scale)")
    scale.add_argument("--output", help="the job's output instead of WORK/out (e.g. s3://bucket/prefix); "
                                        "emptied first")
    scale.add_argument("--model", default=NEAR_FREE_MODEL, help=f"classifier and embedder (default: {NEAR_FREE_MODEL})")
    scale.add_argument("--batch-size", type=int, default=256, help="images per model call (default: 256)")
    scale.add_argument("--decode-batch-size", type=int, default=32, help="images per decode task (default: 32)")
