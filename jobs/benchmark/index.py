"""``index``: builds an index from synthetic embeddings (Zipf-like class sizes) with the real builder
and measures: build time and peak memory, class-restricted search latency per query (p50/p99),
exact global search QPS, and approximate (IVF) global search QPS and recall@10 against exact.
``--json FILE`` writes the figures. faiss (an optional dependency the other areas do without) and
pipeline.index and pipeline.batch are imported only when it runs (neither imports torch).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from jobs.benchmark.runner import batch_slices, latency_ms, machine
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.manifests import EmbeddingManifest, ModelSet


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
    for part in batch_slices(rows, 100_000):
        n = part.stop - part.start
        cls = rng.choice(classes, n, p=weights)
        vectors = centres[cls] + rng.normal(scale=noise / np.sqrt(dim), size=(n, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = np.arange(part.start, part.stop, dtype=np.int64)
        batch = {"id": ids, "uri": np.array([f"synthetic/{i}" for i in ids], dtype=object),
                 "label": np.array([str(c) for c in cls], dtype=object),
                 "classes": cls[:, None].astype(np.int32), "class_probs": np.ones((n, 1), np.float32),
                 "embedding": vectors, "read_s": np.zeros(n), "decode_s": np.zeros(n), "model_s": np.zeros(n)}
        parts.append({"path": f"embeddings/{writer(batch)['part'][0]}", "rows": n})
    models = ModelSet(classifier={"spec": "synthetic", "preprocess": {}},
                      embedder={"spec": "synthetic", "dim": dim, "preprocess": {}})
    EmbeddingManifest(models=models, inputs=["synthetic"], top_n=1, embedding_dtype="float32",
                      max_pixels=DEFAULT_MAX_PIXELS, counts={"embedded": rows}, parts=parts).write(out)
    return {"centres": centres, "weights": weights}


def _build_in_child(emb: str, index_dir: str, config_kwargs: dict) -> None:
    from pipeline.index import IndexConfig, build_index

    build_index(emb, index_dir, IndexConfig(**config_kwargs))


def bench_index(args: argparse.Namespace) -> dict:
    import faiss

    from pipeline.index import ShardedIndex

    results: dict = {"rows": args.rows, "dim": args.dim, "classes": args.classes, "queries": args.queries,
                     "noise": args.noise, "machine": machine()}
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
        results["shards"] = len(index.manifest.shards)
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
            results["class_search"].append({
                "exact_max_rows": exact_max, **latency_ms(latencies, (50, 99), digits=3),
                "max_ms": round(float(np.max(latencies) * 1000), 3),
                "recall_at_10_vs_exact": round(float(np.mean([len(f & e) / max(len(e), 1)
                                                              for f, e in zip(found, exact_ids)])), 4)})
        sizes = np.array([index.class_size(c) for c in q_cls])
        results["queried_class_rows"] = {"median": int(np.median(sizes)), "max": int(sizes.max())}

        # Exact global search: one flat index over every vector (the reference), batched queries.
        vectors = np.concatenate([np.asarray(np.load(index_dir / s["path"] / "vectors.npy", mmap_mode="r"))
                                  for s in index.manifest.shards])
        ids = np.concatenate([pq.read_table(index_dir / s["path"] / "rows.parquet", columns=["id"])["id"].to_numpy()
                              for s in index.manifest.shards])
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


def check_index(args: argparse.Namespace) -> str | None:
    if min(args.rows, args.dim, args.classes, args.queries) < 1:
        return "--rows, --dim, --classes and --queries must be >= 1"
    return None


def add_arguments(subparsers) -> argparse.ArgumentParser:
    """Registers ``index`` with the runner's subcommands."""
    index = subparsers.add_parser("index", help="index build, class-restricted latency, global QPS and recall")
    index.set_defaults(check=check_index, bench=bench_index, report=lambda results, _args: print_index(results))
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
    return index
