"""Immutable index versions: every publish (build, append, update, delete) writes a new version and
switches one small pointer last.

    INDEX/manifest.json                  the pointer: the current version's manifest, written last
                                         (locally renamed into place; in an object store one PUT)
    INDEX/versions/000003.json           every published version's manifest (for readers of an
                                         older version, rollback and clean-up)
    INDEX/shards/0002-v000003/...        a shard's files, written once under a versioned name and
                                         never changed; versions that did not touch a shard share it
    INDEX/tombstones/0002-v000004.npy    deleted row positions of a shard (sorted int64), as of a version

A reader reads ``manifest.json`` once and then only the files that version names, so a reader
loading version N never sees a file of N+1, and a publish in progress is invisible until its
pointer is written. One writer publishes at a time (a job, not the service). Versions older than the
newest ``keep`` are removed once their successor has been current for ``grace_s`` seconds (a
reader still loading one has that long), with every file no kept version names.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging

import numpy as np

from pipeline.manifests import IndexManifest, ShardEntry
from pipeline.storage import Location

logger = logging.getLogger(__name__)

#: Versions kept however old (the current one and the one before, which replicas may still serve).
KEEP_VERSIONS = 2
#: Seconds a superseded version stays readable once the next is current.
GRACE_S = 600.0


class IndexIntegrityError(ValueError):
    """An index file is missing, truncated or corrupted (the message names the file)."""


def version_file(version: int) -> str:
    return f"versions/{version:06d}.json"


def shard_folder(number: int, version: int) -> str:
    """A shard's folder, relative to the index: written once, by ``version``."""
    return f"shards/{number:04d}-v{version:06d}"


def publish(index_dir: Location | str, manifest: IndexManifest) -> IndexManifest:
    """Makes ``manifest`` (whose files are all written) the current version: its copy under
    ``versions/`` first, then the pointer ``manifest.json``."""
    index_dir = Location(index_dir)
    manifest.write(index_dir, version_file(manifest.version))
    manifest.write(index_dir)
    logger.info("index %s: version %d published (%d images)", index_dir, manifest.version, manifest.rows)
    return manifest


def read_version(index_dir: Location | str, version: int | None = None) -> IndexManifest:
    """The current version's manifest, or a published version's (an index written before versions
    has no ``versions/``: its one version is the pointer's)."""
    index_dir = Location(index_dir)
    if version is None:
        return IndexManifest.read(index_dir)
    try:
        return IndexManifest.read(index_dir, version_file(version))
    except FileNotFoundError:
        current = IndexManifest.read(index_dir)
        if current.version == version:
            return current
        raise


def published(index_dir: Location | str) -> list[int]:
    """The versions under ``versions/`` (ascending)."""
    index_dir = Location(index_dir)
    return sorted(int(name.removesuffix(".json")) for name in (index_dir / "versions").list("*.json"))


def write_tombstones(index_dir: Location, number: int, version: int, positions: np.ndarray) -> dict:
    """Writes a shard's deleted row positions as of ``version``; returns its ``ShardEntry.deleted``."""
    positions = np.unique(np.asarray(positions, dtype=np.int64))
    buffer = io.BytesIO()
    np.save(buffer, positions)
    data = buffer.getvalue()
    path = f"tombstones/{number:04d}-v{version:06d}.npy"
    (index_dir / path).write_bytes(data)
    return {"path": path, "rows": int(len(positions)), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def read_tombstones(where: Location, entry: ShardEntry) -> np.ndarray:
    """A shard's deleted row positions (sorted; empty when none), ``where`` the index root."""
    if not entry.deleted:
        return np.zeros(0, dtype=np.int64)
    data = (where / entry.deleted["path"]).read_bytes()
    if len(data) != entry.deleted["bytes"] or hashlib.sha256(data).hexdigest() != entry.deleted["sha256"]:
        raise IndexIntegrityError(f"index file {where / entry.deleted['path']} is corrupted: its sha256 does "
                                  f"not match the manifest")
    return np.load(io.BytesIO(data))


def referenced(manifest: IndexManifest) -> tuple[set[str], set[str]]:
    """The shard folders and tombstone files a version reads."""
    return ({s.path for s in manifest.shards}, {s.deleted["path"] for s in manifest.shards if s.deleted})


def remove_old_versions(index_dir: Location | str, keep: int = KEEP_VERSIONS, grace_s: float = GRACE_S,
                        now: dt.datetime | None = None) -> list[int]:
    """Removes versions older than the newest ``keep`` whose successor was published more than
    ``grace_s`` seconds ago, and every shard folder and tombstone file no remaining version names.

    Returns:
        the versions removed.
    """
    index_dir = Location(index_dir)
    now = now or dt.datetime.now(dt.timezone.utc)
    versions = published(index_dir)
    manifests = {v: read_version(index_dir, v) for v in versions}
    removable = []
    for older, newer in zip(versions, versions[1:]):
        if older in versions[-keep:]:
            continue
        age = (now - dt.datetime.fromisoformat(manifests[newer].created)).total_seconds()
        if age > grace_s:
            removable.append(older)
    kept = [manifests[v] for v in versions if v not in removable] + [IndexManifest.read(index_dir)]
    folders, tombstones = set(), set()
    for manifest in kept:
        f, t = referenced(manifest)
        folders |= f
        tombstones |= t
    for name in (index_dir / "shards").list_folders():
        if f"shards/{name}" not in folders and not name.startswith("."):
            (index_dir / "shards" / name).delete_tree()
    for name in (index_dir / "tombstones").list("*.npy"):
        if f"tombstones/{name}" not in tombstones:
            (index_dir / "tombstones" / name).delete()
    for version in removable:
        (index_dir / version_file(version)).delete()
    if removable:
        logger.info("index %s: removed versions %s", index_dir, removable)
    return removable
