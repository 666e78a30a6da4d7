"""Small local-file helpers: checksums, atomic writes, and where an output folder may not go."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


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


def write_json_atomically(data: dict, path: Path, indent: int = 2) -> None:
    """Writes JSON atomically."""
    with replace_atomically(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, default=float))


#: Set by Ray's job manager in the environment of a ``ray job submit`` entrypoint.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_output_folder(path: str | os.PathLike, flag: str = "--output") -> str | None:
    """Why ``path`` cannot be an output folder here, or None.

    Under ``ray job submit --working-dir``, the entrypoint runs inside Ray's temporary copy of the
    working dir (``.../runtime_resources/working_dir_files/...``), which is deleted with the Ray
    session: a relative output would land there, be reported as written, and be lost.
    """
    text = os.fspath(path)
    if "://" in text or Path(text).is_absolute():
        return None
    in_ray_copy = "working_dir_files" in Path.cwd().parts or RAY_JOB_ENV in os.environ
    if in_ray_copy:
        return (f"{flag} {text} is a relative path, and this runs as a Ray job in Ray's temporary copy of the "
                f"working dir ({Path.cwd()}), which is deleted with the Ray session: give an absolute path "
                f"(on a cluster, a shared filesystem), e.g. {flag} /mnt/shared/{Path(text).name}")
    return None
