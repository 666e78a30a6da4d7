"""The web page in headless Chromium: upload a real photo, see predicted classes and results.

Needs Debian's chromium (/usr/bin/chromium, installed by .ci/run) and the playwright package
(dev extra); skipped where either is missing.
"""

from __future__ import annotations

import shutil
import socket

import pytest
import ray
from conftest import TINY_CLASSIFIER, TINY_CLIP_SPEC, make_class_folders

from jobs.embed import EmbedConfig, run
from pipeline.datasets import sample_photos
from pipeline.index import build_index

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from ray import serve

    from serve.app import build_app

    root = tmp_path_factory.mktemp("page")
    make_class_folders(root / "data", classes=2, per_class=4)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    run(EmbedConfig(inputs=(str(root / "data"),), output=str(root / "emb"), classifier=TINY_CLASSIFIER,
                    embedder=TINY_CLIP_SPEC, batch_size=4))
    build_index(root / "emb", root / "index")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"index": str(root / "index")}), name="lookalike", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_upload_a_photo_and_see_results(url: str, tmp_path) -> None:
    photo = next(p for p in sample_photos() if p.name == "chelsea.png")
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            assert "lookalike" in page.title()
            page.fill("#k", "3")
            page.select_option("#mode", "global")  # random test models: the predicted class may be empty
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
