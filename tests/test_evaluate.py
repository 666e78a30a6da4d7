"""The evaluation end to end (embedding job, index, query engine) and Ray Train fine-tuning, on one
module-scoped local Ray with tiny models and generated labelled images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from helpers import TINY_CLASSIFIER, TINY_CLIP_SPEC, make_class_folders
from PIL import Image

from jobs.evaluate import main as evaluate_main
from jobs.train_embedder import main as train_main
from pipeline.evaluation import split
from pipeline.grids import grid_size
from pipeline.images import decode_image, resize_image
from pipeline.models import load_embedder
from pipeline.strategy import Strategy

pytestmark = [pytest.mark.ray]

TINY_DETECTOR = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@random"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_split_is_stratified_seeded_and_checked() -> None:
    labels = ["a"] * 5 + ["b"] * 4 + ["c"] * 3
    queries, gallery = split(labels, 2, seed=3)
    assert sorted(np.array(labels)[queries].tolist()) == ["a", "a", "b", "b", "c", "c"]
    assert set(queries).isdisjoint(gallery) and len(queries) + len(gallery) == 12
    np.testing.assert_array_equal(split(labels, 2, seed=3)[0], queries)
    with pytest.raises(ValueError, match="class 'c' has 3 images"):
        split(labels, 3, seed=0)


def reference_map(out: Path, query_paths: list[str], query_labels: list[str], k: int,
                  tie: float = 1e-5) -> tuple[float, float]:
    """mAP@k of exact global search, computed here from the job's gallery rows and a fresh embedder:
    the lowest and highest values that breaking near-tied scores (within ``tie``) either way gives."""
    parts = sorted(out.glob("runs/*/embedding-job/embeddings/*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    gallery = np.array([r["embedding"] for r in rows], dtype=np.float32)
    labels = np.array([r["label"] for r in rows])
    embedder = load_embedder(TINY_CLIP_SPEC)
    images = np.stack([resize_image(decode_image(Path(p).read_bytes()), embedder.preprocess) for p in query_paths])
    scores = embedder.embed_images(images).astype(np.float64) @ gallery.T.astype(np.float64)

    def mean_ap(nudge: float) -> float:
        aps = []
        for q, label in enumerate(query_labels):
            relevant = labels == label
            ranked = relevant[np.argsort(-(scores[q] + nudge * relevant), kind="stable")[:k]]
            precisions = np.cumsum(ranked) / np.arange(1, k + 1)
            aps.append(float((precisions * ranked).sum()) / min(k, int(relevant.sum())))
        return float(np.mean(aps))

    return mean_ap(-tie), mean_ap(tie)  # relevant images lose every near tie, then win every one


def test_evaluation_end_to_end_with_finetuning_crop_and_grids(tmp_path: Path, capsys) -> None:
    make_class_folders(tmp_path / "data", classes=3, per_class=6)
    out = tmp_path / "eval"
    common = ["--data", str(tmp_path / "data"), "--output", str(out), "--queries-per-class", "2",
              "--classifier", TINY_CLASSIFIER, "--embedder", TINY_CLIP_SPEC, "--batch-size", "4", "--top-n", "2"]
    assert evaluate_main(common) == 0
    first = json.loads((out / "results.json").read_text())
    names = [r["strategy"] for r in first["rows"]]
    assert names[:3] == ["global", "class@1", "class@2"] and names[5] == "calibrated", names
    assert names[3].startswith("gated@") and names[4].startswith("rerank:"), names
    calibration = first["calibration"][0]
    sweep = {row["strategy"]: row for row in calibration["sweep"]}
    assert len(sweep) > 10 and sweep["global"]["class_searches"] == 0 and sweep["class@1"]["class_searches"] == 6
    for row in first["rows"][:5]:  # the table's rows are the sweep's
        assert row["mAP@5"] == sweep[row["strategy"]]["mAP@5"]
    # The recommendation is global unless another setting's gain over it is significant (a lower
    # confidence bound above 0): then one of those (the simplest within the noise of the best).
    best = calibration["best_per_metric"]["mAP@5"]
    recommended = calibration["recommended"]["name"]
    assert best["value"] == max(row["mAP@5"] for row in sweep.values())
    significant = {row["strategy"] for row in sweep.values() if row["gain_bound"] > 0}
    assert recommended in (significant | {"global"} if significant else {"global"})
    assert sweep["global"]["gain_bound"] <= 1e-12 and calibration["confidence"] == 0.95
    split_info = json.loads((out / "split.json").read_text())
    assert len(split_info["queries"]) == 6 and len(split_info["gallery"]) == 12
    assert len(list((out / "gallery").glob("*/*"))) == 12      # the gallery split, for jobs.train_embedder
    query_labels = [Path(p).parent.name for p in split_info["queries"]]
    lowest, highest = reference_map(out, split_info["queries"], query_labels, 5)
    assert lowest - 6e-5 <= first["rows"][0]["mAP@5"] <= highest + 6e-5, (lowest, highest)  # 4 decimals
    for row in first["rows"]:
        assert 0.0 <= row["mAP@1"] <= 1.0 and row["queries_per_s"] > 0 and len(row["worst_classes"]) == 3

    # Fine-tune on the gallery split only (queries stay held out), as a Ray Train job with two workers.
    assert train_main(["--data", str(out / "gallery"), "--output", str(tmp_path / "triplet"),
                       "--backbone", TINY_CLASSIFIER, "--dim", "16", "--input-size", "32", "--classes-per-batch", "2",
                       "--per-class", "2", "--steps", "4", "--ray", "--num-workers", "2"]) == 0
    spec = json.loads((tmp_path / "triplet" / "summary.json").read_text())["embedder"]
    assert spec.startswith("timm:test_efficientnet@") and spec.endswith("embedder.safetensors")
    capsys.readouterr()

    assert evaluate_main([*common, "--finetuned", spec, "--detector", TINY_DETECTOR, "--crop-min-score", "0",
                          "--grids", "2", "--recommend", str(tmp_path / "strategy.json"), "--min-gain", "-1",
                          "--confidence", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| embedder | crop | strategy | mAP@1 | mAP@3 | mAP@5 |" in printed
    results = json.loads((out / "results.json").read_text())
    rows = {(r["embedder"], r["crop"], r["strategy"]): r for r in results["rows"]}
    assert len(rows) == 24   # 2 embedders x crop off/on x 6 strategies
    # The pretrained index was reused, so its rows are unchanged.
    assert rows[("pretrained", "off", "global")]["mAP@5"] == first["rows"][0]["mAP@5"]
    assert len(list((out / "runs").iterdir())) == 2
    assert (out / "results.md").read_text().count("\n| finetuned |") == 12 + 6  # the table; best per metric x crop
    # --recommend: the fine-tuned embedder's best setting (--min-gain -1 --confidence 0: whatever is best), as a strategy file.
    written = json.loads((tmp_path / "strategy.json").read_text())
    finetuned = next(c for c in results["calibration"] if c["embedder"] == "finetuned" and c["crop"] == "off")
    assert written["embedder"] == spec and written["strategy"]["name"] == finetuned["best_per_metric"]["mAP@5"]["strategy"]
    assert str(Strategy.load(str(tmp_path / "strategy.json"))) == written["strategy"]["name"]
    assert "recommended strategy (finetuned embedder, mAP@5)" in printed
    assert results["grids"] and all(Image.open(p).size == grid_size(5) for p in results["grids"])


def test_evaluation_with_a_head_fitted_on_the_gallery_keys_the_index_by_its_labels(tmp_path: Path) -> None:
    """--classifier head: a head is fitted on the gallery split's vectors (the queries stay unseen),
    the index's classes are the gallery's labels, and every strategy is evaluated on it."""
    make_class_folders(tmp_path / "data", classes=3, per_class=6)
    out = tmp_path / "eval"
    assert evaluate_main(["--data", str(tmp_path / "data"), "--output", str(out), "--queries-per-class", "2",
                          "--classifier", "head", "--embedder", TINY_CLASSIFIER, "--batch-size", "4",
                          "--top-n", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    calibration = results["calibration"][0]
    assert calibration["classes"] == "labels" and 0 <= calibration["head_accuracy"] <= 1
    assert calibration["classifier_spec"].startswith("head:") and [r["strategy"] for r in results["rows"]][:3] == \
        ["global", "class@1", "class@2"]
    run = next((out / "runs").iterdir())
    index = json.loads((run / "index" / "manifest.json").read_text())
    assert index["class_source"]["labels"] == ["class0", "class1", "class2"]
    assert {c: v[2] - v[1] for c, v in index["classes"].items()} == {"0": 4, "1": 4, "2": 4}  # the gallery split
    queries = {str(Path(q).resolve()) for q in json.loads((out / "split.json").read_text())["queries"]}
    embedded = [u for part in (run / "embedding-job" / "embeddings").glob("part-*.parquet")
                for u in pq.read_table(part).column("uri").to_pylist()]
    assert len(embedded) == 12 and not queries & {str(Path(u).resolve()) for u in embedded}
    assert "(classes: labels; head accuracy" in (out / "results.md").read_text()


def test_bad_evaluation_input_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "one" / "only").mkdir(parents=True)
    assert evaluate_main(["--data", str(tmp_path / "one"), "--output", str(tmp_path / "o")]) == 2
    assert "at least two class sub-folders" in capsys.readouterr().err
    assert evaluate_main(["--dataset", "imagenet", "--output", str(tmp_path / "o")]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(["--data", "x", "--dataset", "mnist5000", "--output", str(tmp_path / "o")])
