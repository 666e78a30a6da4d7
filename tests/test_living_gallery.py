"""A living gallery under load: the HTTP service answers continuously while images are added,
deleted and replaced and the index is republished; local disk and an S3 server (moto's, over HTTP).

Each round changes the gallery's files, re-runs the embedding job into the same output (it embeds
only what changed and logs it), applies the change log with ``jobs.build_index --update`` (or a
takedown with ``--delete``), and waits until ``/healthz`` names the new version. Then: every added
image is found by a search with itself, no deleted id is returned by any answer from that version
on, a replaced image is found with its new content, and no request failed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import requests
from helpers import TINY_CLASSIFIER, TINY_CLIP_SPEC, free_port, make_class_folders, write_jpeg

from jobs.build_index import main as build_main
from pipeline.embed_job import EmbedConfig, run
from pipeline.sources import uri_id

pytestmark = [pytest.mark.ray, pytest.mark.serve]

#: How often the service looks for a new version here (a setting, not a synchronisation: the test
#: waits for /healthz to name the version, however long that takes up to DEADLINE_S).
POLL_S = 0.2
DEADLINE_S = 180


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray with Serve, and an S3 server whose address the replicas know from the start
    (a Ray worker's environment is fixed when Ray starts)."""
    from moto.server import ThreadedMotoServer
    import pyarrow.fs as pafs
    from ray import serve

    s3_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    moto.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_EC2_METADATA_DISABLED": "true",
           "LOOKALIKE_CACHE": str(tmp_path_factory.mktemp("cache"))}
    saved = {name: os.environ.get(name) for name in [*env, "AWS_PROFILE"]}
    os.environ.update(env)
    os.environ.pop("AWS_PROFILE", None)
    pafs.FileSystem.from_uri("s3://living?allow_bucket_creation=true")[0].create_dir("living")
    ray.init(address="local", num_cpus=5, include_dashboard=False, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        moto.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Load:
    """Queries the service without pause from a thread, recording every answer."""

    def __init__(self, url: str, images: list[Path]) -> None:
        self.url, self.images = url, [p.read_bytes() for p in images]
        self.answers: list[tuple[int, int | None, list[int]]] = []  # (status, index_version, ids)
        self.answered = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as session:
            i = 0
            while not self.stop.is_set():
                response = session.post(f"{self.url}/search", params={"k": 5, "strategy": "global"},
                                        data=self.images[i % len(self.images)], timeout=60)
                body = response.json() if response.status_code == 200 else {}
                with self.answered:
                    self.answers.append((response.status_code, body.get("index_version"),
                                         [h["id"] for h in body.get("results", [])]))
                    self.answered.notify_all()
                i += 1

    def wait_for(self, count: int) -> None:
        """Blocks until ``count`` answers have come back."""
        with self.answered:
            assert self.answered.wait_for(lambda: len(self.answers) >= count, DEADLINE_S)

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(120)


def wait_for_version(url: str, version: int) -> float:
    """Seconds until /healthz names ``version`` (fails after DEADLINE_S)."""
    start = time.monotonic()
    while time.monotonic() - start < DEADLINE_S:
        if requests.get(f"{url}/healthz", timeout=30).json()["index_version"] >= version:
            return time.monotonic() - start
        time.sleep(POLL_S)
    raise AssertionError(f"the service did not serve version {version} within {DEADLINE_S} s")


def scores(url: str, path: Path) -> tuple[int, dict[int, float]]:
    """The version answered from and id -> score of every gallery image (k above the gallery's size:
    the tiny random-weight model scores unrelated images close together, so a test that an image
    is in the index looks for its own score of 1, not for the first place)."""
    response = requests.post(f"{url}/search", params={"k": 50, "strategy": "global"}, data=path.read_bytes(),
                             timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["index_version"], {r["id"]: r["score"] for r in response.json()["results"]}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_add_delete_replace_under_load(cluster, tmp_path: Path, where: str) -> None:
    from ray import serve

    from serve.app import build_app

    url = f"{cluster}/{where}"
    data, emb = tmp_path / "data", str(tmp_path / "emb")
    made = make_class_folders(data, classes=3, per_class=4, seed=5)["good"]
    index = str(tmp_path / "index") if where == "local" else "s3://living/index"
    config = EmbedConfig(inputs=(str(data),), output=emb, classifier=TINY_CLASSIFIER, embedder=TINY_CLIP_SPEC,
                         batch_size=4, top_n=3, model_cpus=0.5)
    run(config)
    assert build_main(["--embeddings", emb, "--output", index, "--shard-size", "4"]) == 0
    serve.run(build_app({"index": index, "max_batch_size": 4, "index_poll_s": POLL_S}),
              name=f"living-{where}", route_prefix=f"/{where}")
    rng = np.random.default_rng(6)
    counts = {"publish_to_served_s": []}

    def publish(version: int, *command: str) -> None:
        if command[0] != "--delete":
            summary = run(config)  # embeds what changed, logs it
            counts.setdefault("embedded", []).append(summary["embedded_this_run"])
        assert build_main(["--output", index, *command]) == 0
        counts["publish_to_served_s"].append(round(wait_for_version(url, version), 2))

    with Load(url, made[:6]) as load:
        # (a) two images added, (b) two removed from the source: one update.
        added = [write_jpeg(data / "class0" / "new0.jpg", rng), write_jpeg(data / "class2" / "new1.jpg", rng)]
        removed = [made[1], made[9]]
        gone_from = {uri_id(str(p)): 2 for p in removed}  # id -> the first version without it
        for path in removed:
            path.unlink()
        publish(2, "--embeddings", emb, "--update")
        for path in added:
            version, found = scores(url, path)
            assert version >= 2 and found.get(uri_id(str(path)), 0) > 0.9999
        # (c) one image replaced (new content, same path), and a takedown by URI.
        replaced = made[2]
        old_bytes = replaced.read_bytes()
        write_jpeg(replaced, rng)
        os.utime(replaced, ns=(replaced.stat().st_atime_ns, replaced.stat().st_mtime_ns + 10**9))
        publish(3, "--embeddings", emb, "--update")
        takedown = made[5]
        (tmp_path / "takedown.txt").write_text(f"{takedown}\n")
        publish(4, "--delete", str(tmp_path / "takedown.txt"))
        gone_from[uri_id(str(takedown))] = 4
        version, found = scores(url, replaced)
        assert version >= 3 and found.get(uri_id(str(replaced)), 0) > 0.9999
        stale = tmp_path / "old.jpg"
        stale.write_bytes(old_bytes)
        _, found = scores(url, stale)  # the old content is no longer in the index
        assert found[uri_id(str(replaced))] < 0.9999 and max(found.values()) < 0.9999
        load.wait_for(len(load.answers) + 6)  # a round of the load's queries on the last version
    statuses = [status for status, _, _ in load.answers]
    deleted_returned = sum(1 for _, version, ids in load.answers for i in ids
                           if i in gone_from and version is not None and version >= gone_from[i])
    counts.update(sent=len(statuses), failed=sum(s != 200 for s in statuses), deleted_returned=deleted_returned,
                  versions_seen=sorted({v for _, v, _ in load.answers if v is not None}), where=where)
    print(f"living gallery ({where}): {json.dumps(counts)}")
    assert counts["failed"] == 0 and deleted_returned == 0
    assert counts["embedded"] == [2, 1]  # the update runs embedded only what was new or changed
    assert counts["versions_seen"][0] == 1 and counts["versions_seen"][-1] == 4
    serve.delete(f"living-{where}")
