"""``publish``: how long a newly published index version takes to reach a serving replica, and
what the swap costs a replica in memory.

One run takes an existing index (``--index PATH``: copied to a scratch folder first, the original
is never touched) or builds synthetic ones (``--rows``, ``--dim``, ``--classes``: the ``index``
area's gallery generator, one index per ``--shard-size`` compared, each build timed in a child
process), starts a follower as a retriever replica does (:class:`pipeline.index.follow.FollowedIndex`
over all shards, verifying every file; in a child process, so the memory measured is the
follower's alone), and publishes three changes in turn:

a. **delete** ``--delete-fraction`` of the live rows (a takedown: tombstones, no shard rebuilt);
b. **append** ``--append-rows`` new rows into ``--append-classes`` existing classes (picked as the
   classes of random rows, so by size): the shards holding those classes are rebuilt whole;
c. **new class**: ``--new-class-rows`` rows of a class the index does not hold (a new shard).

For each change: the publish's wall time (``delete_from_index`` / ``append_index``, i.e.
``update_index``, run in a child process whose peak RSS is measured too), the follower's load of
the new version (``refresh()``: changed shards loaded beside the held ones, unchanged ones reused),
their sum (publish -> loaded; a service adds up to ``index_poll_s`` for its poll to notice), and
the follower's RSS (``/proc/self/status``: VmRSS, its anonymous and file-backed parts) before the
load, right after it (two versions held), at its peak during it (VmHWM, reset through
``/proc/self/clear_refs``, and a 5 ms sampler), and after a round of queries on the new version;
the bytes of the files it loaded (vectors, rows, FAISS files of the shards not reused) and of the
index files it has memory-mapped (``/proc/self/maps``: vectors and FAISS codes are mapped, so RSS
counts only the pages touched). The checks a served version must pass are counted: deleted ids
returned by global or class search with the deleted rows' own vectors (must be 0), added rows
found by a search with themselves. ``--json FILE`` writes the figures. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import multiprocessing as mp
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from jobs.benchmark.index import _build, _in_child, _synthetic_gallery, faiss_settings
from jobs.benchmark.runner import machine, thread_settings
from pipeline.batch import WriteParts
from pipeline.index import append_index, delete_from_index
from pipeline.index.faiss_index import GLOBAL_INDEX_TYPES, HEAD_MIN_ROWS
from pipeline.index.keying import UNLABELLED
from pipeline.index.versions import read_tombstones, read_version
from pipeline.manifests import EmbeddingManifest, IndexManifest
from pipeline.storage import Location

#: The three changes published in turn, with what the table calls them.
STEPS = {"delete": "delete (tombstones)", "append": "append, known classes", "new_class": "append, new class"}
MB = 2**20


# -- the follower (a child process: a retriever replica's view of the index) ---------------------

def _status() -> dict:
    """This process's memory (MiB) from ``/proc/self/status``: VmRSS, its anonymous and file-backed
    parts, and the peak (VmHWM) since the last reset."""
    names = {"VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb", "VmHWM": "hwm_mb"}
    found = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in names:
                    found[names[key]] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        import resource  # elsewhere: the peak only

        found["hwm_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return found


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux: ``5`` into ``/proc/self/clear_refs``); False when
    this kernel or container does not allow it (then the sampler's peak stands alone)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _mapped_bytes(root: str) -> int:
    """Bytes of address space mapped from files under ``root`` (``/proc/self/maps``)."""
    total = 0
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip().startswith(root):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    total += end - start
    except OSError:
        return 0
    return total


def _memory(root: str) -> dict:
    return {**_status(), "index_files_mapped_mb": round(_mapped_bytes(root) / MB, 1)}


class _Sampler(threading.Thread):
    """The highest VmRSS seen every ``interval_s`` while running (a second measure of the peak)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak_mb = max(self.peak_mb, _status().get("rss_mb", 0.0))
            self._done.wait(self.interval_s)

    def stop(self) -> float:
        self._done.set()
        self.join()
        return max(self.peak_mb, _status().get("rss_mb", 0.0))


def _shard_file_bytes(manifest: IndexManifest, numbers) -> int:
    """Bytes of the files of these shards in ``manifest`` (their tombstones included)."""
    entries = [manifest.shards[n] for n in numbers]
    return sum(f["bytes"] for e in entries for f in e.files.values()) + sum(e.deleted["bytes"] for e in entries
                                                                              if e.deleted)


def _measured_load(root: str, load) -> tuple[object, dict]:
    """Runs ``load()`` with the peak reset and sampled; returns its result and the figures."""
    before = _memory(root)
    reset = _reset_peak()
    sampler = _Sampler()
    sampler.start()
    start = time.perf_counter()
    result = load()
    seconds = time.perf_counter() - start
    sampled = sampler.stop()
    after = _memory(root)
    peak = max(sampled, after["hwm_mb"]) if reset else sampled
    return result, {"load_s": round(seconds, 3), "memory_before": before, "memory_after": after,
                    "peak_rss_mb": round(peak, 1), "peak_from": "VmHWM and sampler" if reset else "sampler (5 ms)"}


def _check(index, deleted: dict, added: dict) -> dict:
    """What a served version must satisfy: searched with the deleted rows' own vectors (globally and
    in their class), no deleted id comes back; searched with an added row, the row is found (among
    the top 10, globally and in its class)."""
    out = {"version": index.version, "rows": len(index), "deleted_checked": 0, "deleted_returned": 0,
           "added_checked": 0, "added_found_global": 0, "added_found_class": 0}
    if len(deleted["vectors"]):
        dead = set(int(i) for i in deleted["all_ids"])
        found = index.search_global(deleted["vectors"], k=10) + index.search_class(
            deleted["vectors"], deleted["classes"][:, None], k=10)
        out["deleted_checked"] = len(deleted["vectors"])
        out["deleted_returned"] = sum(h.id in dead for hits in found for h in hits)
    if len(added["vectors"]):
        ids = added["ids"]
        in_global = index.search_global(added["vectors"], k=10)
        in_class = index.search_class(added["vectors"], added["classes"][:, None], k=10)
        out["added_checked"] = len(ids)
        out["added_found_global"] = sum(int(i) in {h.id for h in hits} for i, hits in zip(ids, in_global))
        out["added_found_class"] = sum(int(i) in {h.id for h in hits} for i, hits in zip(ids, in_class))
    return out


def _follow(conn, root: str) -> None:
    """The follower process: loads the index as a retriever replica does, then answers the
    commands ``refresh``, ``check`` and ``stop`` (each reply a dict; ``error`` when one failed)."""
    from pipeline.index.follow import FollowedIndex  # here: its imports count in the baseline

    try:
        followed, figures = _measured_load(root, lambda: FollowedIndex(root))
        figures |= {"version": followed.latest, "shards_loaded": len(followed.current.shard_numbers),
                    "files_loaded_mb": round(_shard_file_bytes(followed.current.manifest,
                                                               followed.current.shard_numbers) / MB, 1)}
        conn.send(figures)
    except Exception:  # noqa: BLE001 - reported to the parent
        conn.send({"error": traceback.format_exc()})
        return
    while True:
        command, payload = conn.recv()
        if command == "stop":
            return
        try:
            if command == "refresh":
                old = followed.current
                version, figures = _measured_load(root, followed.refresh)
                new = followed.current
                # Reused: the held version's mapped files taken over (new tombstones at most).
                reused = sorted(n for n, shard in new._shards.items()
                                if n in old._shards and old._shards[n].vectors is shard.vectors)
                loaded = sorted(set(new._shards) - set(reused))
                figures |= {"version": version, "held": followed.held(), "shards_reused": len(reused),
                            "shards_loaded": len(loaded), "loaded_shard_numbers": loaded,
                            "files_loaded_mb": round(_shard_file_bytes(new.manifest, loaded) / MB, 1)}
                del old, new
                gc.collect()
                conn.send(figures)
            elif command == "check":
                result = _check(followed.current, **payload)
                result["memory_after_queries"] = _memory(root)
                conn.send(result)
            else:
                conn.send({"error": f"unknown command {command!r}"})
        except Exception:  # noqa: BLE001 - reported to the parent
            conn.send({"error": traceback.format_exc()})


class Follower:
    """The parent's handle on the follower process."""

    def __init__(self, root: Path) -> None:
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_follow, args=(child, str(root)), daemon=True)
        self._process.start()
        child.close()
        self.started = self._reply()

    def _reply(self) -> dict:
        reply = self._conn.recv()
        if "error" in reply:
            raise RuntimeError(f"the follower failed:\n{reply['error']}")
        return reply

    def ask(self, command: str, payload: dict | None = None) -> dict:
        self._conn.send((command, payload))
        return self._reply()

    def stop(self) -> None:
        try:
            self._conn.send(("stop", None))
        except OSError:
            pass
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()


# -- the publisher (a child process per publish) -------------------------------------------------

def _publish(index_dir: str, embeddings: str | None, delete_ids: str | None, report: str) -> None:
    """One publish, timed from inside (the child's start-up is not the publish's)."""
    start = time.perf_counter()
    if delete_ids is not None:
        manifest = delete_from_index(index_dir, np.load(delete_ids))
    else:
        manifest = append_index(embeddings, index_dir)
    Path(report).write_text(json.dumps({"publish_s": time.perf_counter() - start, "version": manifest.version}))


# -- what is published ---------------------------------------------------------------------------

class _Rows:
    """The current version's rows (id, class, shard, position; live or deleted), read from its files."""

    def __init__(self, index_dir: Path) -> None:
        self.root = Location(index_dir)
        self.manifest = read_version(self.root)
        ids, classes, shard, position, alive = [], [], [], [], []
        for number, entry in enumerate(self.manifest.shards):
            table = (self.root / entry.path / "rows.parquet").read_parquet(["id", "class"])
            n = table.num_rows
            ids.append(table["id"].to_numpy())
            classes.append(table["class"].to_numpy().astype(np.int64))
            shard.append(np.full(n, number))
            position.append(np.arange(n))
            live = np.ones(n, dtype=bool)
            live[read_tombstones(self.root, entry)] = False
            alive.append(live)
        self.ids, self.classes = np.concatenate(ids), np.concatenate(classes)
        self.shard, self.position = np.concatenate(shard), np.concatenate(position)
        self.alive = np.concatenate(alive)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """float32 vectors of these rows (indexes into this object's arrays)."""
        out = np.empty((len(rows), self.manifest.dim), np.float32)
        for number in np.unique(self.shard[rows]):
            pick = np.flatnonzero(self.shard[rows] == number)
            stored = np.load(self.root.path / self.manifest.shards[number].path / "vectors.npy", mmap_mode="r")
            out[pick] = np.asarray(stored[self.position[rows[pick]]], dtype=np.float32)
        return out


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _write_output(out: Path, manifest: IndexManifest, ids: np.ndarray, classes: np.ndarray,
                  vectors: np.ndarray) -> None:
    """An embedding-job output of these rows, made with the index's models (so it may be appended):
    their class is their stored top-1 prediction."""
    n, dim = vectors.shape
    writer = WriteParts(out / "embeddings", dim)
    batch = {"id": ids, "uri": np.array([f"appended/{i}" for i in ids], dtype=object),
             "label": np.array([None] * n, dtype=object), "classes": classes[:, None].astype(np.int32),
             "class_probs": np.ones((n, 1), np.float32), "embedding": vectors,
             "read_s": np.zeros(n), "decode_s": np.zeros(n), "model_s": np.zeros(n)}
    parts = [{"path": f"embeddings/{writer(batch)['part'][0]}", "rows": n}]
    EmbeddingManifest(models=manifest.models, inputs=["benchmark-append"], top_n=1, embedding_dtype="float32",
                      max_pixels=manifest.max_pixels, counts={"embedded": n}, parts=parts).write(out)


def _new_rows(rows: _Rows, n: int, n_classes: int, new_class: bool, first_id: int,
              rng: np.random.Generator) -> dict:
    """``n`` new rows near existing rows of ``n_classes`` existing classes (picked as the classes of
    random live rows: by size), or around a new centre in a class the index does not hold."""
    live = np.flatnonzero(rows.alive & (rows.classes != UNLABELLED))
    dim = rows.manifest.dim
    if new_class:
        taken = {int(c) for c in rows.manifest.classes}
        cls = next(c for c in range(len(taken) + 1) if c not in taken)
        centre = _unit(0.5 * rows.vectors(rng.choice(live, 1))[0] + 0.85 * _unit(rng.normal(size=dim)))
        classes = np.full(n, cls, np.int64)
        vectors = _unit(centre + 0.5 * rng.normal(size=(n, dim)) / np.sqrt(dim))
    else:
        chosen: list[int] = []
        for row in rng.permutation(live):
            if int(rows.classes[row]) not in chosen:
                chosen.append(int(rows.classes[row]))
            if len(chosen) == n_classes:
                break
        classes = np.array(chosen, np.int64)[np.arange(n) % len(chosen)]
        sources = np.empty(n, np.int64)
        for c in chosen:
            pick = classes == c
            sources[pick] = rng.choice(live[rows.classes[live] == c], int(pick.sum()))
        vectors = _unit(rows.vectors(sources) + 0.3 * rng.normal(size=(n, dim)) / np.sqrt(dim))
    return {"ids": np.arange(first_id, first_id + n, dtype=np.int64), "classes": classes, "vectors": vectors}


def _shard_changes(index_dir: Path, before: int, after: int) -> dict:
    """What a publish did to the shards: rebuilt (new files), new, given tombstones, unchanged."""
    old, new = read_version(Location(index_dir), before), read_version(Location(index_dir), after)
    rebuilt = [n for n, e in enumerate(new.shards) if n < len(old.shards) and e.path != old.shards[n].path]
    added = list(range(len(old.shards), len(new.shards)))
    tombstoned = [n for n, e in enumerate(new.shards) if n < len(old.shards) and n not in rebuilt
                  and e.deleted != old.shards[n].deleted]
    return {"shards": len(new.shards), "rebuilt": len(rebuilt), "rebuilt_rows": sum(new.shards[n].rows for n in rebuilt),
            "new": len(added), "new_rows": sum(new.shards[n].rows for n in added), "tombstoned": len(tombstoned),
            "unchanged": len(new.shards) - len(rebuilt) - len(added) - len(tombstoned), "rows": new.rows}


def _sequence(index_dir: Path, scratch: Path, args: argparse.Namespace) -> dict:
    """Starts the follower on ``index_dir`` and publishes the three changes, each measured."""
    rng = np.random.default_rng(args.seed + 7)
    rows = _Rows(index_dir)
    n_live = int(rows.alive.sum())
    append_rows = args.append_rows or max(50, n_live // 1000)
    new_class_rows = args.new_class_rows or append_rows
    run: dict = {"rows": n_live, "shards": len(rows.manifest.shards), "dim": rows.manifest.dim,
                 "vector_dtype": rows.manifest.vector_dtype, "global_index": rows.manifest.config.get("global_index"),
                 "shard_size": rows.manifest.config.get("shard_size"), "version": rows.manifest.version,
                 "append_rows": append_rows, "new_class_rows": new_class_rows, "steps": []}
    print(f"index: {n_live:,} rows in {run['shards']} shard(s), version {run['version']}; starting the follower ...",
          flush=True)
    follower = Follower(index_dir)
    try:
        run["follower_start"] = follower.started
        # A first round of queries (existing rows, found by themselves): pages the files in as a
        # replica that has been serving has.
        warm = rng.choice(np.flatnonzero(rows.alive), min(args.check_rows, n_live), replace=False)
        none = {"vectors": np.zeros((0, rows.manifest.dim), np.float32), "classes": np.zeros(0, np.int64),
                "all_ids": np.zeros(0, np.int64)}
        run["follower_start"]["check"] = follower.ask("check", {"deleted": none, "added": {
            "vectors": rows.vectors(warm), "classes": rows.classes[warm], "ids": rows.ids[warm]}})

        doomed = rng.choice(np.flatnonzero(rows.alive), round(args.delete_fraction * n_live), replace=False)
        sample = doomed[:args.check_rows]
        deleted = {"vectors": rows.vectors(sample), "classes": rows.classes[sample], "all_ids": rows.ids[doomed]}
        added = {"vectors": np.zeros((0, rows.manifest.dim), np.float32), "classes": np.zeros(0, np.int64),
                 "ids": np.zeros(0, np.int64)}
        first_id = int(rows.ids.max()) + 1
        for step in STEPS:
            version = read_version(Location(index_dir)).version
            report = scratch / f"publish-{step}.json"
            if step == "delete":
                np.save(scratch / "doomed.npy", rows.ids[doomed])
                what = {"deleted_rows": int(len(doomed))}
                child_s, peak_gb = _in_child(_publish, str(index_dir), None, str(scratch / "doomed.npy"), str(report))
            else:
                new = _new_rows(rows, append_rows if step == "append" else new_class_rows, args.append_classes,
                                step == "new_class", first_id, rng)
                first_id += len(new["ids"])
                out = scratch / f"emb-{step}"
                _write_output(out, rows.manifest, new["ids"], new["classes"], new["vectors"])
                what = {"appended_rows": int(len(new["ids"])), "into_classes": sorted({int(c) for c in new["classes"]})}
                child_s, peak_gb = _in_child(_publish, str(index_dir), str(out), None, str(report))
                shutil.rmtree(out)
                keep = rng.permutation(len(new["ids"]))[:args.check_rows]
                added = {k: np.concatenate([added[k], new[k][keep]]) for k in added}
            published = json.loads(report.read_text())
            refresh = follower.ask("refresh")
            check = follower.ask("check", {"deleted": deleted, "added": added})
            record = {"step": step, "what": STEPS[step], **what, "version_before": version,
                      "version": published["version"], "publish_s": round(published["publish_s"], 3),
                      "publish_child_s": round(child_s, 2), "publisher_peak_rss_gb": peak_gb,
                      "shards": _shard_changes(index_dir, version, published["version"]), "refresh": refresh,
                      "publish_to_loaded_s": round(published["publish_s"] + refresh["load_s"], 3), "check": check}
            run["steps"].append(record)
            print(f"  {STEPS[step]}: version {record['version']} published in {record['publish_s']} s, loaded by "
                  f"the follower in {refresh['load_s']} s", flush=True)
    finally:
        follower.stop()
    return run


# -- the command ---------------------------------------------------------------------------------

def bench_publish(args: argparse.Namespace) -> dict:
    results: dict = {"date": dt.date.today().isoformat(), "machine": machine(),
                     "threads": {**thread_settings(), **faiss_settings()}, "runs": []}
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        scratch = Path(scratch)
        if args.index:
            index_dir = scratch / "index"
            start = time.perf_counter()
            shutil.copytree(args.index, index_dir)
            results["source"] = {"kind": "index", "path": str(args.index),
                                 "copy_s": round(time.perf_counter() - start, 2)}
            results["runs"].append(_sequence(index_dir, scratch, args))
            return results
        heads = args.head_min_rows or None
        results["source"] = {"kind": "synthetic", "rows": args.rows, "dim": args.dim, "classes": args.classes,
                             "global_index": args.global_index, "head_min_rows": heads,
                             "vector_dtype": args.vector_dtype, "gallery": None if args.gallery is None else str(args.gallery)}
        if args.gallery is not None:  # a kept one: its own size, whatever --rows etc. say
            emb = args.gallery
            made = EmbeddingManifest.read(emb)
            results["source"] |= {"rows": sum(p["rows"] for p in made.parts), "dim": made.dim, "classes": None,
                                  "generate_s": None}
        else:
            emb = scratch / "emb"
            start = time.perf_counter()
            # its returned vectors are dropped at once: they are read back from the index where needed
            _synthetic_gallery(emb, args.rows, args.dim, args.classes, args.seed, 0.5, 1.2)
            gc.collect()
            results["source"]["generate_s"] = round(time.perf_counter() - start, 1)
            print(f"generated {args.rows:,} vectors in {results['source']['generate_s']} s", flush=True)
        for shard_size in args.shard_size:
            index_dir = scratch / f"index-{shard_size}"
            config = {"shard_size": shard_size, "global_index": args.global_index, "head_min_rows": heads}
            print(f"building the index (shard size {shard_size:,}, {args.global_index}) ...", flush=True)
            seconds, peak = _in_child(_build, str(emb), str(index_dir), config, args.vector_dtype)
            print(f"built in {seconds:.1f} s (peak RSS {peak} GB)", flush=True)
            built = {"seconds": round(seconds, 1), "peak_rss_gb": peak,
                     "bytes_on_disk": sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())}
            run = _sequence(index_dir, scratch, args)
            run["build"] = built
            results["runs"].append(run)
            shutil.rmtree(index_dir)
    return results


def _mem(m: dict) -> str:
    return f"{m.get('rss_mb', float('nan')):,.0f}"


def print_publish(results: dict, args: argparse.Namespace | None = None) -> None:
    source = results["source"]
    if source["kind"] == "index":
        what = f"the index {source['path']} (a copy)"
    else:
        made = (f"the gallery {source['gallery']}" if source["gallery"] else
                f"{source['classes']:,} classes (1/rank sizes), generated in {source['generate_s']} s (not counted)")
        heads = f"heads from {source['head_min_rows']:,} rows" if source["head_min_rows"] else "no head indexes"
        what = (f"synthetic {source['rows']:,} x {source['dim']}, {made}; {source['global_index']}, {heads}, "
                f"{source['vector_dtype']} vectors")
    print(f"\npublish benchmark: {what} ({results['machine']}, {results['date']})")
    t = results["threads"]
    env = ", ".join(f"{k}={v}" for k, v in t["env"].items() if v is not None) or "none set"
    print(f"CPU: {t['cpu_model']}, {t['cpus']} CPUs ({t['usable_cpus']} usable); FAISS {t['faiss_version']}: "
          f"{t['faiss_omp_threads']} OpenMP threads, SIMD {t['faiss_simd_level']}; thread variables: {env}")
    for run in results["runs"]:
        start = run["follower_start"]
        print(f"\n{run['rows']:,} rows, dim {run['dim']}, {run['vector_dtype']}, global index {run['global_index']}, "
              f"shard size {run['shard_size']:,}: {run['shards']} shard(s)")
        if "build" in run:
            b = run["build"]
            print(f"  build: {b['seconds']} s, peak RSS {b['peak_rss_gb']} GB, {b['bytes_on_disk'] / MB:,.0f} MiB on disk")
        print(f"  follower start (version {start['version']}, {start['shards_loaded']} shard(s), "
              f"{start['files_loaded_mb']:,} MiB of files verified and loaded): {start['load_s']} s; RSS "
              f"{_mem(start['memory_before'])} -> {_mem(start['memory_after'])} MiB (peak {start['peak_rss_mb']:,.0f}), "
              f"{_mem(start['check']['memory_after_queries'])} after {start['check']['added_checked']} queries; "
              f"index files mapped {start['memory_after']['index_files_mapped_mb']:,} MiB")
        print(f"  {'change':<24}{'ver':>4}{'publish s':>11}{'load s':>9}{'pub->loaded':>13}{'reused/loaded':>15}"
              f"{'loaded MiB':>12}{'RSS before':>12}{'after':>8}{'peak':>8}{'queried':>9}{'mapped MiB':>12}"
              f"{'publisher GB':>14}{'deleted ret.':>14}{'added found':>13}")
        for s in run["steps"]:
            r, c = s["refresh"], s["check"]
            found = (f"{c['added_found_global']}/{c['added_checked']}" if c["added_checked"] else "-")
            print(f"  {s['what']:<24}{s['version']:>4}{s['publish_s']:>11.2f}{r['load_s']:>9.2f}"
                  f"{s['publish_to_loaded_s']:>13.2f}{str(r['shards_reused']) + '/' + str(r['shards_loaded']):>15}"
                  f"{r['files_loaded_mb']:>12,.1f}{_mem(r['memory_before']):>12}{_mem(r['memory_after']):>8}"
                  f"{r['peak_rss_mb']:>8,.0f}{_mem(c['memory_after_queries']):>9}"
                  f"{r['memory_after']['index_files_mapped_mb']:>12,.0f}{s['publisher_peak_rss_gb']:>14}"
                  f"{c['deleted_returned']:>14}{found:>13}")
        for s in run["steps"]:
            sh = s["shards"]
            extra = (f"{s['deleted_rows']:,} rows deleted" if "deleted_rows" in s else
                     f"{s['appended_rows']:,} rows into class(es) {', '.join(map(str, s['into_classes'][:5]))}")
            print(f"    {s['what']}: {extra}; shards: {sh['rebuilt']} rebuilt ({sh['rebuilt_rows']:,} rows), "
                  f"{sh['new']} new ({sh['new_rows']:,} rows), {sh['tombstoned']} given tombstones, {sh['unchanged']} "
                  f"unchanged; follower holds versions {s['refresh']['held']}; RSS anon/file after the load "
                  f"{s['refresh']['memory_after'].get('anon_mb', 'n/a')}/{s['refresh']['memory_after'].get('file_mb', 'n/a')}"
                  f" MiB; class search found {s['check']['added_found_class']}/{s['check']['added_checked']} added")
    print("\n(publish s: update_index's wall time; load s: the follower's refresh(), changed shards loaded and "
          "verified beside the held version; a service adds up to index_poll_s for its poll. RSS in MiB: "
          "before the load, after it (two versions held), its peak, after queries on the new version. "
          "Vectors and FAISS codes are memory-mapped: RSS counts the pages touched, 'mapped' the files mapped.)")


def check_publish(args: argparse.Namespace) -> str | None:
    if args.index is not None and not (Path(args.index) / "manifest.json").is_file():
        return f"--index {args.index}: no index there (no manifest.json)"
    if args.gallery is not None and not (Path(args.gallery) / "manifest.json").is_file():
        return f"--gallery {args.gallery}: no embedding output there (no manifest.json)"
    if args.head_min_rows < 0:
        return "--head-min-rows must be >= 0 (0: no head indexes)"
    if min(args.rows, args.dim, args.classes, args.append_classes, args.check_rows) < 1:
        return "--rows, --dim, --classes, --append-classes and --check-rows must be >= 1"
    if min(args.shard_size) < 1:
        return "--shard-size must be >= 1"
    if not 0 < args.delete_fraction < 1:
        return "--delete-fraction must be a fraction in (0, 1)"
    if (args.append_rows is not None and args.append_rows < 1) or (args.new_class_rows is not None
                                                                   and args.new_class_rows < 1):
        return "--append-rows and --new-class-rows must be >= 1"
    return None


def add_arguments(publish: argparse.ArgumentParser) -> None:
    """Adds ``publish``'s arguments and functions to its subcommand parser (``jobs.benchmark.cli``)."""
    publish.set_defaults(check=check_publish, bench=bench_publish, report=print_publish)
    publish.add_argument("--index", type=Path, help="an existing index (e.g. out/demo-index), copied to a scratch "
                                                    "folder first; default: build synthetic ones")
    publish.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows (default: 1,000,000)")
    publish.add_argument("--dim", type=int, default=512)
    publish.add_argument("--classes", type=int, default=20_000)
    publish.add_argument("--shard-size", type=int, nargs="+", default=[1_000_000, 100_000],
                         help="synthetic: one index per shard size, compared in one run (default: 1,000,000 and "
                              "100,000: an append rebuilds the shards holding its classes whole)")
    publish.add_argument("--global-index", default="hnsw-sq8", choices=GLOBAL_INDEX_TYPES,
                         help="synthetic: the builder's --global-index (default: hnsw-sq8; flat builds fast)")
    publish.add_argument("--head-min-rows", type=int, default=HEAD_MIN_ROWS,
                         help=f"synthetic: classes from this size get a head index; 0: none (default: {HEAD_MIN_ROWS})")
    publish.add_argument("--gallery", type=Path,
                         help="synthetic: build from this embedding output instead of generating one (e.g. a kept "
                              "copy of a generated gallery: generating 1M x 512 takes minutes)")
    publish.add_argument("--vector-dtype", default="float16", choices=["float32", "float16"])
    publish.add_argument("--delete-fraction", type=float, default=0.01,
                         help="share of the live rows deleted by the first publish (default: 0.01)")
    publish.add_argument("--append-rows", type=int,
                         help="rows appended into existing classes (default: 0.1 %% of the rows, at least 50)")
    publish.add_argument("--append-classes", type=int, default=1,
                         help="existing classes the appended rows go into (default: 1)")
    publish.add_argument("--new-class-rows", type=int, help="rows of the new class (default: --append-rows)")
    publish.add_argument("--check-rows", type=int, default=200,
                         help="deleted and added rows searched with after each publish (default: 200)")
    publish.add_argument("--seed", type=int, default=0)
    publish.add_argument("--scratch", help="folder for the temporary copies, outputs and indexes (default: system temp)")
