"""``python -m jobs.benchmark index`` on a tiny gallery: every measurement runs, the figures it
writes are consistent with each other, and recall is computed against the float32 truth. (Times
are printed, never asserted.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.benchmark.cli import main


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    code = main(["index", "--rows", "6000", "--dim", "32", "--classes", "40", "--queries", "40",
                 "--head-thresholds", "300", "600", "--ef-search", "16", "64", "--scratch", str(out),
                 "--json", str(out / "index.json")])
    assert code == 0
    return json.loads((out / "index.json").read_text())


def test_class_search_rows_cover_every_threshold_and_breadth(results) -> None:
    rows = results["class_search"]
    assert rows[0]["threshold"] is None and rows[0]["recall_vs_exact_scan"] == 1.0
    assert [(r["threshold"], r["ef_search"]) for r in rows[1:]] == [(300, 16), (300, 64), (600, 16), (600, 64)]
    # float16 exact scans against the float32 truth: rounding may swap a near tie, little more
    assert rows[0]["recall_at_10"] >= 0.97
    assert all(r["recall_vs_exact_scan"] >= 0.9 for r in rows[1:] if r["ef_search"] == 64)
    via = {r["threshold"]: r["queries_via_heads"] for r in rows[1:]}
    assert via[300] >= via[600] > 0
    heads = results["head_classes"]
    assert heads["300"]["classes"] >= heads["600"]["classes"] >= 1
    assert heads["300"]["rows"] >= heads["600"]["rows"] >= 600


def test_global_search_and_float16_figures(results) -> None:
    assert [r["ef_search"] for r in results["global_search"]] == [16, 64]
    assert all(0.5 <= r["recall_at_10"] <= 1.0 for r in results["global_search"])
    assert results["global_search"][1]["recall_at_10"] >= 0.9
    f32 = results["global_search_float32"]
    assert [r["ef_search"] for r in f32] == [16, 64]
    assert results["vector_dtype"] == "float16"
    # float16 vectors: 2 bytes a dimension (plus the .npy header), per million vectors
    assert abs(results["bytes_per_million"]["vectors"] - 32 * 2 * 1_000_000) < 200 * 1_000_000 / 6000
    assert results["bytes_per_million"]["head_indexes"] > 0


def test_bad_arguments_are_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["index", "--rows", "0"])
    assert exit_info.value.code == 2
    assert "--rows" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["index", "--head-thresholds", "0"])


def test_compare_autofaiss_says_how_to_install_it(monkeypatch, capsys) -> None:
    import builtins

    real_import = builtins.__import__

    def no_autofaiss(name, *args, **kwargs):
        if name == "autofaiss":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_autofaiss)
    with pytest.raises(SystemExit):
        main(["index", "--compare-autofaiss"])
    assert "make install-autofaiss" in capsys.readouterr().err


def test_scratch_is_left_empty(results, tmp_path_factory) -> None:
    scratch = Path(tmp_path_factory.getbasetemp()) / "bench0"
    assert sorted(p.name for p in scratch.iterdir()) == ["index.json"]
