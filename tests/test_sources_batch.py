"""Input discovery and the batch stages, called directly without Ray."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import TINY_CLASSIFIER, TINY_CLIP_SPEC, assert_same_ranking, make_class_folders, write_jpeg

from pipeline.batch import DecodeImages, ReadShards, WriteParts, shard_to_row
from pipeline.model_stages import ClassifyAndEmbed, ModelSettings
from pipeline.models import load_classifier, load_embedder, select_runtime
from pipeline.sources import discover_shards, read_shard, uri_id


def read_all(inputs: list[str], files_per_shard: int = 256) -> list:
    return [item for shard in discover_shards(inputs, files_per_shard) for item in read_shard(shard)]


def test_class_folders_and_flat_files(tmp_path: Path) -> None:
    made = make_class_folders(tmp_path / "data", classes=3, per_class=4)
    write_jpeg(tmp_path / "data" / "loose.jpg", np.random.default_rng(1))
    (tmp_path / "data" / ".hidden").write_text("skip me")
    shards = discover_shards([str(tmp_path / "data")])
    assert [s.kind for s in shards] == ["folder", "folder", "folder", "files"]
    items = read_all([str(tmp_path / "data")])
    assert len(items) == len(made["good"]) + 1
    assert {i.label for i in items} == {"class0", "class1", "class2", None}
    assert all(i.data and i.error is None for i in items)
    # Flat folders are split into shards of files_per_shard files.
    flat = tmp_path / "data" / "class0"
    assert [len(s.members) for s in discover_shards([str(flat)], files_per_shard=3)] == [3, 1]


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_imagenet_class_tars_and_webdataset(tmp_path: Path) -> None:
    jpeg = write_jpeg(tmp_path / "x.jpg", np.random.default_rng(2)).read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "n01440764.tar").write_bytes(tar_bytes({"n01440764_1.JPEG": jpeg, "n01440764_2.JPEG": jpeg}))
    (tmp_path / "in" / "shard-000.tar").write_bytes(tar_bytes({
        "a.jpg": jpeg, "a.cls": b"7", "b.jpg": jpeg, "b.cls": b"3"}))
    items = read_all([str(tmp_path / "in")])
    assert [(i.uri.rsplit("/", 1)[-1], i.label) for i in items] == [
        ("n01440764.tar#n01440764_1.JPEG", "n01440764"), ("n01440764.tar#n01440764_2.JPEG", "n01440764"),
        ("shard-000.tar#a.jpg", "7"), ("shard-000.tar#b.jpg", "3")]


def test_parquet_of_bytes_and_of_paths(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    files = [write_jpeg(tmp_path / f"p{i}.jpg", rng) for i in range(5)]
    table = pa.table({"image": [f.read_bytes() for f in files], "label": ["a", "b", "a", "b", "a"]})
    pq.write_table(table, tmp_path / "bytes.parquet", row_group_size=2)
    pq.write_table(pa.table({"path": [str(f) for f in files]}), tmp_path / "paths.parquet")
    shards = discover_shards([str(tmp_path / "bytes.parquet")])
    assert [s.row_group for s in shards] == [0, 1, 2]  # one shard per row group
    by_bytes = read_all([str(tmp_path / "bytes.parquet")])
    assert [i.uri.rsplit("#", 1)[-1] for i in by_bytes] == ["0", "1", "2", "3", "4"]
    assert [i.label for i in by_bytes] == ["a", "b", "a", "b", "a"]
    by_path = read_all([str(tmp_path / "paths.parquet")])
    assert [i.uri for i in by_path] == [str(f) for f in files] and by_path[0].data == files[0].read_bytes()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="bytes column"):
        read_all([str(tmp_path / "wrong.parquet")])


def test_discovery_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_shards([str(tmp_path / "nope")])
    with pytest.raises(ValueError):
        discover_shards([])


def test_ids_are_stable_and_distinct() -> None:
    assert uri_id("/a/b.jpg") == uri_id("/a/b.jpg")
    ids = {uri_id(f"/data/{i}.jpg") for i in range(10000)}
    assert len(ids) == 10000 and all(0 <= i < 2**63 for i in ids)


def run_stages(tmp_path: Path, inputs: list[str], classifier: str, embedder: str, done=None) -> dict:
    """The job's stages in one process, as Ray Data would chain them."""
    runtime = select_runtime("cpu")
    clf = load_classifier(classifier, runtime)
    emb = load_embedder(embedder, runtime)
    read = ReadShards(done)
    decode = DecodeImages({"cls": clf.preprocess, "emb": emb.preprocess}, tmp_path / "out" / "errors")
    model = ClassifyAndEmbed(classifier, embedder, ModelSettings(device="cpu", top_n=3))
    write = WriteParts(tmp_path / "out" / "embeddings", emb.dim)
    rows = [shard_to_row(s) for s in discover_shards(inputs)]
    read_out = read({"shard": np.array([r["shard"] for r in rows], dtype=object)})
    decoded = decode(read_out)
    modelled = model(decoded)
    return {"read": read_out, "decoded": decoded, "model": modelled, "write": write(modelled), "model_obj": model}


def test_stages_account_for_every_file(tmp_path: Path) -> None:
    made = make_class_folders(tmp_path / "data", classes=2, per_class=5, bad=3)
    out = run_stages(tmp_path, [str(tmp_path / "data")], TINY_CLASSIFIER, TINY_CLIP_SPEC)
    assert len(out["read"]["id"]) == 13
    assert len(out["decoded"]["id"]) == 10
    errors = pq.read_table(next((tmp_path / "out" / "errors").glob("part-*.parquet"))).to_pylist()
    assert sorted(Path(e["uri"]).name for e in errors) == sorted(p.name for p in made["bad"])
    assert {e["stage"] for e in errors} == {"decode"}
    assert {e["error_type"] for e in errors} <= {"not an image", "truncated", "corrupt"}
    table = pq.read_table(tmp_path / "out" / "embeddings" / out["write"]["part"][0])
    assert table.num_rows == 10 and table.schema.field("embedding").type.list_size == 32
    rows = table.to_pylist()
    assert all(len(r["classes"]) == 3 and len(r["class_probs"]) == 3 for r in rows)
    assert {r["label"] for r in rows} == {"class0", "class1"}
    norms = np.linalg.norm(np.array([r["embedding"] for r in rows]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    # Skipping done ids (resume) reads only the rest.
    again = run_stages(tmp_path, [str(tmp_path / "data")], TINY_CLASSIFIER, TINY_CLIP_SPEC,
                       done=out["read"]["id"][:7])
    assert len(again["read"]["id"]) == 6


def test_shared_forward_equals_separate_models(tmp_path: Path) -> None:
    """Classifier == embedder: one forward pass gives what the two loaders give separately."""
    make_class_folders(tmp_path / "data", classes=1, per_class=4)
    out = run_stages(tmp_path, [str(tmp_path / "data")], TINY_CLASSIFIER, TINY_CLASSIFIER)
    assert out["model_obj"].shared
    runtime = select_runtime("cpu")
    images = out["decoded"]["image_cls"]
    indices, probs = load_classifier(TINY_CLASSIFIER, runtime).classify(images, 3)
    for row in range(len(indices)):  # one fused pass vs the classifier alone: equal up to near ties
        assert_same_ranking(out["model"]["classes"][row], out["model"]["class_probs"][row], indices[row], probs[row])
    np.testing.assert_allclose(out["model"]["embedding"], load_embedder(TINY_CLASSIFIER, runtime).embed_images(
        out["decoded"]["image_emb"]), atol=1e-5)


def test_shard_row_round_trip(tmp_path: Path) -> None:
    shard = discover_shards([str(write_jpeg(tmp_path / "a.jpg", np.random.default_rng(0)))])[0]
    payload = json.loads(shard_to_row(shard)["shard"])
    assert payload["kind"] == "files" and payload["members"] == [str(tmp_path / "a.jpg")]
