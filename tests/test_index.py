"""Sharded index: exact equality with a numpy brute-force reference, shard planning, integrity
checks, model checks, append, and the end-to-end path embed -> build -> search."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import DIM, MODELS, assert_same_ranking, synthetic, unit, write_embeddings
from PIL import Image

from pipeline.images import ImageDecodeError
from pipeline.index import (
    IndexConfig,
    IndexIntegrityError,
    SearchParams,
    ShardedIndex,
    append_index,
    build_index,
    plan_shards,
)
from pipeline.manifests import IndexManifest
from pipeline.search import QueryEngine, QueryPreprocess

def brute_force(data: dict[str, np.ndarray], queries: np.ndarray, k: int,
                allowed=None) -> list[tuple[list[int], list[float]]]:
    """The exact top-k (ids, scores) of each query, by numpy."""
    sims = queries @ data["embedding"].T
    out = []
    for q in range(len(queries)):
        mask = np.ones(len(data["id"]), bool) if allowed is None else allowed[q]
        candidates = np.flatnonzero(mask)
        order = candidates[np.argsort(-sims[q, candidates], kind="stable")][:k]
        out.append((data["id"][order].tolist(), sims[q, order].tolist()))
    return out


def assert_hits_equal(got: list[list], expected: list[tuple[list[int], list[float]]]) -> None:
    """Hits equal a reference, up to ties that numpy and FAISS may round either way."""
    assert len(got) == len(expected)
    for hits, (ids, scores) in zip(got, expected):
        assert_same_ranking([h.id for h in hits], [h.score for h in hits], ids, scores)


def hit_lists(results: list[list]) -> list[tuple[list[int], list[float]]]:
    return [([h.id for h in hits], [h.score for h in hits]) for hits in results]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> tuple[dict, Path, Path]:
    root = tmp_path_factory.mktemp("gallery")
    data = synthetic(3000, classes=40, seed=1)
    emb = write_embeddings(root / "emb", data)
    index_dir = root / "index"
    build_index(emb, index_dir, IndexConfig(shard_size=400, global_index="flat"))
    return data, emb, index_dir


def test_plan_shards_never_splits_a_class() -> None:
    counts = {0: 5, 1: 3, 2: 9, 3: 1, 4: 2}
    shards = plan_shards(counts, shard_size=6)
    assert shards == [[0], [1], [2], [3, 4]]
    assert sorted(c for s in shards for c in s) == sorted(counts)
    assert plan_shards({}, 10) == []


def test_shards_hold_contiguous_whole_classes(gallery) -> None:
    data, _, index_dir = gallery
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["rows"] == 3000 and len(manifest["shards"]) > 1
    seen = set()
    for number, entry in enumerate(manifest["shards"]):
        rows = pq.read_table(index_dir / entry["path"] / "rows.parquet").to_pydict()
        classes = np.array(rows["class"])
        assert np.all(np.diff(classes) >= 0), "rows sorted by class"
        for cls in np.unique(classes):
            positions = np.flatnonzero(classes == cls)
            assert positions[-1] - positions[0] + 1 == len(positions), "class range contiguous"
            assert manifest["classes"][str(cls)] == [number, int(positions[0]), int(positions[-1]) + 1]
            assert cls not in seen, "class split across shards"
            seen.add(cls)
        assert entry["rows"] <= 400 or len(np.unique(classes)) == 1
    assert seen == set(np.unique(data["classes"][:, 0]).tolist())


def test_class_restricted_search_equals_brute_force(gallery) -> None:
    data, _, index_dir = gallery
    index = ShardedIndex.load(index_dir)
    rng = np.random.default_rng(7)
    queries = unit(rng.normal(size=(25, DIM)))
    query_classes = rng.integers(0, 40, (25, 2))
    top1 = data["classes"][:, 0]
    for n in (1, 2):
        allowed = (top1[None, None, :] == query_classes[:, :n, None]).any(axis=1)
        expected = brute_force(data, queries, 5, allowed)
        assert_hits_equal(index.search_class(queries, query_classes[:, :n], k=5), expected)
    hit = index.search_class(queries[:1], query_classes[:1, :1], k=1)[0][0]
    assert hit.uri == f"/img/{hit.id}.jpg" and hit.label.startswith("c") and hit.cls == query_classes[0, 0]


def test_global_exact_search_equals_brute_force(gallery) -> None:
    data, _, index_dir = gallery
    index = ShardedIndex.load(index_dir)
    queries = unit(np.random.default_rng(8).normal(size=(20, DIM)))
    got = index.search_global(queries, k=10)
    assert_hits_equal(got, brute_force(data, queries, 10))
    scores = [h.score for h in got[0]]
    assert scores == sorted(scores, reverse=True)
    assert all(h.score >= 0.5 for h in index.search_global(queries, k=10, min_score=0.5)[0])


def test_approximate_global_search_recall(tmp_path: Path) -> None:
    data = synthetic(20000, classes=50, seed=3)
    emb = write_embeddings(tmp_path / "emb", data)
    build_index(emb, tmp_path / "index", IndexConfig(shard_size=10**6, global_index="ivf", nlist=64))
    index = ShardedIndex.load(tmp_path / "index")
    assert index.manifest.shards[0].index_type == "ivf"
    queries = data["embedding"][np.random.default_rng(4).choice(len(data["id"]), 100, replace=False)]
    got = [[h.id for h in hits] for hits in index.search_global(queries, k=10, search=SearchParams(nprobe=16))]
    expected = brute_force(data, queries, 10)
    recall = np.mean([len(set(g) & set(e)) / 10 for g, (e, _) in zip(got, expected)])
    assert recall >= 0.95, recall


def test_unknown_classes(gallery) -> None:
    _, _, index_dir = gallery
    index = ShardedIndex.load(index_dir)
    query = unit(np.ones((1, DIM)))
    assert index.search_class(query, [[12345]], k=5) == [[]]  # a class with no images: empty, no error
    assert index.manifest.class_size(12345) == 0
    with pytest.raises(ValueError, match="dimension"):
        index.search_global(np.ones((1, DIM + 1), np.float32))


def test_subset_of_shards_for_a_replica(gallery) -> None:
    _, _, index_dir = gallery
    part = ShardedIndex.load(index_dir, shards=[0])
    full = ShardedIndex.load(index_dir)
    assert 0 < len(part) < len(full)
    owned = {int(c) for c, (shard, _, _) in full.manifest.classes.items() if shard == 0}
    assert owned and len(owned) < len(full.manifest.classes)
    query = unit(np.ones((1, DIM)))
    for c in range(40):  # a replica answers for the classes of its shards only
        got = [h.id for h in part.search_class(query, [[c]], k=3)[0]]
        assert got == ([h.id for h in full.search_class(query, [[c]], k=3)[0]] if c in owned else [])


def test_corrupted_and_truncated_files_are_named(tmp_path: Path, gallery) -> None:
    import shutil

    _, _, index_dir = gallery
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    target = copy / "shards" / "0001-v000001" / "vectors.npy"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match=r"0001/vectors.npy is corrupted"):
        ShardedIndex.load(copy)
    target.write_bytes(bytes(data[:-100]))
    with pytest.raises(IndexIntegrityError, match=r"0001/vectors.npy is truncated"):
        ShardedIndex.load(copy)


def test_wrong_models_are_refused(gallery) -> None:
    _, _, index_dir = gallery
    with pytest.raises(ValueError, match="other models"):
        ShardedIndex.load(index_dir, expect_models={"embedder": "open_clip:ViT-B-32/laion2b_s34b_b79k"})
    ShardedIndex.load(index_dir, expect_models={"embedder": MODELS["embedder"]["spec"]})


def test_building_twice_into_one_folder_is_refused(gallery) -> None:
    _, emb, index_dir = gallery
    with pytest.raises(FileExistsError, match="append"):
        build_index(emb, index_dir)


def test_append_equals_building_from_the_union(tmp_path: Path) -> None:
    a = synthetic(1500, classes=30, seed=11)
    b = synthetic(700, classes=45, seed=12, id_offset=10_000)  # new classes 30..44 and more of old ones
    union = {k: np.concatenate([a[k], b[k]]) for k in a}
    emb_a, emb_b = write_embeddings(tmp_path / "a", a), write_embeddings(tmp_path / "b", b)
    emb_u = write_embeddings(tmp_path / "u", union)
    config = IndexConfig(shard_size=300, global_index="flat")
    build_index(emb_a, tmp_path / "appended", config)
    before = json.loads((tmp_path / "appended" / "manifest.json").read_text())
    append_index(emb_b, tmp_path / "appended")
    append_index(emb_b, tmp_path / "appended")  # appending the same output twice adds nothing
    build_index(emb_u, tmp_path / "whole", config)
    appended, whole = ShardedIndex.load(tmp_path / "appended"), ShardedIndex.load(tmp_path / "whole")
    assert len(appended) == len(whole) == 2200
    after = json.loads((tmp_path / "appended" / "manifest.json").read_text())
    untouched = [i for i, s in enumerate(before["shards"]) if s["files"] == after["shards"][i]["files"]]
    touched_classes = set(np.unique(b["classes"][:, 0]).tolist())
    for i in untouched:
        assert not any(after["classes"][str(c)][0] == i for c in touched_classes)
    rng = np.random.default_rng(13)
    queries = unit(rng.normal(size=(30, DIM)))
    classes = rng.integers(0, 45, (30, 2))
    assert_hits_equal(appended.search_class(queries, classes, k=7), hit_lists(whole.search_class(queries, classes, k=7)))
    assert_hits_equal(appended.search_global(queries, k=7), hit_lists(whole.search_global(queries, k=7)))


def test_append_refuses_other_models(tmp_path: Path, gallery) -> None:
    import shutil

    _, _, index_dir = gallery
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    other = write_embeddings(tmp_path / "other", synthetic(50, classes=3, seed=2))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["models"]["embedder"]["spec"] = "open_clip:ViT-B-32/laion2b_s34b_b79k"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="other models"):
        append_index(other, copy)


def test_head_classes_get_their_own_index(tmp_path: Path) -> None:
    """Classes of at least head_min_rows images get an HNSW index beside the shard; a class search
    goes through it, stays inside the class, agrees with the exact scan, and its scores are exact
    similarities (re-scored from vectors.npy). Smaller classes are still scanned exactly."""
    data = synthetic(6000, classes=12, seed=21)
    sizes = np.bincount(data["classes"][:, 0])
    emb = write_embeddings(tmp_path / "emb", data)
    manifest = build_index(emb, tmp_path / "index", IndexConfig(head_min_rows=int(np.sort(sizes)[6])))
    heads = manifest.shards[0].heads
    assert heads == sorted(np.flatnonzero(sizes >= np.sort(sizes)[6]).tolist()) and 0 < len(heads) < 12
    assert all(f"head-{c:06d}.faiss" in manifest.shards[0].files for c in heads)
    index = ShardedIndex.load(tmp_path / "index")
    exact = ShardedIndex.load(tmp_path / "index", heads=False)
    rng = np.random.default_rng(22)
    picks = rng.choice(len(data["id"]), 60, replace=False)
    queries, classes = data["embedding"][picks], data["classes"][picks, :1]
    got, expected = index.search_class(queries, classes, k=10), exact.search_class(queries, classes, k=10)
    recall = np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(got, expected)])
    assert recall >= 0.95, recall
    by_id = dict(zip(data["id"].tolist(), data["embedding"]))
    for hits, query, cls in zip(got, queries, classes[:, 0]):
        assert len(hits) == 10 and all(h.cls == cls for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        np.testing.assert_allclose([h.score for h in hits], [by_id[h.id] @ query for h in hits], atol=1e-5)
    small = [q for q, c in enumerate(classes[:, 0]) if c not in heads]
    assert small
    assert_hits_equal([got[q] for q in small], hit_lists([expected[q] for q in small]))
    # a corrupted head index is named like the shard's other files
    target = tmp_path / "index" / "shards" / "0000-v000001" / f"head-{heads[0]:06d}.faiss"
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(IndexIntegrityError, match=f"head-{heads[0]:06d}.faiss is corrupted"):
        ShardedIndex.load(tmp_path / "index")


def test_hnsw_global_search_rescores_exactly(tmp_path: Path) -> None:
    """The HNSW index over 8-bit codes (the default above 50k rows) finds the exact neighbours
    nearly always, and its scores are exact similarities, so shards of any type merge correctly;
    the search parameters come from the manifest unless the caller gives its own."""
    data = synthetic(5000, classes=20, seed=31)
    emb = write_embeddings(tmp_path / "emb", data)
    manifest = build_index(emb, tmp_path / "index", IndexConfig(shard_size=2000, global_index="hnsw-sq8"),
                           search=SearchParams(ef_search=64, refine=3))
    assert {s.index_type for s in manifest.shards} == {"hnsw-sq8"} and len(manifest.shards) > 1
    index = ShardedIndex.load(tmp_path / "index")
    assert index.search_params == SearchParams(ef_search=64, refine=3)
    queries = unit(np.random.default_rng(32).normal(size=(50, DIM)))
    got = index.search_global(queries, k=10)
    expected = brute_force(data, queries, 10)
    recall = np.mean([len({h.id for h in g} & set(e)) / 10 for g, (e, _) in zip(got, expected)])
    assert recall >= 0.95, recall
    by_id = dict(zip(data["id"].tolist(), data["embedding"]))
    for hits, query in zip(got, queries):
        np.testing.assert_allclose([h.score for h in hits], [by_id[h.id] @ query for h in hits], atol=1e-5)
    narrow = index.search_global(queries, k=10, search=SearchParams(ef_search=1, refine=1))
    assert all(len(hits) == 10 for hits in narrow)
    with pytest.raises(ValueError, match="refine must be >= 1"):
        SearchParams(refine=0)
    assert SearchParams.from_json({"ef_search": 64, "rerank": 3}) == SearchParams(ef_search=64, refine=3)  # earlier name


def test_float16_vectors_halve_the_bytes_and_keep_the_ranking(tmp_path: Path) -> None:
    """float16 storage: vectors.npy is half the size, class scans (FAISS over the half floats)
    and global searches return the float32 index's results up to float16 rounding."""
    data = synthetic(3000, classes=10, seed=41)
    emb = write_embeddings(tmp_path / "emb", data)
    config = IndexConfig(head_min_rows=None)
    m32 = build_index(emb, tmp_path / "f32", config)
    m16 = build_index(emb, tmp_path / "f16", config, dtype="float16")
    b32, b16 = m32.shards[0].files["vectors.npy"]["bytes"], m16.shards[0].files["vectors.npy"]["bytes"]
    assert b16 - 128 == (b32 - 128) // 2 == 3000 * DIM * 2
    f32, f16 = ShardedIndex.load(tmp_path / "f32"), ShardedIndex.load(tmp_path / "f16")
    rng = np.random.default_rng(42)
    queries = unit(rng.normal(size=(40, DIM)))
    classes = rng.integers(0, 10, (40, 2))
    for a, b in [(f16.search_class(queries, classes, k=10), f32.search_class(queries, classes, k=10)),
                 (f16.search_global(queries, k=10), f32.search_global(queries, k=10))]:
        for ha, hb in zip(a, b):
            np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], atol=2e-3)
            assert len({h.id for h in ha} & {h.id for h in hb}) >= 9


def test_max_pixels_travels_from_the_embeddings_to_every_query_path(tmp_path: Path) -> None:
    """The decode limit the gallery was embedded with is written in the index manifest, kept by
    append, and applied by QueryEngine and by the service's query steps (QueryPreprocess)."""
    emb = write_embeddings(tmp_path / "emb", synthetic(200, classes=4, seed=5), max_pixels=50 * 50)
    build_index(emb, tmp_path / "index", IndexConfig(global_index="flat"))
    manifest = IndexManifest.read(tmp_path / "index")
    assert manifest.max_pixels == 2500 and QueryPreprocess.of(manifest).max_pixels == 2500

    def jpeg(side: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(out, format="JPEG")
        return out.getvalue()

    engine = QueryEngine.load(str(tmp_path / "index"))
    assert engine.queries.decode(jpeg(50)).shape == (50, 50, 3)
    with pytest.raises(ImageDecodeError, match="too large"):
        engine.search([jpeg(51)])
    with pytest.raises(ImageDecodeError, match="too large"):
        QueryPreprocess.of(manifest).decode(jpeg(51))
    # Appending an output decoded with another limit is refused; the same limit is kept.
    other = write_embeddings(tmp_path / "other", synthetic(20, classes=4, seed=6, id_offset=5000))
    with pytest.raises(ValueError, match="max_pixels"):
        append_index(other, tmp_path / "index")
    same = write_embeddings(tmp_path / "same", synthetic(20, classes=4, seed=6, id_offset=5000), max_pixels=2500)
    assert append_index(same, tmp_path / "index").max_pixels == 2500


@pytest.mark.parametrize("text, says", [
    ("", "is empty"),
    ('{"schema_version": 2,\n', "is not valid JSON"),
    ("[1, 2]", "holds a JSON list"),
    ('{"schema_version": 2}', "damaged: field 'models' is missing"),
    ('{"schema_version": 2, "models": {}}', "damaged: manifest names no classifier"),
])
def test_a_damaged_index_manifest_is_named(tmp_path: Path, gallery, text: str, says: str) -> None:
    import shutil

    _, _, index_dir = gallery
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    (copy / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(copy / "manifest.json")) + " .*" + re.escape(says)):
        ShardedIndex.load(copy)
