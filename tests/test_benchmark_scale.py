"""``python -m jobs.benchmark scale`` on a small ImageNet-shaped input: the real job runs twice (the
second a resume with nothing left), and the figures it writes agree with the input. (Times and
memory are printed, never asserted.) Also the ``uploads`` area's argument checks."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from jobs.benchmark.cli import main

pytestmark = pytest.mark.ray


def test_scale_runs_the_job_and_a_resume_that_finds_everything_done(tmp_path: Path, capsys) -> None:
    code = main(["scale", "--classes", "12", "--per-class", "2", "--work", str(tmp_path), "--batch-size", "8",
                 "--json", str(tmp_path / "scale.json")])
    assert code == 0
    results = json.loads((tmp_path / "scale.json").read_text())
    tars = sorted((tmp_path / "input").glob("n*.tar"))
    assert [t.name for t in tars[:2]] == ["n00000000.tar", "n00000001.tar"] and len(tars) == 12
    with tarfile.open(tars[0]) as tar:
        assert tar.getnames() == ["n00000000_0.JPEG", "n00000000_1.JPEG"]
    assert results["tars"] == 12 and results["images"] == 24
    first, again = results["first_run"], results["resume_all_done"]
    assert first["counts"] == {"seen": 24, "embedded": 24, "failed": 0, "failed_by_type": {}}
    assert first["embedded_this_run"] == 24 and again["embedded_this_run"] == 0
    assert results["resume_bookkeeping"]["ids"] == 24 and results["parts"] >= 3  # batches of at most 8
    assert first["driver_peak_rss_mb"] > 0 and again["driver_peak_rss_mb"] > 0
    printed = capsys.readouterr().out
    assert "12 class tars x 2 JPEGs" in printed and "resume, everything done" in printed
    # The input is built once and reused while its shape is the same.
    stamp = (tmp_path / "input" / "_shape.json").stat().st_mtime_ns
    from jobs.benchmark.scale import make_input
    assert make_input(tmp_path / "input", 12, 2)["built_s"] == 0.0
    assert (tmp_path / "input" / "_shape.json").stat().st_mtime_ns == stamp


def test_uploads_needs_an_index(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["uploads", "--index", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    assert "make demo builds out/demo-index" in capsys.readouterr().err
