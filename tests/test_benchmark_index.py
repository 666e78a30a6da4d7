"""``python -m jobs.benchmark index`` on a tiny gallery: every measurement runs, the figures it
writes are consistent with each other, and recall is computed against the float32 truth. (Times
are printed, never asserted.) The first gallery's build runs in this process (a child would import
the whole pipeline again); the one with deleted rows is built in a child, as the benchmark does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import in_process

import jobs.benchmark.index as bench_index
from jobs.benchmark.cli import main


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_index, "_in_child", in_process)
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


@pytest.fixture(scope="module")
def deleted_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-deleted")
    code = main(["index", "--rows", "4000", "--dim", "32", "--classes", "30", "--queries", "40",
                 "--head-thresholds", "300", "--ef-search", "16", "64", "--deleted", "0.1",
                 "--hnsw-m", "16", "--ef-construction", "40", "--scratch", str(out), "--json", str(out / "index.json")])
    assert code == 0
    return json.loads((out / "index.json").read_text())


def test_deleted_rows_are_tombstoned_never_returned_and_out_of_the_truth(deleted_results) -> None:
    r = deleted_results
    # 10 % below the compaction threshold (20 %): every deleted row is a tombstone the searches skip
    assert r["deletion"]["deleted_rows"] == 400
    assert r["deletion"]["tombstoned_rows"] == 400 and r["deletion"]["compacted_rows"] == 0
    assert r["deletion"]["shards_with_tombstones"] >= 1 and r["deletion"]["version"] == 2
    assert r["truth_has_deleted"] == 0
    assert r["deleted_returned"]["total"] == 0
    assert set(r["deleted_returned"]) == {"class_search", "global_search", "float32_twin", "total"}
    assert all(row["deleted_returned"] == 0 for row in r["global_search"] + r["global_search_float32"])
    # the truth is over the live rows: the exact scans find it (float16 rounding aside)
    assert r["class_search"][0]["recall_at_10"] >= 0.97
    assert r["global_search"][-1]["recall_at_10"] >= 0.9
    assert (r["hnsw_m"], r["ef_construction"]) == (16, 40)
    assert r["build_peak_rss_gb"] > 0  # measured in the build's own process


def test_targets_are_ratios_of_the_same_run(deleted_results) -> None:
    t = deleted_results["targets"]
    assert (t["recall"], t["class_p99_ratio_at_most"], t["global_speedup_at_least"]) == (0.95, 0.1, 10.0)
    exact_p99 = deleted_results["class_search"][0]["p99_ms"]
    assert t["class"]["exact_scan_p99_ms"] == exact_p99
    assert t["class"]["recall_at_10"] >= 0.95
    assert t["class"]["met"] == (t["class"]["ratio"] <= 0.1)
    g = t["global"]
    assert g["exact_qps"] == deleted_results["global_exact_qps"] and g["recall_at_10"] >= 0.95
    assert g["met"] == (g["ratio"] >= 10)


def test_machine_and_thread_settings_are_recorded(deleted_results, results) -> None:
    import faiss

    for r in (results, deleted_results):
        t = r["threads"]
        assert t["cpu_model"] and t["cpu_model"] in r["machine"]
        assert t["cpus"] >= 1 and 1 <= t["usable_cpus"] <= t["cpus"]
        assert t["faiss_omp_threads"] == faiss.omp_get_max_threads()
        assert "OMP_NUM_THREADS" in t["env"] and isinstance(t["torch_imported"], bool)
        assert t["faiss_simd_level"]
    assert results["deleted_fraction"] == 0 and "deletion" not in results
    assert results["deleted_returned"]["total"] == 0


def test_bad_deleted_fraction_is_refused(capsys) -> None:
    for value in ("1", "-0.1"):
        with pytest.raises(SystemExit):
            main(["index", "--deleted", value])
        assert "--deleted" in capsys.readouterr().err
