"""Command-line checks that run before any Ray starts: a relative --output under `ray job submit`
(it would land in Ray's temporary copy of the working dir and be deleted with the session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.files import RAY_JOB_ENV, check_output_folder


def test_relative_output_is_fine_outside_a_ray_job(monkeypatch) -> None:
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    assert check_output_folder("out/rel") is None


def test_relative_output_is_refused_in_a_ray_job(monkeypatch) -> None:
    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    problem = check_output_folder("out/rel")
    assert problem and "--output out/rel is a relative path" in problem and "absolute path" in problem
    assert check_output_folder("/mnt/shared/emb") is None
    assert check_output_folder("s3://bucket/emb") is None


def test_ray_working_dir_copy_is_recognised_by_its_path(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert "temporary copy" in check_output_folder("out/rel", "--output")


@pytest.mark.parametrize("module, argv", [
    ("jobs.embed", ["--input", "in", "--output", "out/rel"]),
    ("jobs.build_index", ["--embeddings", "/abs/emb", "--output", "out/rel"]),
    ("jobs.evaluate", ["--dataset", "mnist5000", "--output", "out/rel"]),
    ("jobs.train_embedder", ["--data", "/abs/data", "--output", "out/rel"]),
])
def test_every_job_refuses_it_before_starting_ray(monkeypatch, capsys, module: str, argv: list[str]) -> None:
    import importlib

    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    job = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_info:
        job.main(argv)
    assert exit_info.value.code == 2
    assert "relative path" in capsys.readouterr().err


def test_faiss_loader_chatter_is_not_shown() -> None:
    """FAISS logs three INFO lines per process about SIMD builds it could not load; the jobs keep
    them out of the user's log (its warnings still show)."""
    import subprocess
    import sys

    code = "import logging; logging.basicConfig(level=logging.INFO); import jobs.build_index, faiss"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "faiss.loader" not in done.stderr


def test_unknown_model_names_are_one_line_with_suggestions() -> None:
    from pipeline.models.catalog import require_known

    with pytest.raises(ValueError, match=r"timm has no model named 'tf_efficientnet_lite9'; did you mean tf_efficientnet_lite"):
        require_known("timm:tf_efficientnet_lite9")
    with pytest.raises(ValueError, match="open_clip has no model named 'ViT-Z-99'"):
        require_known("open_clip:ViT-Z-99/laion")
    assert require_known("timm:test_efficientnet@random").name == "test_efficientnet"


#: Runs jobs.embed's main on each named argv in a fresh interpreter, so that whether Ray started
#: does not depend on what other tests did in this process; prints one JSON line of results.
_EMBED_RUNS = """
import contextlib, io, json, sys
import ray
from jobs import embed
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = embed.main(argv)
    results[name] = {"code": code, "err": err.getvalue(), "ray": ray.is_initialized()}
print("RESULTS " + json.dumps(results))
"""

_BAD_MODELS = {
    "classifier": (["--classifier", "timm:nonexistent_model"], "unknown model 'timm:nonexistent_model'"),
    "embedder": (["--embedder", "open_clip:nonexistent/tag"], "open_clip has no model named 'nonexistent'"),
}


@pytest.fixture(scope="module")
def embed_refusals(tmp_path_factory) -> tuple[Path, dict]:
    """jobs.embed.main on bad models and a missing input, all in one fresh interpreter (one import
    of the job's stack); returns the folder and name -> ``code``, ``err``, ``ray``."""
    import json
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("embed-refusals")
    (root / "in").mkdir()
    tiny = "timm:test_efficientnet@random"
    runs = {name: ["--input", str(root / "in"), "--output", str(root / f"out-{name}"), *argv]
            for name, (argv, _) in _BAD_MODELS.items()}
    runs["missing-input"] = ["--input", str(root / "missing"), "--output", str(root / "out-missing-input"),
                             "--classifier", tiny, "--embedder", tiny]
    done = subprocess.run([sys.executable, "-c", _EMBED_RUNS, json.dumps(runs)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULTS ")]
    assert len(line) == 1, done.stdout[-3000:]
    return root, json.loads(line[0].removeprefix("RESULTS "))


@pytest.mark.parametrize("name", sorted(_BAD_MODELS))
def test_embed_checks_models_before_starting_ray(embed_refusals, name: str) -> None:
    root, results = embed_refusals
    result, says = results[name], _BAD_MODELS[name][1]
    assert result["code"] == 2
    err = result["err"].strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not (root / f"out-{name}").exists() and not result["ray"]


def test_embed_checks_inputs_before_starting_ray(embed_refusals) -> None:
    root, results = embed_refusals
    result = results["missing-input"]
    assert result["code"] == 2
    assert "does not exist" in result["err"]
    assert not (root / "out-missing-input").exists() and not result["ray"]


def test_predict_unknown_model_is_one_line(capsys) -> None:
    from jobs import predict

    assert predict.main(["--classifier", "timm:nonexistent_model@random", "--sample-photos"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown model 'timm:nonexistent_model@random': timm has no model named 'nonexistent_model'")


def test_embed_progress_is_one_plain_line(caplog) -> None:
    import logging

    from pipeline.embed_job import Progress

    progress = Progress(done_before=7, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="pipeline.embed_job"):
        progress.add({"rows": 16})
        progress.add({"rows": 16})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[1].startswith("progress: 32 images embedded in this run (")
    assert lines[1].endswith("images/s), 7 done before")
