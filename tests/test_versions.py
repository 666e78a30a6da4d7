"""Immutable index versions: deletions (tombstones inside every search), compaction, what a publish
writes and shares, readers during a publish, removal of old versions, the CLI's --delete."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import DIM, assert_same_ranking, synthetic, unit, write_embeddings

from jobs.build_index import main as build_main
from pipeline.index import (
    IndexConfig,
    SearchParams,
    ShardedIndex,
    append_index,
    build_index,
    delete_from_index,
    live_ids,
)
from pipeline.index.follow import FollowedIndex
from pipeline.index.versions import published, read_version, remove_old_versions
from pipeline.sources import uri_id

K = 10


def subset(data: dict, keep: np.ndarray) -> dict:
    return {name: values[keep] for name, values in data.items()}


def assert_same_hits(got: list[list], want: list[list]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert_same_ranking([h.id for h in a], [h.score for h in a], [h.id for h in b], [h.score for h in b])


@pytest.mark.parametrize("kind, dtype, heads", [("flat", "float32", None), ("flat", "float16", None),
                                                ("hnsw-sq8", "float32", 60)])
def test_deleted_rows_are_never_returned(tmp_path: Path, kind: str, dtype: str, heads: int | None) -> None:
    """After a delete, class and global search over every index kind return what an index built
    without those rows returns (exact kinds), and never a deleted id (approximate kinds too)."""
    data = synthetic(2400, classes=12, seed=3)
    config = IndexConfig(shard_size=800, global_index=kind, head_min_rows=heads)
    build_index(write_embeddings(tmp_path / "emb", data), tmp_path / "index", config, dtype)
    rng = np.random.default_rng(4)
    gone = np.sort(rng.choice(data["id"], 240, replace=False))  # 10 %: below the compaction threshold
    manifest = delete_from_index(tmp_path / "index", gone)
    assert manifest.version == 2 and manifest.rows == 2400 - 240
    assert all(s.deleted is not None for s in manifest.shards)  # tombstones, no shard rewritten
    index = ShardedIndex.load(tmp_path / "index")
    assert len(index) == 2160 and index.version == 2
    queries = unit(np.concatenate([data["embedding"][np.isin(data["id"], gone)][:20],
                                   rng.normal(size=(20, DIM))]))
    classes = np.stack([rng.integers(0, 12, 40), rng.integers(0, 12, 40)], axis=1)
    by_class = index.search_class(queries, classes, k=K)
    overall = index.search_global(queries, k=K)
    for hits in by_class + overall:
        assert len(hits) == K
        assert not np.isin([h.id for h in hits], gone).any()
    assert all(index.lookup(int(i)) is None for i in gone[:10])
    for c in range(12):
        assert manifest.class_size(c) == int(((data["classes"][:, 0] == c) & ~np.isin(data["id"], gone)).sum())
    if kind == "flat":
        kept = subset(data, ~np.isin(data["id"], gone))
        build_index(write_embeddings(tmp_path / "emb-kept", kept), tmp_path / "without", config, dtype)
        without = ShardedIndex.load(tmp_path / "without")
        assert_same_hits(by_class, without.search_class(queries, classes, k=K))
        assert_same_hits(overall, without.search_global(queries, k=K))
    # The old version is still there, whole, for readers that loaded it.
    old = ShardedIndex.load(tmp_path / "index", version=1)
    assert len(old) == 2400 and old.version == 1


def test_compaction_rebuilds_only_the_shard_past_the_threshold(tmp_path: Path) -> None:
    data = synthetic(1500, classes=15, seed=5)
    config = IndexConfig(shard_size=500, global_index="flat")
    first = build_index(write_embeddings(tmp_path / "emb", data), tmp_path / "index", config)
    shard0 = np.asarray([cls for cls, where in first.classes.items() if where[0] == 0], dtype=int)
    in0 = data["id"][np.isin(data["classes"][:, 0], shard0)]
    few = in0[:5]
    many = in0[5: 5 + int(0.3 * len(in0))]
    second = delete_from_index(tmp_path / "index", few)
    assert second.shards[0].deleted["rows"] == 5 and second.shards[0].path == first.shards[0].path
    third = delete_from_index(tmp_path / "index", many)
    assert third.shards[0].deleted is None and third.shards[0].path.endswith("-v000003")  # compacted
    assert third.shards[0].rows == len(in0) - 5 - len(many)
    assert [s.path for s in third.shards[1:]] == [s.path for s in first.shards[1:]]  # shared, untouched
    index = ShardedIndex.load(tmp_path / "index")
    assert len(index) == 1500 - 5 - len(many)
    assert np.array_equal(live_ids(tmp_path / "index"), np.sort(np.setdiff1d(data["id"], np.r_[few, many])))


def test_a_reader_during_a_publish_loads_the_old_version_whole(tmp_path: Path) -> None:
    """A publish writes its shard files first (new names) and the pointer last: a reader that loads
    while the new files are written (and checks every file's sha256) gets the old version intact;
    once the pointer is written it gets the new one. Synchronised by events inside the build."""
    a, b = synthetic(1200, classes=10, seed=7), synthetic(800, classes=14, seed=8, id_offset=10_000)
    b = subset(b, b["classes"][:, 0] >= 10)  # new classes only: the old shards stay as they are
    config = IndexConfig(shard_size=300, global_index="flat")
    build_index(write_embeddings(tmp_path / "a", a), tmp_path / "index", config)
    built, release = threading.Event(), threading.Event()

    def paused_map(fn, jobs):  # builds every shard, then holds the publish before its pointer
        results = list(map(fn, jobs))
        built.set()
        assert release.wait(60)
        return results

    errors: list[BaseException] = []

    def publish() -> None:
        try:
            append_index(write_embeddings(tmp_path / "b", b), tmp_path / "index", mapper=paused_map)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    writer = threading.Thread(target=publish)
    writer.start()
    assert built.wait(60)
    assert any(p.name.endswith("-v000002") for p in (tmp_path / "index" / "shards").iterdir())
    during = ShardedIndex.load(tmp_path / "index", verify=True)
    assert during.version == 1 and len(during) == 1200
    during.search_global(unit(np.ones((1, DIM))), k=5)
    release.set()
    writer.join(60)
    assert not errors
    after = ShardedIndex.load(tmp_path / "index", verify=True, reuse=during)
    assert after.version == 2 and len(after) == 1200 + len(b["id"])
    reused = [n for n in after.shard_numbers if after._shards[n] is during._shards.get(n)]
    assert reused == during.shard_numbers and len(reused) < len(after.shard_numbers)  # taken over, not reloaded


def test_old_versions_are_removed_after_the_grace_period(tmp_path: Path) -> None:
    data = synthetic(900, classes=9, seed=9)
    config = IndexConfig(shard_size=300, global_index="flat")
    build_index(write_embeddings(tmp_path / "emb", data), tmp_path / "index", config)
    for step in range(3):  # versions 2..4, each compacting one shard (40 % of a class deleted)
        cls = data["id"][data["classes"][:, 0] == step]
        delete_from_index(tmp_path / "index", cls[: len(cls) // 2], compact_at=0.01, grace_s=3600)
    assert published(tmp_path / "index") == [1, 2, 3, 4]  # within the grace period: all kept
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    assert remove_old_versions(tmp_path / "index", keep=2, grace_s=3600, now=later) == [1, 2]
    assert published(tmp_path / "index") == [3, 4]
    wanted = {s.path.split("/")[1] for v in (3, 4) for s in read_version(tmp_path / "index", v).shards}
    assert {p.name for p in (tmp_path / "index" / "shards").iterdir()} == wanted
    with pytest.raises(FileNotFoundError):
        ShardedIndex.load(tmp_path / "index", version=1)
    assert ShardedIndex.load(tmp_path / "index", version=3, verify=True).version == 3


def test_delete_command_takes_ids_and_uris(tmp_path: Path, capsys) -> None:
    data = synthetic(600, classes=6, seed=10)
    data["id"][1] = uri_id(data["uri"][1])  # as the embedding job names images
    emb = write_embeddings(tmp_path / "emb", data)
    assert build_main(["--embeddings", str(emb), "--output", str(tmp_path / "index"), "--global-index", "flat"]) == 0
    listing = tmp_path / "takedown.txt"
    listing.write_text(f"# takedown 1\n{data['id'][0]}\n{data['uri'][1]}\n\n12345678901\n")
    assert build_main(["--output", str(tmp_path / "index"), "--delete", str(listing)]) == 0
    out = capsys.readouterr().out
    assert "version 2: 2 images deleted (1 of the 3 given were not in it); 598 images" in out
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["rows"] == 598
    assert build_main(["--output", str(tmp_path / "index"), "--delete", str(listing)]) == 0
    assert "nothing published" in capsys.readouterr().out
    assert build_main(["--output", str(tmp_path / "index"), "--strategy", "class@1"]) == 0
    assert read_version(tmp_path / "index").version == 3
    index = ShardedIndex.load(tmp_path / "index")
    hits = index.search_global(data["embedding"][:2], k=3)
    assert data["id"][0] not in [h.id for h in hits[0]] and data["id"][1] not in [h.id for h in hits[1]]


def test_search_params_pass_the_selector() -> None:
    import faiss
    sel = faiss.IDSelectorRange(0, 10)
    assert SearchParams().faiss_params(faiss.IndexFlatIP(4), 5) is None
    assert SearchParams().faiss_params(faiss.IndexFlatIP(4), 5, sel=sel).sel is not None


def test_a_followed_index_loads_new_versions_and_keeps_the_one_before(tmp_path: Path) -> None:
    data = synthetic(900, classes=9, seed=12)
    build_index(write_embeddings(tmp_path / "emb", data), tmp_path / "index", IndexConfig(shard_size=300))
    followed = FollowedIndex(tmp_path / "index", keep=2)
    assert followed.refresh() is None and followed.held() == [1]
    delete_from_index(tmp_path / "index", data["id"][:10])
    delete_from_index(tmp_path / "index", data["id"][10:20])
    assert followed.refresh() == 3 and followed.held() == [1, 3]  # the newest published, beside the one before
    assert len(followed.current) == 880 and len(followed.get(1)) == 900
    # Deletes write tombstones only: the new version maps no file again, it takes the shards over.
    assert all(followed.current._shards[n].vectors is followed.get(1)._shards[n].vectors
               for n in followed.current.shard_numbers)
    assert len(followed.get(2)) == 890 and followed.held() == [2, 3]  # a version a request names: loaded then
    assert followed.latest == 3
    (tmp_path / "index" / "manifest.json").write_text("{ not json")  # a damaged pointer: keep serving
    assert followed.refresh() is None and followed.latest == 3


def test_versions_on_an_object_store_and_the_cache_keeps_two(tmp_path: Path, s3_bucket: str, monkeypatch) -> None:
    """The same on an S3 server: tombstones travel through the local cache, and the cache keeps the
    files of the version loaded and of the one before it, no older."""
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    data = synthetic(900, classes=9, seed=13)
    index = f"{s3_bucket}/index"
    build_index(write_embeddings(tmp_path / "emb", data), index, IndexConfig(shard_size=300, global_index="flat"))
    followed = FollowedIndex(index)
    for step in range(3):  # versions 2..4, each compacting one class's shard
        cls = data["id"][data["classes"][:, 0] == step]
        delete_from_index(index, cls[: len(cls) // 2], compact_at=0.01)
        assert followed.refresh() == step + 2
    gone = np.concatenate([data["id"][data["classes"][:, 0] == s][: (data["classes"][:, 0] == s).sum() // 2]
                           for s in range(3)])
    hits = followed.current.search_global(data["embedding"][np.isin(data["id"], gone)][:20], k=10)
    assert not np.isin([h.id for row in hits for h in row], gone).any()
    cached = {p.name for p in next((tmp_path / "cache").glob("index-*")).joinpath("shards").iterdir()}
    wanted = {s.path.split("/")[1] for v in (3, 4) for s in read_version(index, v).shards}
    assert cached == wanted


def test_a_followed_shard_group_takes_the_shards_a_version_adds(tmp_path: Path) -> None:
    a, b = synthetic(900, classes=9, seed=14), synthetic(900, classes=12, seed=15, id_offset=10_000)
    b = subset(b, b["classes"][:, 0] >= 9)  # new classes: new shards
    build_index(write_embeddings(tmp_path / "a", a), tmp_path / "index", IndexConfig(shard_size=300))
    first = FollowedIndex(tmp_path / "index", shards=[0])
    last = FollowedIndex(tmp_path / "index", shards=[1, 2], new_shards=True)
    manifest = append_index(write_embeddings(tmp_path / "b", b), tmp_path / "index")
    assert first.refresh() == last.refresh() == 2 and len(manifest.shards) > 3
    assert first.current.shard_numbers == [0] and last.current.shard_numbers == list(range(1, len(manifest.shards)))
    assert len(first.current) + len(last.current) == 900 + len(b["id"])
