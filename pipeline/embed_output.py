"""The output folder of an embedding run, and the run's settings.

    OUT/config.json        the settings of the last run (the output-defining ones must not change)
    OUT/embeddings/part-*.parquet, OUT/errors/part-*.parquet   one part per batch, each committed by
                           its record part-*.json (pipeline.parts), which names the run that wrote it
    OUT/changes/run-NNNNNN.json   each finished run's change log: added, changed, deleted ids
    OUT/manifest.json      pipeline.manifests.EmbeddingManifest: the committed parts, written last
    OUT/summary.json       throughput and counts of the last run

OUT is a local (or shared) folder or an object store URI (``s3://bucket/prefix``,
:mod:`pipeline.storage`). Re-running into the same folder resumes and follows the inputs: images
done at their current version (``pipeline.sources.Item.version``) are skipped, new and changed
ones embedded, and images gone from the inputs recorded as deleted; parts without a record are
deleted and done again. An interrupted run is finished by the next one under the same run number.
The Ray job that fills the folder is :mod:`pipeline.embed_job`; everything here runs without Ray.

The index reads the runs through :func:`change_log` and :func:`live_parts`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.manifests import EmbeddingManifest, ModelSet, now
from pipeline.models import (
    DEFAULT_CLASSIFIER,
    DEFAULT_EMBEDDER,
    NO_CLASSIFIER,
    as_spec,
    head_for,
    load_classifier,
    load_embedder,
    locate_weights,
    select_runtime,
    trained_embedding_metadata,
)
from pipeline.batch import load_listing, version_hashes
from pipeline.parts import READ_THREADS, committed_parts, read_column, remove_uncommitted
from pipeline.sources import Shard, canonical_uri, list_files, resolve, uri_id
from pipeline.storage import Location

logger = logging.getLogger(__name__)

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
        if self.classifier == NO_CLASSIFIER:
            if self.stages != "fused":
                raise ValueError("--classifier none (embeddings only) runs one model stage: use --stages fused")
        elif as_spec(self.classifier).library == "head" and self.stages != "fused":
            raise ValueError("a classifier head (head:PATH) runs inside the embedder: use --stages fused")
        as_spec(self.embedder)
        if self.compile is not None:
            select_runtime("cpu", compile=self.compile)  # checks the backend name before any actor starts

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def check_config(out: Location, config: EmbedConfig) -> None:
    """Refuses to mix outputs of different models in one folder; records the config otherwise."""
    path = out / "config.json"
    if path.is_file():
        previous = path.read_json()
        changed = {k: (previous.get(k), getattr(config, k)) for k in EmbedConfig.OUTPUT_FIELDS
                   if previous.get(k) != getattr(config, k)}
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{out} holds outputs made with other settings ({details}); "
                             f"use a new --output folder, or delete {out} to start over")
    out.make_folder()
    path.write_json(config.to_json())


def _listed(out: Location) -> dict[str, dict[str, dict]]:
    """The parts the folder's manifest lists, per folder (none when there is no manifest yet)."""
    if not (out / "manifest.json").is_file():
        return {"embeddings": {}, "errors": {}}
    manifest = EmbeddingManifest.read(out)
    listed: dict[str, dict[str, dict]] = {"embeddings": {}, "errors": {}}
    for part in manifest.parts + manifest.error_parts:
        folder, name = part["path"].split("/", 1)
        listed[folder][name] = {k: v for k, v in part.items() if k != "path"}
    return listed


def committed(out: Location) -> dict[str, dict[str, dict]]:
    """The committed parts of an output folder: ``{"embeddings": {name: record}, "errors": {...}}``."""
    listed = _listed(out)
    return {folder: committed_parts(out / folder, listed[folder]) for folder in ("embeddings", "errors")}


def remove_partial_files(out: Location, parts: dict[str, dict[str, dict]]) -> int:
    """Deletes what an interrupted run left that no record names (``parts``: :func:`committed`)."""
    return sum(remove_uncommitted(out / folder, parts[folder]) for folder in ("embeddings", "errors"))


def done_ids(out: Location, parts: dict[str, dict[str, dict]] | None = None) -> np.ndarray:
    """Ids in the committed embedding and error parts (sorted; an image changed since has one row
    per version)."""
    parts = parts or committed(out)
    ids = [c for folder in ("embeddings", "errors") for c in read_column(out / folder, list(parts[folder]), "id")]
    return np.sort(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)


def pending_shards(listings: Location, shards: list[Shard], done: np.ndarray) -> tuple[list[Shard], np.ndarray]:
    """The shards a resumed run still has to read, and the done ids that lie in them.

    A tar or parquet shard whose listing (saved when it was read, :class:`pipeline.batch.ReadShards`)
    names only done ids is complete and is not read again; at ImageNet-22k scale that is 1.3 TB of
    tars a resume does not re-read to find nothing to do. Other shards are read, skipping done ids.
    A tar or parquet file that changed has another listing key, so it is read again.

    Args:
        listings: the output's ``listings`` folder.
        shards: the shards of the inputs.
        done: sorted ids in committed parts (:func:`done_ids`).
    """
    pending, covered = _complete_listings(listings, shards, done)
    rest = done[~_in(done, _ids(np.concatenate(covered)))] if covered else done
    return pending, rest


def _complete_listings(listings: Location, shards: list[Shard], done: np.ndarray) -> tuple[list[Shard], list[np.ndarray]]:
    """(the shards to read, the listings of the complete ones)."""
    present = set(listings.list("*.npy"))
    keys = [s.listing_key for s in shards if s.listing_key and f"{s.listing_key}.npy" in present]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        listed = dict(zip(keys, pool.map(lambda key: load_listing(listings, key), keys)))
    complete = {key for key, ids in listed.items() if _all_in(ids, done)}
    return [s for s in shards if s.listing_key not in complete], [listed[key] for key in complete]


def _all_in(values: np.ndarray, sorted_pool: np.ndarray) -> bool:
    if not len(values):
        return True
    if not len(sorted_pool):
        return False
    pos = np.searchsorted(sorted_pool, values).clip(max=len(sorted_pool) - 1)
    return bool(np.all(sorted_pool[pos] == values))


# ---- runs: the rows each run wrote, the change logs, the state a run starts from ---------------

#: The change logs' folder: ``changes/run-NNNNNN.json``, one per finished run.
CHANGES = "changes"
_EMPTY = np.zeros(0, dtype=np.int64)


def log_name(run: int) -> str:
    """The file name of a run's change log."""
    return f"run-{run:06d}.json"


def _ids(values) -> np.ndarray:
    """Sorted unique int64 ids (by sorting: numpy 2's np.unique hashes, 80x slower on 1M ids)."""
    ids = np.sort(np.asarray(values, dtype=np.int64))
    return ids[np.concatenate([[True], ids[1:] != ids[:-1]])] if len(ids) else _EMPTY


def _in(values: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Which ``values`` are in the sorted unique ``pool`` (fastest with sorted values)."""
    if not len(pool) or not len(values):
        return np.zeros(len(values), dtype=bool)
    return pool[np.searchsorted(pool, values).clip(max=len(pool) - 1)] == values


def _minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted unique ids of ``a`` not in ``b`` (both sorted unique)."""
    return a[~_in(a, b)]


def _both(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted unique ids in both ``a`` and ``b`` (both sorted unique)."""
    return a[_in(a, b)]


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``values`` of ``query`` in sorted unique ``keys`` (0 where absent)."""
    if not len(keys) or not len(query):
        return np.zeros(len(query), dtype=values.dtype if len(values) else np.int64)
    pos = np.searchsorted(keys, query).clip(max=len(keys) - 1)
    return np.where(keys[pos] == query, values[pos], 0)


def _last_per_id(ids: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """Indices of each id's entry of the highest run (ids ascending)."""
    order = np.lexsort((runs, ids))
    ordered = ids[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = ordered[1:] != ordered[:-1]
    return order[last]


@dataclass(frozen=True)
class Rows:
    """Every committed row of an output folder, one entry each (no particular order).

    Attributes:
        id: the image's id.
        run: the run that wrote it (1 for parts written before runs were recorded).
        version: :func:`pipeline.batch.version_hash` of the version it was made from (0: unknown).
        embedded: an embedding row (False: an error row).
        error_type: the error row's ``error_type`` ("" for embedding rows).
    """

    id: np.ndarray
    run: np.ndarray
    version: np.ndarray
    embedded: np.ndarray
    error_type: np.ndarray


def _read_part_rows(part: Location, embedded: bool) -> pa.Table:
    columns = ["id", "version"] if embedded else ["id", "version", "error_type"]
    try:
        return part.read_parquet(columns)
    except pa.ArrowInvalid:  # a part written before versions existed
        return part.read_parquet([c for c in columns if c != "version"])


def read_rows(out: Location, parts: dict[str, dict[str, dict]]) -> Rows:
    """The rows of the given committed parts (``parts``: :func:`committed`), read in parallel."""
    jobs = [(out / folder / name, folder == "embeddings", int(record.get("run", 1)))
            for folder in ("embeddings", "errors") for name, record in parts.get(folder, {}).items()]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        tables = list(pool.map(lambda job: _read_part_rows(job[0], job[1]), jobs))
    ids, runs, versions, embedded, types = [], [], [], [], []
    for (_, is_embedding, run), table in zip(jobs, tables):
        n = table.num_rows
        ids.append(table.column("id").to_numpy())
        runs.append(np.full(n, run, dtype=np.int64))
        versions.append(version_hashes(table.column("version").to_pylist()) if "version" in table.column_names
                        else np.zeros(n, dtype=np.int64))
        embedded.append(np.full(n, is_embedding))
        types.append(np.full(n, "", dtype=object) if is_embedding
                     else np.array(table.column("error_type").to_pylist(), dtype=object))
    if not jobs:
        return Rows(_EMPTY, _EMPTY, _EMPTY, np.zeros(0, dtype=bool), np.zeros(0, dtype=object))
    return Rows(np.concatenate(ids).astype(np.int64), np.concatenate(runs), np.concatenate(versions),
                np.concatenate(embedded), np.concatenate(types))


def read_logs(out: Location, after: int = 0) -> list[dict]:
    """The change logs of the runs after ``after`` in the folder, by run (the latest may be newer
    than the manifest)."""
    names = [n for n in (out / CHANGES).list("run-*.json") if int(n[len("run-"):-len(".json")]) > after]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        logs = list(pool.map(lambda name: (out / CHANGES / name).read_json(), names))
    return sorted(logs, key=lambda log: int(log["run"]))


@dataclass(frozen=True)
class History:
    """What an output folder holds: its committed rows, its change logs, its finished runs.

    Attributes:
        rows: every committed row (:func:`read_rows`).
        logs: the finished runs' change logs, by run.
        finished: the latest finished run (0: none). Rows of later runs are an interrupted run's,
            which the next run finishes under the same number.
        inputs: the inputs of the finished runs (canonical uris).
        read: the parts whose rows are in ``rows`` (``folder/name``).
    """

    rows: Rows
    logs: list[dict]
    finished: int
    inputs: tuple[str, ...]
    read: frozenset[str] = frozenset()


def load_history(out: Location, parts: dict[str, dict[str, dict]] | None = None,
                 previous: History | None = None) -> History:
    """The history of an output folder (``parts``: its committed parts, :func:`committed`).

    Args:
        previous: an earlier history of the same folder: only parts and change logs it does not
            hold are read (after a run: its own).
    """
    parts = parts if parts is not None else committed(out)
    names = {f"{folder}/{name}" for folder in ("embeddings", "errors") for name in parts.get(folder, {})}
    if previous is None:
        rows, logs = read_rows(out, parts), read_logs(out)
    else:
        new = {folder: {n: r for n, r in parts.get(folder, {}).items() if f"{folder}/{n}" not in previous.read}
               for folder in ("embeddings", "errors")}
        rows = _concat_rows(previous.rows, read_rows(out, new))
        logs = previous.logs + read_logs(out, after=max([int(log["run"]) for log in previous.logs], default=0))
    inputs = {i for log in logs for i in log.get("inputs", [])}
    finished = max([int(log["run"]) for log in logs], default=0)
    if (out / "manifest.json").is_file():
        manifest = EmbeddingManifest.read(out)
        finished = max(finished, manifest.run)  # an output made before change logs: its parts are run 1
        if not logs:
            inputs |= {_canonical_input(i) for i in manifest.inputs}
    return History(rows=rows, logs=logs, finished=finished, inputs=tuple(sorted(inputs)), read=frozenset(names))


def _concat_rows(a: Rows, b: Rows) -> Rows:
    return Rows(*(np.concatenate([getattr(a, f.name), getattr(b, f.name)]) for f in dataclasses.fields(Rows)))


def _canonical_input(raw: str) -> str:
    return resolve(raw)[2]


def resolve_inputs(inputs) -> list[str]:
    """A run's inputs as the change logs record them (absolute paths, uris without a trailing /)."""
    return sorted({_canonical_input(i) for i in inputs})


@dataclass(frozen=True)
class Status:
    """Each id's state after some run (arrays aligned, ids ascending).

    Attributes:
        id, version: the id and the version of its latest row.
        embedded: its latest row is an embedding row.
        live: its latest row stands (no deletion since).
        held: deleted on request (``--delete``) since its latest row, and kept out while its
            version stays the same.
        row: the index of its latest row in :class:`Rows`.
    """

    id: np.ndarray
    version: np.ndarray
    embedded: np.ndarray
    live: np.ndarray
    held: np.ndarray
    row: np.ndarray


def _status(rows: Rows, logs: list[dict], upto: int) -> Status:
    """Replays the rows and the logged deletions of runs up to ``upto``."""
    index = np.flatnonzero(rows.run <= upto)
    last = index[_last_per_id(rows.id[index], rows.run[index])]
    ids, runs = rows.id[last], rows.run[last]
    deleted, released = [], []
    for log in logs:
        run = int(log["run"])
        if run <= upto:
            explicit = 1 if log.get("explicit") else 0
            deleted += [(i, run, explicit) for i in log.get("deleted", [])]
            released += [(i, run) for i in log.get("released", [])]
    d = np.array(deleted, dtype=np.int64).reshape(-1, 3)
    d = d[_last_per_id(d[:, 0], d[:, 1])]
    r = np.array(released, dtype=np.int64).reshape(-1, 2)
    r = r[_last_per_id(r[:, 0], r[:, 1])]
    deleted_at, explicit = _lookup(d[:, 0], d[:, 1], ids), _lookup(d[:, 0], d[:, 2], ids)
    released_at = _lookup(r[:, 0], r[:, 1], ids)
    live = runs > np.maximum(deleted_at, released_at)
    held = ~live & (deleted_at > released_at) & (explicit == 1)
    return Status(id=ids, version=rows.version[last], embedded=rows.embedded[last], live=live, held=held, row=last)


@dataclass(frozen=True)
class RunState:
    """Where a run starts (run ``run`` = the latest finished + 1).

    Attributes:
        done_ids, done_versions: what the run skips: images at the version they were done at
            (live rows and held deletions; rows an interrupted attempt of this run wrote: at any
            version, 0). ``done_ids`` sorted.
        live: ids with a standing row before this run (sorted).
        live_embedded: those whose row is an embedding row (in an index).
        held: ids deleted on request and kept out while unchanged (sorted).
        current: ids an interrupted attempt of this run already wrote (sorted).
    """

    run: int
    done_ids: np.ndarray
    done_versions: np.ndarray
    live: np.ndarray
    live_embedded: np.ndarray
    held: np.ndarray
    current: np.ndarray


def run_state(history: History) -> RunState:
    """Where the next run starts: the latest finished run + 1 (an interrupted run's number, when
    one left parts: they count as this run's)."""
    status = _status(history.rows, history.logs, history.finished)
    run = history.finished + 1
    current = _ids(history.rows.id[history.rows.run >= run])
    keep = (status.live | status.held) & ~_in(status.id, current)
    ids = np.concatenate([status.id[keep], current])
    versions = np.concatenate([status.version[keep], np.zeros(len(current), dtype=np.int64)])
    order = np.argsort(ids, kind="stable")
    return RunState(run=run, done_ids=ids[order], done_versions=versions[order], live=status.id[status.live],
                    live_embedded=status.id[status.live & status.embedded], held=status.id[status.held],
                    current=current)


def _done_mask(ids: np.ndarray, versions: np.ndarray, state: RunState) -> np.ndarray:
    """Which of these images (id, version hash) a run skips."""
    if not len(state.done_ids) or not len(ids):
        return np.zeros(len(ids), dtype=bool)
    pos = np.searchsorted(state.done_ids, ids).clip(max=len(state.done_ids) - 1)
    known = state.done_versions[pos]
    return (state.done_ids[pos] == ids) & ((known == 0) | (versions == 0) | (known == versions))


# ---- planning a run: which shards to read ---------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a run reads, decided on the driver before any worker starts.

    Attributes:
        shards: the shards to read (folders and loose files with nothing new or changed left out,
            loose files narrowed to those).
        skip_ids, skip_versions: done images the read tasks may meet (:class:`pipeline.batch.ReadShards`).
        present: ids the inputs hold as far as listed here (folders, loose files, complete tars
            and row groups), or None when nothing was done before (nothing can have disappeared).
        to_list: the listing keys of the tars and row groups to read: their ids are known once
            read whole (a key of None: a file without size or time, never known).
        listed_files: images listed here (folders and loose files).
    """

    shards: list[Shard]
    skip_ids: np.ndarray
    skip_versions: np.ndarray
    present: np.ndarray | None
    to_list: list[str | None]
    listed_files: int


def plan_run(out: Location, shards: list[Shard], state: RunState) -> Plan:
    """Lists the folders and loose files (not their bytes) and the saved listings of tars and
    parquet row groups, and keeps the shards that hold new or changed images.

    A folder is listed here only when something was done before: the first run into a folder lists
    each folder once, in its read task.
    """
    containers = [s for s in shards if s.kind in ("tar", "parquet")]
    files = [s for s in shards if s.kind in ("folder", "files")]
    pending, complete = _complete_listings(out / "listings", containers, state.done_ids)
    covered = list(complete)
    present = list(complete)
    keep: list[Shard] = []
    listed = 0
    if len(state.done_ids) and files:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            listings = list(pool.map(list_files, files))
        for shard, entries in zip(files, listings):
            ids = np.fromiter((uri_id(uri) for uri, _, _ in entries), dtype=np.int64, count=len(entries))
            todo = ~_done_mask(ids, version_hashes(v for _, v, _ in entries), state)
            listed += len(ids)
            present.append(ids)
            if shard.kind == "folder" and todo.any():
                keep.append(shard)  # its read task lists it again, skipping its done images
                continue
            covered.append(ids[~todo])  # not met by any read task
            if todo.any():
                wanted = np.flatnonzero(todo)
                keep.append(dataclasses.replace(shard, members=tuple(entries[i][0] for i in wanted),
                                                versions=tuple(entries[i][1] for i in wanted)))
    else:
        keep = files
    skip = ~_in(state.done_ids, _ids(np.concatenate(covered))) if covered else np.ones(len(state.done_ids), bool)
    return Plan(shards=keep + pending, skip_ids=state.done_ids[skip], skip_versions=state.done_versions[skip],
                present=(_ids(np.concatenate(present)) if present else _EMPTY) if len(state.done_ids) else None,
                to_list=[s.listing_key for s in pending], listed_files=listed)


def present_after(out: Location, plan: Plan) -> np.ndarray | None:
    """The ids the inputs hold, once the run read its tars and row groups whole; None when some
    are not known (a tar not read whole: ``--limit``; no size or time to key its listing)."""
    if plan.present is None or any(key is None for key in plan.to_list):
        return None
    listings = out / "listings"
    names = set(listings.list("*.npy"))
    if any(f"{key}.npy" not in names for key in plan.to_list):
        return None
    with ThreadPoolExecutor(READ_THREADS) as pool:
        read = list(pool.map(lambda key: load_listing(listings, key), plan.to_list))
    return _ids(np.concatenate([plan.present, *read]))


# ---- finishing a run: its change log, the manifest -------------------------------------------------


def finish_run(out: Location, state: RunState, history: History, inputs: list[str],
               present: np.ndarray | None = None, explicit: np.ndarray | None = None) -> dict | None:
    """Writes run ``state.run``'s change log (``changes/run-NNNNNN.json``) from the rows it wrote
    and the images gone; returns it, or None (and writes nothing) when the run changed nothing.

    Args:
        state: where the run started (:func:`run_state`).
        history: the folder's history now, the run's own parts included (:func:`load_history`).
        inputs: the run's inputs (canonical uris).
        present: ids the inputs hold (every one, :func:`present_after`), or None: deletions not
            checked.
        explicit: ids deleted on request (``--delete``; a run that writes no rows).

    Raises:
        RuntimeError: an id written twice by this run (outputs are inconsistent; a bug).
    """
    run = state.run
    mine = history.rows.run >= run
    ids, embedded_rows = history.rows.id[mine], history.rows.embedded[mine]
    twice = len(ids) - len(_ids(ids))
    if twice:
        raise RuntimeError(f"{out}: {twice} ids were written twice by run {run}")
    embedded, failed = _ids(ids[embedded_rows]), _ids(ids[~embedded_rows])
    written = _ids(np.concatenate([embedded, failed]))
    deleted = released = _EMPTY
    if explicit is not None:
        deleted = _ids(explicit)
    elif present is not None:
        gone = _ids(np.concatenate([written, present]))
        deleted = _minus(state.live, gone)
        released = _minus(state.held, gone)
    log = {"run": run, "created": now(), "kind": "delete" if explicit is not None else "embed",
           "explicit": explicit is not None, "inputs": sorted(inputs), "deletions_checked": present is not None
           or explicit is not None,
           "added": _minus(embedded, state.live_embedded).tolist(),
           "changed": _both(written, state.live_embedded).tolist(),
           "deleted": deleted.tolist(), "failed": failed.tolist(), "released": released.tolist()}
    if not any(log[key] for key in ("added", "changed", "deleted", "failed", "released")):
        return None
    (out / CHANGES / log_name(run)).write_json(log, indent=None)
    return log


def write_manifest(out: Location, config: EmbedConfig | EmbeddingManifest, models: ModelSet | None = None,
                   parts: dict[str, dict[str, dict]] | None = None, history: History | None = None,
                   ) -> EmbeddingManifest:
    """Lists the committed parts in ``manifest.json`` (written last: it commits the run), with the
    latest finished run and the counts of the images that stand (each id's latest row).

    Args:
        config: the run's settings, or the folder's manifest (a run that embeds nothing: ``--delete``).
        models: the models (None: those of ``config``, a manifest).
        parts: the committed parts (None: listed now).
        history: an earlier history of the folder (only what it lacks is read).

    Raises:
        RuntimeError: an id appears twice in one run (outputs are inconsistent; a bug, never expected).
    """
    parts = parts if parts is not None else committed(out)
    history = load_history(out, parts, previous=history)
    rows = history.rows
    order = np.lexsort((rows.run, rows.id))
    twice = int(np.sum((np.diff(rows.id[order]) == 0) & (np.diff(rows.run[order]) == 0)))
    if twice:
        raise RuntimeError(f"{out}: {twice} ids appear twice in one run's outputs")
    status = _status(rows, history.logs, max(history.finished, int(rows.run.max(initial=0))))
    standing = status.row[status.live]
    failures = Counter(rows.error_type[standing[~rows.embedded[standing]]])
    embedded = int(np.sum(rows.embedded[standing]))
    failed = len(standing) - embedded
    entries = {folder: [{"path": f"{folder}/{name}", **record, "run": int(record.get("run", 1))}
                        for name, record in parts[folder].items()] for folder in parts}
    if isinstance(config, EmbeddingManifest):
        base = dict(models=config.models, inputs=config.inputs, top_n=config.top_n,
                    embedding_dtype=config.embedding_dtype, max_pixels=config.max_pixels)
    else:
        base = dict(models=models, inputs=list(config.inputs), top_n=config.top_n,
                    embedding_dtype=config.embedding_dtype, max_pixels=config.max_pixels)
    manifest = EmbeddingManifest(
        **base, parts=entries["embeddings"], error_parts=entries["errors"], run=history.finished,
        counts={"seen": embedded + failed, "embedded": embedded, "failed": failed,
                "failed_by_type": dict(sorted(failures.items()))})
    manifest.write(out)
    return manifest


# ---- deletes on request ------------------------------------------------------------------------------


def parse_deletes(lines) -> tuple[np.ndarray, int]:
    """The ids a ``--delete`` list names: one id (digits) or one image uri per line (a local path is
    made absolute; ``file.tar#member`` and ``file.parquet#row`` as the job records them); blank
    lines and ``#`` comments skipped. Returns (sorted unique ids, entries read)."""
    ids, entries = [], 0
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        entries += 1
        ids.append(int(text) if text.isdigit() and int(text) < 2**63 else uri_id(canonical_uri(text)))
    return _ids(ids), entries


@dataclass(frozen=True)
class DeleteResult:
    """What :func:`delete_images` recorded.

    Attributes:
        run: the run whose change log holds the deletions (None: nothing was deleted).
        deleted: ids deleted.
        unknown: ids asked for that name no standing image (never embedded, or deleted already).
        finished: an interrupted run finished first, under this number (its change log written
            without deletions), or None.
    """

    run: int | None
    deleted: int
    unknown: int
    finished: int | None = None


def delete_images(out: Location, ids: np.ndarray) -> DeleteResult:
    """Records a run that deletes these ids (its change log holds only deletions) and writes the
    manifest; reads no input and starts no Ray. A deleted image stays out while the inputs still
    hold it unchanged; one that changes, or leaves the inputs and comes back, is embedded again.

    Raises:
        FileNotFoundError, ValueError: ``out`` is not an embedding output.
    """
    manifest = EmbeddingManifest.read(out)
    parts = committed(out)
    history = load_history(out, parts)
    state = run_state(history)
    finished = None
    if len(state.current):  # an interrupted run: its rows get their change log first
        if finish_run(out, state, history, list(history.inputs)) is not None:
            finished = state.run
        history = load_history(out, parts, previous=history)
        state = run_state(history)
    hits = _both(_ids(ids), state.live)
    run = None
    if len(hits):
        finish_run(out, state, history, list(history.inputs), explicit=hits)
        run = state.run
    write_manifest(out, manifest, parts=parts, history=history)
    return DeleteResult(run=run, deleted=len(hits), unknown=len(_ids(ids)) - len(hits), finished=finished)


# ---- what the index reads --------------------------------------------------------------------------


@dataclass(frozen=True)
class Changes:
    """One finished run's changes.

    Attributes:
        run: the run.
        added: sorted int64 ids embedded by this run that no standing embedding row had before.
        changed: sorted int64 ids whose earlier embedding rows are stale since this run (the image
            changed: a new row in this run's parts, or an error row if it no longer decodes).
        deleted: sorted int64 ids gone since this run (left the inputs, or ``--delete``).
    """

    run: int
    added: np.ndarray
    changed: np.ndarray
    deleted: np.ndarray


def _finished(out: Location) -> tuple[EmbeddingManifest, list[dict]]:
    """The manifest and the change logs of the runs it includes (a log newer than the manifest is
    a run whose manifest was not written yet: not part of the output until it is)."""
    manifest = EmbeddingManifest.read(out)
    return manifest, [log for log in read_logs(out) if int(log["run"]) <= manifest.run]


def change_log(out: Location | str) -> list[Changes]:
    """Every finished run's changes, in order. An output made before change logs existed (parts
    without a run) reads as one run 1 that added every id of its embedding parts."""
    out = Location(out)
    manifest, logs = _finished(out)
    by_run = {int(log["run"]): log for log in logs}
    unlogged = sorted({p["run"] for p in manifest.parts + manifest.error_parts} - set(by_run))
    changes = [Changes(run, _ids(log["added"]), _ids(log["changed"]), _ids(log["deleted"]))
               for run, log in by_run.items()]
    for run in unlogged:
        names = [p["path"] for p in manifest.parts if p["run"] == run]
        ids = read_column(out, names, "id")
        changes.append(Changes(run, _ids(np.concatenate(ids)) if ids else _EMPTY, _EMPTY, _EMPTY))
    return sorted(changes, key=lambda c: c.run)


def live_parts(out: Location | str, after_run: int = 0) -> list[tuple[Location, int, np.ndarray]]:
    """The committed embedding parts written by runs after ``after_run``, in run order, each as
    ``(part, its run, sorted ids of its rows that are stale)``: changed or deleted by a later run.

    A fresh index takes ``live_parts(out)``'s rows minus each part's stale ids; an index at run R0
    takes ``live_parts(out, R0)``'s the same way and deletes the ids changed or deleted by the runs
    after R0 (:func:`change_log`).
    """
    out = Location(out)
    manifest, _ = _finished(out)
    gone: list[tuple[int, int]] = []
    for change in change_log(out):
        gone += [(int(i), change.run) for i in np.concatenate([change.changed, change.deleted])]
    stale_at = np.array(gone, dtype=np.int64).reshape(-1, 2)
    stale_at = stale_at[_last_per_id(stale_at[:, 0], stale_at[:, 1])]
    chosen = sorted((p for p in manifest.parts if p["run"] > after_run), key=lambda p: (p["run"], p["path"]))
    ids = read_column(out, [p["path"] for p in chosen], "id")
    return [(out / p["path"], p["run"], _ids(part_ids[_lookup(stale_at[:, 0], stale_at[:, 1], part_ids) > p["run"]]))
            for p, part_ids in zip(chosen, ids)]


def describe_models(config: EmbedConfig) -> ModelSet:
    """Model facts the driver needs (preprocessing, label space, dimension) without real weights.

    The weights are only located here (a missing file fails now, not in every actor); the models
    are built with random weights on the CPU to read their configuration.
    """
    none = config.classifier == NO_CLASSIFIER
    for spec in (config.embedder,) if none else (config.classifier, config.embedder):
        locate_weights(spec)
    emb_spec = as_spec(config.embedder)
    cpu = select_runtime("cpu")
    # A triplet-trained embedder's size and resolution live in its file (small, so load it).
    embedder = load_embedder(emb_spec if trained_embedding_metadata(emb_spec)
                             else dataclasses.replace(emb_spec, weights="random"), cpu)
    if none:
        facts = {"spec": NO_CLASSIFIER, "label_space": None, "num_classes": 0,
                 "preprocess": dataclasses.asdict(embedder.preprocess)}
    else:
        cls_spec = as_spec(config.classifier)
        if cls_spec.library == "head":  # small: load it, and check it takes this embedder's vectors
            classifier = head_for(cls_spec, embedder, embedder_spec=str(emb_spec))
        else:
            classifier = load_classifier(dataclasses.replace(cls_spec, weights="random"), cpu)
        facts = {"spec": str(cls_spec), "label_space": classifier.labels.name, "num_classes": len(classifier.labels),
                 "preprocess": dataclasses.asdict(classifier.preprocess)}
    return ModelSet(
        classifier=facts,
        embedder={"spec": str(emb_spec), "dim": embedder.dim, "metric": "inner_product", "normalized": True,
                  "preprocess": dataclasses.asdict(embedder.preprocess)})


def change_summary(state: RunState, log: dict | None, note: str | None = None) -> dict:
    """What a run changed, for ``summary.json`` and the job's last line (:func:`describe_changes`)."""
    counts = {key: len(log[key]) if log else 0 for key in ("added", "changed", "deleted", "failed", "released")}
    return {"run": log["run"] if log else None, **counts,
            "log": f"{CHANGES}/{log_name(log['run'])}" if log else None,
            "deletions_checked": bool(log["deletions_checked"]) if log else note is None, "note": note}


def describe_changes(changes: dict) -> str:
    """One line: ``run 2: 3 new, 1 changed, 1 deleted (changes/run-000002.json)``, or
    ``0 new, 0 changed, 0 deleted: nothing to embed``."""
    counts = f"{changes['added']} new, {changes['changed']} changed, {changes['deleted']} deleted"
    if changes["failed"]:
        counts += f", {changes['failed']} failed"
    text = f"run {changes['run']}: {counts} ({changes['log']})" if changes["run"] else f"{counts}: nothing to embed"
    return text + (f"; {changes['note']}" if changes.get("note") else "")


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
