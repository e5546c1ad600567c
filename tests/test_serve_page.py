"""The editing page in a real browser: Debian's Chromium driven by Playwright (its own browsers cannot be downloaded
here: `apt-get install chromium`, and `.ci/run` does). Upload, invert, edit, move sliders, open the maps grid, go
back in the history; the edited image on the page is the API's, pixel for pixel. A missing browser fails the test:
it is never skipped. The last screenshot is kept in test-artifacts/serve-page.png."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import p2p_engine as p2p
from p2p_engine.toy.dataset import make_scene
from serving import running

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 180_000


def _browser(playwright):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Chromium is missing: install Debian's (apt-get install -y chromium chromium-driver); the page "
                    "test needs a real browser and is not skipped without one")
    return playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])


def _page_pixels(page, selector: str) -> np.ndarray:
    """The pixels the page decoded for an <img>, at its natural size, read back through a canvas."""
    data = page.evaluate("""(sel) => {
        const img = document.querySelector(sel);
        const c = document.createElement("canvas");
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext("2d");
        ctx.drawImage(img, 0, 0);
        return {w: c.width, h: c.height, px: Array.from(ctx.getImageData(0, 0, c.width, c.height).data)};
    }""", selector)
    return np.array(data["px"], dtype=np.uint8).reshape(data["h"], data["w"], 4)[..., :3]


def _new_job(page, previous: str | None) -> str:
    page.wait_for_function("(prev) => { const i = document.querySelector('#edit-image');"
                           " return i.dataset.job && i.dataset.job !== prev; }", arg=previous, timeout=TIMEOUT_MS)
    return page.get_attribute("#edit-image", "data-job")


def test_the_page_uploads_inverts_edits_and_shows_the_apis_pixels(tmp_path):
    from playwright.sync_api import sync_playwright

    scene = make_scene(7, 4)
    photo = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(photo)
    target = scene.caption.replace("green", "purple")
    toy = p2p.load("toy", device="cpu", dtype=torch.float32)
    ARTIFACTS.mkdir(exist_ok=True)
    with running(toy, batch_timeout_ms=10) as (client, app), sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests = []
            page.on("request", lambda r: requests.append((r.method, r.url)))
            page.goto(client.base + "/")
            page.wait_for_selector(".scene img[src]", timeout=TIMEOUT_MS)  # the toy scenes came

            # upload, invert (with its progress bar)
            page.set_input_files("#file", str(photo))
            page.wait_for_function("() => document.querySelector('#source-image').dataset.url", timeout=TIMEOUT_MS)
            page.fill("#source-prompt", scene.caption)
            page.select_option("#method", "null_text")
            page.fill("#inversion-steps", "6")
            page.click("#invert")
            page.wait_for_function("() => document.querySelector('#inversion-state').textContent === 'inverted'",
                                   timeout=TIMEOUT_MS)
            bar = page.evaluate("() => [document.querySelector('#inversion-progress').value,"
                                " document.querySelector('#inversion-progress').max]")
            assert bar[0] == bar[1] > 0

            # a target, then edit
            page.fill("#target", target)
            page.wait_for_selector("#target-words .word button[data-word='purple']", timeout=TIMEOUT_MS)
            page.click("#run-edit")
            first = _new_job(page, None)
            job = client.get(f"/v1/jobs/{first}")[1]
            assert job["status"] == "done" and job["request"]["targets"] == [target]
            api = client.png(job["result"]["images"][1])
            assert np.array_equal(_page_pixels(page, "#edit-image"), api)
            assert np.array_equal(_page_pixels(page, "#source-image"), client.png(job["result"]["images"][0]))

            # moving the cross-window slider re-edits, from the source's cache
            page.fill("#cross", "0.5")
            second = _new_job(page, first)
            job2 = client.get(f"/v1/jobs/{second}")[1]
            assert job2["request"]["controller"]["cross_steps"] == 0.5 and job2["result"]["cache"] == "made"
            # a word's weight slider: a reweight of it, from the cache
            page.fill(".weight-slider[data-word='purple']", "2")
            third = _new_job(page, second)
            job3 = client.get(f"/v1/jobs/{third}")[1]
            assert job3["request"]["controller"]["equalizer"] == {"purple": 2.0} and job3["result"]["cache"] == "hit"
            assert np.array_equal(_page_pixels(page, "#edit-image"), client.png(job3["result"]["images"][1]))

            # the maps grid: a word's map laid over the image
            page.click("#open-maps")
            page.wait_for_selector("#maps-grid .map-tile[data-prompt='1'][data-word='purple'] img[src]",
                                   timeout=TIMEOUT_MS)
            page.click("#maps-grid .map-tile[data-prompt='1'][data-word='purple']")
            assert page.get_attribute("#edit-overlay", "data-word") == "purple"
            page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)

            # going back in the history re-runs nothing
            sent = len(requests)
            page.click(f"#history button[data-job='{first}']")
            page.wait_for_function("(j) => document.querySelector('#edit-image').dataset.job === j", arg=first,
                                   timeout=TIMEOUT_MS)
            assert requests[sent:] == [] or all(m == "GET" and "/v1/edits" not in u for m, u in requests[sent:])
            assert np.array_equal(_page_pixels(page, "#edit-image"), api)
            assert all(u.startswith(client.base) or u.startswith("blob:") for _, u in requests), \
                "the page fetched from another host"
        finally:
            browser.close()
    assert (ARTIFACTS / "serve-page.png").stat().st_size > 10_000
