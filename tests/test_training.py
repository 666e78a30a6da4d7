"""Metric-learning losses (triplet, multi-similarity, supcon) against loops over anchors,
class-balanced batches, and fine-tuning on a tiny set (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from helpers import TINY_CLASSIFIER, make_class_folders

from jobs.train_embedder import main
from pipeline.datasets import list_labelled_images
from pipeline.models import load_embedder, select_runtime
from pipeline.training import (
    TrainConfig,
    augment_images,
    class_balanced_batches,
    classify_loss,
    multi_similarity_loss,
    pairwise_distances,
    supcon_loss,
    train,
    triplet_loss,
)


def unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_batch_hard_loss_by_hand() -> None:
    # Angles 0, 60 (class a) and 90, 180 degrees (class b) on the unit circle.
    e = unit([1, 0], [0.5, 3 ** 0.5 / 2], [0, 1], [-1, 0])
    labels = torch.tensor([0, 0, 1, 1])
    d = pairwise_distances(e)
    np.testing.assert_allclose(d[0, 1], 1.0, atol=1e-5)           # chord of 60 degrees
    np.testing.assert_allclose(d[0, 2], 2 ** 0.5, atol=1e-5)
    loss, stats = triplet_loss(e, labels, margin=0.5, mining="batch-hard")
    # Anchor: hardest positive, closest negative -> max(0, d_ap - d_an + 0.5)
    chord = lambda degrees: 2 * np.sin(np.radians(degrees) / 2)  # noqa: E731
    expected = [max(0, chord(60) - chord(90) + 0.5),    # 0: pos 60 deg, closest neg 90 deg
                max(0, chord(60) - chord(30) + 0.5),    # 60: pos 60, neg (90) 30 deg away
                max(0, chord(90) - chord(30) + 0.5),    # 90: pos 180 is 90 away, neg 60 is 30 away
                max(0, chord(90) - chord(120) + 0.5)]   # 180: pos 90 away, neg (60) 120 away
    np.testing.assert_allclose(float(loss), np.mean(expected), atol=1e-5)
    assert stats["active"] == 1.0


@pytest.mark.parametrize("mining", ["batch-hard", "semi-hard"])
def test_mining_matches_a_loop_over_anchors(mining: str) -> None:
    generator = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(12, 5, generator=generator), dim=-1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    d = torch.cdist(e.double(), e.double()).numpy()
    expected = []
    for a in range(12):
        pos = max(d[a, p] for p in range(12) if p != a and labels[p] == labels[a])
        negatives = [d[a, n] for n in range(12) if labels[n] != labels[a]]
        farther = [x for x in negatives if x > pos]
        neg = min(farther) if mining == "semi-hard" and farther else min(negatives)
        expected.append(max(0.0, pos - neg + 0.3))
    loss, _ = triplet_loss(e, labels, margin=0.3, mining=mining)
    np.testing.assert_allclose(float(loss), np.mean(expected), atol=1e-5)


def random_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    e = torch.nn.functional.normalize(torch.randn(12, 5, generator=generator), dim=-1)
    return e, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])


def test_multi_similarity_loss_matches_a_loop_over_anchors() -> None:
    e, labels = random_batch(1)
    s = (e.double() @ e.double().T).numpy()
    alpha, beta, base, eps = 2.0, 50.0, 0.5, 0.1
    per_anchor = []
    for a in range(12):
        pos = [s[a, p] for p in range(12) if p != a and labels[p] == labels[a]]
        neg = [s[a, n] for n in range(12) if labels[n] != labels[a]]
        kept_neg = [x for x in neg if x + eps > min(pos)]
        kept_pos = [x for x in pos if x - eps < max(neg)]
        if kept_pos or kept_neg:
            per_anchor.append(np.log1p(sum(np.exp(-alpha * (x - base)) for x in kept_pos)) / alpha
                              + np.log1p(sum(np.exp(beta * (x - base)) for x in kept_neg)) / beta)
    loss, stats = multi_similarity_loss(e, labels, alpha, beta, base, eps)
    np.testing.assert_allclose(float(loss), np.mean(per_anchor), rtol=1e-5)
    assert stats["active"] == len(per_anchor) / 12
    # Well separated classes (each a tight cluster, clusters orthogonal) keep no pair: zero loss.
    tight = torch.nn.functional.normalize(torch.eye(4).repeat_interleave(3, 0) + 0.01 * e[:, :4], dim=-1)
    loss, stats = multi_similarity_loss(tight, labels)
    assert float(loss) == 0.0 and stats["active"] == 0.0


def test_supcon_loss_matches_a_loop_over_anchors() -> None:
    e, labels = random_batch(2)
    s = (e.double() @ e.double().T).numpy() / 0.1
    per_anchor = []
    for a in range(12):
        others = [j for j in range(12) if j != a]
        log_norm = np.log(sum(np.exp(s[a, j]) for j in others))
        positives = [p for p in others if labels[p] == labels[a]]
        per_anchor.append(-np.mean([s[a, p] - log_norm for p in positives]))
    loss, _ = supcon_loss(e, labels, temperature=0.1)
    np.testing.assert_allclose(float(loss), np.mean(per_anchor), rtol=1e-5)


def test_loss_needs_positives_and_negatives() -> None:
    with pytest.raises(ValueError, match="class-balanced"):
        triplet_loss(unit([1, 0], [0, 1]), torch.tensor([0, 1]), margin=0.2)
    with pytest.raises(ValueError, match="mining"):
        triplet_loss(unit([1, 0], [0, 1]), torch.tensor([0, 0]), margin=0.2, mining="easy")
    for loss in (multi_similarity_loss, supcon_loss):
        with pytest.raises(ValueError, match="positive and a negative"):
            loss(unit([1, 0], [0, 1]), torch.tensor([0, 1]))


def test_class_balanced_batches_are_p_by_k_and_resume_exactly() -> None:
    labels = np.array(["a"] * 10 + ["b"] * 3 + ["c"] * 7)
    first = class_balanced_batches(labels, classes_per_batch=2, per_class=4, seed=1)
    batches = [next(first) for _ in range(5)]
    for batch in batches:
        values, counts = np.unique(labels[batch], return_counts=True)
        assert len(values) == 2 and (counts == 4).all()   # "b" (3 images) is drawn with replacement
    resumed = class_balanced_batches(labels, classes_per_batch=2, per_class=4, seed=1, start=3)
    np.testing.assert_array_equal(next(resumed), batches[3])
    with pytest.raises(ValueError, match="two classes"):
        next(class_balanced_batches(np.array(["a"] * 5), 2, 2, seed=0))


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="timm"):
        TrainConfig(backbone="open_clip:ViT-B-32@random")
    with pytest.raises(ValueError, match="per_class"):
        TrainConfig(per_class=1)
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="arcface")
    with pytest.raises(ValueError, match="unknown augmentation rotate"):
        TrainConfig(augment="crop,rotate")
    with pytest.raises(ValueError, match="classify"):
        TrainConfig(classify=-1)
    assert TrainConfig(augment="none").augment == "none"


def test_augmentation_flips_and_crops_reproducibly() -> None:
    # A left-to-right ramp: a flip reverses it, a crop resized back keeps it rising and within its range.
    ramp = np.broadcast_to(np.linspace(0, 255, 32).astype(np.uint8)[None, :, None], (32, 32, 3))
    images = np.stack([ramp] * 16)
    assert augment_images(images, (), np.random.default_rng(0)) is images
    flipped = augment_images(images, ("flip",), np.random.default_rng(0))
    was_flipped = [bool((f == ramp[:, ::-1]).all()) for f in flipped]
    assert all(was_flipped[i] or (flipped[i] == ramp).all() for i in range(16))
    assert 0 < sum(was_flipped) < 16  # half of them, by chance: never all or none of 16 with this seed
    cropped = augment_images(images, ("crop",), np.random.default_rng(1))
    assert cropped.shape == images.shape and cropped.dtype == np.uint8
    assert (np.diff(cropped[:, 16, :, 0].astype(int), axis=1) >= 0).all()  # still rising left to right
    assert (cropped != images).any(axis=(1, 2, 3)).sum() >= 12  # most crops are not the whole image
    np.testing.assert_array_equal(cropped, augment_images(images, ("crop",), np.random.default_rng(1)))
    assert (images == ramp).all()  # the input is not changed in place


def test_erasing_fills_one_rectangle_of_noise_in_about_half_the_images() -> None:
    images = np.full((32, 40, 48, 3), 7, np.uint8)  # a value the noise rarely draws over a whole rectangle
    erased = augment_images(images, ("erase",), np.random.default_rng(2))
    np.testing.assert_array_equal(erased, augment_images(images, ("erase",), np.random.default_rng(2)))
    changed = (erased != images).any(axis=3)
    touched = changed.any(axis=(1, 2))
    assert 0 < touched.sum() < 32  # by chance: never all or none of 32 with this seed
    for mask in changed[touched]:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert mask.sum() > 0.9 * box  # one filled rectangle (a noise pixel may equal 7 by chance)
        assert 0.01 * 40 * 48 <= box <= 0.45 * 40 * 48  # 2-40 % of the area, rounded to whole pixels
    assert (images == 7).all()


def test_classify_loss_by_hand() -> None:
    embeddings = unit([1, 0], [0, 1], [1, 1])
    vectors = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised inside: (1, 0) and (0, 1)
    labels = torch.tensor([0, 1, 1])
    loss, accuracy = classify_loss(embeddings, labels, vectors, scale=16.0)
    logits = 16 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5 ** 0.5, 0.5 ** 0.5]])
    expected = -torch.log_softmax(logits, 1)[[0, 1, 2], [0, 1, 1]].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert accuracy == pytest.approx(2 / 3)  # the tie on row 3 goes to class 0


def tiny_config(**kwargs) -> TrainConfig:
    settings = dict(backbone=TINY_CLASSIFIER, dim=16, input_size=32, classes_per_batch=2, per_class=4, steps=20,
                    lr=1e-3)
    return TrainConfig(**(settings | kwargs))


@pytest.mark.parametrize("loss", ["triplet", "supcon"])
def test_every_loss_trains(tmp_path: Path, loss: str) -> None:
    make_class_folders(tmp_path / "data", classes=2, per_class=4)
    paths, labels = list_labelled_images(tmp_path / "data")
    summary = train(tiny_config(steps=20, loss=loss), paths, labels, tmp_path / "out", log_every=5)
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0], losses


def test_training_lowers_the_loss_writes_a_loadable_embedder_and_resumes(tmp_path: Path) -> None:
    # Two classes of four images: every batch is the whole set, so the (multi-similarity) loss must fall.
    make_class_folders(tmp_path / "data", classes=2, per_class=4)
    paths, labels = list_labelled_images(tmp_path / "data")
    summary = train(tiny_config(steps=20), paths, labels, tmp_path / "out", log_every=5)
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert (tmp_path / "out" / "checkpoint.pt").is_file()
    embedder = load_embedder(summary["embedder"], select_runtime("cpu"))
    assert embedder.dim == 16 and embedder.preprocess.size == (32, 32)
    vectors = embedder.embed_images(np.zeros((2, 32, 32, 3), np.uint8))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Resuming continues from step 20 (the history is kept), and refuses other settings.
    more = train(tiny_config(steps=25), paths, labels, tmp_path / "out", log_every=5)
    assert more["steps"] == 25 and more["steps_this_run"] == 5 and len(more["history"]) == 5
    with pytest.raises(ValueError, match="other settings"):
        train(tiny_config(steps=30, dim=8), paths, labels, tmp_path / "out")


@pytest.mark.parametrize("config", [{}, {"augment": "crop,flip", "classify": 1.0}], ids=["plain", "augment+classify"])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, config: dict) -> None:
    make_class_folders(tmp_path / "data", classes=3, per_class=5)
    paths, labels = list_labelled_images(tmp_path / "data")
    whole = train(tiny_config(steps=6, **config), paths, labels, tmp_path / "whole", checkpoint_every=3,
                  log_every=3)
    assert ("train_accuracy" in whole["history"][-1]) == bool(config.get("classify"))
    train(tiny_config(steps=3, **config), paths, labels, tmp_path / "split", checkpoint_every=3)
    train(tiny_config(steps=6, **config), paths, labels, tmp_path / "split", checkpoint_every=3)
    if config:
        with pytest.raises(ValueError, match="other settings"):
            train(tiny_config(steps=9, augment="crop,flip"), paths, labels, tmp_path / "split")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    # The embedder file holds the model alone (no class vectors) and loads like any other.
    a = load_embedder(f"{TINY_CLASSIFIER.split('@')[0]}@{tmp_path / 'whole' / 'embedder.safetensors'}")
    b = load_embedder(f"{TINY_CLASSIFIER.split('@')[0]}@{tmp_path / 'split' / 'embedder.safetensors'}")
    np.testing.assert_allclose(a.embed_images(images), b.embed_images(images), atol=1e-4)


def test_weight_averaging_saves_the_mean_of_the_weights_after_each_step_past_average_from(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "data", classes=2, per_class=4)
    paths, labels = list_labelled_images(tmp_path / "data")
    # The weights after steps 3, 4 and 5 of a plain run (each resumed run writes its last weights) ...
    states = []
    for steps in (3, 4, 5):
        train(tiny_config(steps=steps), paths, labels, tmp_path / "plain", checkpoint_every=1)
        states.append(load_file(tmp_path / "plain" / "embedder.safetensors"))
    # ... averaged, in one run and in a run resumed in the middle of the average.
    whole = train(tiny_config(steps=5, average_from=2), paths, labels, tmp_path / "whole")
    assert whole["averaged_steps"] == [3, 5]
    train(tiny_config(steps=4, average_from=2), paths, labels, tmp_path / "split", checkpoint_every=1)
    split = train(tiny_config(steps=5, average_from=2), paths, labels, tmp_path / "split", checkpoint_every=1)
    assert split["averaged_steps"] == [3, 5]
    for folder in ("whole", "split"):
        averaged = load_file(tmp_path / folder / "embedder.safetensors")
        assert averaged.keys() == states[0].keys()
        for key, value in averaged.items():
            if value.is_floating_point():
                torch.testing.assert_close(value, sum(s[key] for s in states) / 3, atol=1e-5, rtol=1e-4)
            else:  # BatchNorm's step counters: the last run's
                assert torch.equal(value, states[-1][key]), key
    assert not torch.allclose(states[0]["conv_stem.weight"], states[-1]["conv_stem.weight"])  # the steps moved
    # The averaged embedder loads like any other; a resumed run may move the start, a bad one is refused.
    load_embedder(whole["embedder"]).embed_images(np.zeros((1, 32, 32, 3), np.uint8))
    later = train(tiny_config(steps=6, average_from=4), paths, labels, tmp_path / "whole")
    assert later["averaged_steps"] == [6, 6]  # the checkpoint's average began too early: restarted
    with pytest.raises(ValueError, match="average_from"):
        tiny_config(steps=5, average_from=5)


def test_a_checkpoint_from_before_augmentation_resumes(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "data", classes=2, per_class=4)
    paths, labels = list_labelled_images(tmp_path / "data")
    train(tiny_config(steps=2), paths, labels, tmp_path / "out")
    checkpoint = tmp_path / "out" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    config = json.loads(state["config"])
    del config["augment"], config["classify"]  # as written before these settings existed
    torch.save(state | {"config": json.dumps(config)}, checkpoint)
    assert train(tiny_config(steps=3), paths, labels, tmp_path / "out")["steps_this_run"] == 1


def test_cli_trains_and_reports(tmp_path: Path, capsys) -> None:
    make_class_folders(tmp_path / "data", classes=2, per_class=4)
    args = ["--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--backbone", TINY_CLASSIFIER,
            "--dim", "8", "--input-size", "32", "--classes-per-batch", "2", "--per-class", "2", "--steps", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "embedder spec: timm:test_efficientnet@" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["images_this_run"] == 16
    assert main(["--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o2")]) == 2
    assert "is not a folder" in capsys.readouterr().err
