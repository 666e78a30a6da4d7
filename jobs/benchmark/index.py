"""``index``: builds an index from synthetic embeddings (1/rank class sizes) with the real builder
and measures, all in one run: build time, peak memory and bytes per million vectors; class-restricted
latency (p50/p99) and recall@10 for each head-class threshold and HNSW breadth, against the exact
class scan; global search QPS and recall@10 against exact search; the float16 vectors' recall
against float32; and, with ``--compare-autofaiss``, autofaiss's index built on the same vectors.
``--deleted FRACTION`` deletes that share of the rows (random, seeded) after the build, as a
takedown does (``delete_from_index``: tombstones, skipped inside every FAISS search), and measures
everything against the truth over the live rows only, counting any deleted row returned (must be
0). The issue's two targets are printed as ratios of the same run: class-restricted p99 through
head indexes against the exact class scan's, and global QPS against exact search's, both at
recall@10 >= ``--target-recall``. The CPU model, FAISS's threads and SIMD level and the thread
environment variables are printed with the figures (graph walks are memory-latency bound, exact
search BLAS bound: figures from different CPUs differ in their ratios too).
``--json FILE`` writes the figures. Nothing here imports torch itself (the build runs in a child
process whose memory is measured), but ``pipeline.index`` may (its builder reads embedding outputs
through ``pipeline.embed_output``, which imports the model catalog): the run prints whether torch
was imported. autofaiss, optional, is imported only for ``--compare-autofaiss``.

The synthetic gallery follows what real embeddings measure (this project's EfficientNet-Lite0
features of MNIST, Fashion-MNIST and the demo images, docs/PERFORMANCE.md "Index at scale"):

- class centres are related, not random: they share a common direction (embeddings fill a narrow
  cone: two images have cosine 0.5-0.75 on average there, two class centres 0.6-0.98)
  and each belongs to one of ``classes / 100`` groups of related classes. Centre = common * 0.63 +
  group * 0.55 + own * 0.55 (unit vectors): centres cosine 0.4 across groups, 0.7 within one.
  ``--random-centres`` draws them independently instead (cosine ~0 in 512 dimensions: thousands
  of isolated clusters, which no real embedding produces and on which graph indexes lose their way);
- members are the centre plus noise of norm ``--noise`` whose variance falls off as
  1/j^``--spectrum-decay`` over the dimensions in a random orientation per class (measured: j^-1.2
  to j^-1.4; pretrained: 90 % of the variance in 69-88 of 1,280 dimensions). ``--isotropic`` spreads it evenly
  over all dimensions: a class is then a ball of random points, the worst case for any approximate
  search.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from jobs.benchmark.runner import batch_slices, latency_ms, machine, thread_settings
from pipeline.batch import WriteParts
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.index import IndexConfig, SearchParams, ShardedIndex, build_index, delete_from_index
from pipeline.index.faiss_index import HEAD_MIN_ROWS
from pipeline.manifests import EmbeddingManifest, ModelSet

#: Random orientations shared out among the classes (a basis per class would take 1 MB each).
ORIENTATIONS = 16
#: Weights of a class centre's common, group and own directions (squares sum to 1).
COMMON, GROUP, OWN = 0.4**0.5, 0.3**0.5, 0.3**0.5


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _synthetic_gallery(out: Path, rows: int, dim: int, classes: int, seed: int, noise: float,
                       decay: float | None, related: bool = True) -> dict:
    """Writes an embedding-job output of clustered unit vectors; class sizes follow 1/rank.

    Returns the generator's state and every vector (float32, in id order) with its class, to
    measure against and to make queries from.
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, classes + 1)
    weights /= weights.sum()
    centres = _unit(rng.normal(size=(classes, dim)))
    if related:
        common, groups = _unit(rng.normal(size=dim)), _unit(rng.normal(size=(max(1, classes // 100), dim)))
        centres = _unit(COMMON * common + GROUP * groups[rng.integers(0, len(groups), classes)] + OWN * centres)
    # Per-dimension noise variance (summing to noise^2), turned by one of a few random rotations.
    spectrum = np.ones(dim) if decay is None else np.arange(1, dim + 1.0) ** -decay
    spectrum *= noise**2 / spectrum.sum()
    mixers = [(np.sqrt(spectrum)[:, None] * np.linalg.qr(rng.normal(size=(dim, dim)))[0].T).astype(np.float32)
              for _ in range(ORIENTATIONS)]

    def sample(cls: np.ndarray) -> np.ndarray:
        vectors = centres[cls].copy()
        z = rng.normal(size=(len(cls), dim)).astype(np.float32)
        for o, mixer in enumerate(mixers):
            pick = cls % ORIENTATIONS == o
            vectors[pick] += z[pick] @ mixer
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    writer = WriteParts(out / "embeddings", dim)
    parts, all_vectors, all_classes = [], np.empty((rows, dim), np.float32), np.empty(rows, np.int64)
    for part in batch_slices(rows, 100_000):
        n = part.stop - part.start
        cls = rng.choice(classes, n, p=weights)
        vectors = sample(cls)
        all_vectors[part], all_classes[part] = vectors, cls
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
    return {"weights": weights, "sample": sample, "vectors": all_vectors, "classes": all_classes}


def _in_child(target, *args) -> tuple[float, float]:
    """Runs ``target(*args)`` in a fresh process: (seconds, its peak RSS in GB), measured alone."""
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    start = time.perf_counter()
    child = context.Process(target=_measured, args=(queue, target, *args))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"{target.__name__} failed (exit {child.exitcode})")
    return time.perf_counter() - start, round(queue.get() / 2**20, 2)


def _measured(queue, target, *args) -> None:
    target(*args)
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def _build(emb: str, index_dir: str, config_kwargs: dict, dtype: str) -> None:
    build_index(emb, index_dir, IndexConfig(**config_kwargs), dtype)


def _build_autofaiss(vectors_dir: str, index_path: str, infos_path: str, memory: str, index_memory: str) -> None:
    import autofaiss  # lazy: optional (make install-autofaiss), only --compare-autofaiss needs it

    # Saved here, not by autofaiss: its own infos file fails on numpy 2 (a float32 in the JSON).
    index, infos = autofaiss.build_index(embeddings=vectors_dir, save_on_disk=False, metric_type="ip",
                               current_memory_available=memory, max_index_memory_usage=index_memory, verbose=40)
    if index is None:
        raise RuntimeError("autofaiss built no index (its log above says why)")
    faiss.write_index(index, index_path)
    Path(infos_path).write_text(json.dumps(infos, default=str))


def _recall(found: list[set], truth: list[set]) -> float:
    # a class whose rows were all deleted has an empty truth: finding nothing there is right
    return round(float(np.mean([len(f & t) / len(t) if t else float(not f) for f, t in zip(found, truth)])), 4)


def _dead_found(found: list[set], dead: np.ndarray | None) -> int:
    """How many of the returned ids are deleted rows (``dead``: a mask over ids; None: none deleted)."""
    return 0 if dead is None else sum(int(dead[list(f)].sum()) for f in found if f)


def faiss_settings() -> dict:
    """FAISS's version, OpenMP threads and the SIMD level its kernels dispatch to (AVX2 on an AMD
    EPYC before Zen 4, AVX-512 on recent Xeons: the SQ8 and float16 distance code differs), and the
    BLAS libraries exact search runs on (threadpoolctl, when installed)."""
    simd = getattr(faiss, "SIMDConfig", None)
    settings = {"faiss_version": faiss.__version__, "faiss_omp_threads": faiss.omp_get_max_threads(),
                "faiss_simd_level": simd.get_level_name() if simd is not None else None,
                "faiss_compile_options": faiss.get_compile_options().strip(), "blas": None}
    if importlib.util.find_spec("threadpoolctl") is not None:
        from threadpoolctl import threadpool_info  # lazy: optional

        settings["blas"] = [{k: lib.get(k) for k in ("internal_api", "version", "num_threads", "architecture",
                                                      "threading_layer", "prefix")}
                            for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return settings


def _disk_bytes(index_dir: Path) -> dict:
    """Bytes on disk of the index's files by kind (vectors, rows, global index, head indexes)."""
    sizes = {"vectors": 0, "rows": 0, "global_index": 0, "head_indexes": 0}
    for path in (index_dir / "shards").rglob("*"):
        if path.is_file():
            kind = {"vectors.npy": "vectors", "rows.parquet": "rows", "index.faiss": "global_index"}.get(path.name,
                                                                                                          "head_indexes")
            sizes[kind] += path.stat().st_size
    return sizes


def _float32_twin(index, vectors: dict[int, np.ndarray]):
    """The same loaded index with float32 vectors (the generated ones, per shard) in place of
    float16: the graphs and codes are built from float32 either way, so this isolates what float16
    storage costs in exact scans and re-scoring."""
    twin = copy.copy(index)
    twin._shards = {n: copy.copy(s) for n, s in index._shards.items()}
    for number, shard in twin._shards.items():
        shard.vectors = vectors[number]
    return twin


def _class_search(index, exact_index, queries, q_cls, thresholds, efs, truth_ids, dead=None) -> dict:
    """Per query: the exact scan's latency, and for queries of head classes the head index's at
    each breadth; then p50/p99 and recall for every (threshold, breadth) from those measurements,
    with p99 over the head-class queries alone and the p99 as a share of the exact scan's.
    ``dead``: a mask over ids of the deleted rows, counted when any comes back."""
    # One untimed pass through each path first: the memory-mapped files' pages are read from
    # disk on first touch, which a replica that has been serving has long done.
    for query, cls in zip(queries, q_cls):
        exact_index.search_class(query[None], [[cls]], k=10)
        index.search_class(query[None], [[cls]], k=10)
    exact_s, exact_ids = [], []
    for query, cls in zip(queries, q_cls):
        t0 = time.perf_counter()
        hits = exact_index.search_class(query[None], [[cls]], k=10)[0]
        exact_s.append(time.perf_counter() - t0)
        exact_ids.append({h.id for h in hits})
    sizes = np.array([index.manifest.class_size(c) for c in q_cls])
    head_s = {ef: {} for ef in efs}
    head_ids = {ef: {} for ef in efs}
    for ef in efs:
        params = SearchParams(head_ef_search=ef, refine=index.search_params.refine)
        for q in np.flatnonzero(sizes >= min(thresholds)):
            t0 = time.perf_counter()
            hits = index.search_class(queries[q][None], [[q_cls[q]]], k=10, search=params)[0]
            head_s[ef][q] = time.perf_counter() - t0
            head_ids[ef][q] = {h.id for h in hits}
    exact = latency_ms(exact_s, (50, 99), digits=3)
    rows = [{"threshold": None, "ef_search": None, **exact,
             "max_ms": round(max(exact_s) * 1000, 3), "recall_at_10": _recall(exact_ids, truth_ids),
             "recall_vs_exact_scan": 1.0, "queries_via_heads": 0, "heads_p99_ms": None, "p99_vs_exact_scan": 1.0}]
    for threshold in thresholds:
        for ef in efs:
            via = sizes >= threshold
            lat = [head_s[ef][q] if via[q] else exact_s[q] for q in range(len(queries))]
            ids = [head_ids[ef][q] if via[q] else exact_ids[q] for q in range(len(queries))]
            row = {"threshold": threshold, "ef_search": ef, **latency_ms(lat, (50, 99), digits=3),
                   "max_ms": round(max(lat) * 1000, 3), "recall_at_10": _recall(ids, truth_ids),
                   "recall_vs_exact_scan": _recall(ids, exact_ids), "queries_via_heads": int(via.sum()),
                   "heads_p99_ms": latency_ms([head_s[ef][q] for q in np.flatnonzero(via)], (99,), digits=3)["p99_ms"]
                   if via.any() else None}
            row["p99_vs_exact_scan"] = round(row["p99_ms"] / exact["p99_ms"], 4) if exact["p99_ms"] else None
            rows.append(row)
    deleted_returned = _dead_found(exact_ids, dead) + sum(_dead_found(list(h.values()), dead) for h in head_ids.values())
    return {"rows": rows, "exact_ids": exact_ids, "deleted_returned": deleted_returned,
            "queried_class_rows": {"median": int(np.median(sizes)), "p99": int(np.percentile(sizes, 99)),
                                   "max": int(sizes.max())}}


def _global_search(index, queries, efs, truth, dead=None, exact=None, repeats: int = 1) -> tuple[list[dict], dict]:
    """QPS and recall of one batch per breadth; each row counts the deleted rows returned (``dead``).

    The batches run ``repeats`` rounds, each round the exact search (``exact``: a flat FAISS index,
    or None) and then every breadth, so a burst of other work on the machine hits all of them alike;
    each QPS is the median of its rounds (all rounds are kept in ``qps_runs``).

    Returns:
        The rows per breadth, and the exact search's ``{"qps", "qps_runs"}`` (empty without ``exact``).
    """
    index.search_global(queries, k=10, search=SearchParams(ef_search=max(efs)))  # untimed: page the files in
    runs: dict = {ef: [] for ef in efs}
    exact_runs: list[float] = []
    found: dict = {}
    for _ in range(max(1, repeats)):
        if exact is not None:
            start = time.perf_counter()
            exact.search(queries, 10)
            exact_runs.append(round(len(queries) / (time.perf_counter() - start), 1))
        for ef in efs:
            params = SearchParams(ef_search=ef, refine=index.search_params.refine)
            start = time.perf_counter()
            found[ef] = index.search_global(queries, k=10, search=params)
            runs[ef].append(round(len(queries) / (time.perf_counter() - start), 1))
    rows = []
    for ef in efs:
        ids = [{h.id for h in hits} for hits in found[ef]]
        rows.append({"ef_search": ef, "qps": float(np.median(runs[ef])), "qps_runs": runs[ef],
                     "recall_at_10": _recall(ids, truth), "deleted_returned": _dead_found(ids, dead)})
    return rows, ({"qps": float(np.median(exact_runs)), "qps_runs": exact_runs} if exact_runs else {})


def _autofaiss(scratch: Path, vectors: np.ndarray, queries: np.ndarray, truth: list[set], match: float,
               memory: str, index_memory: str, ids: np.ndarray | None = None) -> dict:
    """autofaiss's index on the same vectors: built in a child process with its defaults and the
    memory budget ``index_memory``, then its search parameter swept to the setting that first
    reaches ``match`` recall@10. ``ids``: the id of each of ``vectors`` (default: its row number)."""
    folder = scratch / "autofaiss-input"
    folder.mkdir()
    np.save(folder / "vectors.npy", vectors)
    index_path, infos_path = scratch / "autofaiss.index", scratch / "autofaiss-infos.json"
    seconds, peak = _in_child(_build_autofaiss, str(folder), str(index_path), str(infos_path), memory, index_memory)
    infos = json.loads(infos_path.read_text())
    index = faiss.read_index(str(index_path))
    space = faiss.ParameterSpace()
    key = infos.get("index_key", "")
    name, values = ("efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]) if key.startswith("HNSW") else \
        ("nprobe", [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
    sweep = []
    for value in values:
        space.set_index_parameter(index, name, value)
        index.search(queries[:10], 10)
        start = time.perf_counter()
        _, found = index.search(queries, 10)
        if ids is not None:
            found = np.where(found >= 0, ids[np.maximum(found, 0)], -1)
        qps = len(queries) / (time.perf_counter() - start)
        recall = _recall([set(row[row >= 0].tolist()) for row in found], truth)
        sweep.append({name: value, "qps": round(qps, 1), "recall_at_10": recall})
        if recall >= match:
            break
    matched = next((row for row in sweep if row["recall_at_10"] >= match), None)
    return {"index_key": key, "index_param": infos.get("index_param"), "index_memory": index_memory, "build_s": round(seconds, 1),
            "build_peak_rss_gb": peak, "bytes_on_disk": index_path.stat().st_size, "sweep": sweep, "matched": matched}


def bench_index(args: argparse.Namespace) -> dict:
    decay = None if args.isotropic else args.spectrum_decay
    thresholds = sorted(args.head_thresholds)
    # Heads are built down to the smallest threshold; larger thresholds are read off the same run.
    config = {"shard_size": args.shard_size, "global_index": args.global_index, "head_min_rows": thresholds[0]}
    if args.hnsw_m is not None:
        config["hnsw_m"] = args.hnsw_m
    if args.ef_construction is not None:
        config["ef_construction"] = args.ef_construction
    built_with = IndexConfig(**config)
    results: dict = {"rows": args.rows, "dim": args.dim, "classes": args.classes, "queries": args.queries,
                     "noise": args.noise, "within_class": "isotropic" if decay is None else f"1/j^{decay}",
                     "centres": "random" if args.random_centres else "related",
                     "vector_dtype": args.vector_dtype, "machine": machine(),
                     "threads": {**thread_settings(), **faiss_settings()},
                     "faiss_threads": faiss.omp_get_max_threads(),
                     "hnsw_m": built_with.hnsw_m, "ef_construction": built_with.ef_construction,
                     "deleted_fraction": args.deleted}
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        emb, index_dir = Path(scratch) / "emb", Path(scratch) / "index"
        start = time.perf_counter()
        gallery = _synthetic_gallery(emb, args.rows, args.dim, args.classes, args.seed, args.noise, decay,
                                     related=not args.random_centres)
        results["generate_s"] = round(time.perf_counter() - start, 1)
        print(f"generated {args.rows:,} vectors in {results['generate_s']} s; building the index ...", flush=True)

        seconds, peak = _in_child(_build, str(emb), str(index_dir), config, args.vector_dtype)
        results["build_s"], results["build_peak_rss_gb"] = round(seconds, 1), peak
        vectors, classes = gallery["vectors"], gallery["classes"]

        dead = None  # a mask over ids (= the generated rows) of the deleted ones
        if args.deleted:
            doomed = np.random.default_rng(args.seed + 2).choice(args.rows, round(args.deleted * args.rows), replace=False)
            start = time.perf_counter()
            manifest = delete_from_index(index_dir, doomed)
            results["delete_s"] = round(time.perf_counter() - start, 2)
            dead = np.zeros(args.rows, dtype=bool)
            dead[doomed] = True
            tombstoned = sum((s.deleted or {}).get("rows", 0) for s in manifest.shards)
            # Past the compaction threshold a shard is rebuilt without its deleted rows instead: then
            # the search skips nothing, and the figures measure a compacted index.
            results["deletion"] = {"deleted_rows": int(len(doomed)), "tombstoned_rows": int(tombstoned),
                                   "compacted_rows": int(len(doomed) - tombstoned),
                                   "shards_with_tombstones": sum(bool(s.deleted) for s in manifest.shards),
                                   "version": manifest.version}
            print(f"deleted {len(doomed):,} rows ({args.deleted:.0%}) in {results['delete_s']} s: "
                  f"{tombstoned:,} as tombstones; measuring against the live rows", flush=True)
        index = ShardedIndex.load(index_dir, verify=False)
        exact_index = ShardedIndex.load(index_dir, verify=False, heads=False)
        disk = _disk_bytes(index_dir)
        per_million = 1e6 / args.rows
        results["bytes_per_million"] = {k: round(v * per_million) for k, v in disk.items()}
        results["shards"] = len(index.manifest.shards)
        heads = {int(c): index.manifest.class_size(int(c)) for s in index.manifest.shards for c in s.heads}
        results["head_classes"] = {str(t): {"classes": sum(n >= t for n in heads.values()),
                                            "rows": sum(n for n in heads.values() if n >= t)} for t in thresholds}
        print(f"built in {results['build_s']} s; measuring ...", flush=True)

        rng = np.random.default_rng(args.seed + 1)
        q_cls = rng.choice(args.classes, args.queries, p=gallery["weights"])
        queries = gallery["sample"](q_cls).astype(np.float32)

        # The truth: exact top-10 over the float32 vectors of the live rows, inside the class and over all.
        live = np.arange(args.rows) if dead is None else np.flatnonzero(~dead)
        live_classes = classes[live]
        truth_class = []
        for query, cls in zip(queries, q_cls):
            members = live[live_classes == cls]
            sims = vectors[members] @ query
            truth_class.append(set(members[np.argsort(-sims, kind="stable")[:10]].tolist()))
        live_vectors = vectors if dead is None else vectors[live]
        # Exact global search over the live rows alone (a compacted flat index: the fastest exact
        # search there is, so the approximate index's speed-up against it is not flattered).
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(live_vectors)
        _, exact_pos = flat.search(queries, 10)  # the truth; timed below, in rounds with the approximate search
        truth_global = [set(live[row[row >= 0]].tolist()) for row in exact_pos]
        results["truth_has_deleted"] = _dead_found(truth_class, dead) + _dead_found(truth_global, dead)

        cls_results = _class_search(index, exact_index, queries, q_cls, thresholds, args.ef_search, truth_class, dead)
        results["class_search"] = cls_results["rows"]
        results["queried_class_rows"] = cls_results["queried_class_rows"]
        returned = {"class_search": cls_results["deleted_returned"]}
        results["global_search"], exact = _global_search(index, queries, args.ef_search, truth_global, dead,
                                                         exact=flat, repeats=args.repeats)
        results["global_exact_qps"], results["global_exact_qps_runs"] = exact["qps"], exact["qps_runs"]
        del flat
        returned["global_search"] = sum(r["deleted_returned"] for r in results["global_search"])
        for row in results["global_search"]:
            row["speedup_vs_exact"] = round(row["qps"] / results["global_exact_qps"], 1)
        if args.vector_dtype == "float16":
            # ids are the generated vectors' row numbers
            by_shard = {n: vectors[shard.ids] for n, shard in index._shards.items()}
            twin, twin_exact = _float32_twin(index, by_shard), _float32_twin(exact_index, by_shard)
            twin_class = _class_search(twin, twin_exact, queries, q_cls, thresholds, args.ef_search, truth_class, dead)
            results["class_search_float32"] = twin_class["rows"]
            results["global_search_float32"], _ = _global_search(twin, queries, args.ef_search, truth_global, dead)
            returned["float32_twin"] = twin_class["deleted_returned"] + sum(
                r["deleted_returned"] for r in results["global_search_float32"])
        results["deleted_returned"] = {**returned, "total": sum(returned.values())}
        results["chosen"] = _choose(results, args)
        results["targets"] = _targets(results, args)
        if args.compare_autofaiss:
            match = results["chosen"]["global"]["recall_at_10"] if results["chosen"]["global"] else args.target_recall
            print("building autofaiss's index on the same vectors ...", flush=True)
            # The same memory budget as our index takes, unless given.
            budget = args.autofaiss_index_memory or f"{max(1, round(sum(disk.values()) / 2**20))}M"
            results["autofaiss"] = _autofaiss(Path(scratch), live_vectors, queries, truth_global, match,
                                              args.autofaiss_memory, budget, None if dead is None else live)
            ours = results["chosen"]["global"] or {}
            results["ours"] = {"build_s": results["build_s"], "build_peak_rss_gb": results["build_peak_rss_gb"],
                               "bytes_on_disk": sum(disk.values()), "recall_at_10": ours.get("recall_at_10"),
                               "qps": ours.get("qps")}
    return results


def _targets(results: dict, args: argparse.Namespace) -> dict:
    """The issue's two targets as ratios of this run, each at recall@10 >= ``--target-recall``:
    class-restricted p99 through head indexes / the exact class scan's p99 (target <= 1/10), at the
    best (threshold, breadth) measured and at the index's defaults; global QPS / exact QPS (target
    >= 10x), at the smallest breadth reaching the recall and at the default breadth."""
    defaults = SearchParams()
    exact_p99 = results["class_search"][0]["p99_ms"]
    heads = [r for r in results["class_search"][1:] if r["recall_at_10"] >= args.target_recall]
    best_class = min(heads, key=lambda r: (r["p99_ms"], -r["threshold"], r["ef_search"]), default=None)
    default_class = next((r for r in results["class_search"][1:] if r["threshold"] == HEAD_MIN_ROWS
                          and r["ef_search"] == defaults.head_ef_search), None)
    best_global = next((r for r in results["global_search"] if r["recall_at_10"] >= args.target_recall), None)
    default_global = next((r for r in results["global_search"] if r["ef_search"] == defaults.ef_search), None)

    def cls(row):
        return None if row is None else {
            "threshold": row["threshold"], "ef_search": row["ef_search"], "p99_ms": row["p99_ms"],
            "exact_scan_p99_ms": exact_p99, "ratio": row["p99_vs_exact_scan"], "recall_at_10": row["recall_at_10"],
            "met": row["recall_at_10"] >= args.target_recall and row["p99_vs_exact_scan"] <= args.target_class_ratio}

    def glob(row):
        return None if row is None else {
            "ef_search": row["ef_search"], "qps": row["qps"], "exact_qps": results["global_exact_qps"],
            "ratio": row["speedup_vs_exact"], "recall_at_10": row["recall_at_10"],
            "met": row["recall_at_10"] >= args.target_recall and row["speedup_vs_exact"] >= args.target_speedup}

    return {"recall": args.target_recall, "class_p99_ratio_at_most": args.target_class_ratio,
            "global_speedup_at_least": args.target_speedup,
            "class": cls(best_class), "class_at_defaults": cls(default_class),
            "global": glob(best_global), "global_at_default": glob(default_global)}


def _choose(results: dict, args: argparse.Namespace) -> dict:
    """Class search: the largest head threshold meeting both targets (fewest head indexes to build
    and hold), and at it the largest breadth (best recall) within the p99 target. Global: the
    smallest breadth (fastest) meeting the recall target."""
    ok = [row for row in results["class_search"] if row["threshold"] is not None
          and row["p99_ms"] <= args.target_p99_ms and row["recall_vs_exact_scan"] >= args.target_recall]
    best_class = max(ok, key=lambda r: (r["threshold"], r["ef_search"]), default=None)
    best_global = next((r for r in results["global_search"] if r["recall_at_10"] >= args.target_recall), None)
    return {"class": best_class, "global": best_global}


def _ratio(f16: list[dict], f32: list[dict], key: str = "recall_at_10") -> list[float]:
    return [round(a[key] / b[key], 4) if b[key] else float("nan") for a, b in zip(f16, f32)]


def print_index(results: dict, args: argparse.Namespace | None = None) -> None:
    print(f"\nindex benchmark: {results['rows']:,} vectors, dim {results['dim']}, {results['classes']:,} classes "
          f"(1/rank sizes, {results['centres']} centres; within-class noise {results['noise']}, spectrum "
          f"{results['within_class']}), "
          f"{results['shards']} shard(s), {results['queries']} queries, vectors {results['vector_dtype']} "
          f"({results['machine']}, FAISS threads {results['faiss_threads']})")
    t = results["threads"]
    env = ", ".join(f"{k}={v}" for k, v in t["env"].items() if v is not None) or "none set"
    blas = "; ".join(f"{b['internal_api']} {b['version']} {b['architecture']} {b['num_threads']} threads "
                     f"({b['prefix']})" for b in t["blas"] or []) or "unknown (no threadpoolctl)"
    print(f"CPU: {t['cpu_model']}, {t['cpus']} CPUs ({t['usable_cpus']} usable); FAISS {t['faiss_version']}: "
          f"{t['faiss_omp_threads']} OpenMP threads, SIMD {t['faiss_simd_level']}; BLAS: {blas}; "
          f"thread variables: {env}; torch {'imported' if t['torch_imported'] else 'not imported'}")
    print(f"build: {results['build_s']} s, peak RSS {results['build_peak_rss_gb']} GB, HNSW M {results['hnsw_m']}, "
          f"efConstruction {results['ef_construction']} "
          f"(synthetic data generated in {results['generate_s']} s, not counted)")
    if results.get("deletion"):
        d, r = results["deletion"], results["deleted_returned"]
        print(f"deleted: {d['deleted_rows']:,} rows ({results['deleted_fraction']:.0%}, version {d['version']}, "
              f"{results['delete_s']} s): {d['tombstoned_rows']:,} tombstoned in {d['shards_with_tombstones']} "
              f"shard(s), {d['compacted_rows']:,} compacted away; truth over the live rows only "
              f"(deleted ids in it: {results['truth_has_deleted']}); deleted ids returned by any search: "
              f"{r['total']} ({', '.join(f'{k} {v}' for k, v in r.items() if k != 'total')})")
    per = results["bytes_per_million"]
    print("bytes per million vectors: " + ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in per.items())
          + f"; total {sum(per.values()) / 2**30:.2f} GiB")
    heads = ", ".join(f">= {t}: {h['classes']} classes, {h['rows']:,} rows" for t, h in results["head_classes"].items())
    print(f"head classes by threshold: {heads}")
    sizes = results["queried_class_rows"]
    print(f"class-restricted search, top-10, one query at a time (queried class sizes: median "
          f"{sizes['median']}, p99 {sizes['p99']}, max {sizes['max']} rows):")
    print(f"  {'heads from':>11}{'head ef':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'recall@10':>11}"
          f"{'vs exact scan':>15}{'via heads':>11}{'heads p99':>11}{'p99/exact':>11}")
    f32 = results.get("class_search_float32")
    for i, row in enumerate(results["class_search"]):
        label = "exact scan" if row["threshold"] is None else f"{row['threshold']:,}"
        ef = "" if row["ef_search"] is None else row["ef_search"]
        extra = f"  (float32: {f32[i]['recall_at_10']:.4f}, {f32[i]['p99_ms']:.3f} ms p99)" if f32 else ""
        heads_p99 = "" if row.get("heads_p99_ms") is None else f"{row['heads_p99_ms']:.3f}"
        share = "" if row.get("p99_vs_exact_scan") is None else f"{row['p99_vs_exact_scan']:.3f}"
        print(f"  {label:>11}{ef:>8}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{row['max_ms']:>9.3f}"
              f"{row['recall_at_10']:>11.4f}{row['recall_vs_exact_scan']:>15.4f}{row['queries_via_heads']:>11}"
              f"{heads_p99:>11}{share:>11}{extra}")
    runs = results.get("global_exact_qps_runs", [])
    print(f"global exact (flat float32 over the live rows, batched): {results['global_exact_qps']} QPS"
          f" (median of {len(runs)} rounds, each the exact batch and then every breadth: {', '.join(map(str, runs))})")
    print(f"  {'ef_search':<10}{'QPS':>10}{'recall@10':>11}{'x exact':>9}  QPS of each round")
    f32 = results.get("global_search_float32")
    for i, row in enumerate(results["global_search"]):
        extra = f"  (float32 vectors: recall {f32[i]['recall_at_10']:.4f})" if f32 else ""
        print(f"  {row['ef_search']:<10}{row['qps']:>10.1f}{row['recall_at_10']:>11.4f}{row['speedup_vs_exact']:>9.1f}"
              f"  {', '.join(map(str, row.get('qps_runs', [])))}{extra}")
    if f32:
        print(f"float16 recall@10 / float32 recall@10: class search {min(_ratio(results['class_search'], results['class_search_float32']))} "
              f"at worst, global {min(_ratio(results['global_search'], f32))} at worst")
    chosen = results["chosen"]
    c, g = chosen["class"], chosen["global"]
    print("chosen: " + (f"head classes from {c['threshold']:,} rows at head_ef_search {c['ef_search']} (p99 {c['p99_ms']} ms, "
                        f"recall {c['recall_vs_exact_scan']} vs the exact scan)" if c else "no class setting meets the targets")
          + "; " + (f"global ef_search {g['ef_search']} ({g['speedup_vs_exact']}x exact QPS at recall {g['recall_at_10']})"
                    if g else "no global setting meets the recall target"))
    _print_targets(results["targets"])
    if "autofaiss" in results:
        a, ours = results["autofaiss"], results["ours"]
        m = a["matched"]
        print(f"side by side with autofaiss ({a['index_key']}, its own setting {a['index_param']}, memory budget "
              f"{a['index_memory']}), global top-10 at matched recall:")
        print(f"  {'':<12}{'build s':>9}{'peak RSS GB':>13}{'disk MiB':>10}{'recall@10':>11}{'QPS':>9}")
        print(f"  {'lookalike':<12}{ours['build_s']:>9}{ours['build_peak_rss_gb']:>13}{ours['bytes_on_disk'] / 2**20:>10,.0f}"
              f"{ours['recall_at_10'] or float('nan'):>11.4f}{ours['qps'] or float('nan'):>9.1f}")
        recall, qps = (m["recall_at_10"], m["qps"]) if m else (a["sweep"][-1]["recall_at_10"], float("nan"))
        print(f"  {'autofaiss':<12}{a['build_s']:>9}{a['build_peak_rss_gb']:>13}{a['bytes_on_disk'] / 2**20:>10,.0f}"
              f"{recall:>11.4f}{qps:>9.1f}" + ("" if m else "  (never reached our recall in its sweep)"))
        print("  autofaiss sweep: " + ", ".join(" ".join(f"{k} {v}" for k, v in row.items()) for row in a["sweep"]))


def _print_targets(t: dict) -> None:
    """The two targets side by side, ratios of this one run."""
    print(f"targets (ratios of this run, at recall@10 >= {t['recall']}): class p99 via heads <= "
          f"{t['class_p99_ratio_at_most']:g} x the exact class scan's; global QPS >= {t['global_speedup_at_least']:g} x exact")

    def cls(label, c):
        if c is None:
            return f"  class  {label}: no head setting reaches the recall"
        return (f"  class  {label}: heads from {c['threshold']:,}, head ef {c['ef_search']}: p99 {c['p99_ms']} ms / "
                f"exact scan {c['exact_scan_p99_ms']} ms = {c['ratio']:.3f} (recall {c['recall_at_10']:.4f}) "
                f"-> {'met' if c['met'] else 'NOT met'}")

    def glob(label, g):
        if g is None:
            return f"  global {label}: no breadth measured reaches the recall"
        return (f"  global {label}: ef_search {g['ef_search']}: {g['qps']} QPS / exact {g['exact_qps']} QPS = "
                f"{g['ratio']}x (recall {g['recall_at_10']:.4f}) -> {'met' if g['met'] else 'NOT met'}")

    print(cls("best measured", t["class"]))
    if t["class_at_defaults"] is not None:
        print(cls("at the defaults", t["class_at_defaults"]))
    print(glob("best measured", t["global"]))
    if t["global_at_default"] is not None:
        print(glob("at the default", t["global_at_default"]))


def check_index(args: argparse.Namespace) -> str | None:
    if min(args.rows, args.dim, args.classes, args.queries) < 1:
        return "--rows, --dim, --classes and --queries must be >= 1"
    if min(args.head_thresholds) < 1 or min(args.ef_search) < 1:
        return "--head-thresholds and --ef-search must be >= 1"
    if not 0 <= args.deleted < 1:
        return "--deleted must be a fraction in [0, 1)"
    if args.repeats < 1:
        return "--repeats must be >= 1"
    if (args.hnsw_m is not None and args.hnsw_m < 2) or (args.ef_construction is not None and args.ef_construction < 1):
        return "--hnsw-m must be >= 2 and --ef-construction >= 1"
    if args.compare_autofaiss and importlib.util.find_spec("autofaiss") is None:
        return "--compare-autofaiss needs autofaiss: make install-autofaiss"
    return None


def add_arguments(index: argparse.ArgumentParser) -> None:
    """Adds ``index``'s arguments and functions to its subcommand parser (``jobs.benchmark.cli``)."""
    index.set_defaults(check=check_index, bench=bench_index, report=print_index)
    index.add_argument("--rows", type=int, default=1_000_000)
    index.add_argument("--dim", type=int, default=512)
    index.add_argument("--classes", type=int, default=20_000)
    index.add_argument("--queries", type=int, default=1000)
    index.add_argument("--shard-size", type=int, default=1_000_000)
    index.add_argument("--global-index", default="hnsw-sq8", help="the builder's --global-index (default: hnsw-sq8)")
    index.add_argument("--vector-dtype", default="float16", choices=["float32", "float16"],
                       help="storage of vectors.npy; float16 also measures the same index with float32 vectors")
    index.add_argument("--noise", type=float, default=0.5,
                       help="within-class spread: noise norm relative to the unit class centre (default: 0.5)")
    index.add_argument("--spectrum-decay", type=float, default=1.2,
                       help="within-class variance of dimension j falls as 1/j^DECAY (default: 1.2, as measured)")
    index.add_argument("--isotropic", action="store_true", help="within-class noise spread evenly (worst case)")
    index.add_argument("--random-centres", action="store_true",
                       help="independent class centres (isolated clusters) instead of related ones")
    index.add_argument("--head-thresholds", type=int, nargs="+", default=[2000, 5000, 10_000, 20_000],
                       help="class sizes from which classes get their own index, compared in one run")
    index.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128, 256, 512],
                       help="HNSW search breadths compared (head classes and global)")
    index.add_argument("--hnsw-m", type=int, help="HNSW graph degree (IndexConfig.hnsw_m; default: the builder's)")
    index.add_argument("--ef-construction", type=int,
                       help="HNSW build breadth (IndexConfig.ef_construction; default: the builder's)")
    index.add_argument("--deleted", type=float, default=0.0, metavar="FRACTION",
                       help="delete this fraction of the rows after the build (random, seeded; tombstones "
                            "below the compaction threshold) and measure against the live rows (default: 0)")
    index.add_argument("--target-p99-ms", type=float, default=1.0)
    index.add_argument("--target-recall", type=float, default=0.95)
    index.add_argument("--target-class-ratio", type=float, default=0.1,
                       help="class target: p99 via heads at most this share of the exact class scan's (default: 0.1)")
    index.add_argument("--target-speedup", type=float, default=10.0,
                       help="global target: QPS at least this multiple of exact search's (default: 10)")
    index.add_argument("--compare-autofaiss", action="store_true",
                       help="also build autofaiss's index on the same vectors (make install-autofaiss)")
    index.add_argument("--autofaiss-memory", default="16G", help="autofaiss's current_memory_available (default: 16G)")
    index.add_argument("--autofaiss-index-memory",
                       help="autofaiss's max_index_memory_usage (default: the bytes of our index, e.g. 1500M)")
    index.add_argument("--repeats", type=int, default=3,
                       help="rounds of the global batches (exact, then every breadth); QPS is each one's median "
                            "(default: 3)")
    index.add_argument("--seed", type=int, default=0)
    index.add_argument("--scratch", help="folder for the temporary gallery and index (default: system temp)")
