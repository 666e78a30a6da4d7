"""A loaded index: the shards a process holds (memory-mapped) and the two searches over them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.files import sha256_file
from pipeline.index.faiss_index import faiss_uses_gpu, ivf_of, set_search_params
from pipeline.manifests import IndexManifest


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


class IndexIntegrityError(ValueError):
    """An index file is missing, truncated or corrupted (the message names the file)."""


@dataclass
class Shard:
    number: int
    vectors: np.ndarray          # memory-mapped (rows, dim)
    ids: np.ndarray
    uris: pa.Array
    labels: pa.Array
    classes: np.ndarray
    index: faiss.Index = field(repr=False)

    def scan(self, query: np.ndarray, start: int, end: int, k: int, exact_max_rows: int | None,
             nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, positions) among positions [start, end), best first."""
        if exact_max_rows is not None and end - start > exact_max_rows:
            ivf = ivf_of(self.index)
            if ivf is not None:
                # Positions are the FAISS ids and each inverted list stores them in ascending order,
                # so a sorted range selector bisects each visited list instead of testing every id.
                params = faiss.SearchParametersIVF(sel=faiss.IDSelectorRange(start, end, True),
                                                   nprobe=min(nprobe, ivf.nlist))
                scores, positions = self.index.search(query[None], k, params=params)
                keep = positions[0] >= 0
                return scores[0][keep], positions[0][keep]
        sims = np.asarray(self.vectors[start:end], dtype=np.float32) @ query
        if len(sims) > k:
            top = np.argpartition(-sims, k - 1)[:k]
            top = top[np.lexsort((top, -sims[top]))]
        else:
            top = np.lexsort((np.arange(len(sims)), -sims))
        return sims[top], start + top

    def hit(self, position: int, score: float) -> Hit:
        label = self.labels[position].as_py()
        return Hit(int(self.ids[position]), self.uris[position].as_py(), label, int(self.classes[position]),
                   float(score))


class ShardedIndex:
    """A loaded index (all shards, or the subset a serving replica owns).

    Attributes:
        manifest: the index manifest.
        shard_numbers: the shards loaded here.
    """

    def __init__(self, root: Path, manifest: IndexManifest, shards: list[Shard]) -> None:
        self.root = root
        self.manifest = manifest
        self._shards = {s.number: s for s in shards}
        self.shard_numbers = sorted(self._shards)
        self._class_map = {int(c): tuple(v) for c, v in manifest.classes.items()}
        self._positions: dict[int, tuple[int, int]] | None = None  # id -> (shard, position), built on first lookup

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def __len__(self) -> int:
        return sum(len(s.ids) for s in self._shards.values())

    @classmethod
    def load(cls, index_dir: str | Path, *, expect_models: dict[str, str] | None = None,
             shards: Iterable[int] | None = None, verify: bool = True, use_gpu: str = "auto") -> "ShardedIndex":
        """Loads an index; vectors and IVF lists are memory-mapped, so RSS does not grow with it.

        Args:
            index_dir: the index folder.
            expect_models: refuse the index unless it was built with these model specs
                (``{"classifier": spec, "embedder": spec}``).
            shards: load only these shard numbers (a serving replica's share); default all.
            verify: check every file's size and sha256 against the manifest.
            use_gpu: ``auto`` (FAISS GPU when available), ``yes`` or ``no``.

        Raises:
            FileNotFoundError: no manifest.
            IndexIntegrityError: a file is missing, truncated or corrupted.
            ValueError: the index was built with other models.
        """
        root = Path(index_dir)
        manifest = IndexManifest.read(root)
        if expect_models:
            manifest.models.require(expect_models, f"the index {root}")
        numbers = range(len(manifest.shards)) if shards is None else list(shards)
        gpu = faiss_uses_gpu(use_gpu)
        loaded = []
        for number in numbers:
            if not 0 <= number < len(manifest.shards):
                raise ValueError(f"shard {number} does not exist (index has {len(manifest.shards)})")
            entry = manifest.shards[number]
            loaded.append(load_shard(root / entry["path"], number, entry, verify, gpu))
        return cls(root, manifest, loaded)

    def lookup(self, image_id: int) -> Hit | None:
        """The gallery image with this id (score 1.0), or None when no loaded shard holds it."""
        if self._positions is None:
            self._positions = {int(i): (number, p) for number, shard in self._shards.items()
                               for p, i in enumerate(shard.ids)}
        where = self._positions.get(int(image_id))
        return None if where is None else self._shards[where[0]].hit(where[1], 1.0)

    def owns_class(self, cls: int) -> bool:
        """Whether the class's images are in a shard loaded here."""
        where = self._class_map.get(int(cls))
        return where is not None and where[0] in self._shards

    def class_size(self, cls: int) -> int:
        """Gallery images of a class (0 for a class with none)."""
        where = self._class_map.get(int(cls))
        return 0 if where is None else where[2] - where[1]

    def search_class(self, queries: np.ndarray, classes: np.ndarray, k: int = 5, *,
                     min_score: float | None = None, fallback_global: bool = False,
                     exact_max_rows: int | None = None, nprobe: int = 32) -> list[list[Hit]]:
        """Approach 2: search among the images of each query's predicted classes only.

        Args:
            queries: (Q, dim) L2-normalised query embeddings.
            classes: (Q, n) predicted class indices per query (top-n); -1 entries are ignored.
            k: results per query.
            min_score: drop results below this similarity.
            fallback_global: when the classes hold fewer than k images (here), fill up from a
                global search.
            exact_max_rows: classes up to this size are scanned exactly (the default, None, scans
                every class exactly). A larger class in a shard with an IVF index is searched
                through that index restricted to the class's position range, visiting ``nprobe``
                lists: approximate, but its cost no longer grows with the class.
            nprobe: IVF lists visited for such large classes.

        Returns:
            per query, up to k hits, best first.
        """
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
                sims, positions = shard.scan(query, where[1], where[2], k, exact_max_rows, nprobe)
                scores.extend(sims)
                hits.extend((shard, int(p)) for p in positions)
            order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")[:k]
            found = [hits[i][0].hit(hits[i][1], scores[i]) for i in order]
            if fallback_global and len(found) < k:
                seen = {h.id for h in found}
                extra = self.search_global(query[None], k + len(found))[0]
                found += [h for h in extra if h.id not in seen][: k - len(found)]
            results.append(threshold(found, min_score))
        return results

    def search_global(self, queries: np.ndarray, k: int = 5, *, min_score: float | None = None,
                      nprobe: int = 32, ef_search: int = 128) -> list[list[Hit]]:
        """Scatter-gather over the loaded shards' FAISS indexes, merged by score.

        Args:
            queries: (Q, dim) L2-normalised query embeddings.
            k: results per query.
            min_score: drop results below this similarity.
            nprobe: IVF lists visited per shard (recall/speed trade-off).
            ef_search: HNSW search breadth.
        """
        queries = self._check_queries(queries)
        per_query: list[list[tuple[float, Shard, int]]] = [[] for _ in range(len(queries))]
        for shard in self._shards.values():
            if shard.index.ntotal == 0:
                continue
            set_search_params(shard.index, nprobe, ef_search)
            scores, positions = shard.index.search(queries, min(k, shard.index.ntotal))
            for q in range(len(queries)):
                per_query[q].extend((float(s), shard, int(p)) for s, p in zip(scores[q], positions[q]) if p >= 0)
        results = []
        for candidates in per_query:
            candidates.sort(key=lambda c: -c[0])
            results.append(threshold([shard.hit(pos, score) for score, shard, pos in candidates[:k]], min_score))
        return results

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dim}")
        return queries


def threshold(hits: list[Hit], min_score: float | None) -> list[Hit]:
    return hits if min_score is None else [h for h in hits if h.score >= min_score]


def load_shard(directory: Path, number: int, entry: dict, verify: bool, gpu: bool) -> Shard:
    for name, facts in entry["files"].items():
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
        index = faiss.read_index(str(directory / "index.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except (OSError, ValueError, RuntimeError, pa.ArrowException) as exc:
        raise IndexIntegrityError(f"cannot read shard {directory}: {exc}") from None
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if not (len(vectors) == rows.num_rows == index.ntotal == entry["rows"]):
        raise IndexIntegrityError(f"shard {directory}: vectors {len(vectors)}, rows {rows.num_rows}, "
                                  f"index {index.ntotal}, manifest {entry['rows']} disagree")
    return Shard(number, vectors, rows.column("id").to_numpy(), rows.column("uri").combine_chunks(),
                  rows.column("label").combine_chunks(), rows.column("class").to_numpy(), index)
