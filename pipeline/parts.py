"""Parts of an output folder (``embeddings/``, ``errors/``), committed by records.

A part is written under its final name (``part-<ids hash>.parquet``), then its record
(``part-<ids hash>.json``: rows, sha256, bytes) beside it. A part counts only once its record
exists (or the folder's manifest lists it): an object store has no rename, and a writer killed
during an upload, or one whose stream was closed on an error, may leave an object that is not a
whole part. A resumed run deletes the parts that nothing names and does their images again.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from pipeline.storage import Location, parquet_bytes

#: Parallel reads of many small objects (records, id columns) from an object store.
READ_THREADS = 32


def record_name(part: str) -> str:
    return part.removesuffix(".parquet") + ".json"


def write_part(folder: Location, name: str, table: pa.Table) -> dict:
    """Writes ``folder/name`` and then its record; returns the record."""
    data = parquet_bytes(table)
    (folder / name).write_bytes(data)
    record = {"rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / record_name(name)).write_json(record, indent=None)
    return record


def committed_parts(folder: Location, listed: dict[str, dict] | None = None) -> dict[str, dict]:
    """The committed parts of a folder: name -> record (``rows``, ``sha256``, ``bytes``).

    Args:
        listed: records already known (a manifest's parts, by file name): not read again.
    """
    listed = listed or {}
    names = set(folder.list("part-*"))
    parts = {n for n in names if n.endswith(".parquet")}
    to_read = sorted(n for n in parts if n not in listed and record_name(n) in names)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        records = dict(zip(to_read, pool.map(lambda n: (folder / record_name(n)).read_json(), to_read)))
    known = {n: r for n, r in listed.items() if n in parts}
    return dict(sorted({**known, **records}.items()))


def remove_uncommitted(folder: Location, committed: dict[str, dict]) -> int:
    """Deletes the parts no record or manifest names, records without their part, and local
    temporaries; returns how many files went."""
    names = folder.list("*")
    doomed = [n for n in names if n.startswith(".tmp-")
              or (n.startswith("part-") and n.endswith(".parquet") and n not in committed)
              or (n.startswith("part-") and n.endswith(".json") and n.removesuffix(".json") + ".parquet" not in names)]
    for name in doomed:
        (folder / name).delete()
    return len(doomed)


def read_column(folder: Location, names: list[str], column: str) -> list[np.ndarray]:
    """One column of each named part (read in parallel)."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(lambda n: (folder / n).read_parquet([column])[column].to_numpy(), names))
