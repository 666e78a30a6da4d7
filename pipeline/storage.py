"""Where outputs and indexes live: a local (or shared) folder, or an object store (``s3://bucket/prefix``).

Both go through one type, :class:`Location`, so the jobs and the index read and write them alike.
Object stores are reached with ``pyarrow.fs``: S3 takes the standard AWS environment variables and
credential files, ``AWS_ENDPOINT_URL`` included (S3-compatible stores such as MinIO).

Every write is whole: a local file is written under a temporary name and renamed; an object
appears only when its upload completes. Neither makes a *set* of files complete, and an object
store cannot rename: completeness comes from records and manifests written after the files they
name (:mod:`pipeline.parts`, the manifests).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.files import replace_atomically


def is_uri(where: str | os.PathLike) -> bool:
    """Whether ``where`` names an object store (``s3://...``) rather than a local path."""
    text = os.fspath(where)
    return "://" in text and not text.startswith("file://")


class Location:
    """A file or folder, local or in an object store. Picklable: the filesystem is resolved in each
    process that uses it (so Ray workers take their own credentials from their environment).

    Args:
        where: a local path (made absolute here) or a URI such as ``s3://bucket/prefix``.
    """

    def __init__(self, where: str | os.PathLike | "Location") -> None:
        text = where.uri if isinstance(where, Location) else os.fspath(where)
        if text.startswith("file://"):
            text = text[len("file://"):]
        self.remote = is_uri(text)
        self.uri = text.rstrip("/") if self.remote else str(Path(text).expanduser().absolute())

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "remote": self.remote}  # not the filesystem (resolved per process)

    def __truediv__(self, name: str) -> "Location":
        return Location(f"{self.uri}/{name}")

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def path(self) -> Path:
        """The local path (local locations only)."""
        if self.remote:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.uri)

    @cached_property
    def _fs(self) -> tuple[pafs.FileSystem, str]:
        if not self.remote:
            return _local(), self.uri
        scheme, rest = self.uri.split("://", 1)
        settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
        return _filesystem(f"{scheme}://{rest.split('/', 1)[0]}", settings), rest

    @property
    def fs(self) -> pafs.FileSystem:
        return self._fs[0]

    @property
    def key(self) -> str:
        """The path inside :attr:`fs`."""
        return self._fs[1]

    def check_reachable(self) -> None:
        """Raises ValueError when this object-store location's bucket cannot be reached (no such
        bucket, no credentials, no network); nothing for local paths. Jobs call it before they
        start Ray, so a typo in a bucket name costs seconds, not a cluster start."""
        if not self.remote:
            return
        bucket = self.key.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as exc:
            raise ValueError(f"cannot reach {self.uri}: {exc}") from None
        if info.type == pafs.FileType.NotFound:
            raise ValueError(f"{self.uri}: bucket {bucket!r} does not exist, or these credentials cannot see it "
                             f"(AWS_* variables, ~/.aws; AWS_ENDPOINT_URL for other S3-compatible stores)")

    # ---- reading

    def is_file(self) -> bool:
        if not self.remote:
            return self.path.is_file()
        return self.fs.get_file_info(self.key).type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        """The file's bytes. Raises FileNotFoundError."""
        if not self.remote:
            return self.path.read_bytes()
        try:
            with self.fs.open_input_stream(self.key) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri} not found") from None
        except OSError as exc:
            if self.fs.get_file_info(self.key).type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"{self.uri} not found") from None
            raise OSError(f"reading {self.uri}: {exc}") from None

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self):
        return json.loads(self.read_text())

    def read_parquet(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.key, columns=columns, filesystem=self.fs)

    def list(self, pattern: str = "*") -> list[str]:
        """Names of the files directly inside this folder that match ``pattern`` (sorted; none when
        the folder does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.key, allow_not_found=True, recursive=False))
        names = (info.base_name for info in infos if info.type == pafs.FileType.File)
        return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))

    def list_folders(self) -> list[str]:
        """Names of the folders directly inside this folder (sorted; none when it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.key, allow_not_found=True, recursive=False))
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)

    def size(self) -> int:
        return self.fs.get_file_info(self.key).size

    # ---- writing

    def write_bytes(self, data: bytes) -> None:
        """Writes the whole file: locally under a temporary name, renamed when complete; in an
        object store as one upload, visible only when complete."""
        if not self.remote:
            with replace_atomically(self.path) as tmp:
                tmp.write_bytes(data)
            return
        with self.fs.open_output_stream(self.key) as f:
            f.write(data)

    def write_json(self, data: dict, indent: int = 2) -> None:
        self.write_bytes(json.dumps(data, indent=indent, default=float).encode("utf-8"))

    def upload(self, source: Path) -> None:
        """Copies a local file here (whole, as :meth:`write_bytes`)."""
        if not self.remote:
            with replace_atomically(self.path) as tmp:
                pafs.copy_files(str(source), str(tmp))
            return
        pafs.copy_files(str(source), self.key, destination_filesystem=self.fs)

    def download(self, target: Path) -> str:
        """Copies this file to a local path (renamed into place when complete); returns its sha256."""
        digest = hashlib.sha256()
        with replace_atomically(Path(target)) as tmp, tmp.open("wb") as out, \
                self.fs.open_input_stream(self.key) as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        return digest.hexdigest()

    def delete(self) -> None:
        """Deletes this file (nothing when it does not exist)."""
        try:
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            pass

    def delete_tree(self) -> None:
        """Deletes this folder and everything under it (nothing when it does not exist)."""
        if self.fs.get_file_info(self.key).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.key)

    def make_folder(self) -> None:
        if not self.remote:
            self.path.mkdir(parents=True, exist_ok=True)  # object stores have no folders to make


@functools.lru_cache(maxsize=1)
def _local() -> pafs.FileSystem:
    return pafs.LocalFileSystem()


@functools.lru_cache(maxsize=64)
def _filesystem(root: str, settings: tuple) -> pafs.FileSystem:
    """The filesystem of ``scheme://bucket`` under these ``AWS_*`` settings, made once per process
    (making one per file would cost a client, and for S3 possibly a region look-up, per part)."""
    try:
        return pafs.FileSystem.from_uri(root)[0]
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"cannot open {root}: {exc}") from None


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of a parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
