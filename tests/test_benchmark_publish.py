"""``python -m jobs.benchmark publish`` on tiny indexes: the three publishes run, each one's
version reaches the follower, the shards are rebuilt, added or given tombstones as each change
needs, no deleted id comes back, every added row is found, and an index given with ``--index`` is
copied, never changed. (Times and memory are printed, never asserted.) The builds and publishes run
in this process here (each child process would import the whole pipeline again); the follower is
still a process of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import in_process

import jobs.benchmark.publish as publish
from jobs.benchmark.cli import main
from jobs.benchmark.index import _synthetic_gallery
from pipeline.index import IndexConfig, build_index
from pipeline.index.versions import read_version

ROWS, APPEND = 3000, 40


@pytest.fixture(scope="module", autouse=True)
def no_child_processes():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(publish, "_in_child", in_process)
        yield


def _run(argv: list[str], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    assert main(["publish", *argv, "--append-rows", str(APPEND), "--check-rows", "50", "--scratch", str(out),
                 "--json", str(out / "publish.json")]) == 0
    return json.loads((out / "publish.json").read_text())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("publish")
    return _run(["--rows", str(ROWS), "--dim", "16", "--classes", "20", "--shard-size", "1000",
                 "--global-index", "flat", "--head-min-rows", "300"], out)


def test_each_publish_reaches_the_follower(synthetic) -> None:
    assert synthetic["source"]["kind"] == "synthetic" and synthetic["machine"] and synthetic["threads"]["cpu_model"]
    (run,) = synthetic["runs"]
    assert run["build"]["seconds"] > 0 and run["shards"] >= 3
    start = run["follower_start"]
    assert start["version"] == 1 and start["shards_loaded"] == run["shards"]
    assert start["check"]["added_found_global"] == start["check"]["added_checked"] == 50  # existing rows find themselves
    assert [s["step"] for s in run["steps"]] == ["delete", "append", "new_class"]
    for number, step in enumerate(run["steps"], start=2):
        assert step["version_before"] == number - 1 and step["version"] == number
        assert step["refresh"]["version"] == step["check"]["version"] == number
        assert step["refresh"]["held"] == [number - 1, number]  # the one before is still held
        assert step["refresh"]["shards_reused"] + step["refresh"]["shards_loaded"] == step["shards"]["shards"]
        assert step["publish_to_loaded_s"] >= step["publish_s"]
        for memory in (step["refresh"]["memory_before"], step["refresh"]["memory_after"]):
            assert memory["rss_mb"] > 0 and memory["index_files_mapped_mb"] > 0
        assert step["refresh"]["peak_rss_mb"] >= step["refresh"]["memory_before"]["rss_mb"] * 0.9


def test_no_deleted_id_returned_and_every_added_row_found(synthetic) -> None:
    delete, append, new_class = synthetic["runs"][0]["steps"]
    assert delete["deleted_rows"] == ROWS // 100
    assert [s["shards"]["rows"] for s in (delete, append, new_class)] == [ROWS - 30, ROWS - 30 + APPEND,
                                                                           ROWS - 30 + 2 * APPEND]
    for step in (delete, append, new_class):
        assert step["check"]["deleted_checked"] == 30 and step["check"]["deleted_returned"] == 0
    assert delete["check"]["added_checked"] == 0
    assert append["check"]["added_checked"] == APPEND and new_class["check"]["added_checked"] == 2 * APPEND
    for step in (append, new_class):  # flat: exact, so every added row finds itself
        assert step["check"]["added_found_global"] == step["check"]["added_found_class"] == step["check"]["added_checked"]


def test_each_change_touches_the_shards_it_should(synthetic) -> None:
    delete, append, new_class = synthetic["runs"][0]["steps"]
    shards = synthetic["runs"][0]["shards"]
    # a takedown rebuilds nothing: tombstones; the follower maps no file again (new tombstones only)
    assert delete["shards"]["rebuilt"] == delete["shards"]["new"] == 0 and delete["shards"]["tombstoned"] >= 1
    assert delete["refresh"]["shards_loaded"] == 0 and delete["refresh"]["shards_reused"] == shards
    # an append into one known class rebuilds that class's shard, the others are reused
    assert len(append["into_classes"]) == 1
    assert append["shards"]["rebuilt"] == 1 and append["shards"]["new"] == 0
    assert append["refresh"]["shards_loaded"] == 1 and append["refresh"]["shards_reused"] == shards - 1
    # a new class gets a new shard; nothing else is loaded again
    assert new_class["shards"]["new"] == 1 and new_class["shards"]["rebuilt"] == 0
    assert new_class["refresh"]["shards_loaded"] == 1 and new_class["refresh"]["shards_reused"] == shards
    assert new_class["into_classes"][0] not in append["into_classes"]


def test_an_existing_index_is_copied_not_changed(tmp_path) -> None:
    emb, index = tmp_path / "emb", tmp_path / "index"
    _synthetic_gallery(emb, 1500, 16, 10, seed=1, noise=0.5, decay=1.2)
    build_index(emb, index, IndexConfig(shard_size=600, global_index="flat", head_min_rows=None))
    before = (index / "manifest.json").read_text()
    results = _run(["--index", str(index)], tmp_path / "scratch")
    assert results["source"] == {"kind": "index", "path": str(index), "copy_s": results["source"]["copy_s"]}
    (run,) = results["runs"]
    assert [s["version"] for s in run["steps"]] == [2, 3, 4]
    assert all(s["check"]["deleted_returned"] == 0 for s in run["steps"])
    assert (index / "manifest.json").read_text() == before and read_version(index).version == 1


def test_bad_arguments_are_refused(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["publish", "--delete-fraction", "0"])
    assert exit_info.value.code == 2
    assert "--delete-fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["publish", "--index", str(tmp_path / "nothing")])
    assert "no index there" in capsys.readouterr().err
