"""Change detection in the embedding job: re-runs embed only new and changed images, record the
images that left the inputs, keep a change log per run; --delete; what the index reads
(change_log, live_parts). The job's tests share one module-scoped local Ray; the first test needs
none."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from helpers import TINY_CLASSIFIER, make_class_folders, synthetic, write_embeddings, write_jpeg

from jobs.embed import main
from pipeline.embed_job import EmbedConfig, run
from pipeline.embed_output import change_log, delete_images, live_parts, load_history, parse_deletes, plan_run, run_state
from pipeline.manifests import EmbeddingManifest
from pipeline.sources import discover_shards, uri_id
from pipeline.storage import Location

REPO = Path(__file__).resolve().parents[1]


def with_ray(test):
    """A test that runs the job: on the module's local Ray."""
    return pytest.mark.ray(pytest.mark.usefixtures("local_ray")(test))


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_deletes_change_log_and_live_parts_without_a_job(tmp_path: Path) -> None:
    """An output written without runs (helpers.write_embeddings): one run 1; --delete's run 2; the
    rows that stand; the --delete list's forms; a manifest of another schema refused clearly."""
    out = Location(write_embeddings(tmp_path / "emb", synthetic(20, classes=3, seed=1), parts=3))
    assert [(c.run, c.added.tolist(), len(c.changed), len(c.deleted)) for c in change_log(out)] == \
        [(1, list(range(20)), 0, 0)]
    ids, entries = parse_deletes(["3", "  # a comment", "", "/img/4.jpg", "12345678"])
    assert entries == 3 and 3 in ids and uri_id("/img/4.jpg") in ids
    result = delete_images(out, np.array([0, 1, 999]))
    assert (result.run, result.deleted, result.unknown, result.finished) == (2, 2, 1, None)
    assert delete_images(out, np.array([0])).run is None  # deleted already: nothing recorded
    history = change_log(out)
    assert [c.run for c in history] == [1, 2] and history[1].deleted.tolist() == [0, 1]
    assert len(history[1].added) == len(history[1].changed) == 0
    parts = live_parts(out)
    assert sorted(i for _, _, stale in parts for i in stale.tolist()) == [0, 1]
    assert all(r == 1 for _, r, _ in parts) and live_parts(out, after_run=1) == []
    manifest = EmbeddingManifest.read(out)
    assert manifest.run == 2 and manifest.counts["embedded"] == 18 and manifest.schema_version == 2
    raw = json.loads((out.path / "manifest.json").read_text())
    (out.path / "manifest.json").write_text(json.dumps(raw | {"schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99 is not 2; re-run the embedding job"):
        change_log(out)


def config(inputs: list, output, **kwargs) -> EmbedConfig:
    defaults = dict(classifier=TINY_CLASSIFIER, embedder=TINY_CLASSIFIER, batch_size=4, decode_batch_size=4,
                    files_per_shard=4, top_n=3)
    return EmbedConfig(inputs=tuple(str(p) for p in inputs), output=str(output), **{**defaults, **kwargs})


def ids_of(*paths) -> list[int]:
    return sorted(uri_id(str(p)) for p in paths)


def log(out: Path, run: int) -> dict:
    return json.loads((out / "changes" / f"run-{run:06d}.json").read_text())


def rewrite(path: Path, seed: int, size=(40, 50)) -> None:
    """New content at the same path, its modification time set one second later (so the test does
    not depend on the filesystem's clock resolution)."""
    before = path.stat().st_mtime_ns
    write_jpeg(path, np.random.default_rng(seed), size)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def standing_rows(out) -> dict[int, dict]:
    """What a fresh index would take: live_parts' rows minus each part's stale ids."""
    rows: dict[int, dict] = {}
    for part, _, stale in live_parts(out):
        for row in part.read_parquet(["id", "uri", "version"]).to_pylist():
            if row["id"] not in set(stale.tolist()):
                assert row["id"] not in rows, "two standing rows for one id"
                rows[row["id"]] = row
    return rows


@with_ray
def test_runs_follow_the_folder_added_changed_deleted(tmp_path: Path) -> None:
    made = make_class_folders(tmp_path / "data", classes=2, per_class=4, bad=1)
    good, bad = made["good"], made["bad"][0]
    out = tmp_path / "out"

    first = run(config([tmp_path / "data"], out))
    assert first["changes"] | {"log": None} == {"run": 1, "added": 8, "changed": 0, "deleted": 0, "failed": 1,
                                               "released": 0, "log": None, "deletions_checked": True, "note": None}
    one = log(out, 1)
    assert one["added"] == ids_of(*good) and one["failed"] == ids_of(bad)
    assert one["changed"] == one["deleted"] == []
    history = change_log(Location(out))
    assert [c.run for c in history] == [1] and history[0].added.tolist() == ids_of(*good)
    assert history[0].added.dtype == np.int64 and len(history[0].changed) == len(history[0].deleted) == 0
    manifest = EmbeddingManifest.read(out)
    assert manifest.run == 1 and {p["run"] for p in manifest.parts + manifest.error_parts} == {1}
    assert manifest.counts["embedded"] == 8 and manifest.counts["failed"] == 1

    # Nothing changed: nothing read, nothing embedded, no new run.
    again = run(config([tmp_path / "data"], out))
    assert again["embedded_this_run"] == 0 and again["shards"]["read"] == 0
    assert again["changes"]["run"] is None and again["changes"]["added"] == again["changes"]["deleted"] == 0
    assert sorted(p.name for p in (out / "changes").iterdir()) == ["run-000001.json"]
    assert EmbeddingManifest.read(out).run == 1

    # One image added, one rewritten, one removed; the broken one stays broken (not retried).
    added = write_jpeg(tmp_path / "data" / "class0" / "new.jpg", np.random.default_rng(42))
    changed, removed = good[5], good[2]
    rewrite(changed, seed=43)
    removed.unlink()
    second = run(config([tmp_path / "data"], out))
    assert second["embedded_this_run"] == 2
    assert {k: second["changes"][k] for k in ("run", "added", "changed", "deleted", "failed")} == \
        {"run": 2, "added": 1, "changed": 1, "deleted": 1, "failed": 0}
    two = log(out, 2)
    assert (two["added"], two["changed"], two["deleted"], two["failed"]) == \
        (ids_of(added), ids_of(changed), ids_of(removed), [])
    history = change_log(Location(out))
    assert [c.run for c in history] == [1, 2]
    assert history[1].added.tolist() == ids_of(added) and history[1].changed.tolist() == ids_of(changed)
    assert history[1].deleted.tolist() == ids_of(removed)

    # live_parts: the run-1 rows of the changed and the removed image are stale; run 2's are not.
    parts = live_parts(Location(out))
    assert sorted({r for _, r, _ in parts}) == [1, 2]
    stale_in_1 = sorted(int(i) for _, r, stale in parts if r == 1 for i in stale)
    assert stale_in_1 == sorted(ids_of(changed) + ids_of(removed))
    assert all(len(stale) == 0 for _, r, stale in parts if r == 2)
    assert {r for _, r, _ in live_parts(Location(out), after_run=1)} == {2}
    standing = standing_rows(Location(out))
    now = [p for p in good if p != removed] + [added]
    assert sorted(standing) == ids_of(*now)
    stat = changed.stat()
    assert standing[uri_id(str(changed))]["version"] == f"{stat.st_size}:{stat.st_mtime_ns}"
    manifest = EmbeddingManifest.read(out)
    assert manifest.run == 2 and manifest.counts["embedded"] == 8 and manifest.counts["failed"] == 1

    # The broken file repaired (a new version): retried, and now embedded, as added.
    rewrite(bad, seed=44)
    third = run(config([tmp_path / "data"], out))
    assert third["embedded_this_run"] == 1 and log(out, 3)["added"] == ids_of(bad)
    assert log(out, 3)["changed"] == [] and EmbeddingManifest.read(out).counts["failed"] == 0


@with_ray
def test_an_interrupted_run_is_finished_under_its_number(tmp_path: Path) -> None:
    """A run killed after some of its parts: the next invocation is the same run; its change log
    holds every image of the run once, and only the lost images are embedded again."""
    make_class_folders(tmp_path / "data", classes=2, per_class=3)
    out = tmp_path / "out"
    run(config([tmp_path / "data"], out))
    new = [write_jpeg(tmp_path / "data" / "class1" / f"new{i}.jpg", np.random.default_rng(50 + i)) for i in range(6)]
    run(config([tmp_path / "data"], out, files_per_shard=2))
    # As if killed before its change log and manifest: one of its parts never got written.
    parts = sorted((out / "embeddings").glob("part-*.json"), key=lambda p: p.name)
    of_run_2 = [p for p in parts if json.loads(p.read_text())["run"] == 2]
    lost = pq.read_table(of_run_2[0].with_suffix(".parquet"), columns=["id"])["id"].to_pylist()
    of_run_2[0].with_suffix(".parquet").unlink()
    of_run_2[0].unlink()
    (out / "changes" / "run-000002.json").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest | {
        "run": 1, "parts": [p for p in manifest["parts"] if p["run"] == 1]}))
    resumed = run(config([tmp_path / "data"], out, files_per_shard=2))
    assert resumed["changes"]["run"] == 2 and resumed["embedded_this_run"] == len(lost)
    assert log(out, 2)["added"] == ids_of(*new)
    assert [c.run for c in change_log(Location(out))] == [1, 2]


@with_ray
def test_delete_by_id_and_uri_without_ray_and_what_comes_back(tmp_path: Path) -> None:
    made = make_class_folders(tmp_path / "data", classes=2, per_class=3)
    good = made["good"]
    out = tmp_path / "out"
    run(config([tmp_path / "data"], out))
    listing = tmp_path / "takedown.txt"
    listing.write_text(f"{uri_id(str(good[0]))}\n# a comment\n\n{good[4]}\n/no/such/image.jpg\n")
    # In a fresh process: a no-change re-run and the deletes, neither starting Ray.
    script = ("import sys, ray\nfrom jobs.embed import main\n"
              "a = main(sys.argv[1:11])\nb = main(sys.argv[11:])\n"
              "print('RAY STARTED' if ray.is_initialized() else 'NO RAY')\nsys.exit(a or b)")
    args = ["--input", str(tmp_path / "data"), "--output", str(out), "--classifier", TINY_CLASSIFIER,
            "--embedder", TINY_CLASSIFIER, "--top-n", "3", "--output", str(out), "--delete", str(listing)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "0 new, 0 changed, 0 deleted: nothing to embed" in lines
    assert f"run 2: 2 deleted ({out}/changes/run-000002.json); 1 of 3 ids name no image in the output " \
           "(never embedded, or deleted already)" in lines
    assert lines[-1] == "NO RAY"
    two = log(out, 2)
    assert two["kind"] == "delete" and two["deleted"] == ids_of(good[0], good[4])
    assert two["added"] == two["changed"] == []
    assert change_log(Location(out))[-1].deleted.tolist() == ids_of(good[0], good[4])
    assert sorted(standing_rows(Location(out))) == ids_of(*good[1:4], good[5])
    assert EmbeddingManifest.read(out).counts["embedded"] == 4

    # Still in the inputs, unchanged: they stay deleted.
    assert run(config([tmp_path / "data"], out))["changes"]["run"] is None
    # One changes (embedded again, as added); the other leaves the inputs and comes back unchanged.
    rewrite(good[0], seed=60)
    kept = tmp_path / "kept.jpg"
    good[4].rename(kept)
    third = run(config([tmp_path / "data"], out))
    assert third["embedded_this_run"] == 1 and log(out, 3)["added"] == ids_of(good[0])
    assert log(out, 3)["released"] == ids_of(good[4]) and log(out, 3)["deleted"] == []
    kept.rename(good[4])
    fourth = run(config([tmp_path / "data"], out))
    assert fourth["embedded_this_run"] == 1 and log(out, 4)["added"] == ids_of(good[4])
    assert sorted(standing_rows(Location(out))) == ids_of(*good)
    # Deleting what is not there records nothing.
    listing.write_text("12345\n")
    assert main(["--output", str(out), "--delete", str(listing)]) == 0
    assert EmbeddingManifest.read(out).run == 4


def tar_with(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@with_ray
def test_a_changed_tar_is_read_again_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    (tmp_path / "in").mkdir()
    members = {t: {f"n0000000{t}_{i}.JPEG": write_jpeg(tmp_path / "src" / f"{t}-{i}.jpg", rng).read_bytes()
                   for i in range(3)} for t in range(3)}
    tars = {t: tmp_path / "in" / f"n0000000{t}.tar" for t in range(3)}
    for t, tar in tars.items():
        tar_with(tar, members[t])
    out = tmp_path / "out"
    first = run(config([tmp_path / "in"], out))
    assert first["changes"]["added"] == 9

    def member_id(t: int, name: str) -> int:
        return uri_id(f"{tars[t]}#{name}")

    def replace_tar(t: int, content: dict[str, bytes]) -> None:
        before = tars[t].stat().st_mtime_ns
        tar_with(tars[t], content)
        os.utime(tars[t], ns=(before + 10**9, before + 10**9))

    # One member of one tar replaced: that tar alone is read, that member alone embedded, as changed.
    replaced = "n00000001_1.JPEG"
    replace_tar(1, members[1] | {replaced: write_jpeg(tmp_path / "src" / "x.jpg", rng).read_bytes()})
    second = run(config([tmp_path / "in"], out))
    assert second["shards"] == {"total": 3, "read": 1, "complete_not_read": 2}
    assert second["embedded_this_run"] == 1
    assert (log(out, 2)["added"], log(out, 2)["changed"], log(out, 2)["deleted"]) == \
        ([], [member_id(1, replaced)], [])
    # A tar rewritten with the same images (a new time): read, nothing embedded, no run.
    replace_tar(2, members[2])
    third = run(config([tmp_path / "in"], out))
    assert third["shards"]["read"] == 1 and third["embedded_this_run"] == 0 and third["changes"]["run"] is None
    # A member removed from a tar: deleted.
    gone = "n00000000_2.JPEG"
    replace_tar(0, {k: v for k, v in members[0].items() if k != gone})
    fourth = run(config([tmp_path / "in"], out))
    assert fourth["embedded_this_run"] == 0 and log(out, 3)["deleted"] == [member_id(0, gone)]
    assert len(standing_rows(Location(out))) == 8


@with_ray
def test_deletions_are_not_guessed_from_a_partial_run(tmp_path: Path) -> None:
    """A run over fewer inputs than before does not delete the images of the inputs left out."""
    make_class_folders(tmp_path / "a", classes=1, per_class=2)
    make_class_folders(tmp_path / "b", classes=1, per_class=2, seed=1)
    out = tmp_path / "out"
    run(config([tmp_path / "a", tmp_path / "b"], out))
    write_jpeg(tmp_path / "a" / "class0" / "more.jpg", np.random.default_rng(3))
    partial = run(config([tmp_path / "a"], out))
    assert partial["changes"]["added"] == 1 and partial["changes"]["deleted"] == 0
    assert not partial["changes"]["deletions_checked"] and str(tmp_path / "b") in partial["changes"]["note"]
    assert len(standing_rows(Location(out))) == 5


@with_ray
def test_an_output_made_before_change_logs_reads_as_one_run(tmp_path: Path) -> None:
    """Parts without versions or runs and a schema-1 manifest: one run 1 that added every id; the
    next run is run 2 and takes the old rows as unchanged."""
    made = make_class_folders(tmp_path / "data", classes=1, per_class=3)
    out = tmp_path / "out"
    run(config([tmp_path / "data"], out))
    for part in (out / "embeddings").glob("part-*.parquet"):  # as written before versions and runs
        pq.write_table(pq.read_table(part).drop_columns(["version"]), part)
        record = part.with_suffix(".json")
        record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "run"}))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("run")
    manifest["schema_version"] = 1
    for p in manifest["parts"]:
        p.pop("run")
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "changes" / "run-000001.json").unlink()
    history = change_log(Location(out))
    assert [(c.run, c.added.tolist()) for c in history] == [(1, ids_of(*made["good"]))]
    assert [r for _, r, _ in live_parts(Location(out))] == [1] * len(manifest["parts"])
    added = write_jpeg(tmp_path / "data" / "class0" / "new.jpg", np.random.default_rng(9))
    summary = run(config([tmp_path / "data"], out))
    assert summary["embedded_this_run"] == 1 and log(out, 2)["added"] == ids_of(added)
    assert [c.run for c in change_log(Location(out))] == [1, 2]


@pytest.fixture
def ray_with_s3(s3_bucket: str):
    """The module's Ray restarted with the S3 server's variables in its workers."""
    ray.shutdown()
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": env})
    yield s3_bucket
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")


@with_ray
def test_inputs_and_output_on_object_storage(tmp_path: Path, ray_with_s3: str) -> None:
    bucket = ray_with_s3
    made = make_class_folders(tmp_path / "data", classes=2, per_class=3)
    source = Location(f"{bucket}/gallery")
    for path in made["good"]:
        (source / path.parent.name / path.name).write_bytes(path.read_bytes())
    out = Location(f"{bucket}/emb")
    first = run(config([source.uri], out.uri))
    assert first["changes"]["added"] == 6
    uri = f"{source.uri}/class1/img001.jpg"
    # A rewritten object (another size: S3 times have 1 s resolution) and a removed one.
    (source / "class1" / "img001.jpg").write_bytes(
        write_jpeg(tmp_path / "other.jpg", np.random.default_rng(5), size=(30, 70)).read_bytes())
    (source / "class0" / "img000.jpg").delete()
    state = run_state(load_history(out))
    plan = plan_run(out, discover_shards([source.uri], 4), state)
    assert [s.uri for s in plan.shards] == [f"{source.uri}/class1"] and plan.listed_files == 5
    second = run(config([source.uri], out.uri))
    assert second["embedded_this_run"] == 1
    history = change_log(out)
    assert history[-1].changed.tolist() == [uri_id(uri)]
    assert history[-1].deleted.tolist() == [uri_id(f"{source.uri}/class0/img000.jpg")]
    assert sorted(standing_rows(out)) == sorted(uri_id(f"{source.uri}/{p.parent.name}/{p.name}")
                                                for p in made["good"][1:])
    assert run(config([source.uri], out.uri))["changes"]["run"] is None
    listing = tmp_path / "takedown.txt"
    listing.write_text(f"{source.uri}/class1/img002.jpg\n")
    assert main(["--output", out.uri, "--delete", str(listing)]) == 0
    assert change_log(out)[-1].deleted.tolist() == [uri_id(f"{source.uri}/class1/img002.jpg")]
