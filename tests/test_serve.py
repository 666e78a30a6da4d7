"""The Ray Serve graph end to end on 127.0.0.1 with tiny models and a small index."""

from __future__ import annotations

import importlib.util
import io
import shutil
import struct
import time
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
# The keys app's API keys (made up for the test) and how many requests each may make at once.
API_KEYS = ("test-key-0123456789abcdef", "test-key-fedcba9876543210")
KEY_BURST = 40


@ray.remote(num_cpus=0)
def call_embedder_encoded(app: str, data: bytes):
    """The Embedder's ``classify_and_embed_encoded``, called through a deployment handle from a Ray
    worker. A handle used in the test process itself would leave Serve's router thread there, still
    running its event loop (and loop metrics) after ray.shutdown() and through every later module,
    where it can crash the interpreter at exit; a worker's thread ends with the worker."""
    from ray import serve

    return serve.get_deployment_handle("Embedder", app_name=app).classify_and_embed_encoded.remote(data).result()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from ray import serve

    from serve.app import build_app

    root = tmp_path_factory.mktemp("serve")
    made = make_class_folders(root / "data", classes=3, per_class=5, bad=2)
    # 6 logical CPUs: the main app takes 2.0, the decode=device app 1.5 and the two head apps 1.0
    # each (two physical cores suffice). Ray exports the metrics on a Prometheus port, read every
    # half second from the processes (tests wait for a request's count, never for a time).
    metrics_port = free_port()
    ray.init(address="local", num_cpus=6, include_dashboard=False, logging_level="ERROR",
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 500})
    job = run(EmbedConfig(inputs=(str(root / "data"),), output=str(root / "emb"), classifier=TINY_CLASSIFIER,
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
    # The same index behind API keys (a file of two keys), each allowed KEY_BURST requests at once
    # and one more every 1,000 s: the KEY_BURST + 1st request of a key in this module gets 429.
    (root / "keys.txt").write_text(f"# keys of the test service\n{API_KEYS[0]}\n{API_KEYS[1]}\n")
    serve.run(build_app({"index": str(root / "head-index"), "max_batch_size": 4, "strategy": "global",
                         "api_keys_file": str(root / "keys.txt"), "key_rate_per_s": 0.001, "key_burst": KEY_BURST}),
              name="lookalike-keys", route_prefix="/keys")
    yield {"url": f"http://127.0.0.1:{port}", "index": root / "index", "head_index": root / "head-index",
           "images": made["good"], "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "job": job,
           "emb": root / "emb"}
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
    assert page.status_code == 200 and "lookalike" in page.text and "search?" in page.text
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
    data = service["images"][0].read_bytes()
    classes, vector = ray.get(call_embedder_encoded.remote("lookalike-head", data))
    online = requests.post(f"{service['url']}/head/search", params={"k": 3}, data=data, timeout=60).json()
    assert_same_ranking([c["index"] for c in classes], [c["probability"] for c in classes],
                        [c["index"] for c in online["classes"]], [c["probability"] for c in online["classes"]],
                        atol=0.02)
    assert vector.shape == (engine.index.dim,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-4
    bad = ray.get(call_embedder_encoded.remote("lookalike-head", b"not an image"))
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
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None or importlib.util.find_spec("playwright") is None,
                    reason="needs Debian's chromium (installed by .ci/run) and playwright (dev extra)")
def test_web_page_upload_shows_classes_and_results(service, tmp_path) -> None:
    """The web page in headless Chromium: upload a real photo, see predicted classes and results."""
    from playwright.sync_api import sync_playwright

    photo = next(p for p in sample_photos() if p.name == "chelsea.png")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
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


# --------------------------------------------------------------------------------------------
# Operations: metrics on Ray's Prometheus endpoint, API keys


def scrape(service) -> list:
    """Every sample on Ray's Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(service["metrics"], timeout=30).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples, name: str, **labels) -> float:
    """The sum of a series over the samples whose labels include ``labels`` (all replicas, workers)."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def settled(service, app: str = "lookalike-keys") -> list:
    """The samples once everything the app counted so far is exported: sends one /healthz request
    and waits until its count arrives (the replica reports its metrics together, in order)."""
    name, labels = "ray_lookalike_requests_total", dict(application=app, route="/healthz", status="200")
    before = total(scrape(service), name, **labels)
    prefix = {"lookalike-keys": "/keys", "lookalike": ""}[app]
    assert requests.get(f"{service['url']}{prefix}/healthz", timeout=30).status_code == 200
    deadline = time.monotonic() + 120
    while (samples := scrape(service)) and total(samples, name, **labels) < before + 1:
        assert time.monotonic() < deadline, ("the /healthz request was never counted", [
            (x.name, x.labels, x.value) for x in samples if "lookalike" in x.name][:20])
        time.sleep(0.2)
    assert total(samples, name, **labels) == before + 1
    return samples


def keyed(key: str = API_KEYS[0]) -> dict:
    return {"authorization": f"Bearer {key}"}


def test_metrics_count_each_request_exactly_by_label(service) -> None:
    """Requests of known kinds through the keyed app: every counter moves by exactly its count."""
    url, good = f"{service['url']}/keys/search", service["images"][0].read_bytes()

    def ask(status: int, headers: dict | None = None, data: bytes = good, **params) -> None:
        response = requests.post(url, params=params, data=data, headers=keyed() if headers is None else headers,
                                 timeout=60)
        assert response.status_code == status, response.text

    before = settled(service)
    for _ in range(3):
        ask(200, k=3, strategy="global")
    for _ in range(2):
        ask(200, k=3, strategy="class@1")
    ask(200, k=8, strategy="class@1")               # 5 in the class, 3 filled from the global search
    ask(200, k=8, strategy="class@1", fill="false")  # 5 of 8: short
    ask(200, k=3, strategy="gated:0")               # every probability passes: the class
    ask(200, k=3, strategy="gated@1:1")             # none does: the whole gallery
    ask(422, strategy="everything")
    ask(400, data=b"this is not an image", strategy="global")
    ask(401, headers={})
    ask(401, headers={"authorization": "Basic abc"})
    ask(401, headers=keyed("not-a-key-of-this-service"))
    after = settled(service)

    def delta(name: str, **labels) -> float:
        labels["application"] = "lookalike-keys"
        return total(after, name, **labels) - total(before, name, **labels)

    requests_ = {("global", "200"): 3, ("class", "200"): 4, ("gated", "200"): 2, ("-", "422"): 1,
                 ("global", "400"): 1, ("-", "401"): 3}
    for (strategy, status), n in requests_.items():
        assert delta("ray_lookalike_requests_total", route="/search", strategy=strategy, status=status) == n
    assert delta("ray_lookalike_requests_total", route="/search") == sum(requests_.values())
    searches = {("global", "global", "full"): 3, ("class", "class", "full"): 2, ("class", "class+fill", "full"): 1,
                ("class", "class", "short"): 1, ("gated", "class", "full"): 1, ("gated", "global", "full"): 1}
    for (strategy, path, result), n in searches.items():
        assert delta("ray_lookalike_searches_total", strategy=strategy, path=path, result=result) == n
    assert delta("ray_lookalike_searches_total") == sum(searches.values())
    assert delta("ray_lookalike_auth_refused_total", reason="missing") == 2
    assert delta("ray_lookalike_auth_refused_total", reason="wrong") == 1
    # Stages: 10 uploads decoded (the text is not an image); 9 went through the head in the
    # Embedder; 10 search rounds (the filled query searched twice).
    assert delta("ray_lookalike_decode_wait_seconds_count") == 10
    assert delta("ray_lookalike_stage_seconds_count", stage="decode") == 9
    assert delta("ray_lookalike_stage_seconds_count", stage="classify+embed") == 9
    assert delta("ray_lookalike_stage_seconds_count", stage="search") == 10
    assert delta("ray_lookalike_decode_refused_total") == 0
    assert total(after, "ray_lookalike_index_version", application="lookalike-keys") == 1
    assert total(after, "ray_lookalike_index_rows", application="lookalike-keys") == 15


def test_job_metrics_count_the_runs_images_parts_and_failures(service) -> None:
    """The embedding job (the fixture's run, in this process) exported exactly its summary's counts."""
    from pipeline.embed_output import committed
    from pipeline.storage import Location

    job, output = service["job"], str(Location(str(service["emb"])))
    name, parts = "ray_lookalike_job_parts_total", len(committed(Location(str(service["emb"])))["embeddings"])
    deadline = time.monotonic() + 120
    while (samples := scrape(service)) and total(samples, name, output=output) < parts:
        assert time.monotonic() < deadline, "the job's parts were never counted"
        time.sleep(0.2)
    assert total(samples, name, output=output) == parts
    assert total(samples, "ray_lookalike_job_images_total", output=output) == job["embedded_this_run"] == 15
    failures = {kind: n for kind, n in job["failures_by_type"].items() if n}
    assert sum(failures.values()) == 2
    for kind, n in failures.items():
        assert total(samples, "ray_lookalike_job_failed_total", output=output, kind=kind) == n
    assert total(samples, "ray_lookalike_job_failed_total", output=output) == 2
    for stage in ("read", "decode", "model", "write"):
        assert total(samples, "ray_lookalike_job_busy_seconds_total", output=output, stage=stage) > 0


def test_the_dashboard_names_only_series_that_exist(service) -> None:
    """Every series deploy/grafana's dashboard queries is on the endpoint of a service that ran the
    job and answered requests (Ray's own Serve series included)."""
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parents[1] / "deploy" / "grafana" / "lookalike.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    named = {n for e in exprs for n in re.findall(r"\b(ray_[a-z_]+)\b", e)}
    assert any(n.startswith("ray_serve_") for n in named) and any(n.startswith("ray_lookalike_job_") for n in named)
    settled(service)
    present = {s.name for s in scrape(service)}
    # Prometheus has a counter's series from its first event on: no upload of this module was ever
    # refused by the decode budget (test_budget.py covers refusals), so that one is only checked
    # to be a counter the service declares.
    never_happened = {"ray_lookalike_decode_refused_total"}
    assert 'Counter("lookalike_decode_refused"' in (Path(__file__).parents[1] / "serve" / "metrics.py").read_text()
    missing = sorted(n for n in named - never_happened if n not in present)
    assert not missing, f"the dashboard names series that are not exported: {missing}"


def test_keys_guard_every_route_but_health_and_the_page(service) -> None:
    base, good = f"{service['url']}/keys", service["images"][0].read_bytes()
    health = requests.get(f"{base}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["api_keys"] is True
    assert requests.get(f"{base}/healthz", timeout=30).json()["index_rows"] == 15
    assert requests.get(f"{service['url']}/healthz", timeout=30).json()["api_keys"] is False
    assert requests.get(f"{base}/", timeout=30).status_code == 200  # the page asks for the key itself
    found = requests.post(f"{base}/search", params={"k": 1}, data=good, headers=keyed(), timeout=60).json()
    image = found["results"][0]["thumbnail"]  # /images/{id}
    calls = [("post", "/search", good), ("post", "/search/text?q=a+cat", None), ("get", image, None),
             ("get", "/openapi.json", None)]
    for method, path, data in calls:
        for headers in ({}, keyed("test-key-but-not-this-one-0000"), {"authorization": API_KEYS[0]}):
            response = requests.request(method, base + path, data=data, headers=headers, timeout=60)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")
        response = requests.request(method, base + path, data=data, headers=keyed(), timeout=60)
        assert response.status_code == 200, (path, response.text)
    # The other key works as well; the first key's answer is the same without a key on the open app.
    with_key = requests.post(f"{base}/search", params={"k": 3}, data=good, headers=keyed(API_KEYS[1]), timeout=60)
    assert with_key.status_code == 200 and len(with_key.json()["results"]) == 3


def test_a_key_past_its_burst_gets_429_with_retry_after(service) -> None:
    """The second key makes KEY_BURST requests (its bucket refills one per 1,000 s), then is refused;
    the first key is not affected."""
    url = f"{service['url']}/keys/openapi.json"
    statuses = [requests.get(url, headers=keyed(API_KEYS[1]), timeout=30).status_code for _ in range(KEY_BURST)]
    refused = requests.get(url, headers=keyed(API_KEYS[1]), timeout=30)
    # Requests of earlier tests with this key used some of its burst already: all of them succeeded
    # until the bucket ran dry, and every one after is refused.
    assert statuses[0] == 200 and refused.status_code == 429
    assert statuses == sorted(statuses) and set(statuses) <= {200, 429}
    assert 1 <= int(refused.headers["retry-after"]) <= 1000
    assert requests.get(url, headers=keyed(API_KEYS[0]), timeout=30).status_code == 200


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None or importlib.util.find_spec("playwright") is None,
                    reason="needs Debian's chromium and the playwright package (make install)")
def test_web_page_asks_for_the_key_once_and_sends_it(service) -> None:
    """The keyed app's page in headless Chromium: a search without the key is refused and says so;
    with the key typed once, the search and every thumbnail (fetched with the key) load, and the key
    is remembered by the next page load."""
    from playwright.sync_api import sync_playwright

    photo = service["images"][0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(service["url"] + "/keys/")
            page.wait_for_selector("#key-row:not([hidden])", timeout=30_000)  # /healthz said keys are on
            page.fill("#k", "3")
            page.set_input_files("#file", str(photo))
            page.wait_for_function("document.querySelector('#status').className === 'error'", timeout=60_000)
            assert "API key" in page.inner_text("#status") and page.locator("figure.result").count() == 0
            page.fill("#apikey", API_KEYS[0])
            page.dispatch_event("#apikey", "change")
            page.set_input_files("#file", [])
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("figure.result", timeout=60_000)
            assert page.locator("figure.result").count() == 3 and "3 results" in page.inner_text("#status")
            page.wait_for_function("Array.from(document.querySelectorAll('figure.result img'))"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
            page.reload()
            page.wait_for_selector("#key-row:not([hidden])", timeout=30_000)
            assert page.input_value("#apikey") == API_KEYS[0]
        finally:
            browser.close()
