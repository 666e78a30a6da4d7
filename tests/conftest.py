"""Shared fixtures: offline hubs, an S3 server, seeded generators. Helpers are in helpers.py."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
from helpers import free_port

# No test may reach a model hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def s3_bucket(monkeypatch) -> str:
    """A real S3-compatible HTTP server (moto's) on 127.0.0.1 with one empty bucket; the standard AWS
    variables point this process, and the jobs it starts, at it. Yields the bucket's URI."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    pafs.FileSystem.from_uri("s3://lookalike-test?allow_bucket_creation=true")[0].create_dir("lookalike-test")
    try:
        yield "s3://lookalike-test"
    finally:
        server.stop()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module", autouse=True)
def no_serve_router_left_in_this_process(request):
    """A Ray Serve deployment handle used in the test process starts Serve's router thread here: an
    event loop that never ends, still running after ray.shutdown() into every later module, where it
    can crash the interpreter at exit after all tests passed. Call handles from a Ray worker instead
    (tests/test_serve.py's call_embedder_encoded); this fails the module that starts one."""
    yield
    left = [t.name for t in threading.enumerate() if "_run_router_event_loop" in t.name]
    assert not left, f"{request.module.__name__} left Serve's router thread in the test process: {left}"


_session: pytest.Session | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _session
    _session = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the test process with the session's exit status once pytest has reported everything,
    without running native libraries' teardown. After every test had passed and the summary was
    printed, CI's pytest process died at exit with a segmentation fault (twice: 326 and 327 passed,
    exit 139) and no Python stack from the fault handler, i.e. inside native teardown after Python had
    finalized (the process holds Ray's core worker, gRPC, torch and FAISS thread pools). Nothing of the
    product runs there. LOOKALIKE_TEST_NATIVE_EXIT=1 keeps the normal exit, to study that crash."""
    if _session is None or os.environ.get("LOOKALIKE_TEST_NATIVE_EXIT") == "1":
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(_session.exitstatus))
