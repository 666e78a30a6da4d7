"""The classifier head and label-keyed indexes: fitting on stored vectors (no image decoded),
calibration, the head file and its spec, re-keying an output, the gallery's own labels as the class
partition, and the unlabelled bucket that only global search reaches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DIM, synthetic, unit, write_embeddings

from jobs.build_index import main as build_index_main
from jobs.train_classifier import main as train_main
from pipeline.head_training import HeadSettings, fit_head, fit_temperature, held_out_ids
from pipeline.index import ShardedIndex, append_index, build_index
from pipeline.index.build import embedding_parts
from pipeline.index.keying import UNLABELLED
from pipeline.manifests import IndexManifest
from pipeline.models import ModelSpec, head_for, load_embedder, load_head
from pipeline.storage import Location
from pipeline.strategy import Strategy, run_plan

EMBEDDER = "timm:test_efficientnet@random"


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> tuple[dict, Path, str]:
    """A 12-class synthetic output (labels c0..c11, a few unlabelled rows) and a head fitted on it."""
    root = tmp_path_factory.mktemp("head")
    data = synthetic(2400, classes=12, seed=3)
    data["label"][::40] = None
    # The stored predictions are deliberately poor (a shifted class): only labels or a head key well.
    data["classes"][:, 0] = (data["classes"][:, 0] + 5) % 12
    out = write_embeddings(root / "emb", data)
    assert train_main(["--embeddings", str(out), "--output", str(root / "head.safetensors"), "--epochs", "20"]) == 0
    return data, out, f"head:{root / 'head.safetensors'}"


def test_the_head_learns_the_labels_and_its_temperature_calibrates(output, capsys) -> None:
    data, out, spec = output
    head = load_head(spec)
    assert head.labels.ids == tuple(sorted(f"c{i}" for i in range(12))) and head.embedder == EMBEDDER
    # The clusters overlap: the yardstick is the nearest class mean of the training rows, measured on
    # the same held-out rows (about what a linear rule can reach).
    labelled = np.array([label is not None for label in data["label"]])
    held = np.isin(data["id"], held_out_ids(data["id"][labelled], data["label"][labelled], 0.1))
    names = np.array(head.labels.ids)
    means = unit(np.stack([data["embedding"][~held & (data["label"] == n)].mean(axis=0) for n in names]))
    nearest_mean = (names[(data["embedding"][held] @ means.T).argmax(axis=1)] == data["label"][held]).mean()
    assert nearest_mean > 0.6 and head.accuracy > nearest_mean - 0.03 and 0 < head.temperature
    top, probs = head.classify_vectors(data["embedding"][held], top_n=3)
    assert (names[top[:, 0]] == data["label"][held]).mean() == pytest.approx(head.accuracy, abs=1e-6)
    assert np.all(np.diff(probs, axis=1) <= 0) and np.all(probs.sum(axis=1) <= 1 + 1e-5)
    # Fitting again with the same seed gives the same head (the split is by id, not by chance).
    parts, _ = embedding_parts(Location(out))
    again = fit_head(parts, HeadSettings(epochs=20))
    assert again.labels == list(head.labels.ids) and again.accuracy == pytest.approx(head.accuracy, abs=1e-6)
    assert again.held_out_nll[1] <= again.held_out_nll[0] + 1e-9  # the temperature never makes it worse


@pytest.mark.ray
def test_ray_data_reads_the_parts_and_fits_what_the_local_stream_fits(output, tmp_path: Path, monkeypatch,
                                                                       capsys) -> None:
    """--ray-data: Ray tasks read the parts (a local Ray here) and this process only trains; the
    split, the rows and the head's quality are the local fit's (Ray Data's block order differs, so
    the weights are not the same to the bit)."""
    import ray

    from pipeline import head_training

    data, out, spec = output
    parts, _ = embedding_parts(Location(out))
    local = fit_head(parts, HeadSettings(epochs=20))

    def not_here(*args, **kwargs):
        raise AssertionError("the parts were read in this process, not by Ray Data")

    monkeypatch.setattr(head_training, "labelled_ids", not_here)
    monkeypatch.setattr(head_training, "_LocalRows", not_here)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        fitted = fit_head(parts, HeadSettings(epochs=20), ray_data=True)
        assert train_main(["--embeddings", str(out), "--output", str(tmp_path / "head.safetensors"),
                           "--epochs", "20", "--ray-data"]) == 0
    finally:
        ray.shutdown()
    assert fitted.labels == local.labels
    assert (fitted.train_rows, fitted.held_out_rows) == (local.train_rows, local.held_out_rows)
    assert fitted.accuracy == pytest.approx(local.accuracy, abs=0.04) and fitted.temperature > 0
    assert f"held out ({local.held_out_rows} rows)" in capsys.readouterr().out
    head = load_head(f"head:{tmp_path / 'head.safetensors'}")
    labelled = np.array([label is not None for label in data["label"]])
    held = np.isin(data["id"], held_out_ids(data["id"][labelled], data["label"][labelled], 0.1))
    top, _ = head.classify_vectors(data["embedding"][held], top_n=1)
    assert (np.array(head.labels.ids)[top[:, 0]] == data["label"][held]).mean() == pytest.approx(head.accuracy, abs=1e-6)


def test_the_temperature_undoes_an_overconfident_scale() -> None:
    rng = np.random.default_rng(0)
    calibrated = rng.normal(size=(8000, 5)) * 1.5           # targets drawn from softmax(calibrated)
    p = np.exp(calibrated) / np.exp(calibrated).sum(axis=1, keepdims=True)
    targets = torch.as_tensor((p.cumsum(axis=1) > rng.uniform(size=(8000, 1))).argmax(axis=1))
    temperature, before, after = fit_temperature(torch.as_tensor(calibrated * 4.0), targets)  # four times too sure
    assert temperature == pytest.approx(4.0, rel=0.15) and after < before


def test_held_out_rows_are_chosen_by_id_per_label() -> None:
    ids = np.arange(-5000, 5000, dtype=np.int64) * 7919
    labels = np.array([f"c{i % 7}" for i in range(len(ids))], dtype=object)
    held = held_out_ids(ids, labels, 0.1)
    for c in range(7):
        members = ids[labels == f"c{c}"]
        assert np.isin(members, held).sum() == int(np.ceil(0.1 * len(members)))
    order = np.random.default_rng(0).permutation(len(ids))
    np.testing.assert_array_equal(held_out_ids(ids[order], labels[order], 0.1), held)   # the order does not matter
    tiny = held_out_ids(np.array([5, 9, 11]), np.array(["a", "a", "b"], dtype=object), 0.1)
    assert len(tiny) == 1 and tiny[0] in (5, 9)                # one of a's two rows; b's only row trains


def test_the_head_spec_and_its_checks(output, tmp_path: Path, capsys) -> None:
    _, out, spec = output
    parsed = ModelSpec.parse(spec)
    assert parsed.library == "head" and str(parsed) == spec
    assert str(ModelSpec.parse("head:out/a@b/head.safetensors").weight_file) == "out/a@b/head.safetensors"
    with pytest.raises(FileNotFoundError, match="jobs.train_classifier"):
        load_head(f"head:{tmp_path / 'missing.safetensors'}")
    (tmp_path / "not.safetensors").write_bytes(b"not a head")
    with pytest.raises(ValueError, match="is not a head file"):
        load_head(f"head:{tmp_path / 'not.safetensors'}")
    other = load_embedder("open_clip:lookalike-tiny-clip@random")
    with pytest.raises(ValueError, match=f"fitted on the vectors of {EMBEDDER}"):
        head_for(spec, other)
    # The command refuses what it cannot fit, in one line.
    single = synthetic(200, classes=1, seed=1)
    assert train_main(["--embeddings", str(write_embeddings(tmp_path / "one", single)), "--output",
                       str(tmp_path / "h.safetensors")]) == 2
    assert "needs at least two labels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--embeddings", str(out), "--output", str(tmp_path / "head.pt")])


def test_a_label_keyed_index_searches_the_gallerys_own_labels(output, tmp_path: Path) -> None:
    """--classes labels: a class search returns only images labelled with the searched class,
    unlabelled images are in the bucket no class search reaches, and the manifest says so."""
    data, out, spec = output
    manifest = build_index(out, tmp_path / "index", classes="labels", classifier=spec)
    assert manifest.class_source["source"] == "labels" and manifest.models.spec("classifier") == spec
    assert manifest.class_source["labels"] == sorted(f"c{i}" for i in range(12))
    assert manifest.class_source["gallery_labels_known"] == 12
    unlabelled = int(sum(label is None for label in data["label"]))
    assert manifest.class_size(UNLABELLED) == unlabelled > 0
    index = ShardedIndex.load(tmp_path / "index")
    labels = list(manifest.class_source["labels"])
    queries = unit(np.random.default_rng(5).normal(size=(12, DIM)))
    found = index.search_class(queries, [[c] for c in range(12)], k=10)
    for c, hits in enumerate(found):
        assert len(hits) == 10 and {h.label for h in hits} == {labels[c]} and {h.cls for h in hits} == {c}
    everywhere = index.search_global(unit(np.ones((1, DIM))), k=len(data["id"]))[0]
    assert sum(h.cls == UNLABELLED for h in everywhere) == unlabelled      # global search reaches them
    assert sum(manifest.class_size(c) for c in range(12)) + unlabelled == len(data["id"])


def test_the_default_partition_follows_the_rule(output, tmp_path: Path, capsys) -> None:
    """Labels when the query classifier knows them (a head fitted on them), else the predictions;
    --classes labels with a classifier that knows none of them is one clear error."""
    data, out, spec = output
    assert build_index_main(["--embeddings", str(out), "--output", str(tmp_path / "a"), "--classifier", spec]) == 0
    assert IndexManifest.read(tmp_path / "a").class_source["source"] == "labels"
    assert build_index_main(["--embeddings", str(out), "--output", str(tmp_path / "b")]) == 0
    predicted = IndexManifest.read(tmp_path / "b")
    assert predicted.class_source["source"] == "predicted"                # generic classes know no 'c3'
    assert predicted.class_size(0) == int(((data["classes"][:, 0]) == 0).sum())
    capsys.readouterr()
    assert build_index_main(["--embeddings", str(out), "--output", str(tmp_path / "c"), "--classes", "labels"]) == 2
    err = capsys.readouterr().err
    assert "none of its 12 labels" in err and "jobs.train_classifier" in err and "--classes predicted" in err


def test_a_head_rekeys_an_output_without_reembedding_and_queries_agree(output, tmp_path: Path) -> None:
    """--classes predicted --classifier head: every row's class is the head's top-1 for its stored
    vector (not the stored prediction), and the plan's class search finds a query's neighbours."""
    data, out, spec = output
    manifest = build_index(out, tmp_path / "index", classes="predicted", classifier=spec)
    head = load_head(spec)
    top, _ = head.classify_vectors(data["embedding"], 1)
    for c in range(12):
        assert manifest.class_size(c) == int((top[:, 0] == c).sum())
    index = ShardedIndex.load(tmp_path / "index")
    query = data["embedding"][:8]
    classes, probs = head.classify_vectors(query, 5)
    answers = [[{"index": int(i), "name": head.labels.name_of(int(i)), "probability": float(p)}
                for i, p in zip(ci, pi)] for ci, pi in zip(classes, probs)]

    def search(request):
        vectors = query[request.rows]
        if request.classes is None:
            return index.search_global(vectors, request.k)
        return index.search_class(vectors, request.classes, request.k)

    for (hits, note), row, want in zip(run_plan(Strategy("class", 1).plan(answers, 5, manifest.class_size), search),
                                       answers, data["id"][:8]):
        assert hits[0].id == want and all(h.cls == row[0]["index"] for h in hits[: 5 if note is None else 0])


def test_append_keys_new_rows_as_the_index_did(output, tmp_path: Path) -> None:
    data, out, spec = output
    build_index(out, tmp_path / "index", classes="labels", classifier=spec)
    more = synthetic(300, classes=12, seed=8, id_offset=10**6)
    more["label"][:5] = None
    manifest = append_index(write_embeddings(tmp_path / "more", more), tmp_path / "index")
    assert manifest.class_source["source"] == "labels"
    for c, label in enumerate(manifest.class_source["labels"]):
        want = int((data["label"] == label).sum() + (more["label"] == label).sum())
        assert manifest.class_size(c) == want
    assert manifest.class_size(UNLABELLED) == int(sum(x is None for x in data["label"])) + 5
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["schema_version"] == 4
