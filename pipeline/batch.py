"""The CPU stages of the embedding job as plain callables over ``dict[str, np.ndarray]`` batches.

Ray Data maps them (``pipeline/embed_job.py``); tests call them directly. Each stage adds its busy
seconds per row to a ``*_s`` column so the job can report throughput per stage.

    ReadShards  shard descriptions -> id, uri, label, version, data (bytes), read_error; images
                                      already done at their version are listed, not read
    DecodeImages                   -> id, uri, label, version, image_<name> (uint8, per model input);
                                      failures are written as error parts and dropped
    (pipeline.model_stages)        -> classes, class_probs, embedding
    WriteParts                     -> one parquet part per batch, then its record; returns (part, rows, seconds)

This module imports no torch and no model library, so the read and decode workers start light; the
model stages are in :mod:`pipeline.model_stages`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.images import DEFAULT_MAX_PIXELS, ImageDecodeError, Preprocess, decode_image, resize_image
from pipeline.parts import write_part
from pipeline.sources import Shard, read_shard, uri_id
from pipeline.storage import Location

logger = logging.getLogger(__name__)

#: Error rows. ``version``: the image's version when it failed (:attr:`pipeline.sources.Item.version`;
#: absent in parts written before versions existed).
ERROR_SCHEMA = pa.schema([("id", pa.int64()), ("uri", pa.string()), ("stage", pa.string()),
                          ("error_type", pa.string()), ("message", pa.string()), ("version", pa.string())])


def embedding_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """The schema of embedding rows (docs/ARCHITECTURE.md, on-disk contracts)."""
    value_type = {"float32": pa.float32(), "float16": pa.float16()}[dtype]
    return pa.schema([
        ("id", pa.int64()), ("uri", pa.string()), ("label", pa.string()),
        ("classes", pa.list_(pa.int32())), ("class_probs", pa.list_(pa.float32())),
        ("embedding", pa.list_(value_type, dim)), ("version", pa.string()),
    ])


def part_name(ids: np.ndarray, run: int | None = None) -> str:
    """A part's file name from the ids it holds (and the run that writes it): a retried batch
    overwrites itself, never duplicates; a later run's part never overwrites an earlier one's."""
    digest = hashlib.blake2b(np.sort(np.asarray(ids, dtype=np.int64)).tobytes()
                             + (f"|run {run}".encode() if run else b""), digest_size=10).hexdigest()
    return f"part-{digest}.parquet"


def version_hash(version: str) -> int:
    """A version string as a positive int64 (0 for "", the unknown version, which matches any)."""
    if not version:
        return 0
    return int.from_bytes(hashlib.blake2b(version.encode("utf-8"), digest_size=8).digest(), "big") & ((1 << 63) - 1) or 1


def version_hashes(versions) -> np.ndarray:
    """:func:`version_hash` of each version (None counts as "")."""
    return np.fromiter((version_hash(v or "") for v in versions), dtype=np.int64)


# --------------------------------------------------------------------------------------------


class ReadShards:
    """Lists and reads the images of each shard; skips images already done at their version.

    Args:
        done_ids: int64 ids present in earlier outputs (any order).
        listings: where to save, for each tar or parquet shard read whole, the ids it holds
            (:func:`save_listing`), so that a later run can tell the shard is done without reading
            it (:func:`pipeline.embed_output.pending_shards`); None: nowhere.
        done_versions: for each done id, the :func:`version_hash` of the version it was done at;
            an image whose version now differs is read again (0, or None for all: done at any version).
    """

    def __init__(self, done_ids: np.ndarray | None = None, listings: str | Location | None = None,
                 done_versions: np.ndarray | None = None) -> None:
        ids = np.asarray(done_ids if done_ids is not None else [], dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        self.done_ids = ids[order]
        self.done_versions = (np.zeros(len(ids), np.int64) if done_versions is None
                              else np.asarray(done_versions, dtype=np.int64)[order])
        self.listings = None if listings is None else Location(listings)

    def _done(self, item_id: int, version: str) -> bool:
        i = np.searchsorted(self.done_ids, item_id)
        if not (i < len(self.done_ids) and self.done_ids[i] == item_id):
            return False
        known = int(self.done_versions[i])
        return not version or known == 0 or known == version_hash(version)

    def _want(self, uri: str, version: str) -> bool:
        return not self._done(uri_id(uri), version)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        ids, uris, labels, versions, datas, errors = [], [], [], [], [], []
        for shard_json in batch["shard"]:
            shard = Shard(**json.loads(shard_json))
            listed = []
            for item in read_shard(shard, want=self._want):
                item_id = uri_id(item.uri)
                listed.append(item_id)
                if item.skipped:
                    continue
                ids.append(item_id)
                uris.append(item.uri)
                # "" rather than None: Ray turns an all-None column into NaNs.
                labels.append(item.label or "")
                versions.append(item.version)
                datas.append(item.data if item.data is not None else b"")
                errors.append(item.error or "")
            if self.listings is not None and shard.listing_key:
                save_listing(self.listings, shard.listing_key, np.array(listed, dtype=np.int64))
        n = len(ids)
        seconds = (time.perf_counter() - start) / max(n, 1)
        return {
            "id": np.array(ids, dtype=np.int64), "uri": np.array(uris, dtype=object),
            "label": np.array(labels, dtype=object), "version": np.array(versions, dtype=object),
            "data": np.array(datas, dtype=object),
            "read_error": np.array(errors, dtype=object), "read_s": np.full(n, seconds, dtype=np.float32),
        }


def save_listing(listings: Location, key: str, ids: np.ndarray) -> None:
    """Saves the ids a shard holds as ``listings/KEY.npy`` (sorted int64)."""
    buffer = io.BytesIO()
    np.save(buffer, np.sort(ids))
    (listings / f"{key}.npy").write_bytes(buffer.getvalue())


def load_listing(listings: Location, key: str) -> np.ndarray:
    return np.load(io.BytesIO((listings / f"{key}.npy").read_bytes()))


def shard_to_row(shard: Shard) -> dict[str, str]:
    """The row that carries a shard into :class:`ReadShards`."""
    payload = asdict(shard)
    payload["members"] = list(shard.members)
    payload["versions"] = list(shard.versions)
    return {"shard": json.dumps(payload)}


def write_errors(failures: list[tuple], errors_dir: str | Path | Location, run: int | None = None) -> None:
    """Writes ``(id, uri, stage, error_type, message[, version])`` rows as one committed error part
    (nothing if none), recording the ``run`` that wrote it."""
    if not failures:
        return
    rows = [tuple(f) + ("",) * (len(ERROR_SCHEMA) - len(f)) for f in failures]
    columns = list(zip(*rows))
    table = pa.table({field.name: pa.array(col, type=field.type) for field, col in zip(ERROR_SCHEMA, columns)})
    write_part(Location(errors_dir), part_name(np.array(columns[0]), run), table, _run_record(run))


def _run_record(run: int | None) -> dict:
    return {"run": int(run)} if run else {}


def _versions(batch: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The batch's ``version`` column ("" each when it has none: callers outside the job)."""
    return batch["version"] if "version" in batch else np.full(n, "", dtype=object)


class DecodeImages:
    """Decodes each image once and resizes it to every model's input.

    Failures (unreadable, undecodable) are written to ``errors_dir`` as one parquet part per batch
    and dropped from the output, so every input ends up in exactly one of the two outputs.

    Args:
        inputs: model input name -> its preprocessing (e.g. ``{"cls": ..., "emb": ...}``); names
            that share a preprocessing share one resized array.
        errors_dir: where error parts go (a local folder or an object store URI).
        max_pixels: decode guard (see :func:`pipeline.images.decode_image`).
        run: the embedding run its error parts are recorded under (None: none recorded).
    """

    def __init__(self, inputs: dict[str, Preprocess], errors_dir: str | Path | Location,
                 max_pixels: int = DEFAULT_MAX_PIXELS, run: int | None = None) -> None:
        if not inputs:
            raise ValueError("DecodeImages needs at least one model input")
        self.inputs = inputs
        self.errors_dir = Location(errors_dir)
        self.max_pixels = max_pixels
        self.run = run
        self.draft_size = max(p.draft_size for p in inputs.values())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        keep: list[int] = []
        resized: dict[str, list[np.ndarray]] = {name: [] for name in self.inputs}
        failures: list[tuple[int, str, str, str, str, str]] = []
        versions = _versions(batch, len(batch["id"]))
        for i, (item_id, uri, data, read_error, version) in enumerate(
                zip(batch["id"], batch["uri"], batch["data"], batch["read_error"], versions)):
            if read_error:
                failures.append((int(item_id), str(uri), "read", "unreadable", str(read_error), str(version)))
                continue
            try:
                image = decode_image(bytes(data), max_pixels=self.max_pixels, draft_size=self.draft_size)
            except ImageDecodeError as exc:
                failures.append((int(item_id), str(uri), "decode", exc.reason, str(exc), str(version)))
                continue
            cache: dict[Preprocess, np.ndarray] = {}
            for name, pre in self.inputs.items():
                if pre not in cache:
                    cache[pre] = resize_image(image, pre)
                resized[name].append(cache[pre])
            keep.append(i)
        write_errors(failures, self.errors_dir, self.run)
        if not keep:
            return {}  # an empty block (a 0-row tensor column would not convert to Arrow)
        idx = np.array(keep, dtype=np.int64)
        seconds = (time.perf_counter() - start) / max(len(batch["id"]), 1)
        out = {"id": batch["id"][idx], "uri": batch["uri"][idx], "label": batch["label"][idx],
               "version": versions[idx],
               "read_s": batch["read_s"][idx], "decode_s": np.full(len(idx), seconds, dtype=np.float32)}
        for name in self.inputs:
            out[f"image_{name}"] = np.stack(resized[name])
        return out


class WriteParts:
    """Writes each batch as one committed parquet part (:mod:`pipeline.parts`) and returns a one-row
    summary of it.

    Args:
        out_dir: the embeddings folder (a local folder or an object store URI).
        dim: embedding dimension.
        embedding_dtype: ``float32`` or ``float16``.
        run: the embedding run its parts are recorded under (None: none recorded, read as run 1).
    """

    def __init__(self, out_dir: str | Path | Location, dim: int, embedding_dtype: str = "float32",
                 run: int | None = None) -> None:
        self.out_dir = Location(out_dir)
        self.schema = embedding_schema(dim, embedding_dtype)
        self.dim = dim
        self.run = run

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch.get("id", ()))
        if n == 0:
            return {}
        start = time.perf_counter()
        embedding = np.ascontiguousarray(batch["embedding"]).reshape(-1)
        value_type = self.schema.field("embedding").type.value_type
        table = pa.table({
            "id": pa.array(batch["id"], pa.int64()),
            "uri": pa.array([str(u) for u in batch["uri"]], pa.string()),
            "label": pa.array([str(v) if isinstance(v, str) and v else None for v in batch["label"]], pa.string()),
            "classes": pa.array(list(np.asarray(batch["classes"], np.int32)), pa.list_(pa.int32())),
            "class_probs": pa.array(list(np.asarray(batch["class_probs"], np.float32)), pa.list_(pa.float32())),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embedding, value_type), self.dim),
            "version": pa.array([str(v) for v in _versions(batch, n)], pa.string()),
        }, schema=self.schema)
        name = part_name(batch["id"], self.run)
        write_part(self.out_dir, name, table, _run_record(self.run))
        worker = str(batch["worker"][0]) if "worker" in batch else "-"
        return {"part": np.array([name], dtype=object), "rows": np.array([n], dtype=np.int64),
                "worker": np.array([worker], dtype=object),
                "read_s": np.array([float(np.sum(batch["read_s"]))]),
                "decode_s": np.array([float(np.sum(batch["decode_s"]))]),
                "model_s": np.array([float(np.sum(batch["model_s"]))]),
                "write_s": np.array([time.perf_counter() - start]),
                "written_at": np.array([time.time()])}
