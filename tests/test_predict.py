"""`python -m jobs.predict`: good files are answered, bad ones get a one-line error and exit 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.predict import main

REPO = Path(__file__).resolve().parents[1]


def make_images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    good = tmp_path / "Kätzchen.JPG"  # non-ASCII name, upper-case extension
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(good, format="JPEG")
    png = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), "RGBA").save(png)
    return [good, png]


def test_predict_json_with_a_bad_file(tmp_path: Path, capsys) -> None:
    good, png = make_images(tmp_path)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(good.read_bytes()[:100])
    missing = tmp_path / "missing.jpg"
    status = main([str(good), str(bad), str(png), str(missing), "--json", "--top", "3",
                   "--classifier", "timm:test_efficientnet@random", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert status == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in rows] == [str(good), str(png)]
    for row in rows:
        assert len(row["classes"]) == 3
        assert all(c["synset"].startswith("n") and c["name"] for c in row["classes"])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert "broken.jpg: truncated" in errors[0] and "missing.jpg: cannot read" in errors[1]
    assert "2 of 4 images could not be classified" in err


def test_predict_cli_runs_as_a_module(tmp_path: Path) -> None:
    good, _ = make_images(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "jobs.predict", str(good), "--top", "2",
                           "--classifier", "timm:test_efficientnet@random"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(good) and len(lines) == 3 and "%" in lines[1]


def test_predict_rejects_bad_flags(capsys) -> None:
    import pytest

    with pytest.raises(SystemExit):
        main(["--top", "0", "x.jpg"])
    with pytest.raises(SystemExit):
        main([])
    assert "IMAGE" in capsys.readouterr().err
