"""Throughput benchmarks, measured side by side in one run (shared machines are noisy: compare
ratios, not absolute numbers from different runs).

    python -m jobs.benchmark batch --input DIR [--limit 2000] [--classifier SPEC] [--embedder SPEC]
    python -m jobs.benchmark index [--rows 1000000] [--dim 512] [--classes 20000]

``batch`` measures on the same images and models:
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
``--skip-ray`` measures (a), (b), (b'), (d) and (d') only: the pipeline stages directly, where Ray
is absent. (d)/(a) and (d')/(a) are the end-to-end-from-JPEG-bytes ratios of one model device.

``index`` builds an index from synthetic embeddings (Zipf-like class sizes) with the real builder
and measures: build time and peak memory, class-restricted search latency per query (p50/p99),
exact global search QPS, and approximate (IVF) global search QPS and recall@10 against exact.
``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, resize_image
from pipeline.sources import discover_shards, read_shard

# Model defaults repeated here so that `index` runs (and its build child starts) without torch.
DEFAULT_MODEL = "timm:tf_efficientnet_lite0"


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


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def bench_batch(args: argparse.Namespace) -> dict:
    import torch

    from pipeline.batch import ClassifyAndEmbed, DecodeOnDevice
    from pipeline.models import load_classifier, load_embedder, select_runtime

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    data = _images(args.input, args.limit)
    if len(data) < args.limit:
        print(f"note: only {len(data)} decodable images found (asked for {args.limit})", file=sys.stderr)
    n = len(data)
    runtime = select_runtime(args.device)
    cls_pre = load_classifier(args.classifier, select_runtime("cpu")).preprocess
    emb_pre = load_embedder(args.embedder, select_runtime("cpu")).preprocess
    stage = ClassifyAndEmbed(args.classifier, args.embedder, device=runtime.device, precision=args.precision,
                             compile=args.compile)

    def decode_batch(chunk: list[bytes]) -> dict[str, np.ndarray]:
        draft = max(cls_pre.draft_size, emb_pre.draft_size)
        decoded = [decode_image(d, max_pixels=DEFAULT_MAX_PIXELS, draft_size=draft) for d in chunk]
        cls = np.stack([resize_image(im, cls_pre) for im in decoded])
        emb = cls if emb_pre == cls_pre else np.stack([resize_image(im, emb_pre) for im in decoded])
        return {"id": np.arange(len(chunk)), "image_cls": cls, "image_emb": emb}

    results: dict = {"images": n, "batch_size": args.batch_size, "threads": threads, "compile": args.compile,
                     "classifier": args.classifier, "embedder": args.embedder, "device": runtime.device,
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "stage_split_s": {}}

    # (a) model only: everything decoded beforehand and already on the device, untimed.
    predecoded = [decode_batch(data[s]) for s in _batches(n, args.batch_size)]
    on_device = [{k: v if k == "id" else stage.staging.to_device(v) for k, v in b.items()} for b in predecoded]

    def model_only() -> tuple[float, dict]:
        start = time.perf_counter()
        for batch in on_device:
            stage(batch)
        return n / (time.perf_counter() - start), {}

    # (b) plain single-process loop.
    def plain_loop() -> tuple[float, dict]:
        decode_s = model_s = 0.0
        start = time.perf_counter()
        for s in _batches(n, args.batch_size):
            t0 = time.perf_counter()
            batch = decode_batch(data[s])
            t1 = time.perf_counter()
            stage(batch)
            decode_s += t1 - t0
            model_s += time.perf_counter() - t1
        return n / (time.perf_counter() - start), {"decode": round(decode_s, 2), "model": round(model_s, 2)}

    # (b') the same loop, decoding and resizing on the model's device (the GPU fast path).
    errors = tempfile.TemporaryDirectory()
    on_device_decode = DecodeOnDevice(stage, runtime.device, {"cls": cls_pre, "emb": emb_pre}, errors.name)

    def raw_batch(chunk: list[bytes]) -> dict[str, np.ndarray]:
        """What ReadShards gives the model actor with --decode device: the encoded bytes."""
        blank = np.array([""] * len(chunk), dtype=object)
        return {"id": np.arange(len(chunk)), "uri": blank, "label": blank, "read_error": blank,
                "data": np.array(chunk, dtype=object), "read_s": np.zeros(len(chunk), np.float32)}

    def device_decode_loop() -> tuple[float, dict]:
        decode_s = model_s = 0.0
        start = time.perf_counter()
        for s in _batches(n, args.batch_size):
            out = on_device_decode(raw_batch(data[s]))
            decode_s += float(out["decode_s"].sum())
            model_s += float(out["model_s"].sum())
        return n / (time.perf_counter() - start), {"decode": round(decode_s, 2), "model": round(model_s, 2)}

    # (d) pipelined like a job's model actor, in one process: decoding threads work ahead, and the
    # stage takes two calls at a time (one stages its batch while the other computes).
    def pipelined(make_batch, call, workers: int) -> tuple[float, dict]:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        split = {"decode": 0.0, "model": 0.0}

        def timed(chunk):
            t0 = time.perf_counter()
            return make_batch(chunk), time.perf_counter() - t0

        def done(out: dict) -> None:
            split["model"] += float(out["model_s"].sum())
            split["decode"] += float(out["decode_s"].sum()) if "decode_s" in out else 0.0

        start = time.perf_counter()
        slices, decodes, calls = deque(_batches(n, args.batch_size)), deque(), deque()
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
    measures = {"model_only": model_only, "plain_loop": plain_loop,
                "pipelined": lambda: pipelined(decode_batch, stage, workers)}
    if "device" in args.decode:
        measures["device_decode_loop"] = device_decode_loop
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
    if args.skip_ray:
        return results

    # (c) the Ray Data job on a fresh output folder, once per stage layout.
    # The very same images as (a) and (b): copied to one folder the job reads.
    import ray

    from jobs.embed import EmbedConfig, run

    ray.init(address=args.address, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as scratch:
        images = Path(scratch) / "images"
        images.mkdir()
        for i, blob in enumerate(data):
            (images / f"{i:06d}.img").write_bytes(blob)

        def job(name: str, **kwargs) -> dict:
            summary = run(EmbedConfig(inputs=(str(images),), output=str(Path(scratch) / f"out-{name}"),
                                      classifier=args.classifier, embedder=args.embedder,
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
        # Throughput vs the number of model actors (threads split evenly between them on CPUs).
        results["actors_sweep"] = [
            {"actors": a, **job(f"actors{a}", batch_size=args.batch_size, num_actors=a,
                                model_threads=None if runtime.device != "cpu" else max(1, threads // a))}
            for a in args.sweep_actors]
    ray.shutdown()
    return results


def _batch_size_sweep(stage, decode_batch, data: list[bytes], sizes: list[int]) -> list[dict]:
    """Model-only images/s per batch size (pre-decoded images, one warm-up batch each)."""
    rows = []
    for size in sizes:
        batches = [decode_batch(data[s]) for s in _batches(len(data), size)]
        for batch in batches[:3]:
            stage(batch)
        start = time.perf_counter()
        for batch in batches:
            stage(batch)
        rate = round(len(data) / (time.perf_counter() - start), 2)
        rows.append({"batch_size": size, "model_only_images_per_s": rate})
    return rows


def plot_batch(results: dict, path: Path) -> None:
    """PNG: model-only throughput vs batch size, and the job's throughput vs model actors."""
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
    print(f"\nbatch benchmark: {results['images']} images, batch {results['batch_size']}, "
          f"{results['classifier']} + {results['embedder']} on {results['device']} ({results['machine']})")
    print(f"{'measurement':<34}{'images/s':>10}{'vs (a)':>9}{'vs (b)':>9}")
    print(f"{'(a) model only (pre-decoded)':<34}{a:>10.1f}{1:>9.2f}{a / b:>9.2f}")
    print(f"{'(b) plain loop (decode + model)':<34}{b:>10.1f}{b / a:>9.2f}{1:>9.2f}")
    for key, label in (("device_decode_loop", "(b') plain loop, device decode"),
                       ("pipelined", "(d) pipelined, CPU decode"),
                       ("pipelined_device_decode", "(d') pipelined, device decode")):
        if f"{key}_images_per_s" in results:
            d = results[f"{key}_images_per_s"]
            print(f"{label:<34}{d:>10.1f}{d / a:>9.2f}{d / b:>9.2f}")
    for key, value in results.items():
        if key.startswith("ray_"):
            for kind in ("steady", "end_to_end"):
                c = value[f"{kind}_images_per_s"]
                if c:
                    label = f"(c) Ray Data, {key[4:]}, {kind.replace('_', ' ')}"
                    print(f"{label:<34}{c:>10.1f}{c / a:>9.2f}{c / b:>9.2f}")
    for loop, split in results["stage_split_s"].items():  # busy seconds; (d) overlaps them
        print(f"{loop.replace('_', ' ')}, last round: decode {split['decode']} s, model {split['model']} s busy; "
              f"{split['wall']} s wall")
    for row in results.get("batch_size_sweep", []):
        print(f"(a) model only, batch {row['batch_size']:<4}{row['model_only_images_per_s']:>20.1f}")
    for row in results.get("actors_sweep", []):
        steady = row["steady_images_per_s"] or 0
        print(f"(c) Ray Data, {row['actors']} model actor(s), steady {steady:>9.1f}{steady / a:>9.2f}{steady / b:>9.2f}")


def _synthetic_gallery(out: Path, rows: int, dim: int, classes: int, seed: int, noise: float) -> dict:
    """Writes an embedding-job output of clustered unit vectors; class sizes follow 1/rank.

    Each vector is its class centre (unit norm) plus Gaussian noise of expected norm ``noise``,
    then normalised: noise 0.5 puts members at cosine ~0.9 from their centre, 1.0 at ~0.7.
    """
    from pipeline.batch import WriteParts

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, classes + 1)
    weights /= weights.sum()
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    writer = WriteParts(out / "embeddings", dim)
    parts = []
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        cls = rng.choice(classes, n, p=weights)
        vectors = centres[cls] + rng.normal(scale=noise / np.sqrt(dim), size=(n, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = np.arange(start, start + n, dtype=np.int64)
        batch = {"id": ids, "uri": np.array([f"synthetic/{i}" for i in ids], dtype=object),
                 "label": np.array([str(c) for c in cls], dtype=object),
                 "classes": cls[:, None].astype(np.int32), "class_probs": np.ones((n, 1), np.float32),
                 "embedding": vectors, "read_s": np.zeros(n), "decode_s": np.zeros(n), "model_s": np.zeros(n)}
        parts.append({"path": f"embeddings/{writer(batch)['part'][0]}", "rows": n})
    models = {"classifier": {"spec": "synthetic"}, "embedder": {"spec": "synthetic", "dim": dim}}
    (out / "manifest.json").write_text(json.dumps({"models": models, "parts": parts}))
    return {"centres": centres, "weights": weights}


def _build_in_child(emb: str, index_dir: str, config_kwargs: dict) -> None:
    from pipeline.index import IndexConfig, build_index

    build_index(emb, index_dir, IndexConfig(**config_kwargs))


def bench_index(args: argparse.Namespace) -> dict:
    import multiprocessing as mp
    import resource

    import faiss

    from pipeline.index import ShardedIndex

    results: dict = {"rows": args.rows, "dim": args.dim, "classes": args.classes, "queries": args.queries,
                     "noise": args.noise, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        emb, index_dir = Path(scratch) / "emb", Path(scratch) / "index"
        start = time.perf_counter()
        gallery = _synthetic_gallery(emb, args.rows, args.dim, args.classes, args.seed, args.noise)
        results["generate_s"] = round(time.perf_counter() - start, 1)

        # The build runs in a child process so its peak memory is measured alone.
        config = {"shard_size": args.shard_size, "global_index": "ivf", "nlist": args.nlist}
        start = time.perf_counter()
        child = mp.get_context("spawn").Process(target=_build_in_child, args=(str(emb), str(index_dir), config))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"index build failed (exit {child.exitcode})")
        results["build_s"] = round(time.perf_counter() - start, 1)
        results["build_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)

        index = ShardedIndex.load(index_dir, verify=False)
        results["shards"] = len(index.manifest["shards"])
        rng = np.random.default_rng(args.seed + 1)
        q_cls = rng.choice(args.classes, args.queries, p=gallery["weights"])
        queries = gallery["centres"][q_cls] + rng.normal(scale=args.noise / np.sqrt(args.dim),
                                                         size=(args.queries, args.dim)).astype(np.float32)
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)

        # Class-restricted: every class scanned exactly, then classes above --exact-max-rows
        # searched through the IVF index restricted to their range (recall against exact given).
        results["class_search"] = []
        exact_ids = None
        for exact_max in (None, args.exact_max_rows):
            latencies, found = [], []
            for query, cls in zip(queries, q_cls):
                t0 = time.perf_counter()
                hits = index.search_class(query[None], [[cls]], k=10, exact_max_rows=exact_max, nprobe=args.class_nprobe)
                latencies.append(time.perf_counter() - t0)
                found.append({h.id for h in hits[0]})
            if exact_ids is None:
                exact_ids = found
            ms = np.array(latencies) * 1000
            results["class_search"].append({
                "exact_max_rows": exact_max, "p50_ms": round(float(np.percentile(ms, 50)), 3),
                "p99_ms": round(float(np.percentile(ms, 99)), 3), "max_ms": round(float(ms.max()), 3),
                "recall_at_10_vs_exact": round(float(np.mean([len(f & e) / max(len(e), 1)
                                                              for f, e in zip(found, exact_ids)])), 4)})
        sizes = np.array([index.class_size(c) for c in q_cls])
        results["queried_class_rows"] = {"median": int(np.median(sizes)), "max": int(sizes.max())}

        # Exact global search: one flat index over every vector (the reference), batched queries.
        vectors = np.concatenate([np.asarray(np.load(index_dir / s["path"] / "vectors.npy", mmap_mode="r"))
                                  for s in index.manifest["shards"]])
        ids = np.concatenate([pq.read_table(index_dir / s["path"] / "rows.parquet", columns=["id"])["id"].to_numpy()
                              for s in index.manifest["shards"]])
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(vectors)
        del vectors
        start = time.perf_counter()
        _, exact_pos = flat.search(queries, 10)
        exact_qps = args.queries / (time.perf_counter() - start)
        exact = ids[exact_pos]
        results["global_exact_qps"] = round(exact_qps, 1)
        del flat

        results["global_ivf"] = []
        for nprobe in args.nprobe:
            start = time.perf_counter()
            found = index.search_global(queries, k=10, nprobe=nprobe)
            qps = args.queries / (time.perf_counter() - start)
            recall = np.mean([len({h.id for h in hits} & set(row.tolist())) / 10 for hits, row in zip(found, exact)])
            results["global_ivf"].append({"nprobe": nprobe, "qps": round(qps, 1), "recall_at_10": round(float(recall), 4),
                                          "speedup_vs_exact": round(qps / exact_qps, 1)})
    return results


def print_index(results: dict) -> None:
    print(f"\nindex benchmark: {results['rows']:,} vectors, dim {results['dim']}, {results['classes']:,} classes "
          f"(1/rank sizes, noise {results['noise']}), {results['shards']} shard(s), {results['queries']} queries "
          f"({results['machine']})")
    print(f"build: {results['build_s']} s, peak RSS {results['build_peak_rss_gb']} GB "
          f"(synthetic data generated in {results['generate_s']} s, not counted)")
    sizes = results["queried_class_rows"]
    print(f"class-restricted search, top-10, one query at a time (queried class sizes: median "
          f"{sizes['median']}, max {sizes['max']} rows):")
    print(f"{'  large classes via':<26}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'recall@10':>11}")
    for row in results["class_search"]:
        label = "exact scan (all classes)" if row["exact_max_rows"] is None else f"IVF above {row['exact_max_rows']} rows"
        print(f"  {label:<24}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{row['max_ms']:>9.3f}"
              f"{row['recall_at_10_vs_exact']:>11.4f}")
    print(f"global exact (flat, batched): {results['global_exact_qps']} QPS")
    print(f"{'global IVF nprobe':<20}{'QPS':>10}{'recall@10':>11}{'x exact':>9}")
    for row in results["global_ivf"]:
        print(f"{row['nprobe']:<20}{row['qps']:>10.1f}{row['recall_at_10']:>11.4f}{row['speedup_vs_exact']:>9.1f}")


def _load(url: str, payloads: list[bytes], concurrency: int, requests_total: int, seconds: float,
          params: dict | None = None) -> dict:
    """A bounded closed-loop load on one URL: at most ``requests_total`` requests or ``seconds``."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests_total))
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        session = requests.Session()
        for i in counter:
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            try:
                response = session.post(url, params=params, data=payloads[i % len(payloads)], timeout=60)
                ok = response.status_code == 200
                reason = f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                ok, reason = False, type(exc).__name__
            with lock:
                (latencies.append(time.perf_counter() - t0) if ok else failures.append(reason))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"concurrency": concurrency, "requests": len(latencies), "failed": len(failures),
            "failure_kinds": sorted(set(failures)), "qps": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def _direct(engine, payloads: list[bytes], concurrency: int, requests_total: int) -> dict:
    """The same query path called in this process (no HTTP, no Serve), ``concurrency`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> float:
        t0 = time.perf_counter()
        engine.search([payloads[i % len(payloads)]], k=5)
        return time.perf_counter() - t0

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(requests_total)))
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": requests_total, "qps": round(requests_total / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def _replicas(app: str = "lookalike") -> dict[str, int]:
    from ray import serve

    status = serve.status().applications[app].deployments
    return {name: sum(d.replica_states.values()) if d.replica_states else 0 for name, d in status.items()}


def bench_serve(args: argparse.Namespace) -> dict:
    """Graph vs direct calls, batching on vs off, a soak with a replica killed, autoscaling."""
    import socket
    import threading

    import ray
    from ray import serve

    from pipeline.models import select_runtime
    from pipeline.search import QueryEngine
    from serve.app import build_app

    payloads = [p.read_bytes() for p in sorted(Path(args.images).glob("*")) if p.is_file()][: args.payloads]
    payloads += [p.read_bytes() for p in sorted(Path(args.images).rglob("*.png"))[: max(0, args.payloads - len(payloads))]]
    results: dict = {"index": args.index, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                     "payloads": len(payloads)}
    engine = QueryEngine.load(args.index, runtime=select_runtime("cpu"))
    engine.search(payloads[:1])  # warm-up
    results["direct"] = [_direct(engine, payloads, c, args.requests) for c in (1, 8)]
    del engine

    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/search"
    results["graph"] = {}
    variants = [("batched", args.max_batch_size, "cpu"), ("unbatched", 1, "cpu")]
    if "device" in args.decode:  # the replicas decode uploads on their device (the GPU fast path)
        variants.append(("batched, device decode", args.max_batch_size, "device"))
    for label, batch, decode in variants:
        serve.run(build_app({"index": args.index, "max_batch_size": batch, "decode": decode}),
                  name="lookalike", route_prefix="/")
        _load(url, payloads, 1, 5, 60)  # warm-up
        levels = (8,) if label == "unbatched" else (1, 8, 32)
        results["graph"][label] = [_load(url, payloads, c, args.requests, args.seconds) for c in levels]
        serve.delete("lookalike")

    # Autoscaling and a replica killed mid-run: a longer soak at concurrency 32.
    serve.run(_autoscaling_app(args), name="lookalike", route_prefix="/")
    _load(url, payloads, 1, 5, 60)
    seen: dict[str, int] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for name, n in _replicas().items():
                seen[name] = max(seen.get(name, 0), n)
            time.sleep(1)

    def kill_one() -> None:
        time.sleep(args.soak / 2)
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Classifier" in a["name"]]
        if actors:
            ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
            results["killed_replica"] = actors[0]["name"]

    watcher, killer = threading.Thread(target=watch), threading.Thread(target=kill_one)
    before = _replicas()
    watcher.start(), killer.start()
    results["soak"] = _load(url, payloads, 32, 10**9, args.soak)
    killer.join()
    results["replicas_before"], results["replicas_max_during"] = before, dict(seen)
    time.sleep(args.cooldown)
    stop.set()
    watcher.join()
    results["replicas_after_cooldown"] = _replicas()
    serve.shutdown()
    ray.shutdown()
    return results


def _autoscaling_app(args: argparse.Namespace):
    """The demo app with autoscaling model deployments (serve/config.yaml sets them the same way)."""
    from serve.app import build_app

    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
               "upscale_delay_s": 2, "downscale_delay_s": 10}
    return build_app({"index": args.index, "max_batch_size": args.max_batch_size, "model_autoscaling": scaling})


def print_serve(results: dict) -> None:
    print(f"\nserve benchmark: index {results['index']} ({results['machine']}), loopback HTTP")
    print(f"{'':<36}{'conc.':>6}{'QPS':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'failed':>8}")
    for row in results["direct"]:
        print(f"{'direct (one process)':<36}{row['concurrency']:>6}{row['qps']:>8}{row['p50_ms']:>9}"
              f"{row['p95_ms']:>9}{row['p99_ms']:>9}{'-':>8}")
    for label, rows in results["graph"].items():
        for row in rows:
            print(f"{'graph, ' + label:<36}{row['concurrency']:>6}{row['qps']:>8}{row['p50_ms']:>9}"
                  f"{row['p95_ms']:>9}{row['p99_ms']:>9}{row['failed']:>8}")
    soak = results["soak"]
    print(f"{'soak (replica killed)':<36}{soak['concurrency']:>6}{soak['qps']:>8}{soak['p50_ms']:>9}"
          f"{soak['p95_ms']:>9}{soak['p99_ms']:>9}{soak['failed']:>8}")
    print(f"killed: {results.get('killed_replica', 'none')}; failure kinds: {soak['failure_kinds'] or 'none'}")
    print(f"replicas before {results['replicas_before']}, max during {results['replicas_max_during']}, "
          f"after cool-down {results['replicas_after_cooldown']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="area", required=True)
    batch = sub.add_parser("batch", help="embedding job throughput vs the model-only ceiling")
    batch.add_argument("--input", action="append", required=True, help="images (any jobs.embed input)")
    batch.add_argument("--limit", type=int, default=2000, help="images to use (default: 2000)")
    batch.add_argument("--classifier", default=DEFAULT_MODEL)
    batch.add_argument("--embedder", default=DEFAULT_MODEL)
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
    batch.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    index = sub.add_parser("index", help="index build, class-restricted latency, global QPS and recall")
    index.add_argument("--rows", type=int, default=1_000_000)
    index.add_argument("--dim", type=int, default=512)
    index.add_argument("--classes", type=int, default=20_000)
    index.add_argument("--queries", type=int, default=1000)
    index.add_argument("--shard-size", type=int, default=1_000_000)
    index.add_argument("--nlist", type=int, help="IVF lists (default: the builder's auto, ~4 sqrt(rows))")
    index.add_argument("--noise", type=float, default=0.5,
                       help="cluster spread: noise norm relative to the unit class centre (default: 0.5)")
    index.add_argument("--exact-max-rows", type=int, default=20_000,
                       help="class size above which the second class-search run uses the IVF index")
    index.add_argument("--class-nprobe", type=int, default=16, help="IVF lists for large classes")
    index.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    index.add_argument("--seed", type=int, default=0)
    index.add_argument("--scratch", help="folder for the temporary gallery and index (default: system temp)")
    index.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    srv = sub.add_parser("serve", help="the Ray Serve graph under a bounded loopback load")
    srv.add_argument("--index", required=True, help="index folder (e.g. out/demo-index from make demo)")
    srv.add_argument("--images", required=True, help="folder of query images (e.g. out/demo-data)")
    srv.add_argument("--payloads", type=int, default=20, help="distinct query images to cycle through")
    srv.add_argument("--requests", type=int, default=200, help="most requests per measurement")
    srv.add_argument("--seconds", type=float, default=60, help="most seconds per measurement")
    srv.add_argument("--soak", type=float, default=120, help="seconds of the soak with a replica killed")
    srv.add_argument("--cooldown", type=float, default=30, help="idle seconds before counting replicas again")
    srv.add_argument("--max-batch-size", type=int, default=16)
    srv.add_argument("--decode", nargs="+", default=["cpu"], choices=["cpu", "device"],
                     help="also measure the graph with uploads decoded on the model device (--decode cpu device)")
    srv.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.area == "serve":
        results = bench_serve(args)
        print_serve(results)
    elif args.area == "batch":
        if args.limit < 1 or args.batch_size < 1:
            parser.error("--limit and --batch-size must be >= 1")
        if min([*args.sweep_batch_sizes, *args.sweep_actors, args.rounds]) < 1:
            parser.error("sweep values must be >= 1")
        results = bench_batch(args)
        print_batch(results)
        if args.plot:
            plot_batch(results, args.plot)
            print(f"plot: {args.plot}")
    else:
        if min(args.rows, args.dim, args.classes, args.queries) < 1:
            parser.error("--rows, --dim, --classes and --queries must be >= 1")
        results = bench_index(args)
        print_index(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
