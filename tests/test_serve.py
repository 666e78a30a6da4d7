"""The Ray Serve graph end to end on 127.0.0.1 with tiny models and a small index."""

from __future__ import annotations

import importlib.util
import io
import shutil
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
import ray
import requests
import torch
from helpers import TINY_CLASSIFIER, TINY_CLIP_SPEC, assert_same_ranking, free_port, make_class_folders
from PIL import Image

from pipeline.embed_job import EmbedConfig, run
from jobs.train_classifier import main as train_classifier_main
from pipeline.datasets import sample_photos
from pipeline.images import ImageDecodeError
from pipeline.index import IndexConfig, build_index
from pipeline.models import CropPolicy, Detections, choose_crop, load_detector
from pipeline.search import QueryEngine
from pipeline.strategy import Strategy

pytestmark = [pytest.mark.ray, pytest.mark.serve]

# A random detector's boxes are all unsure; this policy accepts any box so the crop path runs.
TINY_DETECTOR = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@random"
ANY_BOX = {"min_score": 0.0, "max_center_offset": 1.0, "min_area": 0.0, "margin": 0.1}
# The gallery's decode limit (room for the web page test's 451x300 photo): every query path applies it.
MAX_PIXELS = 400 * 400
# The main app's ingress decodes at most two images at the limit at once.
DECODE_BUDGET = 2 * MAX_PIXELS


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from ray import serve

    from serve.app import build_app

    root = tmp_path_factory.mktemp("serve")
    made = make_class_folders(root / "data", classes=3, per_class=5)
    # 5 logical CPUs: the main app takes 2.0, the decode=device app 1.5 and the head app 1.0 (two
    # physical cores suffice).
    ray.init(address="local", num_cpus=5, include_dashboard=False, logging_level="ERROR")
    run(EmbedConfig(inputs=(str(root / "data"),), output=str(root / "emb"), classifier=TINY_CLASSIFIER,
                    embedder=TINY_CLIP_SPEC, batch_size=4, top_n=3, max_pixels=MAX_PIXELS))
    # Small shards, split over two retriever deployments: the ingress must merge their top-k.
    manifest = build_index(root / "emb", root / "index", IndexConfig(shard_size=5))
    shards = list(range(len(manifest.shards)))
    assert len(shards) >= 2
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"index": str(root / "index"), "max_body_mb": 0.25, "max_batch_size": 4,
                         "retriever_shards": [shards[:1], shards[1:]], "detector": TINY_DETECTOR,
                         "crop_policy": ANY_BOX, "decode_pixel_budget": DECODE_BUDGET}),
              name="lookalike", route_prefix="/")
    serve.run(build_app({"index": str(root / "index"), "max_body_mb": 0.25, "max_batch_size": 4,
                         "decode": "device", "strategy": "class@2"}), name="lookalike-device", route_prefix="/device")
    # A classifier head fitted on the gallery, and the index keyed by the gallery's labels.
    assert train_classifier_main(["--embeddings", str(root / "emb"), "--output", str(root / "head.safetensors"),
                                  "--epochs", "5"]) == 0
    build_index(root / "emb", root / "head-index", IndexConfig(shard_size=5), classes="labels",
                classifier=f"head:{root / 'head.safetensors'}")
    serve.run(build_app({"index": str(root / "head-index"), "max_batch_size": 4, "strategy": "class@1"}),
              name="lookalike-head", route_prefix="/head")
    yield {"url": f"http://127.0.0.1:{port}", "index": root / "index", "head_index": root / "head-index",
           "images": made["good"]}
    serve.shutdown()
    ray.shutdown()


def post(service, data: bytes, **params) -> requests.Response:
    return requests.post(f"{service['url']}/search", params=params, data=data, timeout=60)


def test_health_and_page(service) -> None:
    health = requests.get(f"{service['url']}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["index_rows"] == 15 and health["retrievers"] == 2
    assert health["index_version"] == 1
    # The query pixel limit: the service's (50M by default) or the gallery's, whichever is lower.
    assert health["max_query_pixels"] == MAX_PIXELS and health["decode_budget"]["pixels"] == DECODE_BUDGET
    page = requests.get(service["url"] + "/", timeout=30)
    assert page.status_code == 200 and "lookalike" in page.text and "/search" in page.text
    assert "/search" in requests.get(f"{service['url']}/openapi.json", timeout=30).json()["paths"]


def assert_answers_agree(online: dict, engine: QueryEngine, data: bytes, k: int, strategy: str) -> None:
    """The service's answer equals the offline engine's for the query the service saw, up to ties.

    The predicted classes must agree up to near-tied probabilities; the hits are then compared with
    the offline engine searching the classes the service predicted (and the region it cropped), so a
    near-tie that another process broke the other way cannot change which class is searched (or
    whether a gated strategy searches it).
    """
    chosen = Strategy.parse(strategy)
    assert online["strategy"] == str(chosen)
    box = online["crop_box"]
    encoded = engine.encode([data], boxes=[tuple(box) if box else None])
    offline = engine.answer(encoded, k, chosen)[0].to_json()
    classes = [c["index"] for c in online["classes"]]
    assert_same_ranking(classes, [c["probability"] for c in online["classes"]],
                        [c["index"] for c in offline["classes"]], [c["probability"] for c in offline["classes"]],
                        atol=1.5e-4)  # probabilities are rounded to 4 decimals
    probs = np.array([[c["probability"] for c in online["classes"]]])
    pinned = engine.answer(replace(encoded, classes=np.array([classes]), probs=probs), k, chosen)[0].to_json()
    assert online["note"] == pinned["note"]
    assert_same_ranking([h["id"] for h in online["results"]], [h["score"] for h in online["results"]],
                        [h["id"] for h in pinned["results"]], [h["score"] for h in pinned["results"]])


@pytest.mark.parametrize("strategy", ["class@1", "global", "gated:0.002", "rerank:0.5"])
def test_results_equal_the_offline_query_cli(service, strategy: str) -> None:
    engine = QueryEngine.load(str(service["index"]))
    for path in service["images"][::4]:
        data = path.read_bytes()
        response = post(service, data, k=4, strategy=strategy)
        assert response.status_code == 200, response.text
        online = response.json()
        assert online["crop_box"] is None
        assert_answers_agree(online, engine, data, 4, strategy)
        assert online["results"][0]["uri"] == str(path)  # a gallery image finds itself first


def near_best_crops(detector, image: np.ndarray, rel: float = 0.05) -> list[tuple[int, int, int, int]]:
    """The crop boxes the policy could pick were near-ties broken differently: every qualifying
    box whose area is within ``rel`` of the largest one's (the policy picks the largest). The detector
    runs on one thread, as in the service's replica (Ray gives a 0.25-CPU actor one): with another
    thread count the random-weight detector's boxes can differ by more than a near-tie."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        found = detector.detect([image])[0]
    finally:
        torch.set_num_threads(threads)
    crops = [choose_crop(Detections(found.boxes[i:i + 1], found.scores[i:i + 1], found.labels[i:i + 1]),
                         image.shape[:2], detector.policy) for i in range(len(found.boxes))]
    areas = {c: (c[2] - c[0]) * (c[3] - c[1]) for c in crops if c is not None}
    assert areas, "the offline detector found no box the policy accepts"
    return [c for c, area in areas.items() if area >= (1 - rel) * max(areas.values())]


def test_detection_crop_equals_the_offline_crop(service) -> None:
    """The service crops like jobs.search: its box is the offline detector's choice (up to near-tied
    boxes of the random-weight detector), and searching that region offline gives its answer."""
    detector = load_detector(TINY_DETECTOR, policy=CropPolicy(**ANY_BOX))
    engine = QueryEngine.load(str(service["index"]), detector=detector)
    for path in service["images"][1::5]:
        data = path.read_bytes()
        online = post(service, data, k=3, crop="auto").json()
        assert online["crop_box"] is not None
        x0, y0, x1, y1 = online["crop_box"]
        height, width = online["image_size"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        candidates = near_best_crops(detector, engine.queries.decode(data))
        assert any(max(abs(a - b) for a, b in zip(online["crop_box"], c)) <= 2 for c in candidates), \
            (online["crop_box"], candidates)
        assert_answers_agree(online, engine, data, 3, "global")  # the default strategy
        assert post(service, data, k=3).json()["crop_box"] is None  # the app's default is crop=off


def test_multipart_upload(service) -> None:
    path = service["images"][2]
    files = {"image": ("photo.jpg", path.read_bytes(), "image/jpeg")}
    response = requests.post(f"{service['url']}/search", files=files, params={"k": 2}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["uri"] == str(path)


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_bad_input_gets_its_status_and_the_service_carries_on(service) -> None:
    good = service["images"][0].read_bytes()
    cases = [(b"", 400, "empty"), (b"this is not an image", 400, "not an image"),
             (good[: len(good) // 3], 400, "truncated"), (png_claiming(40000, 40000), 400, "too large"),
             (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", 400, "unsupported format")]
    for data, status, reason in cases:
        response = post(service, data)
        assert response.status_code == status, (reason, response.text)
        assert reason in response.json()["detail"]
    too_big = np.random.default_rng(0).integers(0, 256, 400_000, dtype=np.uint8).tobytes()
    assert post(service, too_big).status_code == 413
    for params in ({"k": 0}, {"k": "many"}, {"strategy": "everything"}, {"strategy": "gated"}, {"crop": "maybe"}, {"min_score": 3}):
        assert post(service, good, **params).status_code == 422, params
    assert post(service, good).status_code == 200


def test_queries_are_decoded_with_the_gallerys_pixel_limit(service) -> None:
    """max_pixels travels embedding job -> index manifest -> every query path: the ingress, the
    decode: device replicas and the offline engine refuse an image just over the gallery's limit."""
    def jpeg(width: int, height: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(out, format="JPEG")
        return out.getvalue()

    over, at = jpeg(401, 400), jpeg(400, 400)
    for url in (f"{service['url']}/search", f"{service['url']}/device/search"):
        response = requests.post(url, data=over, timeout=60)
        assert response.status_code == 400 and "too large" in response.json()["detail"], response.text
        assert requests.post(url, data=at, timeout=60).status_code == 200
    with pytest.raises(ImageDecodeError, match="too large"):
        QueryEngine.load(str(service["index"])).search([over])


def test_decoding_on_the_model_device_answers_like_the_ingress(service) -> None:
    """decode: device (the replicas decode uploads on their device; CPU here) gives the ingress
    path's answers within the decoders' small differences, and the same errors for bad uploads."""
    def post_device(data: bytes, **params) -> requests.Response:
        return requests.post(f"{service['url']}/device/search", params=params, data=data, timeout=60)

    for path in service["images"][::3]:
        data = path.read_bytes()
        on_ingress = post(service, data, k=4, strategy="global").json()
        on_device = post_device(data, k=4, strategy="global").json()
        assert on_device["image_size"] == on_ingress["image_size"]
        assert on_device["results"][0]["uri"] == str(path)  # finds itself first
        scores = {h["id"]: h["score"] for h in on_ingress["results"]}
        common = [h for h in on_device["results"] if h["id"] in scores]
        assert len(common) >= 3
        np.testing.assert_allclose([h["score"] for h in common], [scores[h["id"]] for h in common], atol=0.02)
        probs = {c["index"]: c["probability"] for c in on_ingress["classes"]}
        shared = [c for c in on_device["classes"] if c["index"] in probs]
        assert len(shared) >= 3
        np.testing.assert_allclose([c["probability"] for c in shared], [probs[c["index"]] for c in shared], atol=0.02)
    good = service["images"][0].read_bytes()
    for data, reason in ((b"", "empty"), (b"this is not an image", "not an image"),
                         (good[: len(good) // 3], "truncated"), (png_claiming(40000, 40000), "too large")):
        response = post_device(data)
        assert response.status_code == 400 and reason in response.json()["detail"], (reason, response.text)
    assert post_device(good).status_code == 200  # a bad upload in a batch does not break the replica


def test_thumbnails_by_id_only(service) -> None:
    hit = post(service, service["images"][1].read_bytes(), k=1).json()["results"][0]
    thumb = requests.get(service["url"] + hit["thumbnail"], params={"size": 32}, timeout=30)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 32
    assert requests.get(f"{service['url']}/images/12345", timeout=30).status_code == 404
    assert requests.get(f"{service['url']}/images/..%2F..%2Fetc%2Fpasswd", timeout=30).status_code in (404, 422)


def test_text_search_with_a_clip_embedder(service) -> None:
    response = requests.post(f"{service['url']}/search/text", params={"q": "a photo of a cat", "k": 3}, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 3
    assert requests.post(f"{service['url']}/search/text", params={"q": ""}, timeout=30).status_code == 422


def test_the_strategy_defaults_to_the_configs_then_the_indexs_then_global(service) -> None:
    data = service["images"][0].read_bytes()
    assert post(service, data).json()["strategy"] == "global"             # no config, no index strategy
    on_device = requests.post(f"{service['url']}/device/search", data=data, timeout=60).json()
    assert on_device["strategy"] == "class@2"                              # the app's config
    assert on_device["results"][0]["uri"] == str(service["images"][0])
    assert post(service, data, strategy="gated@2:0.5", fill="false").json()["strategy"] == "gated@2:0.5"


def test_a_head_index_is_served_without_a_classifier_deployment(service) -> None:
    """An index whose classifier is a head: the Embedder replicas classify from the vectors they
    compute (no Classifier deployment), the answers equal the offline engine's, and a class search
    returns the gallery images labelled with the predicted class."""
    from ray import serve

    deployments = serve.status().applications["lookalike-head"].deployments
    assert "Embedder" in deployments and "Classifier" not in deployments
    engine = QueryEngine.load(str(service["head_index"]))
    assert engine.models.head
    for path in service["images"][::4]:
        data = path.read_bytes()
        response = requests.post(f"{service['url']}/head/search", params={"k": 3}, data=data, timeout=60)
        assert response.status_code == 200, response.text
        online = response.json()
        assert {c["name"] for c in online["classes"]} <= {"class0", "class1", "class2"}
        assert_answers_agree(online, engine, data, 3, "class@1")
        if online["note"] is None:  # a full class answer: the predicted class's own images
            assert {h["label"] for h in online["results"]} == {online["classes"][0]["name"]}
    # decode: device uses the Embedder's other entry point: the same classes and vector.
    handle = serve.get_deployment_handle("Embedder", app_name="lookalike-head")
    data = service["images"][0].read_bytes()
    classes, vector = handle.classify_and_embed_encoded.remote(data).result()
    online = requests.post(f"{service['url']}/head/search", params={"k": 3}, data=data, timeout=60).json()
    assert_same_ranking([c["index"] for c in classes], [c["probability"] for c in classes],
                        [c["index"] for c in online["classes"]], [c["probability"] for c in online["classes"]],
                        atol=0.02)
    assert vector.shape == (engine.index.dim,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-4
    bad = handle.classify_and_embed_encoded.remote(b"not an image").result()
    assert isinstance(bad, dict) and "error" in bad


def test_model_overrides_that_differ_from_the_index_are_refused(service) -> None:
    from serve.app import build_app

    with pytest.raises(ValueError, match="differs from the index"):
        build_app({"index": str(service["index"]), "embedder": TINY_CLASSIFIER})
    with pytest.raises(ValueError, match="cover shards"):
        build_app({"index": str(service["index"]), "retriever_shards": [[0]]})
    with pytest.raises(ValueError, match="unknown strategy"):
        build_app({"index": str(service["index"]), "strategy": "best"})


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None or importlib.util.find_spec("playwright") is None,
                    reason="needs Debian's chromium (installed by .ci/run) and playwright (dev extra)")
def test_web_page_upload_shows_classes_and_results(service, tmp_path) -> None:
    """The web page in headless Chromium: upload a real photo, see predicted classes and results."""
    from playwright.sync_api import sync_playwright

    photo = next(p for p in sample_photos() if p.name == "chelsea.png")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(service["url"] + "/")
            assert "lookalike" in page.title()
            page.fill("#k", "3")
            page.select_option("#strategy", "global")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("figure.result", timeout=60_000)
            assert page.locator("figure.result").count() == 3
            assert page.locator("#classes li").count() == 5
            assert "3 results" in page.inner_text("#status")
            # Thumbnails load from /images/{id}.
            page.wait_for_function("Array.from(document.querySelectorAll('figure.result img'))"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 1000


def test_concurrent_uploads_at_the_pixel_limit_stay_within_the_decode_budget(service) -> None:
    """A flood of uploads at the pixel limit, all at once: the ingress holds at most its budget's
    pixels (two such images) decoded at a time, while the detector looks at them; the others wait
    their turn, first come first served, and every request is answered, a small query sent into the
    flood included."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    out = io.BytesIO()
    y, x = np.mgrid[:400, :400]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)).save(out, "PNG")
    big, small = out.getvalue(), service["images"][0].read_bytes()
    assert len(big) < 0.25 * 2**20  # under max_body_mb: only the pixel budget holds these back
    before = requests.get(f"{service['url']}/healthz", timeout=30).json()["decode_budget"]
    start = threading.Barrier(13)

    def send(data: bytes, **params) -> requests.Response:
        start.wait(timeout=60)
        return post(service, data, **params)

    with ThreadPoolExecutor(13) as pool:
        flood = [pool.submit(send, big, k=2, crop="auto") for _ in range(12)]
        quick = pool.submit(send, small, k=2)
        responses = [f.result(timeout=300) for f in [*flood, quick]]
    assert [r.status_code for r in responses] == [200] * 13, [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["image_size"] == [400, 400] for r in responses[:12])
    after = requests.get(f"{service['url']}/healthz", timeout=30).json()["decode_budget"]
    assert after["admitted"] - before["admitted"] == 13 and after["in_use"] == 0
    assert MAX_PIXELS <= after["peak_pixels"] <= DECODE_BUDGET  # counted at their size, never more than two
    assert after["waited"] > before["waited"]  # they arrived together, so some had to wait their turn


def test_a_replica_killed_mid_request_loses_no_request(service) -> None:
    """Runs last: kills the Classifier replica while requests are in flight; the ingress asks again
    and Serve's replacement answers, so every request gets its 200."""
    from concurrent.futures import ThreadPoolExecutor

    data = [p.read_bytes() for p in service["images"][:8]]
    (name,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if "lookalike#Classifier" in a["name"]]
    replica = ray.get_actor(name["name"], namespace=name["namespace"])
    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(post, service, data[i % 8], k=2) for i in range(96)]
        for future in futures[:24]:  # requests are flowing and queueing at the models
            future.result(timeout=120)
        ray.kill(replica, no_restart=True)
        statuses = [f.result(timeout=180).status_code for f in futures]
    assert statuses == [200] * 96


def test_ask_retries_a_dead_replica_then_gives_up() -> None:
    import asyncio

    from ray.exceptions import ActorDiedError

    from serve.app import _ask

    class Method:
        def __init__(self, failures: int) -> None:
            self.failures, self.calls = failures, 0

        async def remote(self, value):
            self.calls += 1
            if self.calls <= self.failures:
                raise ActorDiedError()
            return value * 2

    once = Method(failures=1)
    assert asyncio.run(_ask(once, 21)) == 42 and once.calls == 2
    always = Method(failures=10)
    with pytest.raises(ActorDiedError):
        asyncio.run(_ask(always, 1))
    assert always.calls == 3
