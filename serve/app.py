"""The online similarity search service: a Ray Serve graph over the `pipeline` library.

    Ingress (FastAPI) -> Detector (optional crop) -> Classifier + Embedder -> Retriever(s) -> merge

An index whose classifier is a head (``head:PATH``, over the embedder's vectors) has no Classifier
deployment: the Embedder replicas run the head on the vectors they compute.

Run it with ``serve run serve/config.yaml`` or ``serve run serve.app:build_app index=out/demo-index``.
The ingress decodes each upload once (exactly as the gallery was decoded) — or, with
``decode: device``, the model deployments decode their batch of uploads on their GPU — the model
deployments batch concurrent requests (``@serve.batch``), and each retriever owns some of the
index's shards.
"""


import asyncio
import contextlib
import io
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser
from starlette.routing import Match

from pipeline.device_decode import prepare_batch
from pipeline.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, header_pixels
from pipeline.index import Hit
from pipeline.index.follow import FollowedIndex
from pipeline.index.versions import read_version
from pipeline.manifests import IndexManifest
from pipeline.models import CropPolicy, head_for, load_classifier, load_detector, load_embedder, select_runtime
from pipeline.search import Prepared, QueryPreprocess, class_answers, merge_hits
from pipeline.strategy import Search, Strategy, run_plan_async
from pipeline.sources import read_uri
from pipeline.storage import Location
from serve import access
from serve.access import KeyCheck, read_keys
from serve.budget import BudgetExhausted, PixelBudget
from serve.metrics import NoMetrics, ServiceMetrics

logger = logging.getLogger("serve.app")
PAGE = Path(__file__).with_name("page.html")
#: Threads an ingress replica decodes uploads on.
DECODE_THREADS = 2


@dataclass(frozen=True)
class AppConfig:
    """Typed arguments of the application (``args`` in serve/config.yaml).

    Attributes:
        index: the index folder (from ``jobs.build_index``).
        classifier: classifier spec; must equal the index's (default: the index's).
        embedder: embedder spec; must equal the index's (default: the index's).
        detector: torchvision detector spec for the optional crop, or None (no detector: no crop).
        crop: default crop policy, ``auto`` (crop when a box qualifies) or ``off``.
        strategy: the default search strategy: a name (``global``, ``class@N``, ``gated@N:TAU``,
            ``rerank:BETA``) or a ``jobs.evaluate --recommend`` file; default the index's, else global.
        retriever_shards: shard numbers of each retriever deployment; default one retriever with all
            (of every version). Shards a later version adds (new classes) go to the last group.
        retriever_actor_options: ``ray_actor_options`` of each retriever deployment, e.g. custom
            resources that pin a shard group to the nodes that hold it in memory.
        max_body_mb: largest accepted upload.
        max_query_pixels: the most pixels a query image may have (its header is checked before a pixel
            is decoded); the gallery's own limit applies too when it is lower. 50M: a 50-megapixel
            photo, the largest phone cameras'.
        decode_pixel_budget: the most pixels one ingress replica decodes at once (``serve.budget``,
            about 12 bytes a pixel while decoding and resizing); requests beyond it wait their turn.
        decode_wait_s: how long a request waits for room in that budget before the answer is 503
            with ``Retry-After``.
        max_batch_size: most requests a model deployment batches into one forward pass.
        batch_wait_timeout_s: how long a model deployment waits to fill a batch.
        device: model device in the replicas (``auto``, ``cpu``, ``cuda``).
        decode: where uploads are decoded: ``cpu`` (the ingress) or ``device`` (the classifier and
            embedder replicas decode their batch of JPEG bytes on their device, the GPU fast path;
            other formats fall back to their CPU). Cropped queries are decoded by the ingress.
        crop_policy: thresholds of :class:`pipeline.models.CropPolicy`.
        model_autoscaling: an ``autoscaling_config`` for the classifier and embedder deployments.
        index_poll_s: how often the ingress and retriever replicas look for a newly published
            version of the index (``jobs.build_index`` --append/--update/--delete); they load it in
            the background and switch between two requests. 0: serve the version found at start.
        api_keys_file: a file of API keys, one per line (:mod:`serve.access`), read by each ingress
            replica on its node; keys in the environment variable ``LOOKALIKE_API_KEYS`` count too.
            With any key configured every route but ``/healthz`` and the page (``/``) needs
            ``Authorization: Bearer KEY`` (401 without it or with a wrong one).
        key_rate_per_s: requests a second each key may make per ingress replica (0: no limit);
            beyond it, and beyond ``key_burst`` at once, the answer is 429 with ``Retry-After``.
        key_burst: requests a key may make at once above its rate.
        metrics: export the application metrics (:mod:`serve.metrics`) through Ray's metrics system.
    """

    index: str
    classifier: str | None = None
    embedder: str | None = None
    detector: str | None = None
    crop: str = "off"
    strategy: str | dict | None = None
    retriever_shards: list[list[int]] | None = None
    retriever_actor_options: list[dict] | None = None
    max_body_mb: float = 20.0
    max_query_pixels: int = 50_000_000
    decode_pixel_budget: int = 100_000_000
    decode_wait_s: float = 10.0
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    device: str = "auto"
    decode: str = "cpu"
    crop_policy: dict = field(default_factory=dict)
    model_autoscaling: dict | None = None
    index_poll_s: float = 10.0
    api_keys_file: str | None = None
    key_rate_per_s: float = 0.0
    key_burst: int = 10
    metrics: bool = True

    def __post_init__(self) -> None:
        if self.crop not in ("auto", "off"):
            raise ValueError(f"crop must be auto or off, got {self.crop!r}")
        if self.decode not in ("cpu", "device"):
            raise ValueError(f"decode must be cpu or device, got {self.decode!r}")
        if self.max_batch_size < 1 or self.max_body_mb <= 0 or self.batch_wait_timeout_s < 0:
            raise ValueError("max_batch_size must be >= 1, max_body_mb > 0, batch_wait_timeout_s >= 0")
        if self.index_poll_s < 0:
            raise ValueError(f"index_poll_s must be >= 0, got {self.index_poll_s}")
        if self.max_query_pixels < 1 or self.decode_pixel_budget < 1 or self.decode_wait_s < 0:
            raise ValueError("max_query_pixels and decode_pixel_budget must be >= 1, decode_wait_s >= 0")
        KeyCheck([], self.key_rate_per_s, self.key_burst)  # ValueError for a bad rate or burst
        Strategy.load(self.strategy)
        CropPolicy(**self.crop_policy)


def query_pixel_limit(config: AppConfig, manifest: IndexManifest) -> int:
    """The most pixels a query may have: the service's query limit, or the gallery's when lower."""
    return min(config.max_query_pixels, manifest.max_pixels)


# --------------------------------------------------------------------------------------------
# Model and index deployments (thin: each holds a pipeline object)


def _decode_on_device(model, datas: list[bytes], max_pixels: int) -> tuple[object, list[int], dict[int, str]]:
    """A batch of uploads decoded and resized on the model's device (pipeline.device_decode).

    Returns:
        The uint8 batch of the images that decoded, their positions, and position -> error message.
    """
    images, ok, errors = prepare_batch(datas, {"x": model.preprocess}, model.runtime.device, max_pixels=max_pixels)
    return images["x"], [int(i) for i in ok], {i: str(exc) for i, exc in errors}


def _in_order(count: int, ok: list[int], answers: list, errors: dict[int, str]) -> list:
    """Per-request answers of a batch: the model's answer, or ``{"error": message}`` where decoding failed."""
    out: list = [{"error": errors.get(i, "not decoded")} for i in range(count)]
    for i, answer in zip(ok, answers):
        out[i] = answer
    return out


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class Classifier:
    """Top classes with probabilities for images already resized to the classifier's input, or for
    encoded uploads (``decode: device``)."""

    def __init__(self, spec: str, device: str, max_batch_size: int, batch_wait_timeout_s: float,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.model = load_classifier(spec, select_runtime(device))
        self.max_pixels = max_pixels
        for method in (self.classify, self.classify_encoded):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _answers(self, images) -> list[list[dict]]:
        return class_answers(self.model.labels, *self.model.classify(images, top_n=5))

    @serve.batch
    async def classify(self, images: list[np.ndarray]) -> list[list[dict]]:
        return self._answers(np.stack(images))

    @serve.batch
    async def classify_encoded(self, datas: list[bytes]) -> list[list[dict] | dict]:
        images, ok, errors = _decode_on_device(self.model, datas, self.max_pixels)
        return _in_order(len(datas), ok, self._answers(images) if ok else [], errors)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class Embedder:
    """L2-normalised embeddings of images (and texts, for CLIP models), or of encoded uploads
    (``decode: device``); with a classifier head, also the top classes from each image's vector."""

    def __init__(self, spec: str, device: str, max_batch_size: int, batch_wait_timeout_s: float,
                 max_pixels: int = DEFAULT_MAX_PIXELS, head: str | None = None) -> None:
        self.model = load_embedder(spec, select_runtime(device))
        self.head = head_for(head, self.model) if head else None
        self.max_pixels = max_pixels
        for method in (self.embed, self.embed_encoded, self.embed_text, self.classify_and_embed,
                       self.classify_and_embed_encoded):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def has_text(self) -> bool:
        return self.model.has_text

    def _with_classes(self, vectors: np.ndarray) -> list[tuple[list[dict], np.ndarray]]:
        if self.head is None:
            raise ValueError("this Embedder has no classifier head")
        return list(zip(class_answers(self.head.labels, *self.head.classify_vectors(vectors, 5)), vectors))

    @serve.batch
    async def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.model.embed_images(np.stack(images)))

    @serve.batch
    async def embed_encoded(self, datas: list[bytes]) -> list[np.ndarray | dict]:
        images, ok, errors = _decode_on_device(self.model, datas, self.max_pixels)
        return _in_order(len(datas), ok, list(self.model.embed_images(images)) if ok else [], errors)

    @serve.batch
    async def classify_and_embed(self, images: list[np.ndarray]) -> list[tuple[list[dict], np.ndarray]]:
        """The head's top classes and the vector of each image (one forward pass)."""
        return self._with_classes(self.model.embed_images(np.stack(images)))

    @serve.batch
    async def classify_and_embed_encoded(self, datas: list[bytes]) -> list[tuple[list[dict], np.ndarray] | dict]:
        images, ok, errors = _decode_on_device(self.model, datas, self.max_pixels)
        return _in_order(len(datas), ok, self._with_classes(self.model.embed_images(images)) if ok else [], errors)

    @serve.batch
    async def embed_text(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.model.embed_texts(texts))


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Detector:
    """The crop box ("largest box near the centre") of an image, or None."""

    def __init__(self, spec: str, device: str, policy: dict, max_batch_size: int,
                 batch_wait_timeout_s: float) -> None:
        self.model = load_detector(spec, select_runtime(device), policy=CropPolicy(**policy))
        self.crop_box.set_max_batch_size(max_batch_size)
        self.crop_box.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def crop_box(self, images: list[np.ndarray]) -> list[tuple[int, int, int, int] | None]:
        return self.model.crop_boxes(images)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Retriever:
    """Owns some shards of the index and answers searches over them, at the version each request
    names (it follows the index: :class:`pipeline.index.follow.FollowedIndex`)."""

    def __init__(self, index: str, shards: list[int] | None, expect_models: dict[str, str],
                 poll_s: float = 0.0, new_shards: bool = False) -> None:
        self.index = FollowedIndex(index, shards=shards, new_shards=new_shards, expect_models=expect_models)
        self.index.start(poll_s)

    def prepare(self, version: int) -> list[int]:
        """Loads ``version`` when this replica does not hold it; returns the versions it holds."""
        self.index.get(version)
        return self.index.held()

    def search(self, vector: np.ndarray, classes: list[int], k: int, mode: str,
               min_score: float | None, version: int | None = None) -> list[dict]:
        index = self.index.get(version)
        if mode == "class":
            hits = index.search_class(vector[None], [classes], k, min_score=min_score)[0]
        else:
            hits = index.search_global(vector[None], k, min_score=min_score)[0]
        return [h.to_json() for h in hits]

    def lookup(self, image_id: int, version: int | None = None) -> dict | None:
        hit = self.index.get(version).lookup(image_id)
        return None if hit is None else hit.to_json()


# --------------------------------------------------------------------------------------------
# Ingress


async def _ask(method, *args, attempts: int = 3):
    """Calls a deployment method, again if its replica died mid-request (killed, node lost): every
    call the ingress makes is idempotent, and Serve routes the retry to a live or replacement replica."""
    for attempt in range(attempts):
        try:
            return await method.remote(*args)
        except (ActorDiedError, ActorUnavailableError) as exc:
            if attempt == attempts - 1:
                raise
            logger.warning("a replica failed mid-request (%s); asking again", type(exc).__name__)
            await asyncio.sleep(0.2 * (attempt + 1))


def _results(hits: list[Hit]) -> list[dict]:
    """Hits as the API returns them: with the URL of their thumbnail (looked up by id)."""
    return [h.to_json() | {"thumbnail": f"/images/{h.id}"} for h in hits]


def _image_size(data: bytes) -> list[int]:
    """[height, width] of an image as decoded (EXIF rotation applied), from its header only."""
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        rotated = img.getexif().get(0x0112) in (5, 6, 7, 8)
    return [width, height] if rotated else [height, width]


app = FastAPI(title="lookalike", description="Find the gallery images most similar to a query image.")
#: Routes open without a key: health checks, and the web page itself (a browser cannot send a key
#: when it navigates; the page holds no gallery data and asks for the key before its first search).
OPEN_ROUTES = ("/healthz", "/")


def _route_of(scope: dict, routes: list | None = None) -> str:
    """The route template a request matches (``/images/{image_id}``), or ``other`` (the metrics'
    label: bounded, whatever paths clients send). Looks into included routers too."""
    for route in scope["app"].routes if routes is None else routes:
        inner = getattr(route, "original_router", None)  # FastAPI's included router
        if inner is not None:
            if (found := _route_of(scope, inner.routes)) != "other":
                return found
        elif route.matches(scope)[0] == Match.FULL:
            return route.path
    return "other"


class AccessAndMetrics:
    """ASGI middleware of the ingress: the API key check (401/429 before any work), then the
    request's count by route, strategy kind (set by the route in ``request.state.strategy``) and
    the status sent."""

    def __init__(self, asgi) -> None:
        self.asgi = asgi

    async def __call__(self, scope, receive, send) -> None:
        check, metrics = access.current()  # set by Ingress.__init__
        if scope["type"] != "http" or metrics is None:
            return await self.asgi(scope, receive, send)
        route = _route_of(scope)
        refused = None if route in OPEN_ROUTES or check is None else check.check(
            Headers(scope=scope).get("authorization"))
        if refused:
            status, reason, headers = refused
            metrics.auth_refused.inc(tags={"reason": reason})
            metrics.request(route, "-", status)
            detail = {"missing": "this service needs an API key: send `Authorization: Bearer KEY`",
                      "wrong": "the API key is not valid",
                      "rate": "too many requests with this API key; retry after the time in Retry-After"}[reason]
            return await JSONResponse({"detail": detail}, status, headers)(scope, receive, send)
        sent = {"status": 500}  # an exception that escapes every handler becomes a 500

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            await send(message)

        try:
            await self.asgi(scope, receive, sending)
        finally:
            metrics.request(route, scope.get("state", {}).get("strategy", "-"), sent["status"])


app.add_middleware(AccessAndMetrics)


async def _read_upload(request: Request, limit: int) -> bytes:
    """The image from a raw body or the first file of a multipart form; 413 past ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async def replay():
            yield bytes(body)

        form = await MultiPartParser(request.headers, replay()).parse()
        files = [v for v in form.values() if isinstance(v, UploadFile)]
        if not files:
            raise HTTPException(400, "multipart body has no file field")
        return await files[0].read()
    return bytes(body)


# Small CPU requests by default so the whole graph fits a 2-CPU machine; serve/config.yaml sets
# the production sizes (and GPU fractions).
# max_ongoing_requests: Serve's default (5) would cap every model batch at 5 requests.
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    """HTTP front: decodes, optionally crops, fans out to the model and retriever deployments."""

    def __init__(self, config: dict, manifest: IndexManifest, classifier: DeploymentHandle | None,
                 embedder: DeploymentHandle, retrievers: list[DeploymentHandle],
                 detector: DeploymentHandle | None = None) -> None:
        self.config = AppConfig(**config)
        # The version answered from, with its manifest: replaced whole (one assignment) when a
        # newer version is ready in every retriever; each request reads it once, at its start.
        self.serving: tuple[int, IndexManifest] = (manifest.version, manifest)
        self.classifier, self.embedder, self.detector, self.retrievers = classifier, embedder, detector, retrievers
        # The query path's steps, as QueryEngine takes them; the pixel limit sized for queries.
        queries = QueryPreprocess.of(manifest)
        self.queries = replace(queries, max_pixels=query_pixel_limit(self.config, manifest))
        self.strategy = Strategy.load(self.config.strategy)  # resolved by build_app
        self.limit = int(self.config.max_body_mb * 2**20)
        self.budget = PixelBudget(self.config.decode_pixel_budget)
        # Decoding runs on this replica's own few threads, not asyncio's default pool: the memory a
        # large decode frees stays with the thread that used it (a malloc arena per thread), so
        # with many threads the replica would keep several budgets' worth of freed memory.
        self.decoders = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
        self.switched_at: float | None = None
        self.metrics = ServiceMetrics() if self.config.metrics else NoMetrics()
        self.metrics.serving(manifest.version, manifest.rows)
        keys = read_keys(self.config.api_keys_file)
        self.keys = KeyCheck(keys, self.config.key_rate_per_s, self.config.key_burst)
        access.set_current(self.keys if keys else None, self.metrics)
        if keys:
            logger.info("API keys: %d configured; every route but %s needs one", len(keys), ", ".join(OPEN_ROUTES))
        self._stop = threading.Event()
        if self.config.index_poll_s > 0:
            threading.Thread(target=self._follow, daemon=True, name="index-follow").start()

    def _follow(self) -> None:
        """Looks for a newly published version every ``index_poll_s``; has every retriever
        deployment load it, then answers from it (the old one until then)."""
        while not self._stop.wait(self.config.index_poll_s):
            version, manifest = self.serving
            self.metrics.serving(version, manifest.rows)  # gauges are exported while they are set
            try:
                new = read_version(Location(self.config.index))
            except (OSError, ValueError) as exc:
                logger.warning("index %s: cannot read its pointer (%s)", self.config.index, exc)
                continue
            if new.version <= version:
                continue
            if diffs := manifest.models.mismatches(new.models.specs()):
                logger.error("index %s version %d has other models (%s); still serving version %d",
                             self.config.index, new.version, "; ".join(diffs), version)
                continue
            try:
                for retriever in self.retrievers:
                    retriever.prepare.remote(new.version).result()
            except Exception as exc:  # noqa: BLE001 - any failure keeps the old version serving
                logger.error("index %s version %d: a retriever cannot load it (%s); still serving version %d",
                             self.config.index, new.version, exc, version)
                continue
            self.serving = (new.version, new)
            self.switched_at = time.time()
            self.metrics.serving(new.version, new.rows)
            logger.info("index %s: now serving version %d (%d images)", self.config.index, new.version, new.rows)

    async def _timed(self, stage: str, awaitable):
        """Awaits ``awaitable``; its seconds go to the stage's latency histogram when it succeeds."""
        start = time.perf_counter()
        result = await awaitable
        self.metrics.stage(stage, time.perf_counter() - start)
        return result

    async def _in_decoder(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.decoders, fn, *args)

    @contextlib.asynccontextmanager
    async def _decoding(self, data: bytes) -> AsyncIterator[None]:
        """Holds the upload's pixels in the replica's decode budget; 503 with Retry-After when it
        does not fit within ``decode_wait_s``."""
        pixels = await asyncio.to_thread(header_pixels, data)
        asked = time.perf_counter()
        try:
            async with self.budget.hold(pixels, self.config.decode_wait_s):
                self.metrics.decode_wait.observe(time.perf_counter() - asked)
                yield
        except BudgetExhausted:
            self.metrics.decode_refused.inc()
            raise HTTPException(503, f"busy decoding other large images; retry shortly ({pixels} pixels waited "
                                     f"{self.config.decode_wait_s} s for room in this replica's budget of "
                                     f"{self.budget.limit})", headers={"Retry-After": "2"}) from None

    async def _classify_and_embed_encoded(self, data: bytes) -> tuple[list[int], list[dict], np.ndarray]:
        """``decode: device``: the model replicas decode the upload on their device."""
        if not data:
            raise HTTPException(400, "cannot decode the image: empty: the request has no image")
        if self.classifier is None:  # a head in the Embedder
            answers = [await self._timed("classify+embed", _ask(self.embedder.classify_and_embed_encoded, data))]
        else:  # each decodes the upload on its device
            answers = await asyncio.gather(self._timed("classify", _ask(self.classifier.classify_encoded, data)),
                                           self._timed("embed", _ask(self.embedder.embed_encoded, data)))
        for answer in answers:
            if isinstance(answer, dict):
                raise HTTPException(400, f"cannot decode the image: {answer['error']}")
        classes, vector = answers[0] if self.classifier is None else answers
        return await asyncio.to_thread(_image_size, data), classes, vector

    async def _classify_and_embed(self, prepared: Prepared) -> tuple[list[dict], np.ndarray]:
        """The classes and the vector of a prepared query: from the Classifier and the Embedder in
        parallel, or from the Embedder alone when the classifier is a head."""
        if self.classifier is None:
            return await self._timed("classify+embed", _ask(self.embedder.classify_and_embed, prepared.for_embedder))
        return tuple(await asyncio.gather(self._timed("classify", _ask(self.classifier.classify, prepared.for_classifier)),
                                          self._timed("embed", _ask(self.embedder.embed, prepared.for_embedder))))

    async def _merge(self, vector: np.ndarray, classes: list[int], k: int, mode: str,
                     min_score: float | None, version: int) -> list[Hit]:
        answers = await self._timed("search", asyncio.gather(
            *(_ask(r.search, vector, classes, k, mode, min_score, version) for r in self.retrievers)))
        return [Hit.from_json(h) for h in merge_hits(answers, k)]

    async def _prepare(self, data: bytes, crop: bool) -> Prepared:
        """Decodes, crops and resizes an upload on the decoder threads (the detector replica,
        when cropping, is asked from there through this replica's event loop)."""
        loop = asyncio.get_running_loop()

        def box_of(image: np.ndarray) -> tuple | None:
            return asyncio.run_coroutine_threadsafe(_ask(self.detector.crop_box, image), loop).result()

        try:
            return await self._timed("decode", self._in_decoder(self.queries.prepare, data, box_of if crop else None))
        except ImageDecodeError as exc:
            raise HTTPException(400, f"cannot decode the image: {exc}") from None

    @app.post("/search")
    async def search(self, request: Request, k: int = Query(5, ge=1, le=100),
                     strategy: str | None = Query(None, max_length=64,
                                                  description="global, class[@N], gated[@N]:TAU or rerank:BETA "
                                                              "(default: the service's)"),
                     fill: bool | None = None, crop: Literal["auto", "off"] | None = None,
                     min_score: float | None = Query(None, ge=-1.0, le=1.0)) -> JSONResponse:
        """Upload an image (raw body or a multipart file field); get its classes and similar images."""
        try:  # a request names a strategy (never a file on the server)
            chosen = Strategy.resolve(None if strategy is None else Strategy.parse(strategy), self.strategy, fill=fill)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        request.state.strategy = chosen.kind  # the request's label in the metrics
        data = await _read_upload(request, self.limit)
        version, manifest = self.serving
        cropping = (crop or self.config.crop) == "auto" and self.detector is not None
        on_device = self.config.decode == "device" and not cropping  # the model replicas decode it
        async with self._decoding(data):  # the full-size image lives only in this block
            if on_device:
                box, (size, classes, vector) = None, await self._classify_and_embed_encoded(data)
            else:
                prepared = await self._prepare(data, cropping)
                box, size = prepared.box, prepared.size
        if not on_device:
            classes, vector = await self._classify_and_embed(prepared)

        paths = []

        async def search(request: Search) -> list[list[Hit]]:
            paths.append("global" if request.classes is None else "class")
            if request.classes is None:
                return [await self._merge(vector, [], request.k, "global", min_score, version)]
            return [await self._merge(vector, request.classes[0], request.k, "class", min_score, version)]

        [(hits, note)] = await run_plan_async(chosen.plan([classes], k, manifest.class_size), search)
        self.metrics.search(chosen.kind, "class+fill" if len(paths) > 1 else paths[0], len(hits) >= k)
        return JSONResponse({"strategy": str(chosen), "crop_box": list(box) if box else None, "image_size": size,
                             "classes": classes, "results": _results(hits), "note": note, "index_version": version})

    @app.post("/search/text")
    async def search_text(self, request: Request, q: str = Query(..., min_length=1, max_length=500),
                          k: int = Query(5, ge=1, le=100),
                          min_score: float | None = Query(None, ge=-1.0, le=1.0)) -> JSONResponse:
        """Text-to-image search over the whole gallery (CLIP embedders only)."""
        request.state.strategy = "global"
        if not await _ask(self.embedder.has_text):
            raise HTTPException(501, "this index's embedder has no text tower; text search needs a CLIP embedder")
        version, _ = self.serving
        vector = await self._timed("embed", _ask(self.embedder.embed_text, q))
        hits = await self._merge(vector, [], k, "global", min_score, version)
        self.metrics.search("global", "global", len(hits) >= k)
        return JSONResponse({"strategy": "global", "query": q, "results": _results(hits), "index_version": version})

    @app.get("/images/{image_id}")
    async def image(self, image_id: int, size: int = Query(256, ge=16, le=1024)) -> Response:
        """A JPEG thumbnail of a gallery image, by id (never by a path from the client)."""
        version, _ = self.serving
        found = [h for h in await asyncio.gather(*(_ask(r.lookup, image_id, version) for r in self.retrievers)) if h]
        if not found:
            raise HTTPException(404, f"no gallery image with id {image_id}")
        def thumbnail() -> bytes:
            pil = Image.fromarray(decode_image(read_uri(found[0]["uri"]), draft_size=size))
            pil.thumbnail((size, size))
            out = io.BytesIO()
            pil.save(out, format="JPEG", quality=85)
            return out.getvalue()

        try:
            return Response(await asyncio.to_thread(thumbnail), media_type="image/jpeg")
        except (OSError, ImageDecodeError) as exc:
            raise HTTPException(500, f"gallery image {image_id} cannot be read: {exc}") from None

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: the ingress answers and knows its index (the version it answers from)."""
        version, manifest = self.serving
        self.metrics.serving(version, manifest.rows)
        return {"status": "ok", "index_version": version, "index_rows": manifest.rows, "api_keys": self.keys.enabled,
                "index_switched_at": self.switched_at, "retrievers": len(self.retrievers),
                "models": manifest.models.specs(), "max_query_pixels": self.queries.max_pixels,
                "decode_budget": {"pixels": self.budget.limit, "in_use": self.budget.in_use, **self.budget.stats}}

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        """The web page: drop an image, see its classes and the most similar images."""
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))


def build_app(args: dict) -> serve.Application:
    """The application from typed arguments (``serve run serve.app:build_app index=...``).

    Raises:
        ValueError: model overrides that differ from the index's models (refused at start).
        FileNotFoundError: no index.
    """
    config = AppConfig(**{k: v for k, v in args.items()})
    index = Location(config.index)  # a folder, or an object store URI (replicas copy their shards locally)
    manifest = IndexManifest.read(index)  # FileNotFoundError that says how to build one
    specs = manifest.models.specs()
    overrides = {role: spec for role, spec in (("classifier", config.classifier), ("embedder", config.embedder))
                 if spec}
    diffs = manifest.models.mismatches(overrides)
    if diffs:
        raise ValueError(f"a model override differs from the index's ({'; '.join(diffs)}); queries must be "
                         f"embedded like the gallery — rebuild the index or drop the override")
    # One retriever owns every shard of every version, unless retriever_shards groups them; then
    # shards a later version adds (new classes) go to the last group.
    shards = config.retriever_shards or [None]
    if shards == [None]:
        return _graph(config, index, manifest, specs, [None])
    covered = sorted(s for group in shards for s in group)
    if covered != list(range(len(manifest.shards))):
        raise ValueError(f"retriever_shards must cover shards 0..{len(manifest.shards) - 1} once each, got {shards}")
    return _graph(config, index, manifest, specs, shards)


def _graph(config: AppConfig, index: Location, manifest: IndexManifest, specs: dict[str, str],
           shards: list[list[int] | None]) -> serve.Application:
    """The deployment graph: models, one retriever per shard group (None: all shards), the ingress."""
    batching = dict(max_batch_size=config.max_batch_size, batch_wait_timeout_s=config.batch_wait_timeout_s)
    # A deployment's settings in serve/config.yaml override these; model_autoscaling is for
    # `serve run serve.app:build_app ...` and the benchmarks.
    scaled = {"autoscaling_config": config.model_autoscaling} if config.model_autoscaling else {}
    max_pixels = query_pixel_limit(config, manifest)
    head = specs["classifier"] if specs["classifier"].startswith("head:") else None
    classifier = None if head else Classifier.options(**scaled).bind(specs["classifier"], config.device, **batching,
                                                                      max_pixels=max_pixels)
    embedder = Embedder.options(**scaled).bind(specs["embedder"], config.device, **batching, max_pixels=max_pixels,
                                               head=head)
    options = config.retriever_actor_options or [{}] * len(shards)
    if len(options) != len(shards):
        raise ValueError(f"retriever_actor_options has {len(options)} entries for {len(shards)} retrievers")
    retrievers = [Retriever.options(name=f"Retriever{i}", ray_actor_options={"num_cpus": 0.25} | opts)
                  .bind(str(index), group, specs, config.index_poll_s, i == len(shards) - 1)
                  for i, (group, opts) in enumerate(zip(shards, options))]
    detector = Detector.bind(config.detector, config.device, config.crop_policy, **batching) \
        if config.detector else None
    strategy = Strategy.resolve(config.strategy, manifest.strategy)  # a file is read here, once
    resolved = asdict(config) | {"index": str(index), "strategy": strategy.to_json()}
    return Ingress.bind(resolved, manifest, classifier, embedder, retrievers, detector)
