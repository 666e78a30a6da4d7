"""The embedding job end to end on one module-scoped local Ray."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from helpers import TINY_CLASSIFIER, TINY_CLIP_SPEC, assert_same_ranking, make_class_folders, write_jpeg

from jobs.embed import main, parse_args
from pipeline.embed_job import EmbedConfig, run
from pipeline.strategy import Strategy

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def config(inputs: list[Path], output: Path, **kwargs) -> EmbedConfig:
    defaults = dict(classifier=TINY_CLASSIFIER, embedder=TINY_CLIP_SPEC, batch_size=4, decode_batch_size=4,
                    files_per_shard=4, top_n=3)
    defaults.update(kwargs)
    return EmbedConfig(inputs=tuple(str(p) for p in inputs), output=str(output), **defaults)


def read_rows(out: Path) -> dict[int, dict]:
    rows = {}
    for part in sorted((out / "embeddings").glob("part-*.parquet")):
        for row in pq.read_table(part).to_pylist():
            assert row["id"] not in rows, "duplicate id"
            rows[row["id"]] = row
    return rows


def error_rows(out: Path) -> list[dict]:
    return [r for p in sorted((out / "errors").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_folder_with_corrupt_files_accounts_for_every_file(tmp_path: Path) -> None:
    made = make_class_folders(tmp_path / "data", classes=3, per_class=5, bad=4)
    summary = run(config([tmp_path / "data"], tmp_path / "out"))
    rows, errors = read_rows(tmp_path / "out"), error_rows(tmp_path / "out")
    assert len(rows) == 15 and len(errors) == 4
    assert sorted(Path(e["uri"]).name for e in errors) == sorted(p.name for p in made["bad"])
    assert {Path(r["uri"]).name for r in rows.values()} == {p.name for p in made["good"]}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["seen"] == 19 and manifest["counts"]["embedded"] == 15
    assert sum(manifest["counts"]["failed_by_type"].values()) == 4
    assert manifest["models"]["embedder"]["dim"] == 32
    assert manifest["models"]["classifier"]["label_space"] == "imagenet-1k"
    assert sum(p["rows"] for p in manifest["parts"]) == 15 and all(len(p["sha256"]) == 64 for p in manifest["parts"])
    assert summary["counts"] == manifest["counts"] and summary["images_per_s"] > 0
    assert set(summary["per_worker_images_per_s"]) == {"read", "decode", "model", "write"}
    assert (tmp_path / "out" / "summary.json").exists() and (tmp_path / "out" / "config.json").exists()


def test_device_decode_path_gives_the_cpu_path_rows_and_errors(tmp_path: Path) -> None:
    """--decode device (the GPU fast path; libjpeg-turbo through torchvision on this CPU)."""
    from PIL import Image

    made = make_class_folders(tmp_path / "data", classes=2, per_class=5, bad=3)
    Image.new("RGB", (30, 20), (200, 30, 30)).save(tmp_path / "data" / "class1" / "red.png")  # the CPU fallback
    run(config([tmp_path / "data"], tmp_path / "cpu"))
    summary = run(config([tmp_path / "data"], tmp_path / "device", decode="device"))
    cpu, device = read_rows(tmp_path / "cpu"), read_rows(tmp_path / "device")
    assert set(device) == set(cpu) and len(device) == 11
    for key, row in cpu.items():
        assert device[key]["label"] == row["label"]
        a, b = np.array(row["embedding"]), np.array(device[key]["embedding"])
        assert float(a @ b) > 0.99
    assert sorted((e["id"], e["error_type"]) for e in error_rows(tmp_path / "device")) == \
        sorted((e["id"], e["error_type"]) for e in error_rows(tmp_path / "cpu"))
    assert summary["counts"]["failed"] == len(made["bad"])
    with pytest.raises(ValueError, match="fused"):
        config([tmp_path / "data"], tmp_path / "x", decode="device", stages="separate")


def test_batch_size_auto_is_measured_before_the_job(tmp_path: Path) -> None:
    from pipeline.tuning import BATCH_CANDIDATES

    make_class_folders(tmp_path / "data", classes=2, per_class=5)
    summary = run(config([tmp_path / "data"], tmp_path / "out", batch_size="auto"))
    assert summary["batch_size"] in BATCH_CANDIDATES and summary["config"]["batch_size"] == "auto"
    assert summary["counts"]["embedded"] == 10
    with pytest.raises(ValueError, match="auto"):
        config([tmp_path / "data"], tmp_path / "x", batch_size=0)


def test_tar_and_parquet_inputs_with_limit(tmp_path: Path) -> None:

    rng = np.random.default_rng(5)
    jpegs = [write_jpeg(tmp_path / "src" / f"{i}.jpg", rng).read_bytes() for i in range(6)]
    with tarfile.open(tmp_path / "n01440764.tar", "w") as tar:
        for i, data in enumerate(jpegs):
            info = tarfile.TarInfo(f"n01440764_{i}.JPEG")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"image": jpegs, "label": ["x"] * 6}), tmp_path / "table.parquet")
    run(config([tmp_path / "n01440764.tar", tmp_path / "table.parquet"], tmp_path / "out"))
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 12
    assert sorted({r["label"] for r in rows.values()}) == ["n01440764", "x"]
    # --limit processes at most N images.
    run(config([tmp_path / "n01440764.tar"], tmp_path / "limited", limit=4))
    assert len(read_rows(tmp_path / "limited")) == 4


def test_resume_after_interruption_gives_identical_rows(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "data", classes=2, per_class=8, bad=2)
    run(config([tmp_path / "data"], tmp_path / "full"))
    reference = read_rows(tmp_path / "full")

    out = tmp_path / "resumed"
    run(config([tmp_path / "data"], out))
    # Simulate a kill: half the parts, the manifest and one error part never got written, and a
    # half-written temporary file lies around.
    parts = sorted((out / "embeddings").glob("part-*.parquet"))
    for part in parts[::2]:
        part.unlink()
    for part in (out / "errors").glob("part-*.parquet"):
        part.unlink()
    (out / "manifest.json").unlink()
    (out / "embeddings" / ".tmp-deadbeef-part-x.parquet").write_bytes(b"PAR1 half")
    kept = {p: p.stat().st_mtime_ns for p in parts[1::2]}
    summary = run(config([tmp_path / "data"], out))
    resumed = read_rows(out)
    assert set(resumed) == set(reference)
    assert summary["embedded_this_run"] == len(reference) - sum(
        pq.ParquetFile(p).metadata.num_rows for p in kept)
    for key, row in reference.items():
        assert resumed[key]["uri"] == row["uri"]
        # Other batches in other worker processes: the top classes agree up to near-tied probabilities.
        assert_same_ranking(resumed[key]["classes"], resumed[key]["class_probs"], row["classes"], row["class_probs"])
        np.testing.assert_allclose(resumed[key]["embedding"], row["embedding"], atol=1e-5)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "completed parts were redone"
    assert not list((out / "embeddings").glob(".tmp-*"))
    assert json.loads((out / "manifest.json").read_text())["counts"]["failed"] == 2
    # Running once more does nothing.
    assert run(config([tmp_path / "data"], out))["embedded_this_run"] == 0


def test_a_resume_does_not_read_complete_tars_again(tmp_path: Path) -> None:
    """Each tar read whole leaves a listing of its ids; a later run skips a tar whose every id is
    done, reads one that lost a part, and reads one that changed (size or time)."""
    rng = np.random.default_rng(7)
    (tmp_path / "in").mkdir()
    for t in range(3):
        with tarfile.open(tmp_path / "in" / f"n0000000{t}.tar", "w") as tar:
            for i in range(4):
                data = write_jpeg(tmp_path / "src" / f"{t}-{i}.jpg", rng).read_bytes()
                info = tarfile.TarInfo(f"n0000000{t}_{i}.JPEG")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    first = run(config([tmp_path / "in"], out, batch_size=4, decode_batch_size=4))
    assert first["shards"] == {"total": 3, "read": 3, "complete_not_read": 0}
    assert len(list((out / "listings").glob("*.npy"))) == 3
    again = run(config([tmp_path / "in"], out))
    assert again["shards"] == {"total": 3, "read": 0, "complete_not_read": 3} and again["embedded_this_run"] == 0
    # One part (and its record) lost: its images' tars are read again, only the lost images redone.
    part = sorted((out / "embeddings").glob("part-*.parquet"))[0]
    lost = pq.read_table(part, columns=["uri"])["uri"].to_pylist()
    part.unlink()
    part.with_suffix(".json").unlink()
    redone = run(config([tmp_path / "in"], out))
    touched = {u.split("#")[0] for u in lost}
    assert redone["shards"]["read"] == len(touched) and redone["embedded_this_run"] == len(lost)
    # A tar that grows (another image appended) is read again: only its new image is embedded.
    with tarfile.open(tmp_path / "in" / "n00000002.tar", "a") as tar:
        data = write_jpeg(tmp_path / "src" / "extra.jpg", rng).read_bytes()
        info = tarfile.TarInfo("n00000002_9.JPEG")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    grown = run(config([tmp_path / "in"], out))
    assert grown["shards"] == {"total": 3, "read": 1, "complete_not_read": 2} and grown["embedded_this_run"] == 1
    assert len(read_rows(out)) == 13


def test_output_of_other_models_is_refused(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "data", classes=1, per_class=2)
    run(config([tmp_path / "data"], tmp_path / "out"))
    with pytest.raises(ValueError, match="other settings"):
        run(config([tmp_path / "data"], tmp_path / "out", embedder=TINY_CLASSIFIER))


def test_cli_main_and_errors(tmp_path: Path, capsys) -> None:
    make_class_folders(tmp_path / "data", classes=2, per_class=3)
    status = main(["--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
                   "--classifier", TINY_CLASSIFIER, "--embedder", TINY_CLASSIFIER, "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert status == 0 and "embedded 6 images, 0 failed" in printed and str(tmp_path / "out") in printed
    assert main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o2"),
                 "--classifier", TINY_CLASSIFIER, "--embedder", TINY_CLASSIFIER]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--input", "x", "--output", "y", "--batch-size", "0"])


def test_embed_then_build_then_search_finds_the_image_itself(tmp_path: Path, capsys) -> None:
    from jobs.build_index import main as build_main
    from jobs.search import main as search_main

    made = make_class_folders(tmp_path / "data", classes=3, per_class=6)
    run(config([tmp_path / "data"], tmp_path / "emb"))
    assert build_main(["--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "index"),
                       "--shard-size", "5", "--ray"]) == 0  # shards built as Ray tasks
    assert "18 images" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "index" / "manifest.json").read_text())["shards"]) >= 3
    queries = [made["good"][0], made["good"][13]]
    for strategy in ("class@1", "global", None):
        assert search_main(["--index", str(tmp_path / "index"), "--image", *map(str, queries), "-k", "3", "--json",
                            *(["--strategy", strategy] if strategy else [])]) == 0
        answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        for query, answer in zip(queries, answers):
            assert answer["strategy"] == (strategy or "global")  # an index without a strategy: global
            top = answer["results"][0]
            assert top["uri"] == str(query) and top["score"] == pytest.approx(1.0, abs=1e-4)
            assert answer["classes"][0]["synset"].startswith("n")
            assert len(answer["results"]) == 3  # a class holding fewer than 3 images is filled up, with a note
            held = sum(1 for r in answer["results"] if r["class"] == answer["classes"][0]["index"])
            assert (answer["note"] is not None) == (strategy == "class@1" and held < 3)
    # The index's default strategy: set on the existing index, then used by a search without flags.
    assert build_main(["--output", str(tmp_path / "index"), "--strategy", "class@2"]) == 0
    assert "default strategy class@2" in capsys.readouterr().out
    assert search_main(["--index", str(tmp_path / "index"), "--image", str(queries[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy"] == "class@2"
    assert search_main(["--index", str(tmp_path / "index"), "--image", str(queries[0]), "--strategy", "nope"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    # A bad file is reported, the others answered, exit status 1.
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert search_main(["--index", str(tmp_path / "index"), "--image", str(bad), str(queries[0])]) == 1
    captured = capsys.readouterr()
    assert "bad.jpg: not an image" in captured.err and str(queries[0]) in captured.out
    # Building into an existing index is refused; appending the same output adds nothing.
    assert build_main(["--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "index")]) == 2
    assert build_main(["--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "index"), "--append"]) == 0
    assert "18 images" in capsys.readouterr().out


def test_a_head_classifier_runs_inside_the_embedder_and_keys_the_index_by_labels(tmp_path: Path, capsys) -> None:
    """jobs.embed --classifier head:PATH: the classes come from the embedder's vectors (no second
    network), and an index of that output is keyed by the gallery's labels, searched by jobs.search."""
    from jobs.build_index import main as build_main
    from jobs.search import main as search_main
    from jobs.train_classifier import main as train_main
    from pipeline.models import load_head

    made = make_class_folders(tmp_path / "data", classes=3, per_class=6)
    # Embeddings only (--classifier none): no classes, and an index of it needs a head.
    run(config([tmp_path / "data"], tmp_path / "first", classifier="none"))
    assert {len(row["classes"]) for row in read_rows(tmp_path / "first").values()} == {0}
    assert build_main(["--embeddings", str(tmp_path / "first"), "--output", str(tmp_path / "no-index")]) == 2
    assert "embedded without a classifier" in capsys.readouterr().err
    head_file = tmp_path / "head.safetensors"
    assert train_main(["--embeddings", str(tmp_path / "first"), "--output", str(head_file), "--epochs", "5"]) == 0
    spec = f"head:{head_file}"
    with pytest.raises(ValueError, match="runs inside the embedder"):
        config([tmp_path / "data"], tmp_path / "x", classifier=spec, stages="separate")
    run(config([tmp_path / "data"], tmp_path / "emb", classifier=spec))
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["models"]["classifier"]["spec"] == spec
    assert manifest["models"]["classifier"]["preprocess"] == manifest["models"]["embedder"]["preprocess"]
    head = load_head(spec)
    for row in read_rows(tmp_path / "emb").values():  # the actor's head on its vectors = the head here
        want_ids, want_probs = head.classify_vectors(np.array([row["embedding"]], np.float32), 3)
        assert_same_ranking(row["classes"], row["class_probs"], want_ids[0].tolist(), want_probs[0].tolist(), atol=1e-4)
    capsys.readouterr()
    assert build_main(["--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "index")]) == 0
    assert "classes: the gallery's labels (3 of them" in capsys.readouterr().out  # the default rule
    query = made["good"][7]
    assert search_main(["--index", str(tmp_path / "index"), "--image", str(query), "-k", "3", "--json",
                        "--strategy", "class@1"]) == 0
    answer = json.loads(capsys.readouterr().out)
    predicted = answer["classes"][0]["name"]
    assert predicted in ("class0", "class1", "class2") and answer["note"] is None  # 6 images per label
    assert {r["label"] for r in answer["results"]} == {predicted}                 # the predicted label's images
    assert (answer["results"][0]["uri"] == str(query)) == (predicted == query.parent.name)


def test_synset_tars_with_the_imagenet_classifier_search_the_tar_of_the_predicted_synset(tmp_path: Path,
                                                                                         capsys) -> None:
    """ImageNet class tars (named by synset) and the offline EfficientNet-Lite0: the index is keyed by
    the tars' synsets, a query searches the tar of its predicted synset, and a query whose synset has
    no tar is filled from the global search with a note (or searched globally when the gate says so)."""
    from PIL import Image, ImageOps

    from jobs.build_index import main as build_main
    from pipeline.datasets import sample_photos
    from pipeline.models import DEFAULT_CLASSIFIER
    from pipeline.search import QueryEngine

    photos = {p.name: p for p in sample_photos()}
    variants = {}
    for name in ("coffee.png", "motorcycle_left.png", "rocket.jpg"):
        image = Image.open(photos[name]).convert("RGB")
        w, h = image.size
        variants[name] = [ImageOps.mirror(image), image.crop((w // 10, h // 10, w - w // 10, h - h // 10)),
                          ImageOps.autocontrast(image.rotate(8))]
    # Name the tars after what the classifier predicts for the coffee and the motorcycle photos; the
    # rocket variants go into a tar of a synset no query is about (a tench).
    from pipeline.images import decode_image, resize_image
    from pipeline.models import load_image_models

    models = load_image_models(DEFAULT_CLASSIFIER, DEFAULT_CLASSIFIER)

    def top_synset(path: Path) -> str:
        image = resize_image(decode_image(path.read_bytes()), models.classifier.preprocess)
        return models.classifier.labels.id_of(int(models.classify_and_embed(image[None], None, 1)[0][0, 0]))

    synsets = {"coffee.png": top_synset(photos["coffee.png"]), "motorcycle_left.png": top_synset(photos["motorcycle_left.png"]),
               "rocket.jpg": "n01440764"}
    (tmp_path / "tars").mkdir()
    for name, synset in synsets.items():
        with tarfile.open(tmp_path / "tars" / f"{synset}.tar", "w") as tar:
            for i, image in enumerate(variants[name]):
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{synset}_{i}.JPEG")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
    run(config([tmp_path / "tars"], tmp_path / "emb", classifier=DEFAULT_CLASSIFIER, embedder=DEFAULT_CLASSIFIER))
    capsys.readouterr()
    assert build_main(["--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "index")]) == 0
    assert "classes: the gallery's labels (3 of them are classes of imagenet-1k" in capsys.readouterr().out
    engine = QueryEngine.load(str(tmp_path / "index"))
    assert engine.index.manifest.class_source["source"] == "labels"
    coffee = engine.search([photos["coffee.png"].read_bytes()], k=3, strategy="class@1")[0]
    assert coffee.classes[0]["synset"] == synsets["coffee.png"] and coffee.note is None
    assert {h.label for h in coffee.hits} == {synsets["coffee.png"]} and len(coffee.hits) == 3
    # The astronaut's predicted synset has no tar: the class search finds nothing and says so.
    astronaut = engine.search([photos["astronaut.png"].read_bytes()], k=3, strategy="class@1")[0]
    assert astronaut.classes[0]["synset"] not in synsets.values()
    assert astronaut.note is not None and "has no gallery images; 3 filled from the global search" in astronaut.note
    assert len(astronaut.hits) == 3
    unfilled = engine.search([photos["astronaut.png"].read_bytes()], k=3, strategy=Strategy.parse("class@1", fill=False))[0]
    assert unfilled.hits == [] and "search with fill or the global strategy" in unfilled.note
    # A gate above the astronaut's confidence searches globally instead, without a note.
    tau = (astronaut.classes[0]["probability"] + 1) / 2
    gated = engine.search([photos["astronaut.png"].read_bytes()], k=3, strategy=Strategy("gated", tau=tau))[0]
    assert gated.note is None and [h.id for h in gated.hits] == [h.id for h in astronaut.hits]
