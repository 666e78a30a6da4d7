"""Where images come from: folders, per-class tar files, webdataset shards, parquet tables;
local paths or object-store URIs (anything ``pyarrow.fs`` opens: ``s3://``, ``gs://``, ``hdfs://``).

Discovery (:func:`discover_shards`) runs on the driver and lists only the top level of each input:
the sub-folders, tar files and parquet row groups become *shards*. The files inside a shard are
listed and read by whichever worker processes it (:func:`read_shard`), so an ImageNet-22k run
(21,841 class tars, ~14M images) starts with 21,841 small descriptions, not 14M paths.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq

#: Shard kinds: a class sub-folder, an explicit list of files, a tar, one parquet row group.
SHARD_KINDS = ("folder", "files", "tar", "parquet")

_SYNSET = re.compile(r"^n\d{8}$")
_LABEL_SUFFIXES = (".cls", ".txt", ".label")
_BYTES_COLUMNS = ("image", "bytes", "image_bytes", "jpg", "png", "data")
_PATH_COLUMNS = ("path", "uri", "image_path", "file")


@dataclass(frozen=True)
class Shard:
    """A unit of reading work.

    Attributes:
        kind: one of :data:`SHARD_KINDS`.
        uri: the folder, tar or parquet file (for ``files``: the folder the files are in).
        label: the label of every image in it (class sub-folder name, synset tar name), or None.
        members: for ``files``: the file URIs.
        row_group: for ``parquet``: the row group index.
        version: for ``tar`` and ``parquet``: the file's size and modification time as listed
            (``"SIZE:MTIME_NS"``), or "" where unknown.
    """

    kind: str
    uri: str
    label: str | None = None
    members: tuple[str, ...] = ()
    row_group: int = -1
    version: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SHARD_KINDS:
            raise ValueError(f"unknown shard kind {self.kind!r}; expected one of {SHARD_KINDS}")

    @property
    def listing_key(self) -> str | None:
        """The name of this shard's listing (the ids it holds, saved once read), or None for shards
        whose content may change unseen (folders and loose files: their files are listed afresh).
        A tar or parquet file that changes size or modification time gets a new key."""
        if self.kind not in ("tar", "parquet") or not self.version:
            return None
        text = f"{self.kind}|{self.uri}|{self.row_group}|{self.version}"
        return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


@dataclass(frozen=True)
class Item:
    """One input image as read (not yet decoded).

    Attributes:
        uri: stable name of the image (``tar#member`` for tar members, ``file.parquet#row`` for rows).
        label: ground-truth label, or None.
        data: the encoded bytes, or None when reading failed.
        error: why reading failed, or None.
    """

    uri: str
    label: str | None
    data: bytes | None = None
    error: str | None = None


def uri_id(uri: str) -> int:
    """A stable 63-bit id for an image URI (same URI, same id, in every run and on every machine)."""
    return int.from_bytes(hashlib.blake2b(uri.encode("utf-8"), digest_size=8).digest(), "big") & ((1 << 63) - 1)


def resolve(uri: str) -> tuple[pafs.FileSystem, str, str]:
    """Returns ``(filesystem, path inside it, canonical uri)``; local paths become absolute."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path, uri.rstrip("/")
    path = os.path.abspath(os.path.expanduser(uri))
    return pafs.LocalFileSystem(), path, path


def _join(base_uri: str, name: str) -> str:
    return f"{base_uri.rstrip('/')}/{name}"


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("_")


def discover_shards(inputs: list[str], files_per_shard: int = 256) -> list[Shard]:
    """Turns input paths/URIs into shards, listing only their top level.

    A directory's sub-folders become ``folder`` shards (the sub-folder name is the label), its tar
    files ``tar`` shards, its parquet files one ``parquet`` shard per row group, and its other
    files ``files`` shards of at most ``files_per_shard`` files. A file input is one of the same.
    Hidden entries (``.name``, ``_name``) are skipped.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: no inputs, or ``files_per_shard < 1``.
    """
    if not inputs:
        raise ValueError("no inputs given; pass one or more --input paths or URIs")
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard must be >= 1, got {files_per_shard}")
    shards: list[Shard] = []
    for raw in inputs:
        fs, path, uri = resolve(raw)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input {raw!r} does not exist")
        if info.type == pafs.FileType.File:
            shards.extend(_file_shards(fs, path, uri, files_per_shard, info))
            continue
        entries = sorted(fs.get_file_info(pafs.FileSelector(path, recursive=False)), key=lambda e: e.base_name)
        loose: list[str] = []
        for entry in entries:
            if _hidden(entry.base_name):
                continue
            child_uri = _join(uri, entry.base_name)
            if entry.type == pafs.FileType.Directory:
                shards.append(Shard("folder", child_uri, label=entry.base_name))
            elif entry.base_name.endswith((".tar", ".parquet")):
                shards.extend(_file_shards(fs, entry.path, child_uri, files_per_shard, entry))
            else:
                loose.append(child_uri)
        for start in range(0, len(loose), files_per_shard):
            shards.append(Shard("files", uri, members=tuple(loose[start : start + files_per_shard])))
    return shards


def _file_shards(fs: pafs.FileSystem, path: str, uri: str, files_per_shard: int,
                 info: pafs.FileInfo | None = None) -> list[Shard]:
    name = uri.rsplit("/", 1)[-1]
    info = info or fs.get_file_info(path)
    version = f"{info.size}:{info.mtime_ns}" if info.size is not None and info.mtime_ns is not None else ""
    if name.endswith(".tar"):
        stem = name[: -len(".tar")]
        return [Shard("tar", uri, label=stem if _SYNSET.match(stem) else None, version=version)]
    if name.endswith(".parquet"):
        with fs.open_input_file(path) as f:
            groups = pq.ParquetFile(f).metadata.num_row_groups
        return [Shard("parquet", uri, row_group=g, version=version) for g in range(groups)]
    return [Shard("files", uri.rsplit("/", 1)[0], members=(uri,))]


def read_shard(shard: Shard) -> Iterator[Item]:
    """Lists and reads the images of one shard, in a stable order.

    A file that cannot be read yields an :class:`Item` with ``error`` set instead of raising, so
    every file is accounted for.
    """
    if shard.kind == "folder":
        fs, path, uri = resolve(shard.uri)
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(e.path for e in entries if e.type == pafs.FileType.File
                       and not any(_hidden(part) for part in os.path.relpath(e.path, path).split(os.sep)))
        for file_path in files:
            yield _read_file(fs, file_path, _join(uri, os.path.relpath(file_path, path).replace(os.sep, "/")),
                             shard.label)
    elif shard.kind == "files":
        for member in shard.members:
            fs, path, uri = resolve(member)
            yield _read_file(fs, path, uri, shard.label)
    elif shard.kind == "tar":
        yield from _read_tar(shard)
    else:
        yield from _read_parquet(shard)


def _read_file(fs: pafs.FileSystem, path: str, uri: str, label: str | None) -> Item:
    try:
        with fs.open_input_stream(path) as f:
            return Item(uri, label, data=f.read())
    except OSError as exc:
        return Item(uri, label, error=f"{type(exc).__name__}: {exc}")


def _read_tar(shard: Shard) -> Iterator[Item]:
    """ImageNet class tars (label = synset from the tar name) and webdataset shards (label from a
    ``.cls``/``.txt`` member with the same key)."""
    fs, path, uri = resolve(shard.uri)
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        members = [m for m in archive.getmembers() if m.isfile()]
    except (tarfile.TarError, EOFError, OSError) as exc:
        yield Item(uri, shard.label, error=f"unreadable tar: {exc}")
        return
    labels: dict[str, str] = {}
    images = []
    for member in members:
        base = member.name.rsplit("/", 1)[-1]
        if _hidden(base):
            continue
        key, _, ext = member.name.partition(".")
        if ("." + ext) in _LABEL_SUFFIXES:
            labels[key] = archive.extractfile(member).read().decode("utf-8", "replace").strip()
        else:
            images.append((key, member))
    for key, member in sorted(images, key=lambda km: km[1].name):
        member_uri = f"{uri}#{member.name}"
        label = labels.get(key, shard.label)
        try:
            yield Item(member_uri, label, data=archive.extractfile(member).read())
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield Item(member_uri, label, error=f"unreadable tar member: {exc}")


def _read_parquet(shard: Shard) -> Iterator[Item]:
    """Rows with image bytes (column image/bytes/...) or image paths (column path/uri/...)."""
    fs, path, uri = resolve(shard.uri)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        bytes_col = next((c for c in _BYTES_COLUMNS if c in names), None)
        path_col = next((c for c in _PATH_COLUMNS if c in names), None)
        if bytes_col is None and path_col is None:
            raise ValueError(f"{uri}: parquet inputs need an image bytes column ({', '.join(_BYTES_COLUMNS)}) "
                             f"or a path column ({', '.join(_PATH_COLUMNS)}); found {names}")
        columns = [c for c in (bytes_col, path_col, "label") if c and c in names]
        table = parquet.read_row_group(shard.row_group, columns=columns)
        offset = sum(parquet.metadata.row_group(g).num_rows for g in range(shard.row_group))
    rows = table.to_pydict()
    for i in range(table.num_rows):
        label = rows["label"][i] if "label" in rows else None
        label = None if label is None else str(label)
        if bytes_col is not None:
            item_uri = str(rows[path_col][i]) if path_col else f"{uri}#{offset + i}"
            value = rows[bytes_col][i]
            if isinstance(value, dict):  # HF-style struct {"bytes": ..., "path": ...}
                value = value.get("bytes")
            yield Item(item_uri, label, data=value) if value else Item(item_uri, label, data=b"")
        else:
            target = str(rows[path_col][i])
            fs_i, path_i, uri_i = resolve(target)
            yield _read_file(fs_i, path_i, uri_i, label)


def read_uri(uri: str) -> bytes:
    """The bytes of one image by the ``uri`` the job recorded for it: a file, ``file.tar#member`` or
    ``file.parquet#row``.

    Raises:
        FileNotFoundError: the file, member or row does not exist.
    """
    base, sep, member = uri.partition("#")
    fs, path, _ = resolve(base)
    if not sep:
        with fs.open_input_stream(path) as f:
            return f.read()
    if base.endswith(".tar"):
        with fs.open_input_stream(path) as stream:
            archive = tarfile.open(fileobj=io.BytesIO(stream.read()), mode="r:*")
        try:
            return archive.extractfile(archive.getmember(member)).read()
        except KeyError:
            raise FileNotFoundError(f"{base} has no member {member!r}") from None
    if base.endswith(".parquet") and member.isdigit():
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
        row = int(member)
        if row >= table.num_rows:
            raise FileNotFoundError(f"{base} has no row {row}")
        column = next(c for c in _BYTES_COLUMNS if c in table.column_names)
        value = table.column(column)[row].as_py()
        return value.get("bytes") if isinstance(value, dict) else value
    raise FileNotFoundError(f"cannot resolve image uri {uri!r}")
