"""``python -m jobs.benchmark batch --skip-ray --compare-classifiers`` on tiny models and generated
images: every measurement is made and reported, the three classifier settings side by side (speeds
are printed, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY_CLASSIFIER, TINY_CLIP_SPEC, make_class_folders

from jobs.benchmark.cli import main


def test_the_classifier_comparison_measures_each_setting_in_the_same_run(tmp_path: Path, capsys) -> None:
    make_class_folders(tmp_path / "data", classes=2, per_class=8)
    assert main(["batch", "--input", str(tmp_path / "data"), "--limit", "16", "--batch-size", "4", "--rounds", "2",
                 "--embedder", TINY_CLIP_SPEC, "--classifier", TINY_CLASSIFIER, "--skip-ray", "--threads", "1",
                 "--sweep-batch-sizes", "4", "--compare-classifiers", "--head-classes", "50",
                 "--json", str(tmp_path / "batch.json")]) == 0
    results = json.loads((tmp_path / "batch.json").read_text())
    compared = results["classifiers"]
    names = ["embed only", "embed + head", f"embed + {TINY_CLASSIFIER}"]
    assert list(compared["pipelined_images_per_s"]) == names and compared["head_classes"] == 50
    assert all(len(compared["pipelined_rounds"][name]) == 2 for name in names)
    assert all(rate > 0 for rate in compared["pipelined_images_per_s"].values())
    assert "classifiers_ray" not in results   # --skip-ray: no job
    printed = capsys.readouterr().out
    assert "what the classes cost" in printed and all(f"  {name}" in printed for name in names)
    with pytest.raises(SystemExit):
        main(["batch", "--input", "x", "--head-classes", "1"])
    assert "--head-classes must be >= 2" in capsys.readouterr().err
