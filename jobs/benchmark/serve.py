"""``serve``: the Ray Serve graph under a bounded closed-loop load on 127.0.0.1, against the same
query path called in one process; batching on and off, the application metrics off and API keys on
(what the operations features cost, in the same run), optionally uploads decoded on the model
device, then a soak with a Classifier replica killed and the model deployments autoscaling.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import requests
from ray import serve

from jobs.benchmark.runner import free_port, latency_ms, machine
from pipeline.models import select_runtime
from pipeline.search import QueryEngine
from serve.app import build_app


def _closed_loop(call, concurrency: int, requests_total: int, seconds: float = float("inf"),
                 initializer=None) -> dict:
    """``concurrency`` threads (each set up by ``initializer()``) call ``call(i)`` for i below
    ``requests_total`` until ``seconds`` have passed; ``call`` returns None when it succeeded, else
    what kind of failure it met."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests_total))
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            failure = call(i)
            with lock:
                (latencies.append(time.perf_counter() - t0) if failure is None else failures.append(failure))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency, initializer=initializer) as pool:
        workers = [pool.submit(worker) for _ in range(concurrency)]
    wall = time.perf_counter() - start
    for future in workers:
        future.result()  # a worker's unexpected error stops the benchmark instead of passing unseen
    return {"concurrency": concurrency, "requests": len(latencies), "failed": len(failures),
            "failure_kinds": sorted(set(failures)), "qps": round(len(latencies) / wall, 1), **latency_ms(latencies)}


def _load(url: str, payloads: list[bytes], concurrency: int, requests_total: int, seconds: float,
          params: dict | None = None, headers: dict | None = None) -> dict:
    """A bounded closed-loop load on one URL: at most ``requests_total`` requests or ``seconds``."""
    sessions = threading.local()  # one HTTP session per load thread

    def post(i: int) -> str | None:
        try:
            response = sessions.session.post(url, params=params, data=payloads[i % len(payloads)], headers=headers,
                                             timeout=60)
        except requests.RequestException as exc:
            return type(exc).__name__
        return None if response.status_code == 200 else f"HTTP {response.status_code}"

    return _closed_loop(post, concurrency, requests_total, seconds,
                        initializer=lambda: setattr(sessions, "session", requests.Session()))


def _direct(engine, payloads: list[bytes], concurrency: int, requests_total: int) -> dict:
    """The same query path called in this process (no HTTP, no Serve), ``concurrency`` threads."""
    def search(i: int) -> None:
        engine.search([payloads[i % len(payloads)]], k=5)

    row = _closed_loop(search, concurrency, requests_total)
    return {key: value for key, value in row.items() if key not in ("failed", "failure_kinds")}


def _operations_cost(rounds: int = 20_000) -> dict:
    """Microseconds the ingress spends per ``/search`` request on its metrics (the route lookup and
    the eight records of a global search) and on an API key check, timed over ``rounds`` calls in this
    process (Ray must be initialised: the metrics are Ray's)."""
    from serve import app as ingress
    from serve.access import KeyCheck
    from serve.metrics import ServiceMetrics

    metrics, keys = ServiceMetrics(), KeyCheck(["k" * 43])
    scope = {"type": "http", "path": "/search", "root_path": "", "method": "POST", "app": ingress.app,
             "headers": [], "query_string": b""}

    def request() -> None:
        ingress._route_of(scope)
        metrics.decode_wait.observe(0.0001)
        for stage in ("decode", "classify", "embed", "search"):
            metrics.stage(stage, 0.01)
        metrics.search("global", "global", True)
        metrics.request("/search", "global", 200)

    def per_call_us(call) -> float:
        call()
        start = time.perf_counter()
        for _ in range(rounds):
            call()
        return round((time.perf_counter() - start) / rounds * 1e6, 1)

    return {"metrics_us_per_request": per_call_us(request),
            "key_check_us": per_call_us(lambda: keys.check("Bearer " + "k" * 43))}


def _replicas(app: str = "lookalike") -> dict[str, int]:
    status = serve.status().applications[app].deployments
    return {name: sum(d.replica_states.values()) if d.replica_states else 0 for name, d in status.items()}


def bench_serve(args: argparse.Namespace) -> dict:
    """Graph vs direct calls, batching on vs off, a soak with a replica killed, autoscaling."""
    payloads = [p.read_bytes() for p in sorted(Path(args.images).glob("*")) if p.is_file()][: args.payloads]
    payloads += [p.read_bytes() for p in sorted(Path(args.images).rglob("*.png"))[: max(0, args.payloads - len(payloads))]]
    results: dict = {"index": args.index, "machine": machine(), "payloads": len(payloads)}
    engine = QueryEngine.load(args.index, runtime=select_runtime("cpu"))
    engine.search(payloads[:1])  # warm-up
    results["direct"] = [_direct(engine, payloads, c, args.requests) for c in (1, 8)]
    del engine

    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    results["operations_cost"] = _operations_cost()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/search"
    results["graph"] = {}
    # The operations features against the same graph in this run: application metrics off (the
    # baseline of "batched", which exports them), and API keys on (each request sends its key).
    key = secrets.token_urlsafe(32)
    keys_file = Path(tempfile.mkdtemp(prefix="lookalike-bench-")) / "api-keys"
    keys_file.write_text(key + "\n")
    batched = {"max_batch_size": args.max_batch_size}
    variants = [("batched", batched, None), ("batched, metrics off", {**batched, "metrics": False}, None),
                ("batched, API keys", {**batched, "api_keys_file": str(keys_file)}, {"authorization": f"Bearer {key}"}),
                ("unbatched", {"max_batch_size": 1}, None)]
    if "device" in args.decode:  # the replicas decode uploads on their device (the GPU fast path)
        variants.append(("batched, device decode", {**batched, "decode": "device"}, None))
    for label, config, headers in variants:
        serve.run(build_app({"index": args.index, **config}), name="lookalike", route_prefix="/")
        _load(url, payloads, 1, 5, 60, headers=headers)  # warm-up
        levels = args.levels if label.startswith("batched") else (8,)
        results["graph"][label] = [_load(url, payloads, c, args.requests, args.seconds, headers=headers)
                                   for c in levels]
        serve.delete("lookalike")
    keys_file.unlink()

    # Autoscaling and a replica killed mid-run: a longer soak at concurrency 32.
    serve.run(_autoscaling_app(args), name="lookalike", route_prefix="/")
    _load(url, payloads, 1, 5, 60)
    seen: dict[str, int] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for name, n in _replicas().items():
                seen[name] = max(seen.get(name, 0), n)
            time.sleep(1)

    def kill_one() -> None:
        time.sleep(args.soak / 2)
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Classifier" in a["name"]]
        if actors:
            ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
            results["killed_replica"] = actors[0]["name"]

    watcher, killer = threading.Thread(target=watch), threading.Thread(target=kill_one)
    before = _replicas()
    watcher.start(), killer.start()
    results["soak"] = _load(url, payloads, 32, 10**9, args.soak)
    killer.join()
    results["replicas_before"], results["replicas_max_during"] = before, dict(seen)
    time.sleep(args.cooldown)
    stop.set()
    watcher.join()
    results["replicas_after_cooldown"] = _replicas()
    serve.shutdown()
    ray.shutdown()
    return results


def _autoscaling_app(args: argparse.Namespace):
    """The demo app with autoscaling model deployments (serve/config.yaml sets them the same way)."""
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
               "upscale_delay_s": 2, "downscale_delay_s": 10}
    return build_app({"index": args.index, "max_batch_size": args.max_batch_size, "model_autoscaling": scaling})


def print_serve(results: dict) -> None:
    def row(label: str, figures: dict) -> None:  # direct calls count no failures: "-"
        print(f"{label:<36}{figures['concurrency']:>6}{figures['qps']:>8}{figures['p50_ms']:>9}"
              f"{figures['p95_ms']:>9}{figures['p99_ms']:>9}{figures.get('failed', '-'):>8}")

    print(f"\nserve benchmark: index {results['index']} ({results['machine']}), loopback HTTP")
    print(f"{'':<36}{'conc.':>6}{'QPS':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'failed':>8}")
    for figures in results["direct"]:
        row("direct (one process)", figures)
    for label, rows in results["graph"].items():
        for figures in rows:
            row("graph, " + label, figures)
    soak = results["soak"]
    row("soak (replica killed)", soak)
    cost = results.get("operations_cost")
    if cost:
        print(f"ingress work per request, timed in one process: metrics {cost['metrics_us_per_request']} us "
              f"(route lookup + 8 records of a global search), API key check {cost['key_check_us']} us")
    print(f"killed: {results.get('killed_replica', 'none')}; failure kinds: {soak['failure_kinds'] or 'none'}")
    print(f"replicas before {results['replicas_before']}, max during {results['replicas_max_during']}, "
          f"after cool-down {results['replicas_after_cooldown']}")


def add_arguments(srv: argparse.ArgumentParser) -> None:
    """Adds ``serve``'s arguments and functions to its subcommand parser (``jobs.benchmark.cli``)."""
    srv.set_defaults(check=lambda _args: None, bench=bench_serve, report=lambda results, _args: print_serve(results))
    srv.add_argument("--index", required=True, help="index folder (e.g. out/demo-index from make demo)")
    srv.add_argument("--images", required=True, help="folder of query images (e.g. out/demo-data)")
    srv.add_argument("--payloads", type=int, default=20, help="distinct query images to cycle through")
    srv.add_argument("--requests", type=int, default=200, help="most requests per measurement")
    srv.add_argument("--seconds", type=float, default=60, help="most seconds per measurement")
    srv.add_argument("--soak", type=float, default=120, help="seconds of the soak with a replica killed")
    srv.add_argument("--cooldown", type=float, default=30, help="idle seconds before counting replicas again")
    srv.add_argument("--max-batch-size", type=int, default=16)
    srv.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32],
                     help="concurrency levels of the batched variants (default: 1 8 32)")
    srv.add_argument("--decode", nargs="+", default=["cpu"], choices=["cpu", "device"],
                     help="also measure the graph with uploads decoded on the model device (--decode cpu device)")
