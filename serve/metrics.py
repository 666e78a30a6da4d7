"""The service's application metrics, exported through Ray's metrics system.

Every series is a ``ray.serve.metrics`` metric: Ray adds the ``deployment``, ``replica`` and
``application`` labels and exports it on each node's Prometheus endpoint (``ray start
--metrics-export-port``, ``ray.init(_metrics_export_port=...)``) with the prefix ``ray_``, beside
Ray's own Serve series (``ray_serve_*``). Counters get the suffix ``_total`` there. The series, by
their exported names (deploy/grafana/lookalike.json draws them):

- ``ray_lookalike_requests_total{route, strategy, status}``: every HTTP request, by route template
  (``/search``, ``/images/{image_id}``; ``other`` for unknown paths), the strategy kind of a search
  (``global``, ``class``, ``gated``, ``rerank``; ``-`` elsewhere) and the status code sent.
- ``ray_lookalike_searches_total{strategy, path, result}``: answered searches, by the path taken
  (``class``, ``global``, ``class+fill``: a class search topped up from the global one) and whether
  the answer had all k results (``full``) or fewer (``short``). For ``gated`` strategies the path is
  the class-vs-global decision.
- ``ray_lookalike_stage_seconds{stage}`` (histogram): ``decode`` (decode, crop and resize on the
  ingress), ``classify`` and ``embed`` (the model replicas' round trips, with their decoding under
  ``decode: device``), ``classify+embed`` (a head in the Embedder: one round trip), ``search`` (one
  search round over every retriever: a class search topped up from the global one is two).
- ``ray_lookalike_decode_wait_seconds`` (histogram): how long uploads waited for room in the decode
  pixel budget; ``ray_lookalike_decode_refused_total``: uploads refused with 503 after ``decode_wait_s``.
- ``ray_lookalike_index_version`` and ``ray_lookalike_index_rows`` (gauges): the index version each
  ingress replica answers from.
- ``ray_lookalike_auth_refused_total{reason}``: requests refused by the API key check
  (``missing``, ``wrong``, ``rate``).
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

#: Histogram buckets in seconds: a cached CPU search takes ~1 ms, a CPU model batch 10-300 ms.
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
#: Decode budget waits: none at all, up to ``decode_wait_s`` (10 s by default).
WAIT_BUCKETS = [0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class ServiceMetrics:
    """The ingress replica's metrics (created inside the replica, so Serve's labels apply)."""

    def __init__(self) -> None:
        self.requests = Counter("lookalike_requests", description="HTTP requests by route, strategy kind and status",
                                tag_keys=("route", "strategy", "status"))
        self.searches = Counter("lookalike_searches", description="Answered searches by strategy kind, the path "
                                "taken (class, global, class+fill) and whether all k results came (full, short)",
                                tag_keys=("strategy", "path", "result"))
        self.stage_seconds = Histogram("lookalike_stage_seconds", description="Seconds per request in each stage",
                                       boundaries=LATENCY_BUCKETS, tag_keys=("stage",))
        self.decode_wait = Histogram("lookalike_decode_wait_seconds",
                                     description="Seconds an upload waited for room in the decode pixel budget",
                                     boundaries=WAIT_BUCKETS)
        self.decode_refused = Counter("lookalike_decode_refused",
                                      description="Uploads refused (503) after waiting decode_wait_s for the budget")
        self.index_version = Gauge("lookalike_index_version", description="Index version this replica answers from")
        self.index_rows = Gauge("lookalike_index_rows", description="Gallery images in the version answered from")
        self.auth_refused = Counter("lookalike_auth_refused", description="Requests refused by the API key check",
                                    tag_keys=("reason",))

    def request(self, route: str, strategy: str, status: int) -> None:
        self.requests.inc(tags={"route": route, "strategy": strategy, "status": str(status)})

    def search(self, strategy: str, path: str, full: bool) -> None:
        self.searches.inc(tags={"strategy": strategy, "path": path, "result": "full" if full else "short"})

    def stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.observe(seconds, tags={"stage": stage})

    def serving(self, version: int, rows: int) -> None:
        self.index_version.set(version)
        self.index_rows.set(rows)


class _Nothing:
    """A metric that records nothing."""

    def inc(self, *args, **kwargs) -> None: ...

    def observe(self, *args, **kwargs) -> None: ...

    def set(self, *args, **kwargs) -> None: ...


class NoMetrics(ServiceMetrics):
    """The service with its application metrics off (``metrics: false``; the benchmark's baseline)."""

    def __init__(self) -> None:  # noqa: D107 - every metric records nothing
        nothing = _Nothing()
        self.requests = self.searches = self.stage_seconds = self.decode_wait = self.decode_refused = nothing
        self.index_version = self.index_rows = self.auth_refused = nothing
