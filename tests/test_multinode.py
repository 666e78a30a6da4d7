"""Multi-node behaviour on a simulated cluster: a head and two "GPU nodes" (logical GPUs) in one
machine with ``ray.cluster_utils.Cluster``. The embedding job spreads its model actors over both
nodes; the service's retrievers, one per shard group, run on different nodes."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import requests
from helpers import TINY_CLASSIFIER, TINY_CLIP_SPEC, assert_same_ranking, free_port, make_class_folders

from pipeline.embed_job import EmbedConfig, run
from pipeline.index import IndexConfig, build_index
from pipeline.search import QueryEngine

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # The dashboard serves the state API the test uses to find where replicas run; on a free port, so
    # that another Ray on the machine (a demo, a job) does not block it.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                            "dashboard_port": free_port()})
    nodes = {name: cluster.add_node(num_cpus=1, num_gpus=1, resources={name: 1}) for name in ("node_a", "node_b")}
    ray.init(address=cluster.address, logging_level="ERROR")
    cluster.wait_for_nodes()
    yield {name: node.node_id for name, node in nodes.items()}
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def embedded(cluster, tmp_path_factory) -> dict:
    """The job with one model actor per GPU (num_gpus=1): both GPU nodes get one."""
    root = tmp_path_factory.mktemp("multinode")
    make_class_folders(root / "data", classes=4, per_class=8)
    model = "timm:resnet50@random"  # slow enough that batches queue up for both actors
    summary = run(EmbedConfig(inputs=(str(root / "data"),), output=str(root / "emb"), classifier=model,
                              embedder=model, batch_size=2, decode_batch_size=2, files_per_shard=2,
                              num_gpus=1, model_cpus=0.5, top_n=2))
    return {"root": root, "summary": summary}


def test_embedding_job_spreads_actors_over_both_nodes(cluster, embedded) -> None:
    summary = embedded["summary"]
    nodes = {worker.split("/")[0] for worker in summary["images_by_worker"]}
    assert nodes == {node_id[:8] for node_id in cluster.values()}, summary["images_by_worker"]
    assert summary["counts"] == {"seen": 32, "embedded": 32, "failed": 0, "failed_by_type": {}}
    parts = (embedded["root"] / "emb" / "embeddings").glob("*.parquet")
    assert sum(pq.read_metadata(p).num_rows for p in parts) == 32


def test_retrievers_on_two_nodes_answer_like_one_process(cluster, tmp_path: Path) -> None:
    from ray import serve
    from ray.util.state import list_actors

    from serve.app import build_app

    made = make_class_folders(tmp_path / "data", classes=3, per_class=4)
    run(EmbedConfig(inputs=(str(tmp_path / "data"),), output=str(tmp_path / "emb"), classifier=TINY_CLASSIFIER,
                    embedder=TINY_CLIP_SPEC, batch_size=4, top_n=2, model_cpus=0.5))
    manifest = build_index(tmp_path / "emb", tmp_path / "index", IndexConfig(shard_size=4))
    shards = list(range(len(manifest.shards)))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    try:
        serve.run(build_app({"index": str(tmp_path / "index"), "retriever_shards": [shards[:1], shards[1:]],
                             "retriever_actor_options": [{"resources": {"node_a": 0.01}},
                                                         {"resources": {"node_b": 0.01}}]}),
                  name="lookalike", route_prefix="/")
        replicas = {a.name.split("#")[1]: a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")])
                    if a.name and a.name.startswith("SERVE_REPLICA::lookalike#Retriever")}
        assert replicas == {"Retriever0": cluster["node_a"], "Retriever1": cluster["node_b"]}
        engine = QueryEngine.load(str(tmp_path / "index"))
        for path in made["good"][::3]:
            data = path.read_bytes()
            online = requests.post(f"http://127.0.0.1:{port}/search", params={"k": 6, "strategy": "global"},
                                   data=data, timeout=60).json()
            offline = engine.search([data], k=6, strategy="global")[0].to_json()
            assert_same_ranking([h["id"] for h in online["results"]], [h["score"] for h in online["results"]],
                                [h["id"] for h in offline["results"]], [h["score"] for h in offline["results"]])
    finally:
        serve.shutdown()
