"""``uploads``: the ingress replica's memory under a burst of large uploads, with its decode budget
and without, side by side in one run.

Deploys the service (one Ingress replica) on a local Ray, finds the Ingress replica's process, and
sends ``--concurrent`` uploads at once of a ``--side`` x ``--side`` PNG (flat colour, so the file
is small and only decoding is costly), twice: with the default ``decode_pixel_budget`` and with a
budget too large to bind. It polls the replica's resident memory every 0.05 s and reports the
rise over its idle size, the answers' statuses and the burst's wall time.
"""

from __future__ import annotations

import argparse
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import requests
from PIL import Image
from ray import serve

from jobs.benchmark.runner import free_port, machine
from serve.app import AppConfig, build_app

UNBOUNDED = 10**15


def _ingress_pid(app: str) -> int:
    """The process of the app's Ingress replica (Ray titles replica processes by app and deployment)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "ServeReplica" in title and f"{app}:Ingress" in title.replace("#", ":"):
                return int(proc.name)
    raise RuntimeError(f"no Ingress replica process found for app {app!r}")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _png(side: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), (120, 90, 60), np.uint8)).save(out, "PNG")
    return out.getvalue()


def _burst(url: str, pid: int, data: bytes, concurrent: int) -> dict:
    idle = _rss_mb(pid)
    peak, done = idle, threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_mb(pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:
        responses = list(pool.map(lambda _: requests.post(f"{url}/search", params={"k": 3}, data=data, timeout=600),
                                  range(concurrent)))
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    statuses: dict[str, int] = {}
    for r in responses:
        statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
    return {"idle_rss_mb": round(idle), "peak_rss_mb": round(peak), "rise_mb": round(peak - idle),
            "statuses": statuses, "wall_s": round(wall, 1)}


def bench_uploads(args: argparse.Namespace) -> dict:
    data = _png(args.side)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {"machine": machine(), "side": args.side, "pixels": args.side**2, "png_bytes": len(data),
               "concurrent": args.concurrent, "default_budget_pixels": AppConfig(index="-").decode_pixel_budget}
    try:
        for name, budget in (("budget", None), ("unbounded", UNBOUNDED)):
            config = {"index": str(args.index)} | ({} if budget is None else {"decode_pixel_budget": budget})
            serve.run(build_app(config), name="uploads", route_prefix="/")
            assert requests.post(f"{url}/search", data=_png(64), timeout=120).status_code == 200  # warm
            results[name] = _burst(url, _ingress_pid("uploads"), data, args.concurrent)
            serve.delete("uploads")
            time.sleep(2)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def report_uploads(results: dict, args: argparse.Namespace) -> None:
    print(f"uploads: {results['concurrent']} at once of a {results['side']} x {results['side']} PNG "
          f"({results['pixels'] / 1e6:.1f}M pixels, {results['png_bytes'] / 1024:.0f} KB); {results['machine']}")
    for name, label in (("budget", f"decode budget {results['default_budget_pixels'] / 1e6:.0f}M pixels (default)"),
                        ("unbounded", "no budget")):
        r = results[name]
        print(f"  {label:<40} ingress RSS {r['idle_rss_mb']} -> {r['peak_rss_mb']} MB (+{r['rise_mb']} MB), "
              f"statuses {r['statuses']}, {r['wall_s']} s")
    rise_on, rise_off = results["budget"]["rise_mb"], results["unbounded"]["rise_mb"]
    if rise_on > 0:
        print(f"  peak rise without / with the budget: {rise_off / rise_on:.1f}x")


def check_uploads(args: argparse.Namespace) -> str | None:
    if args.side < 16 or args.concurrent < 1:
        return "--side must be >= 16 and --concurrent >= 1"
    if not (Path(args.index) / "manifest.json").is_file():
        return f"no index at {args.index} (make demo builds out/demo-index)"
    return None


def add_arguments(up: argparse.ArgumentParser) -> None:
    """Adds ``uploads``'s arguments and functions to its subcommand parser (``jobs.benchmark.cli``)."""
    up.set_defaults(check=check_uploads, bench=bench_uploads, report=report_uploads)
    up.add_argument("--index", default="out/demo-index", help="index folder (default: out/demo-index, from make demo)")
    up.add_argument("--side", type=int, default=7000,
                    help="the PNG's width and height (default: 7000, 49M pixels: under the 50M query limit)")
    up.add_argument("--concurrent", type=int, default=12, help="uploads sent at once (default: 12)")
