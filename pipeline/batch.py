"""The CPU stages of the embedding job as plain callables over ``dict[str, np.ndarray]`` batches.

Ray Data maps them (``pipeline/embed_job.py``); tests call them directly. Each stage adds its busy
seconds per row to a ``*_s`` column so the job can report throughput per stage.

    ReadShards  shard descriptions -> id, uri, label, data (bytes), read_error
    DecodeImages                   -> id, uri, label, image_<name> (uint8, per model input);
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

ERROR_SCHEMA = pa.schema([("id", pa.int64()), ("uri", pa.string()), ("stage", pa.string()),
                          ("error_type", pa.string()), ("message", pa.string())])


def embedding_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """The schema of embedding rows (docs/ARCHITECTURE.md, on-disk contracts)."""
    value_type = {"float32": pa.float32(), "float16": pa.float16()}[dtype]
    return pa.schema([
        ("id", pa.int64()), ("uri", pa.string()), ("label", pa.string()),
        ("classes", pa.list_(pa.int32())), ("class_probs", pa.list_(pa.float32())),
        ("embedding", pa.list_(value_type, dim)),
    ])


def part_name(ids: np.ndarray) -> str:
    """A part's file name from the ids it holds: a retried batch overwrites itself, never duplicates."""
    digest = hashlib.blake2b(np.sort(np.asarray(ids, dtype=np.int64)).tobytes(), digest_size=10).hexdigest()
    return f"part-{digest}.parquet"


# --------------------------------------------------------------------------------------------


class ReadShards:
    """Lists and reads the images of each shard; skips ids already done (resume).

    Args:
        done_ids: sorted int64 ids present in earlier outputs.
        listings: where to save, for each tar or parquet shard read whole, the ids it holds
            (:func:`save_listing`), so that a later run can tell the shard is done without reading
            it (:func:`pipeline.embed_output.pending_shards`); None: nowhere.
    """

    def __init__(self, done_ids: np.ndarray | None = None, listings: str | Location | None = None) -> None:
        self.done_ids = np.sort(np.asarray(done_ids if done_ids is not None else [], dtype=np.int64))
        self.listings = None if listings is None else Location(listings)

    def _done(self, item_id: int) -> bool:
        i = np.searchsorted(self.done_ids, item_id)
        return bool(i < len(self.done_ids) and self.done_ids[i] == item_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        ids, uris, labels, datas, errors = [], [], [], [], []
        for shard_json in batch["shard"]:
            shard = Shard(**json.loads(shard_json))
            listed = []
            for item in read_shard(shard):
                item_id = uri_id(item.uri)
                listed.append(item_id)
                if self._done(item_id):
                    continue
                ids.append(item_id)
                uris.append(item.uri)
                # "" rather than None: Ray turns an all-None column into NaNs.
                labels.append(item.label or "")
                datas.append(item.data if item.data is not None else b"")
                errors.append(item.error or "")
            if self.listings is not None and shard.listing_key:
                save_listing(self.listings, shard.listing_key, np.array(listed, dtype=np.int64))
        n = len(ids)
        seconds = (time.perf_counter() - start) / max(n, 1)
        return {
            "id": np.array(ids, dtype=np.int64), "uri": np.array(uris, dtype=object),
            "label": np.array(labels, dtype=object), "data": np.array(datas, dtype=object),
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
    return {"shard": json.dumps(payload)}


def write_errors(failures: list[tuple[int, str, str, str, str]], errors_dir: str | Path | Location) -> None:
    """Writes ``(id, uri, stage, error_type, message)`` rows as one committed error part (nothing if
    none)."""
    if not failures:
        return
    columns = list(zip(*failures))
    table = pa.table({field.name: pa.array(col, type=field.type) for field, col in zip(ERROR_SCHEMA, columns)})
    write_part(Location(errors_dir), part_name(np.array(columns[0])), table)


class DecodeImages:
    """Decodes each image once and resizes it to every model's input.

    Failures (unreadable, undecodable) are written to ``errors_dir`` as one parquet part per batch
    and dropped from the output, so every input ends up in exactly one of the two outputs.

    Args:
        inputs: model input name -> its preprocessing (e.g. ``{"cls": ..., "emb": ...}``); names
            that share a preprocessing share one resized array.
        errors_dir: where error parts go (a local folder or an object store URI).
        max_pixels: decode guard (see :func:`pipeline.images.decode_image`).
    """

    def __init__(self, inputs: dict[str, Preprocess], errors_dir: str | Path | Location,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not inputs:
            raise ValueError("DecodeImages needs at least one model input")
        self.inputs = inputs
        self.errors_dir = Location(errors_dir)
        self.max_pixels = max_pixels
        self.draft_size = max(p.draft_size for p in inputs.values())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        keep: list[int] = []
        resized: dict[str, list[np.ndarray]] = {name: [] for name in self.inputs}
        failures: list[tuple[int, str, str, str, str]] = []
        for i, (item_id, uri, data, read_error) in enumerate(
                zip(batch["id"], batch["uri"], batch["data"], batch["read_error"])):
            if read_error:
                failures.append((int(item_id), str(uri), "read", "unreadable", str(read_error)))
                continue
            try:
                image = decode_image(bytes(data), max_pixels=self.max_pixels, draft_size=self.draft_size)
            except ImageDecodeError as exc:
                failures.append((int(item_id), str(uri), "decode", exc.reason, str(exc)))
                continue
            cache: dict[Preprocess, np.ndarray] = {}
            for name, pre in self.inputs.items():
                if pre not in cache:
                    cache[pre] = resize_image(image, pre)
                resized[name].append(cache[pre])
            keep.append(i)
        write_errors(failures, self.errors_dir)
        if not keep:
            return {}  # an empty block (a 0-row tensor column would not convert to Arrow)
        idx = np.array(keep, dtype=np.int64)
        seconds = (time.perf_counter() - start) / max(len(batch["id"]), 1)
        out = {"id": batch["id"][idx], "uri": batch["uri"][idx], "label": batch["label"][idx],
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
    """

    def __init__(self, out_dir: str | Path | Location, dim: int, embedding_dtype: str = "float32") -> None:
        self.out_dir = Location(out_dir)
        self.schema = embedding_schema(dim, embedding_dtype)
        self.dim = dim

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
        }, schema=self.schema)
        name = part_name(batch["id"])
        write_part(self.out_dir, name, table)
        worker = str(batch["worker"][0]) if "worker" in batch else "-"
        return {"part": np.array([name], dtype=object), "rows": np.array([n], dtype=np.int64),
                "worker": np.array([worker], dtype=object),
                "read_s": np.array([float(np.sum(batch["read_s"]))]),
                "decode_s": np.array([float(np.sum(batch["decode_s"]))]),
                "model_s": np.array([float(np.sum(batch["model_s"]))]),
                "write_s": np.array([time.perf_counter() - start]),
                "written_at": np.array([time.time()])}
