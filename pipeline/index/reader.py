"""A loaded index: the shards a process holds (memory-mapped) and the two searches over them."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.files import sha256_file
from pipeline.index.faiss_index import SearchParams, faiss_uses_gpu, head_file, is_exact
from pipeline.index.versions import IndexIntegrityError, read_tombstones, read_version, referenced
from pipeline.manifests import IndexManifest, ShardEntry
from pipeline.storage import Location

logger = logging.getLogger(__name__)

#: Where indexes loaded from an object store are kept (``LOOKALIKE_CACHE`` overrides).
DEFAULT_CACHE = Path("~/.cache/lookalike")


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: int
    uri: str
    label: str | None
    cls: int
    score: float

    def to_json(self) -> dict:
        return {"id": self.id, "uri": self.uri, "label": self.label, "class": self.cls, "score": self.score}

    @classmethod
    def from_json(cls, raw: dict) -> "Hit":
        return cls(int(raw["id"]), raw["uri"], raw["label"], int(raw["class"]), float(raw["score"]))


@dataclass
class Shard:
    """One loaded shard.

    Attributes:
        vectors: (rows, dim) embeddings, memory-mapped (float32 or float16).
        index: the global-search FAISS index over all rows.
        heads: class -> its own approximate index (ids are positions within the class's range).
    """

    number: int
    vectors: np.ndarray
    ids: np.ndarray
    uris: pa.Array
    labels: pa.Array
    classes: np.ndarray
    index: faiss.Index = field(repr=False)
    exact: bool = True
    heads: dict[int, faiss.Index] = field(default_factory=dict, repr=False)
    dead: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def __post_init__(self) -> None:
        self._alive = None
        self._selectors: dict[tuple[int, int], tuple] = {}
        if len(self.dead):
            self._alive = np.ones(len(self.ids), dtype=bool)
            self._alive[self.dead] = False

    @property
    def live(self) -> int:
        return len(self.ids) - len(self.dead)

    def is_live(self, position: int) -> bool:
        return self._alive is None or bool(self._alive[position])

    def selector(self, start: int = 0, end: int | None = None) -> faiss.IDSelector | None:
        """A FAISS selector of the live rows among positions [start, end), numbered from ``start``
        (a head class's index numbers its rows so); None when none of them is deleted."""
        end = len(self.ids) if end is None else end
        if self._alive is None or self._alive[start:end].all():
            return None
        made = self._selectors.get((start, end))
        if made is None:  # the bitmap must outlive the selector: both are kept
            bits = np.packbits(self._alive[start:end], bitorder="little")
            made = self._selectors[(start, end)] = (faiss.IDSelectorBitmap(end - start, faiss.swig_ptr(bits)), bits)
        return made[0]

    def scan(self, query: np.ndarray, cls: int, start: int, end: int, k: int,
             params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, positions) of one class (positions [start, end)), best first: through the
        class's own index when it has one, else an exact scan; deleted rows never come back."""
        head = self.heads.get(cls)
        sel = self.selector(start, end)
        if head is not None:
            n = min(params.candidates(k), end - start)
            _, local = head.search(query[None], n, params=params.faiss_params(head, n, head=True, sel=sel))
            scores, positions = self.best(query[None], np.where(local >= 0, start + local, -1), k)
            keep = positions[0] >= 0
            return scores[0][keep], positions[0][keep]
        if self.vectors.dtype == np.float16:
            # FAISS computes on half floats directly; numpy would first convert every row (30x slower).
            # One scanner per thread, reused: its buffer keeps its size, so no fresh pages per call.
            scanner = getattr(self._local, "scanner", None)
            if scanner is None:
                scanner = self._local.scanner = faiss.IndexScalarQuantizer(
                    query.shape[0], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            scanner.reset()
            scanner.add_sa_codes(np.asarray(self.vectors[start:end]).view(np.uint8))
            scores, local = scanner.search(query[None], min(k, end - start),
                                           params=None if sel is None else faiss.SearchParameters(sel=sel))
            keep = local[0] >= 0
            return scores[0][keep], start + local[0][keep]
        sims = np.asarray(self.vectors[start:end], dtype=np.float32) @ query
        if sel is not None:
            alive = self._alive[start:end]
            sims, kept = sims[alive], np.flatnonzero(alive)
            top = self._top(sims, k)
            return sims[top], start + kept[top]
        top = self._top(sims, k)
        return sims[top], start + top

    @staticmethod
    def _top(sims: np.ndarray, k: int) -> np.ndarray:
        """Indices of the k best scores, best first (ties by index)."""
        if len(sims) > k:
            top = np.argpartition(-sims, k - 1)[:k]
            return top[np.lexsort((top, -sims[top]))]
        return np.lexsort((np.arange(len(sims)), -sims))

    def search(self, queries: np.ndarray, k: int, params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
        """Global top-k (scores, positions) of each query, (Q, k) each; -1 positions pad."""
        n = min(k if self.exact else params.candidates(k), self.live)
        scores, positions = self.index.search(queries, n, params=params.faiss_params(self.index, n, sel=self.selector()))
        if self.exact:
            return scores, positions
        return self.best(queries, positions, k)

    def best(self, queries: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-scores candidate positions (Q, n; -1 for none) exactly from the stored vectors and
        keeps the best k of each query (ties by position): (Q, k) scores and positions, -1 padded."""
        valid = positions >= 0
        rows = np.asarray(self.vectors[np.where(valid, positions, 0).ravel()], dtype=np.float32)
        scores = np.einsum("qnd,qd->qn", rows.reshape(*positions.shape, -1), queries)
        scores[~valid] = -np.inf
        order = np.lexsort((positions, -scores))[:, :k]
        scores, positions = np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)
        positions[~np.isfinite(scores)] = -1
        return scores, positions

    def hit(self, position: int, score: float) -> Hit:
        label = self.labels[position].as_py()
        return Hit(int(self.ids[position]), self.uris[position].as_py(), label, int(self.classes[position]),
                   float(score))


class ShardedIndex:
    """A loaded index (all shards, or the subset a serving replica owns).

    Attributes:
        manifest: the index manifest.
        shard_numbers: the shards loaded here.
        search_params: how its approximate indexes are searched (the manifest's, or ``load``'s
            ``search``).
    """

    def __init__(self, root: Location, manifest: IndexManifest, shards: list[Shard],
                 search: SearchParams | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.search_params = search or SearchParams.from_json(manifest.search)
        self._shards = {s.number: s for s in shards}
        self.shard_numbers = sorted(self._shards)
        self._class_map = {int(c): tuple(v) for c, v in manifest.classes.items()}
        self._positions: dict[int, tuple[int, int]] | None = None  # id -> (shard, position), built on first lookup

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def version(self) -> int:
        """The published version loaded (:mod:`pipeline.index.versions`)."""
        return self.manifest.version

    def __len__(self) -> int:
        return sum(s.live for s in self._shards.values())

    @classmethod
    def load(cls, index_dir: str | Path, *, expect_models: dict[str, str] | None = None,
             shards: Iterable[int] | None = None, verify: bool = True, use_gpu: str = "auto",
             search: SearchParams | None = None, heads: bool = True, version: int | None = None,
             reuse: "ShardedIndex | None" = None) -> "ShardedIndex":
        """Loads an index; vectors and FAISS files are memory-mapped, so RSS does not grow with them.

        Args:
            index_dir: the index folder, or an object store URI (``s3://bucket/prefix``): its manifest
                and the files of the shards loaded here are copied into a local cache
                (:func:`cached_copy`), each checked against its sha256, and loaded from there.
            expect_models: refuse the index unless it was built with these model specs
                (``{"classifier": spec, "embedder": spec}``).
            shards: load only these shard numbers (a serving replica's share); default all.
            verify: check every file's size and sha256 against the manifest.
            use_gpu: ``auto`` (FAISS GPU when available), ``yes`` or ``no``.
            search: search parameters instead of the ones the manifest records.
            heads: load the head classes' own indexes (False: every class is scanned exactly).
            version: a published version (default: the current one, which ``manifest.json`` names).
            reuse: a loaded version of the same index whose shards are taken over where the new
                version did not rewrite them (same files; new tombstones are read and applied): a
                service that follows the index loads only what changed, so a swap holds two copies
                of the rewritten shards only.

        Raises:
            FileNotFoundError: no manifest.
            IndexIntegrityError: a file is missing, truncated or corrupted.
            ValueError: the index was built with other models.
        """
        where = Location(index_dir)
        manifest = read_version(where, version)
        if expect_models:
            manifest.models.require(expect_models, f"the index {where}")
        numbers = range(len(manifest.shards)) if shards is None else list(shards)
        shared = {}  # shards whose files the held version already has mapped
        if reuse is not None and reuse.root == where:
            shared = {n: shard for n, shard in reuse._shards.items() if n < len(manifest.shards)
                      and reuse.manifest.shards[n].path == manifest.shards[n].path}
        if where.remote:
            root = cached_copy(where, manifest, [n for n in numbers if n not in shared])
            verify = False  # every file was just checked against its sha256
        else:
            root = where.path
        gpu = faiss_uses_gpu(use_gpu)
        loaded = []
        for number in numbers:
            if not 0 <= number < len(manifest.shards):
                raise ValueError(f"shard {number} does not exist (index has {len(manifest.shards)})")
            entry = manifest.shards[number]
            if number in shared:  # the same files; only its tombstones may have changed
                same = reuse.manifest.shards[number].deleted == entry.deleted
                loaded.append(shared[number] if same else replace(shared[number], dead=read_tombstones(where, entry)))
                continue
            if not heads:
                entry = replace(entry, heads=[])
            loaded.append(load_shard(root / entry.path, number, entry, verify, gpu,
                                     read_tombstones(Location(root), entry)))
        return cls(where, manifest, loaded, search)

    def lookup(self, image_id: int) -> Hit | None:
        """The gallery image with this id (score 1.0), or None when no loaded shard holds it."""
        if self._positions is None:
            self._positions = {int(i): (number, p) for number, shard in self._shards.items()
                               for p, i in enumerate(shard.ids)}
        where = self._positions.get(int(image_id))
        if where is None or not self._shards[where[0]].is_live(where[1]):
            return None
        return self._shards[where[0]].hit(where[1], 1.0)

    def search_class(self, queries: np.ndarray, classes: np.ndarray, k: int = 5, *,
                     min_score: float | None = None, search: SearchParams | None = None) -> list[list[Hit]]:
        """Approach 2: search among the images of each query's predicted classes only.

        A class with its own index (at least ``IndexConfig.head_min_rows`` images) is searched
        through it and its candidates re-scored exactly; smaller classes are scanned exactly.

        Args:
            queries: (Q, dim) L2-normalised query embeddings.
            classes: (Q, n) predicted class indices per query (top-n); -1 entries are ignored.
            k: results per query.
            min_score: drop results below this similarity.
            search: search parameters for this call (default: the index's ``search_params``).

        Returns:
            per query, up to k hits, best first.
        """
        params = search or self.search_params
        queries = self._check_queries(queries)
        classes = np.asarray(classes).reshape(len(queries), -1)
        results = []
        for query, query_classes in zip(queries, classes):
            scores, hits = [], []
            for cls in dict.fromkeys(int(c) for c in query_classes if c >= 0):
                where = self._class_map.get(cls)
                if where is None or where[0] not in self._shards:
                    continue
                shard = self._shards[where[0]]
                sims, positions = shard.scan(query, cls, where[1], where[2], k, params)
                scores.extend(sims)
                hits.extend((shard, int(p)) for p in positions)
            order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")[:k]
            found = [hits[i][0].hit(hits[i][1], scores[i]) for i in order]
            results.append(threshold(found, min_score))
        return results

    def search_global(self, queries: np.ndarray, k: int = 5, *, min_score: float | None = None,
                      search: SearchParams | None = None) -> list[list[Hit]]:
        """Every loaded shard's index searched with the whole batch of queries, merged by score
        (approximate indexes' candidates re-scored exactly, so scores are comparable).

        Args:
            queries: (Q, dim) L2-normalised query embeddings.
            k: results per query.
            min_score: drop results below this similarity.
            search: search parameters for this call (default: the index's ``search_params``).
        """
        params = search or self.search_params
        queries = self._check_queries(queries)
        found = [(shard, *shard.search(queries, k, params)) for shard in self._shards.values() if shard.live]
        if not found:
            return [[] for _ in queries]
        scores = np.concatenate([s for _, s, _ in found], axis=1)
        positions = np.concatenate([p for _, _, p in found], axis=1)
        owner = np.concatenate([np.full(p.shape[1], i) for i, (_, _, p) in enumerate(found)])
        scores[positions < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        results = []
        for q, row in enumerate(order):
            hits = [found[owner[j]][0].hit(int(positions[q, j]), float(scores[q, j]))
                    for j in row if positions[q, j] >= 0]
            results.append(threshold(hits, min_score))
        return results

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dim}")
        return queries


def threshold(hits: list[Hit], min_score: float | None) -> list[Hit]:
    return hits if min_score is None else [h for h in hits if h.score >= min_score]


def cached_copy(index: Location, manifest: IndexManifest, shards: Iterable[int],
                cache: str | Path | None = None) -> Path:
    """A local copy of an object-store index (its manifest and the files of ``shards``).

    The copy lives in ``cache/index-<hash of the URI>`` (default ``$LOOKALIKE_CACHE`` or
    ``~/.cache/lookalike``). A file already there is kept when its sha256 matches the manifest, else
    downloaded again; a download whose sha256 does not match raises IndexIntegrityError. Files go
    in under temporary names, so replicas sharing a node (and a cache) may fill it at once.
    """
    cache = Path(cache or os.environ.get("LOOKALIKE_CACHE") or DEFAULT_CACHE).expanduser()
    root = cache / f"index-{hashlib.blake2b(index.uri.encode(), digest_size=8).hexdigest()}"
    fetched = kept = 0
    for number in shards:
        if not 0 <= number < len(manifest.shards):
            raise ValueError(f"shard {number} does not exist (index has {len(manifest.shards)})")
        entry = manifest.shards[number]
        files = {f"{entry.path}/{name}": facts for name, facts in entry.files.items()}
        if entry.deleted:
            files[entry.deleted["path"]] = entry.deleted
        for name, facts in files.items():
            local = root / name
            if local.is_file() and local.stat().st_size == facts["bytes"] and sha256_file(local) == facts["sha256"]:
                kept += 1
                continue
            source = index / name
            try:
                digest = source.download(local)
            except FileNotFoundError:
                raise IndexIntegrityError(f"index file {source} is missing") from None
            if digest != facts["sha256"]:
                local.unlink(missing_ok=True)
                raise IndexIntegrityError(f"index file {source} is corrupted: its sha256 does not match the manifest")
            fetched += 1
    _prune_cache(root, manifest)
    manifest.write(root)
    logger.info("index %s: %d files downloaded, %d already in the cache %s", index, fetched, kept, root)
    return root


def _prune_cache(root: Path, manifest: IndexManifest) -> None:
    """Removes the cached files of versions older than the one before ``manifest`` (the cache
    keeps the version being loaded and the one it replaces, which this node may still serve;
    files a process has mapped stay readable to it after removal)."""
    keep = referenced(manifest)
    try:
        previous = IndexManifest.read(root)
    except (OSError, ValueError):
        previous = None
    if previous is not None:
        keep = (keep[0] | referenced(previous)[0], keep[1] | referenced(previous)[1])
    for folder in (root / "shards").glob("*"):
        if folder.is_dir() and f"shards/{folder.name}" not in keep[0]:
            shutil.rmtree(folder, ignore_errors=True)
    for file in (root / "tombstones").glob("*.npy"):
        if f"tombstones/{file.name}" not in keep[1]:
            file.unlink(missing_ok=True)


def load_shard(directory: Path, number: int, entry: ShardEntry, verify: bool, gpu: bool,
               dead: np.ndarray | None = None) -> Shard:
    for name, facts in entry.files.items():
        path = directory / name
        if not path.is_file():
            raise IndexIntegrityError(f"index file {path} is missing")
        if path.stat().st_size != facts["bytes"]:
            raise IndexIntegrityError(f"index file {path} is truncated or altered: "
                                      f"{path.stat().st_size} bytes, manifest says {facts['bytes']}")
        if verify and sha256_file(path) != facts["sha256"]:
            raise IndexIntegrityError(f"index file {path} is corrupted: its sha256 does not match the manifest")
    try:
        vectors = np.load(directory / "vectors.npy", mmap_mode="r")
        rows = pq.read_table(directory / "rows.parquet", memory_map=True)
        index = read_faiss(directory / "index.faiss", entry.index_type)
        heads = {int(cls): read_faiss(directory / head_file(int(cls)), "hnsw-sq8") for cls in entry.heads}
    except (OSError, ValueError, RuntimeError, pa.ArrowException) as exc:
        raise IndexIntegrityError(f"cannot read shard {directory}: {exc}") from None
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if not (len(vectors) == rows.num_rows == index.ntotal == entry.rows):
        raise IndexIntegrityError(f"shard {directory}: vectors {len(vectors)}, rows {rows.num_rows}, "
                                  f"index {index.ntotal}, manifest {entry.rows} disagree")
    return Shard(number, vectors, rows.column("id").to_numpy(), rows.column("uri").combine_chunks(),
                 rows.column("label").combine_chunks(), rows.column("class").to_numpy(), index,
                 exact=is_exact(entry.index_type), heads=heads,
                 dead=np.zeros(0, np.int64) if dead is None else dead)


def read_faiss(path: Path, kind: str) -> faiss.Index:
    """A FAISS index file of ``kind``, memory-mapped: IVF lists, or the codes of the other types."""
    mmap = faiss.IO_FLAG_MMAP if kind in ("ivf", "ivfpq") else faiss.IO_FLAG_MMAP_IFC
    return faiss.read_index(str(path), mmap | faiss.IO_FLAG_READ_ONLY)
