"""Parts of an output folder (``embeddings/``, ``errors/``), committed by records.

A part is written under its final name (``part-<ids hash>.parquet``), then its record
(``part-<ids hash>.json``: rows, sha256, bytes, and the embedding job's ``run``) beside it. A part counts only once its record
exists (or the folder's manifest lists it): an object store has no rename, and a writer killed
during an upload, or one whose stream was closed on an error, may leave an object that is not a
whole part. A resumed run deletes the parts that nothing names and does their images again.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from pipeline.storage import Location, parquet_bytes

#: Parallel reads of many small objects (records, id columns) from an object store.
READ_THREADS = 32

#: TEST HOOK, for tests that kill a job at a known point (tests/test_embed_cluster.py); never set
#: it in a real run. Its value is ``FOLDER:N:MARKER``: the first N parts written into folders named
#: FOLDER are committed as usual; once all N are, the local file MARKER is created; every later
#: part for such a folder blocks before it writes anything, until the process is killed. So when
#: MARKER appears, exactly N parts of FOLDER are committed and no more ever will be.
TEST_HANG_AFTER_PARTS = "LOOKALIKE_TEST_HANG_AFTER_PARTS"


def record_name(part: str) -> str:
    return part.removesuffix(".parquet") + ".json"


def write_part(folder: Location, name: str, table: pa.Table, extra: dict | None = None) -> dict:
    """Writes ``folder/name`` and then its record; returns the record.

    Args:
        extra: more facts for the record (the embedding job's ``run``).
    """
    hang = _test_hang_turn(folder)
    data = parquet_bytes(table)
    (folder / name).write_bytes(data)
    record = {"rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **(extra or {})}
    (folder / record_name(name)).write_json(record, indent=None)
    if hang is not None:
        _test_hang_committed(*hang)
    return record


def _test_hang_turn(folder: Location) -> tuple[str, int, int] | None:
    """TEST HOOK (:data:`TEST_HANG_AFTER_PARTS`): claims one of the N parts that may still be
    written (``marker, count, turn``), blocks for good when all N are claimed, or returns None when
    the hook is off or names another folder. Claims are files created exclusively beside MARKER, so
    the writers of a job's processes agree on them."""
    spec = os.environ.get(TEST_HANG_AFTER_PARTS)
    if not spec:
        return None
    folder_name, count, marker = spec.split(":", 2)
    if folder.name != folder_name:
        return None
    for turn in range(int(count)):
        try:
            os.close(os.open(f"{marker}.claim{turn}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return marker, int(count), turn
        except FileExistsError:
            continue
    while True:  # a part after the Nth: the job hangs here until the test kills it
        time.sleep(60)


def _test_hang_committed(marker: str, count: int, turn: int) -> None:
    """TEST HOOK: records that claimed part ``turn`` is committed; the last of the N creates MARKER."""
    open(f"{marker}.done{turn}", "w").close()
    if all(os.path.exists(f"{marker}.done{i}") for i in range(count)):
        open(marker, "a").close()


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
