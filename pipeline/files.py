"""Small file helpers shared by the job outputs and the index: checksums and atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _temporary(path: Path) -> Path:
    return path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")


@contextlib.contextmanager
def replace_atomically(path: Path) -> Iterator[Path]:
    """Yields a temporary name beside ``path``; renames it to ``path`` when the block succeeds, so
    readers never see half a file (and a failed write leaves no temporary behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_table_atomically(table: pa.Table, path: Path) -> None:
    """Writes a parquet file atomically."""
    with replace_atomically(path) as tmp:
        pq.write_table(table, tmp)


def write_json_atomically(data: dict, path: Path, indent: int = 2) -> None:
    """Writes JSON atomically."""
    with replace_atomically(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, default=float))
