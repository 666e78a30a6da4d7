"""The embedding job on Ray clusters: actors spread over (logical) GPUs, and `ray job submit`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from helpers import TINY_CLASSIFIER, assert_same_ranking, free_port, make_class_folders

from jobs.build_index import main as build_index_main
from pipeline.embed_job import EmbedConfig, run
from pipeline.index import IndexIntegrityError, ShardedIndex
from pipeline.manifests import EmbeddingManifest
from pipeline.parts import TEST_HANG_AFTER_PARTS, committed_parts
from pipeline.search import QueryEngine
from pipeline.storage import Location

pytestmark = [pytest.mark.ray, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[1]


def test_actors_are_placed_on_both_gpus(tmp_path: Path) -> None:
    """Two logical GPUs on a CPU machine: one model actor per GPU, both do work.

    Ray Data hands each batch to the least busy actor, so both work only while batches queue up,
    as they do for real GPUs: here the model (a random ResNet-50 at 224 px) is far slower than
    decoding tiny JPEGs.
    """
    model = "timm:resnet50@random"
    make_class_folders(tmp_path / "data", classes=4, per_class=10)
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        summary = run(EmbedConfig(inputs=(str(tmp_path / "data"),), output=str(tmp_path / "out"),
                                  classifier=model, embedder=model, batch_size=2,
                                  decode_batch_size=2, files_per_shard=2, num_gpus=1, model_cpus=0.5))
    finally:
        ray.shutdown()
    assert summary["config"]["num_gpus"] == 1
    workers = summary["images_by_worker"]
    gpus = {w.split("/gpu")[1] for w in workers}
    assert gpus == {"0", "1"}, workers
    assert sum(workers.values()) == 40 and summary["counts"]["embedded"] == 40


@pytest.fixture
def ray_head(tmp_path: Path):
    """A `ray start --head` cluster with token authentication on, stopped afterwards."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    # As after `source .venv/bin/activate`: the job's `python` is the project's.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    gcs, dashboard = free_port(), free_port()  # no fixed ports: another Ray on the machine may hold them
    address = f"http://127.0.0.1:{dashboard}"
    # --block in a process group of its own: teardown stops this head only (`ray stop` would stop
    # every Ray on the machine, e.g. a developer's demo running beside the tests). Its own short
    # --temp-dir: the head's "current cluster" file stays there, so a later plain `ray.init()` (the
    # jobs' own) starts its own Ray instead of finding this stopped one.
    temp_dir = tempfile.mkdtemp(prefix="ray-head-", dir="/tmp")  # short: Ray's socket paths must fit
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats",
                             "--port", str(gcs), "--dashboard-port", str(dashboard), "--temp-dir", temp_dir],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([ray_cli, "job", "list", "--address", address], env=env,
                             capture_output=True, timeout=60).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the head's job server did not come up in 180 s"
            time.sleep(1)
        yield ray_cli, env, address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # its graceful stop takes ~30 s; nothing here needs it
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_to_a_local_head(tmp_path: Path, ray_head) -> None:
    ray_cli, env, address = ray_head
    make_class_folders(tmp_path / "data", classes=2, per_class=4, bad=1)
    out = tmp_path / "out"
    deadline = time.monotonic() + 300  # a bound for a broken head only: the loop ends when the agent answers
    while True:
        proc = subprocess.run(
            [ray_cli, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
             "python", "-m", "jobs.embed", "--input", str(tmp_path / "data"), "--output", str(out),
             "--classifier", TINY_CLASSIFIER, "--embedder", TINY_CLASSIFIER, "--batch-size", "4"],
            env=env, capture_output=True, text=True, timeout=600)
        # A head just started may not have its job agent yet (on a busy machine): Ray says to retry.
        if "No available agent to submit job" not in proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"seen": 9, "embedded": 8, "failed": 1, "failed_by_type": manifest["counts"]["failed_by_type"]}
    assert sum(manifest["counts"]["failed_by_type"].values()) == 1


def test_killed_job_on_object_storage_resumes_indexes_and_searches_like_local_disk(
        tmp_path: Path, s3_bucket: str, monkeypatch) -> None:
    """Job -> SIGKILL -> resume -> index -> search on an S3 server (moto's, over HTTP), beside the
    same job on local disk: the same rows, the same index, the same answers."""
    make_class_folders(tmp_path / "data", classes=4, per_class=16, bad=2)
    model = "timm:tf_efficientnet_lite0@random"
    args = ["--input", str(tmp_path / "data"), "--classifier", model, "--embedder", model,
            "--batch-size", "4", "--decode-batch-size", "4"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # with the fixture's AWS variables
    remote = Location(f"{s3_bucket}/run/emb")

    def job(out: str, extra_env: dict | None = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "jobs.embed", *args, "--output", out], cwd=REPO,
                                env=env | (extra_env or {}), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, **kwargs)

    def rows(out: Location) -> dict:
        found = {}
        for name in committed_parts(out / "embeddings"):
            for row in (out / "embeddings" / name).read_parquet(["id", "uri", "classes", "class_probs"]).to_pylist():
                assert row["id"] not in found
                found[row["id"]] = row
        return found

    reference = job(str(tmp_path / "clean"))  # the local-disk run goes on beside the one that gets killed
    # The victim commits exactly two embedding parts, then hangs (pipeline/parts.py's test hook):
    # the kill falls on a committed-part boundary, whatever the machine's speed.
    marker = tmp_path / "two-parts-committed"
    victim = job(remote.uri, start_new_session=True,
                 extra_env={TEST_HANG_AFTER_PARTS: f"embeddings:2:{marker}"})
    deadline = time.monotonic() + 300  # only bounds a broken run; the outcome waits on the marker
    while not marker.exists():
        assert victim.poll() is None, "the job ended before it committed two parts"
        assert time.monotonic() < deadline, "the job never committed two parts"
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert len(committed_parts(remote / "embeddings")) == 2
    written = len(rows(remote))
    assert 0 < written < 64
    # What a writer killed mid-upload (or closed on an error) can leave: an object under a part's
    # final name that no record commits. The resumed run must not trust it.
    (remote / "embeddings" / "part-00000000000000000000.parquet").write_bytes(b"PAR1 half a part")
    assert job(remote.uri).wait(timeout=600) == 0
    assert reference.wait(timeout=600) == 0
    assert "part-00000000000000000000.parquet" not in (remote / "embeddings").list()
    resumed, clean = rows(remote), rows(Location(tmp_path / "clean"))
    assert {i: r["uri"] for i, r in resumed.items()} == {i: r["uri"] for i, r in clean.items()}
    for i, row in clean.items():  # other batches, other processes: equal up to near-tied classes
        assert_same_ranking(resumed[i]["classes"], resumed[i]["class_probs"], row["classes"], row["class_probs"])
    manifest = EmbeddingManifest.read(remote)
    assert manifest.counts["seen"] == 66 and manifest.counts["failed"] == 2
    assert {p["path"] for p in manifest.parts} == {f"embeddings/{n}" for n in committed_parts(remote / "embeddings")}

    # Index both outputs (on S3 and on disk), then search both the same way.
    remote_index = f"{s3_bucket}/run/index"
    assert build_index_main(["--embeddings", remote.uri, "--output", remote_index, "--head-min-rows", "10"]) == 0
    assert build_index_main(["--embeddings", str(tmp_path / "clean"), "--output", str(tmp_path / "index"),
                             "--head-min-rows", "10"]) == 0
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    local_engine, remote_engine = QueryEngine.load(str(tmp_path / "index")), QueryEngine.load(remote_index)
    assert remote_engine.index.manifest.classes == local_engine.index.manifest.classes
    queries = sorted((tmp_path / "data").glob("class*/img00[0-3].jpg"))
    for query in queries:
        for strategy in ("global", "class@1"):
            got = remote_engine.search([query.read_bytes()], k=5, strategy=strategy)[0]
            want = local_engine.search([query.read_bytes()], k=5, strategy=strategy)[0]
            assert_same_ranking([h.id for h in got.hits], [h.score for h in got.hits],
                                [h.id for h in want.hits], [h.score for h in want.hits], atol=1e-4)

    # The cache is checked against the manifest's sha256: a damaged copy is fetched again, a
    # damaged object in the store is refused.
    cached = next((tmp_path / "cache").glob("index-*/shards/0000-v000001/vectors.npy"))
    cached.write_bytes(b"\0" * cached.stat().st_size)
    again = ShardedIndex.load(remote_index)
    assert len(again) == 64 and np.load(cached).shape == (64, remote_engine.index.dim)
    (Location(remote_index) / "shards" / "0000-v000001" / "rows.parquet").write_bytes(b"PAR1 not the rows")
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(IndexIntegrityError, match="rows.parquet is corrupted"):
        ShardedIndex.load(remote_index)
