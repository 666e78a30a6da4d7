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
from typing import Callable, Iterator

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
        versions: for ``files``: each member's version as listed (same order as ``members``), or
            () where not listed (each is then looked up when read).
    """

    kind: str
    uri: str
    label: str | None = None
    members: tuple[str, ...] = ()
    row_group: int = -1
    version: str = ""
    versions: tuple[str, ...] = ()

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
        data: the encoded bytes, or None when reading failed or the image was not wanted.
        error: why reading failed, or None.
        version: what changes when the image's content does (:func:`file_version` for files,
            :func:`content_version` for tar members and parquet cells), or "" where unknown.
        skipped: not read, because the caller did not want it (``read_shard``'s ``want``).
    """

    uri: str
    label: str | None
    data: bytes | None = None
    error: str | None = None
    version: str = ""
    skipped: bool = False


def uri_id(uri: str) -> int:
    """A stable 63-bit id for an image URI (same URI, same id, in every run and on every machine)."""
    return int.from_bytes(hashlib.blake2b(uri.encode("utf-8"), digest_size=8).digest(), "big") & ((1 << 63) - 1)


def file_version(info: pafs.FileInfo) -> str:
    """A file's version as listed: ``"SIZE:MTIME_NS"`` ("" where the filesystem gives neither).
    A file rewritten in place gets a new modification time, so a new version."""
    if info.size is None or info.mtime_ns is None:
        return ""
    return f"{info.size}:{info.mtime_ns}"


def content_version(data: bytes) -> str:
    """The version of bytes read from inside a tar or a parquet file: a hash of the bytes
    (``"b2:HEX"``), so a rewritten container whose image is the same keeps the image's version."""
    return "b2:" + hashlib.blake2b(data, digest_size=8).hexdigest()


def canonical_uri(uri: str) -> str:
    """The uri the job records for an image named ``uri`` (a local path made absolute; the
    ``#member`` of a tar member or parquet row kept)."""
    base, sep, member = uri.partition("#")
    return resolve(base)[2] + sep + member


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
        loose: list[tuple[str, str]] = []
        for entry in entries:
            if _hidden(entry.base_name):
                continue
            child_uri = _join(uri, entry.base_name)
            if entry.type == pafs.FileType.Directory:
                shards.append(Shard("folder", child_uri, label=entry.base_name))
            elif entry.base_name.endswith((".tar", ".parquet")):
                shards.extend(_file_shards(fs, entry.path, child_uri, files_per_shard, entry))
            else:
                loose.append((child_uri, file_version(entry)))
        for start in range(0, len(loose), files_per_shard):
            chunk = loose[start : start + files_per_shard]
            shards.append(Shard("files", uri, members=tuple(u for u, _ in chunk), versions=tuple(v for _, v in chunk)))
    return shards


def _file_shards(fs: pafs.FileSystem, path: str, uri: str, files_per_shard: int,
                 info: pafs.FileInfo | None = None) -> list[Shard]:
    name = uri.rsplit("/", 1)[-1]
    info = info or fs.get_file_info(path)
    version = file_version(info)
    if name.endswith(".tar"):
        stem = name[: -len(".tar")]
        return [Shard("tar", uri, label=stem if _SYNSET.match(stem) else None, version=version)]
    if name.endswith(".parquet"):
        with fs.open_input_file(path) as f:
            groups = pq.ParquetFile(f).metadata.num_row_groups
        return [Shard("parquet", uri, row_group=g, version=version) for g in range(groups)]
    return [Shard("files", uri.rsplit("/", 1)[0], members=(uri,), versions=(version,))]


#: ``want(uri, version)``: whether to read an image (None: every image).
Want = Callable[[str, str], bool] | None


def list_files(shard: Shard) -> list[tuple[str, str, str]]:
    """The images of a ``folder`` or ``files`` shard as ``(uri, version, path)``, in a stable
    order, without reading them (``path``: inside the uri's filesystem)."""
    if shard.kind == "folder":
        fs, path, uri = resolve(shard.uri)
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        root = path.rstrip("/") + "/"
        files = []
        for e in entries:
            if e.type != pafs.FileType.File or not e.path.startswith(root):
                continue
            rel = e.path[len(root):]
            if not any(_hidden(part) for part in rel.split("/")):
                files.append((_join(uri, rel), file_version(e), e.path))
        return sorted(files, key=lambda f: f[2])
    if shard.kind == "files":
        versions = shard.versions if len(shard.versions) == len(shard.members) else (None,) * len(shard.members)
        out = []
        for member, version in zip(shard.members, versions):
            fs, path, uri = resolve(member)
            if version is None:
                info = fs.get_file_info(path)
                version = file_version(info) if info.type == pafs.FileType.File else ""
            out.append((uri, version, path))
        return out
    raise ValueError(f"list_files lists folder and files shards, not {shard.kind!r}")


def read_shard(shard: Shard, want: Want = None) -> Iterator[Item]:
    """Lists and reads the images of one shard, in a stable order.

    A file that cannot be read yields an :class:`Item` with ``error`` set instead of raising, so
    every file is accounted for. Every image listed is yielded with its version; one that ``want``
    rejects is yielded with ``skipped`` set and without its bytes (a file is then not read at all).
    """
    if shard.kind in ("folder", "files"):
        fs = None
        for uri, version, path in list_files(shard):
            if want is not None and not want(uri, version):
                yield Item(uri, shard.label, version=version, skipped=True)
                continue
            fs = fs or resolve(uri)[0]
            yield _read_file(fs, path, uri, shard.label, version)
    elif shard.kind == "tar":
        yield from _read_tar(shard, want)
    else:
        yield from _read_parquet(shard, want)


def _read_file(fs: pafs.FileSystem, path: str, uri: str, label: str | None, version: str = "") -> Item:
    try:
        with fs.open_input_stream(path) as f:
            return Item(uri, label, data=f.read(), version=version)
    except OSError as exc:
        return Item(uri, label, error=f"{type(exc).__name__}: {exc}", version=version)


def _read_bytes(uri: str, label: str | None, data: bytes, want: Want) -> Item:
    """An image read from inside a container: its version is its bytes' hash."""
    version = content_version(data)
    if want is not None and not want(uri, version):
        return Item(uri, label, version=version, skipped=True)
    return Item(uri, label, data=data, version=version)


def _read_tar(shard: Shard, want: Want = None) -> Iterator[Item]:
    """ImageNet class tars (label = synset from the tar name) and webdataset shards (label from a
    ``.cls``/``.txt`` member with the same key)."""
    fs, path, uri = resolve(shard.uri)
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        members = [m for m in archive.getmembers() if m.isfile()]
    except (tarfile.TarError, EOFError, OSError) as exc:
        if want is None or want(uri, shard.version):
            yield Item(uri, shard.label, error=f"unreadable tar: {exc}", version=shard.version)
        else:
            yield Item(uri, shard.label, version=shard.version, skipped=True)
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
            data = archive.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield Item(member_uri, label, error=f"unreadable tar member: {exc}", version=shard.version)
            continue
        yield _read_bytes(member_uri, label, data, want)


def _read_parquet(shard: Shard, want: Want = None) -> Iterator[Item]:
    """Rows with image bytes (column image/bytes/...) or image paths (column path/uri/...).

    A row of bytes is versioned by their hash; a row naming a file by the file's size and time."""
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
            yield _read_bytes(item_uri, label, value or b"", want)
        else:
            target = str(rows[path_col][i])
            fs_i, path_i, uri_i = resolve(target)
            info = fs_i.get_file_info(path_i)
            version = file_version(info) if info.type == pafs.FileType.File else ""
            if want is not None and not want(uri_i, version):
                yield Item(uri_i, label, version=version, skipped=True)
            else:
                yield _read_file(fs_i, path_i, uri_i, label, version)


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
