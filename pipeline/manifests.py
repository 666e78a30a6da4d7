"""The two on-disk manifests, typed, read and written here only.

``EmbeddingManifest``: ``OUT/manifest.json`` of an embedding job (``jobs.embed``): the models and
their preprocessing, the decode limit, the parts and the counts.

``IndexManifest``: ``INDEX/manifest.json`` of an index (``jobs.build_index``): the same models and
decode limit (carried over from the embedding output, so every query is decoded and preprocessed
like the gallery), the shards and where each class lies.

``ModelSet`` holds the models of either and is the one place that checks two sets of models agree.
``ShardEntry`` is one shard of an index manifest; ``Recommendation`` is the strategy file that
``jobs.evaluate --recommend`` writes and every ``--strategy FILE`` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.images import DEFAULT_MAX_PIXELS, Preprocess
from pipeline.storage import Location

#: Version of the embedding row schemas and of their manifest. 2 adds the rows' ``version``, each
#: part's ``run`` and the manifest's ``run`` (change logs in ``changes/``); 1 is read as one run 1.
EMBEDDING_SCHEMA_VERSION = 2
_READABLE_EMBEDDING_VERSIONS = (1, 2)
#: Version of the index layout and manifest. 4 publishes immutable versions (``version``,
#: ``versions/``, tombstones); 3 records ``class_source``; 2 did not (read as predicted classes);
#: 1 neither ``max_pixels`` (read as the default). Older indexes read as version 1.
INDEX_SCHEMA_VERSION = 4
_READABLE_INDEX_VERSIONS = (1, 2, 3, 4)
ROLES = ("classifier", "embedder")


def now() -> str:
    """A manifest's ``created`` time stamp (UTC, seconds)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ModelSet:
    """The classifier and the embedder a gallery was processed with.

    Each role maps to its facts as written in the manifests: ``spec``, ``preprocess`` and, for the
    classifier, ``label_space`` and ``num_classes``; for the embedder ``dim``, ``metric`` and
    ``normalized``.
    """

    classifier: dict
    embedder: dict

    def spec(self, role: str) -> str:
        return str(self._role(role)["spec"])

    def specs(self) -> dict[str, str]:
        return {role: self.spec(role) for role in ROLES}

    def preprocess(self, role: str) -> Preprocess:
        """The preprocessing the gallery's images went through for this model."""
        cfg = self._role(role)["preprocess"]
        return Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})

    def mismatches(self, expect: dict[str, str]) -> list[str]:
        """Differences between these models and ``{"classifier": spec, "embedder": spec}`` (the
        roles given)."""
        return [f"{role}: built with {self.spec(role)!r}, not {spec!r}" for role, spec in expect.items()
                if self.spec(role) != spec]

    def require(self, expect: dict[str, str], what: str) -> None:
        """Raises ValueError naming ``what`` when ``expect`` differs from these models."""
        diffs = self.mismatches(expect)
        if diffs:
            raise ValueError(f"{what} was made with other models ({'; '.join(diffs)}); queries and gallery "
                             f"must go through the same models: rebuild it, or use the models it names")

    def to_json(self) -> dict:
        return {"classifier": self.classifier, "embedder": self.embedder}

    @classmethod
    def from_json(cls, raw: dict) -> "ModelSet":
        missing = [role for role in ROLES if role not in raw or "spec" not in raw[role]]
        if missing:
            raise ValueError(f"manifest names no {' or '.join(missing)} spec")
        return cls(classifier=dict(raw["classifier"]), embedder=dict(raw["embedder"]))

    def _role(self, role: str) -> dict:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return getattr(self, role)


def _read(path: Location, hint: str) -> dict:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileNotFoundError(f"{path} not found; {hint}") from None
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        what = "is empty" if not data else f"is not valid JSON ({exc})"
        raise ValueError(f"{path} {what}; {hint}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not a manifest object; {hint}")
    return raw


@contextlib.contextmanager
def _damaged(path: Location, hint: str) -> Iterator[None]:
    """Turns a missing or mistyped field of a manifest into one error naming the file and the field."""
    try:
        yield
    except KeyError as exc:
        raise ValueError(f"{path} is damaged: field {exc} is missing; {hint}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is damaged: {exc}; {hint}") from None


@dataclass(frozen=True)
class EmbeddingManifest:
    """``manifest.json`` of an embedding job's output folder.

    Attributes:
        parts, error_parts: the committed parts: ``path`` (relative to the folder), ``rows``,
            ``sha256``, ``bytes`` and ``run``, the run that wrote it (1 where not recorded).
        run: the latest finished run (its change log is ``changes/run-NNNNNN.json``); 0: none.
    """

    models: ModelSet
    inputs: list[str]
    top_n: int
    embedding_dtype: str
    max_pixels: int
    counts: dict
    parts: list[dict]
    error_parts: list[dict] = field(default_factory=list)
    run: int = 0
    created: str = field(default_factory=now)
    schema_version: int = EMBEDDING_SCHEMA_VERSION

    @property
    def dim(self) -> int:
        return int(self.models.embedder["dim"])

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["models"] = self.models.to_json()
        return {"schema_version": out.pop("schema_version"), "created": out.pop("created"), **out}

    def write(self, folder: str | Path | Location) -> None:
        (Location(folder) / "manifest.json").write_json(self.to_json())

    @classmethod
    def read(cls, folder: str | Path | Location) -> "EmbeddingManifest":
        """Reads ``folder/manifest.json`` (a local folder or an object store URI).

        Raises:
            FileNotFoundError: not a finished embedding output.
            ValueError: another schema version, or not a manifest.
        """
        path = Location(folder) / "manifest.json"
        raw = _read(path, "it must be the --output folder of a finished `python -m jobs.embed` run")
        if raw.get("schema_version") not in _READABLE_EMBEDDING_VERSIONS:
            raise ValueError(f"{path}: embedding schema_version {raw.get('schema_version')} is not "
                             f"{EMBEDDING_SCHEMA_VERSION}; re-run the embedding job with this version")
        with _damaged(path, "re-run the embedding job into a new folder"):
            parts, error_parts = ([{**p, "run": int(p.get("run", 1))} for p in raw.get(key, [])]
                                  for key in ("parts", "error_parts"))
            # Parts without a run (written before runs, or by hand): one run 1.
            run = max([int(raw.get("run", 0))] + [p["run"] for p in parts + error_parts])
            return cls(models=ModelSet.from_json(raw["models"]), inputs=list(raw["inputs"]), top_n=int(raw["top_n"]),
                       embedding_dtype=raw["embedding_dtype"], max_pixels=int(raw["max_pixels"]),
                       counts=raw["counts"], parts=parts, error_parts=error_parts, run=run,
                       created=raw["created"], schema_version=EMBEDDING_SCHEMA_VERSION)


@dataclass(frozen=True)
class ShardEntry:
    """One shard of an index, as its manifest records it.

    Attributes:
        path: the shard's folder, relative to the index.
        rows: gallery images in it.
        index_type: its global FAISS index (``flat``, ``hnsw-sq8``, ``ivf``, ...).
        classes: how many classes it holds (where each lies: ``IndexManifest.classes``).
        files: file name -> ``{"sha256", "bytes"}``.
        heads: classes large enough for an index of their own (``head-NNNNNN.faiss``).
        deleted: the shard's tombstones, or None: ``{"path"`` (relative to the index: a sorted int64
            ``.npy`` of deleted row positions), ``"rows"``, ``"sha256"``, ``"bytes"}``. Deleted rows
            stay in the shard's files (shared with earlier versions) and are never returned.
    """

    path: str
    rows: int
    index_type: str
    classes: int
    files: dict[str, dict]
    heads: list[int] = field(default_factory=list)
    deleted: dict | None = None

    @property
    def live_rows(self) -> int:
        return self.rows - (self.deleted["rows"] if self.deleted else 0)

    @classmethod
    def from_json(cls, raw: dict) -> "ShardEntry":
        return cls(path=str(raw["path"]), rows=int(raw["rows"]), index_type=raw.get("index_type", "flat"),
                   classes=int(raw["classes"]), files=dict(raw["files"]), heads=[int(c) for c in raw.get("heads", [])],
                   deleted=raw.get("deleted"))


@dataclass(frozen=True)
class IndexManifest:
    """``manifest.json`` of an index folder.

    Attributes:
        version: the published version (1 for a new index; each append, update or delete publishes
            the next: :mod:`pipeline.index.versions`).
        classes: class index (as a string) -> ``[shard, start, end]``, its rows' position range, or
            ``[shard, start, end, live]`` when some of its rows are deleted (tombstones).
        rows: gallery images that searches can return (deleted ones not counted).
        shards: the shards, in order.
        max_pixels: the decode limit the gallery was embedded with; queries use the same.
        strategy: the search strategy queries use by default (``pipeline.strategy.Strategy.to_json``,
            from ``jobs.build_index --strategy``); None: global.
        search: how approximate indexes are searched (``pipeline.index.SearchParams`` fields);
            None: the defaults.
        class_source: how rows got their class (``pipeline.index.keying.Keying.to_json``):
            ``source`` (``labels``: the gallery's own labels; ``predicted``: the classifier's top-1),
            ``label_space`` and ``labels`` (class index -> label id); None: predicted (older indexes).
        applied: embedding output -> the last of its runs (change logs) this version includes.
    """

    models: ModelSet
    dim: int
    vector_dtype: str
    config: dict
    sources: list[str]
    rows: int
    classes: dict[str, list[int]]
    shards: list[ShardEntry]
    max_pixels: int = DEFAULT_MAX_PIXELS
    metric: str = "inner_product"
    strategy: dict | None = None
    search: dict | None = None
    class_source: dict | None = None
    version: int = 1
    applied: dict[str, int] = field(default_factory=dict)
    created: str = field(default_factory=now)
    schema_version: int = INDEX_SCHEMA_VERSION

    def class_size(self, cls: int) -> int:
        """Gallery images of a class that searches can return (0 for a class with none)."""
        where = self.classes.get(str(int(cls)))
        if where is None:
            return 0
        return where[3] if len(where) > 3 else where[2] - where[1]

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["models"] = self.models.to_json()
        return {"schema_version": out.pop("schema_version"), "created": out.pop("created"), **out}

    def write(self, folder: str | Path | Location, name: str = "manifest.json") -> None:
        """Writes ``folder/name`` whole (atomically; publishing a version: pipeline.index.versions)."""
        (Location(folder) / name).write_json(self.to_json(), indent=1)

    @classmethod
    def read(cls, folder: str | Path | Location, name: str = "manifest.json") -> "IndexManifest":
        """Reads ``folder/manifest.json`` (the current version; a local folder or an object store
        URI), or another file of the folder (``versions/000003.json``: a published version).

        Raises:
            FileNotFoundError: no index there.
            ValueError: a schema version this code cannot read, or not a manifest.
        """
        path = Location(folder) / name
        raw = _read(path, "build an index with `python -m jobs.build_index`")
        version = raw.get("schema_version")
        if version not in _READABLE_INDEX_VERSIONS:
            raise ValueError(f"{Location(folder)}: index schema_version {version} is not {INDEX_SCHEMA_VERSION}; "
                             f"rebuild it with this version")
        with _damaged(path, "rebuild the index with `python -m jobs.build_index`"):
            return cls(models=ModelSet.from_json(raw["models"]), dim=int(raw["dim"]), vector_dtype=raw["vector_dtype"],
                       config=dict(raw["config"]), sources=list(raw["sources"]), rows=int(raw["rows"]),
                       classes=dict(raw["classes"]), shards=[ShardEntry.from_json(e) for e in raw["shards"]],
                       max_pixels=int(raw.get("max_pixels", DEFAULT_MAX_PIXELS)),
                       metric=raw.get("metric", "inner_product"), strategy=raw.get("strategy"),
                       search=raw.get("search"), class_source=raw.get("class_source"),
                       version=int(raw.get("version", 1)), applied=dict(raw.get("applied", {})),
                       created=raw["created"], schema_version=INDEX_SCHEMA_VERSION)


@dataclass(frozen=True)
class Recommendation:
    """The strategy file ``jobs.evaluate --recommend`` writes (``--strategy FILE`` everywhere reads it).

    Attributes:
        strategy: the recommended strategy (``pipeline.strategy.Strategy.to_json``).
        metric: what it was chosen for (``mAP@5``, ``P@1``, ...).
        value: its value on all queries; held_out_value: on the half it was not chosen on (the
            mean of both halves); global_value: the global strategy's on all queries.
        evaluation: the evaluation's title (data set, queries, gallery).
        classifier, embedder: the models it was measured with.
    """

    strategy: dict
    metric: str
    value: float
    held_out_value: float
    global_value: float
    evaluation: str
    classifier: str
    embedder: str

    def write(self, path: str | Path) -> None:
        Location(path).write_json(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: dict) -> "Recommendation":
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in raw]
        if missing or not isinstance(raw["strategy"], dict):
            raise ValueError(f"not a recommendation: missing {', '.join(missing) or 'a strategy object'}")
        return cls(**{n: raw[n] for n in names})
