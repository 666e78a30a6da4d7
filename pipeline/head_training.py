"""Fitting a classifier head (:mod:`pipeline.models.head`) on an embedding output's stored vectors and
labels: no image is decoded again.

Rows are split by id (a stable hash of the uri), per label: in each label, the ``held_out`` fraction
of rows that come first in a fixed scrambling of their ids (at least one, for a label with two or
more rows) is held out; the rest train the head with mini-batch AdamW and cross-entropy. The held-out rows then fit the temperature
(the one scalar that minimises their negative log-likelihood, so a gated strategy's threshold reads
as a probability) and give the accuracy that is reported. Rows without a label are skipped.

Two ways to read the rows, each epoch in a new seeded order through a shuffle buffer of
:data:`SHUFFLE_BATCHES` batches:

- on this machine (the default): the parts are streamed one at a time, so an output larger than
  memory trains here; up to :data:`CACHE_BYTES` of parts stay in memory between epochs;
- with Ray Data (``ray_data=True``): Ray tasks read the parts across the cluster once and keep the
  rows in the cluster's object store between epochs, so an output larger than one machine's memory
  trains without reading its parts again; this process only receives the batches. Ray Data's block
  order is not reproducible to the bit, so two such fits agree closely, not exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch

from pipeline.models.head import HeadNet
from pipeline.storage import Location

logger = logging.getLogger(__name__)

#: Parts are kept in memory between epochs up to this many bytes of vectors; the rest are read again.
CACHE_BYTES = 2 * 2**30
#: Training rows are shuffled across parts in a buffer of this many batches.
SHUFFLE_BATCHES = 64


@dataclass(frozen=True)
class HeadSettings:
    """How a head is fitted.

    Attributes:
        hidden: width of the hidden layer (0: a linear head).
        epochs: passes over the training rows.
        batch_size: rows per step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        held_out: fraction of rows held out for the temperature and the accuracy.
        seed: of the initialisation and the shuffling.
    """

    hidden: int = 0
    epochs: int = 30
    batch_size: int = 256
    lr: float = 5e-2
    weight_decay: float = 1e-4
    held_out: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden < 0 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("hidden must be >= 0, epochs and batch_size >= 1, lr > 0, weight_decay >= 0")
        if not 0 < self.held_out < 1:
            raise ValueError(f"held_out must be between 0 and 1, got {self.held_out}")


@dataclass(frozen=True)
class FittedHead:
    """A fitted head and how it did."""

    net: HeadNet
    labels: list[str]            # class index -> label
    temperature: float
    accuracy: float              # top-1 on the held-out rows
    train_rows: int
    held_out_rows: int
    held_out_nll: tuple[float, float]   # before and after the temperature
    seconds: float


def held_out_ids(ids: np.ndarray, labels: np.ndarray, fraction: float) -> np.ndarray:
    """The held-out ids, sorted: per label, the first ``ceil(fraction * n)`` of its ``n`` ids in a
    fixed scrambling (none for a label with one row). Decided by the ids alone, so every pass and
    every process agrees."""
    ids = np.asarray(ids, dtype=np.int64)
    scrambled = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) >= 2:
            take = max(1, int(np.ceil(fraction * len(members))))
            chosen.append(ids[members[np.argsort(scrambled[members], kind="stable")[:take]]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_set, values).clip(max=len(sorted_set) - 1)
    return sorted_set[pos] == values


def read_labelled(part: Location) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One embedding part's labelled rows: ids (int64), labels (object) and vectors (float32)."""
    table = part.read_parquet(["id", "label", "embedding"])
    table = table.filter(pc.is_valid(table.column("label")))
    emb = table.column("embedding").combine_chunks()
    vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size).astype(np.float32)
    return (table.column("id").to_numpy(), np.asarray(table.column("label").to_pylist(), dtype=object), vectors)


def read_labelled_ids(part: Location) -> tuple[np.ndarray, np.ndarray]:
    """One part's labelled rows: ids (int64) and labels (object); reads those two columns only."""
    table = part.read_parquet(["id", "label"])
    table = table.filter(pc.is_valid(table.column("label")))
    return table.column("id").to_numpy(), np.asarray(table.column("label").to_pylist(), dtype=object)


def labelled_ids(parts: list[Location]) -> tuple[np.ndarray, np.ndarray]:
    """The ids and labels of the parts' labelled rows."""
    read = [read_labelled_ids(part) for part in parts]
    return (np.concatenate([r[0] for r in read]) if read else np.zeros(0, np.int64),
            np.concatenate([r[1] for r in read]) if read else np.zeros(0, object))


def fit_head(parts: list[Location], settings: HeadSettings = HeadSettings(),
             progress: Callable[[str], None] = logger.info, ray_data: bool = False) -> FittedHead:
    """Fits a head on the labelled rows of embedding parts.

    Args:
        ray_data: read the rows with Ray Data on the Ray this process is connected to (see the
            module's docstring); the caller connects first.

    Raises:
        ValueError: fewer than two labels, or no held-out rows (too few rows).
    """
    start = time.perf_counter()
    all_ids, all_labels = _ray_labelled_ids(parts) if ray_data else labelled_ids(parts)
    labels = sorted(set(all_labels.tolist()))
    held_out = held_out_ids(all_ids, all_labels, settings.held_out)
    if len(labels) < 2:
        raise ValueError(f"a classifier head needs at least two labels; the rows have {len(labels)}")
    index = {label: i for i, label in enumerate(labels)}
    rows = (_RayDataRows if ray_data else _LocalRows)(parts, held_out, index, settings.batch_size)

    dim = read_labelled(parts[0])[2].shape[1]
    torch.manual_seed(settings.seed)
    net = HeadNet(dim, len(labels), settings.hidden)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    train_rows = 0
    for epoch in range(settings.epochs):
        net.train()
        total, seen = 0.0, 0
        for x, y in rows.batches(settings.seed * 1_000_003 + epoch, held=False):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        schedule.step()
        train_rows = seen
        if epoch == 0 or (epoch + 1) % max(1, settings.epochs // 5) == 0 or epoch + 1 == settings.epochs:
            progress(f"epoch {epoch + 1}/{settings.epochs}: loss {total / max(seen, 1):.4f} on {seen} rows")
    if train_rows == 0:
        raise ValueError("no training rows: every labelled row fell in the held-out part")
    net.eval()
    with torch.inference_mode():
        held = [(net(x), y) for x, y in rows.batches(0, held=True)]
    if not held:
        raise ValueError(f"no held-out rows among {train_rows}: every label has a single row")
    logits, targets = torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])
    temperature, before, after = fit_temperature(logits, targets)
    accuracy = float((logits.argmax(dim=1) == targets).float().mean())
    return FittedHead(net, labels, temperature, accuracy, train_rows, len(targets), (before, after),
                      time.perf_counter() - start)


class _LocalRows:
    """The rows streamed from the parts on this machine (up to :data:`CACHE_BYTES` cached)."""

    def __init__(self, parts: list[Location], held_out: np.ndarray, index: dict[str, int], batch_size: int) -> None:
        self.parts, self.held_out, self.index, self.batch_size = parts, held_out, index, batch_size
        self.cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def part(self, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Part ``p``'s held-out flags, class indices and vectors."""
        if p in self.cache:
            return self.cache[p]
        ids, names, vectors = read_labelled(self.parts[p])
        found = (_member(ids, self.held_out), np.array([self.index[n] for n in names], dtype=np.int64), vectors)
        if sum(c[2].nbytes for c in self.cache.values()) + vectors.nbytes <= CACHE_BYTES:
            self.cache[p] = found
        return found

    def batches(self, order_seed: int, held: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the training (or held-out) rows: parts in a seeded order through a shuffle
        buffer of :data:`SHUFFLE_BATCHES` batches (outputs are written in many small parts)."""
        rng = np.random.default_rng(order_seed)
        size = self.batch_size
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []

        def drain(final: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            x, y = np.concatenate(xs), np.concatenate(ys)
            xs.clear()
            ys.clear()
            order = np.arange(len(y)) if held else rng.permutation(len(y))
            full = len(y) if final else len(y) // size * size
            for s in range(0, full, size):
                take = order[s: min(s + size, full)]
                yield torch.from_numpy(x[take]), torch.from_numpy(y[take])
            if full < len(y):  # the rest waits for the next parts
                xs.append(x[order[full:]])
                ys.append(y[order[full:]])

        for p in range(len(self.parts)) if held else rng.permutation(len(self.parts)):
            flags, classes, vectors = self.part(p)
            keep = flags == held
            xs.append(vectors[keep])
            ys.append(classes[keep])
            if sum(len(y) for y in ys) >= SHUFFLE_BATCHES * size:
                yield from drain(final=False)
        if ys:
            yield from drain(final=True)


def _read_ids(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data: the labelled ids and labels of the parts named in ``batch["uri"]``."""
    read = [read_labelled_ids(Location(str(uri))) for uri in batch["uri"]]
    return {"id": np.concatenate([r[0] for r in read]), "label": np.concatenate([r[1] for r in read])}


def _read_rows(batch: dict[str, np.ndarray], held_out: np.ndarray, index: dict[str, int],
               held: bool) -> dict[str, np.ndarray]:
    """Ray Data: the training (or held-out) rows of the parts named in ``batch["uri"]``, as vectors
    ``x`` and class indices ``y``."""
    xs, ys = [], []
    for uri in batch["uri"]:
        ids, names, vectors = read_labelled(Location(str(uri)))
        keep = _member(ids, held_out) == held
        xs.append(vectors[keep])
        ys.append(np.array([index[n] for n in names[keep]], dtype=np.int64))
    return {"x": np.concatenate(xs), "y": np.concatenate(ys)}


def _uris(parts: list[Location]):
    """The parts' URIs as a dataset of a few blocks per CPU of the cluster: each block is one Ray
    task that reads its parts one at a time (a job writes many small parts; a task per part would
    cost more than the reading)."""
    import ray
    import ray.data

    blocks = min(len(parts), max(1, int(ray.cluster_resources().get("CPU", 1))) * 4)
    return ray.data.from_items([{"uri": p.uri} for p in parts], override_num_blocks=blocks)


def _ray_labelled_ids(parts: list[Location]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`labelled_ids`, the parts read by Ray tasks."""
    ids, labels = [np.zeros(0, np.int64)], [np.zeros(0, object)]
    for batch in _uris(parts).map_batches(_read_ids, batch_size=1).iter_batches(batch_size=None,
                                                                                  batch_format="numpy"):
        ids.append(batch["id"])
        labels.append(np.asarray(batch["label"], dtype=object))
    return np.concatenate(ids).astype(np.int64), np.concatenate(labels)


class _RayDataRows:
    """The rows read once by Ray tasks across the cluster and kept in its object store: one
    materialised dataset of training rows, one of held-out rows."""

    def __init__(self, parts: list[Location], held_out: np.ndarray, index: dict[str, int], batch_size: int) -> None:
        self.batch_size = batch_size
        self.rows = {held: _uris(parts).map_batches(_read_rows, batch_size=1,
                                                    fn_kwargs={"held_out": held_out, "index": index, "held": held})
                     .materialize() for held in (False, True)}

    def batches(self, order_seed: int, held: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the training rows (blocks in a seeded order through a shuffle buffer of
        :data:`SHUFFLE_BATCHES` batches), or of the held-out rows."""
        rows = self.rows[held]
        shuffle = {} if held else {"local_shuffle_buffer_size": SHUFFLE_BATCHES * self.batch_size,
                                   "local_shuffle_seed": order_seed}
        if not held:
            rows = rows.randomize_block_order(seed=order_seed)
        for batch in rows.iter_batches(batch_size=self.batch_size, batch_format="numpy", **shuffle):
            yield torch.from_numpy(np.array(batch["x"], dtype=np.float32)), torch.from_numpy(
                np.array(batch["y"], dtype=np.int64))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
    """The temperature T minimising the negative log-likelihood of ``softmax(logits / T)``: a
    log-spaced search over [0.05, 20], then a finer one around the best.

    Returns:
        ``(T, nll at T = 1, nll at T)``.
    """
    def nll(t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / t, targets))

    grid = np.geomspace(0.05, 20.0, 61)
    best = min(grid, key=nll)
    fine = np.geomspace(best / 1.12, best * 1.12, 41)
    best = float(min(fine, key=nll))
    return best, nll(1.0), nll(best)
