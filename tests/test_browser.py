"""End to end in a real browser: Debian's Chromium driven by Playwright, against a real redis-server, a real worker
(`python -m worker run`) and `streamlit run` on free ports.

A digits job is submitted through the form, its chart gains points while it runs, it reaches `finished`, model.onnx
is downloaded through its button and classifies digits with onnxruntime. Every page is saved as a screenshot in
tests/screenshots/ (git-ignored) for a person to look at, and a small real sweep (3 one-epoch trials) shows on
the Sweeps page.

Chromium: /usr/bin/chromium (`apt-get install -y chromium`), never `playwright install`. Without it the test is
skipped, except in CI (CI=true), where it fails.
"""
from __future__ import annotations

import json
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import free_port, require_system_binary
from tests.fixtures_app import ROOT, wait_until

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = ROOT / "tests" / "screenshots"
EPOCHS = 3
FINISH_TIMEOUT = 240.0
"""Seconds the digits job may take from submission to `finished` (3 epochs + export on 2 busy cores)."""


def require_chromium() -> None:
    require_system_binary(CHROMIUM, "chromium")


def wait_http(url: str, timeout: float, proc: Any, spawn: Any) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited early:\n{spawn.output(proc)[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False
    wait_until(up, timeout, f"{url} to answer", interval=0.3)


def start_dashboard(env: dict[str, str], spawn: Any) -> tuple[str, Any]:
    """`streamlit run app/asgi.py` (what `python -m app` serves: the download route too) on a free port, answering:
    (its base URL, its process)."""
    port = free_port()
    web = spawn([sys.executable, "-m", "streamlit", "run", "app/asgi.py", "--server.headless=true",
                 f"--server.port={port}", "--server.address=127.0.0.1", "--browser.gatherUsageStats=false",
                 "--server.fileWatcherType=none"], env, name="streamlit")
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/_stcore/health", 60, web, spawn)
    return base, web


@pytest.fixture
def stack(redis_conn: Any, job_env: dict[str, str], spawn: Any, tmp_path: Path) -> dict[str, Any]:
    """A worker and the dashboard (Redis is the session's redis-server); killed at teardown, pass or fail."""
    require_chromium()
    env = {**job_env, "DATA_CACHE_DIR": str(tmp_path / "data-cache"), "OMP_NUM_THREADS": "2"}
    worker = spawn.python(["worker", "run", "--cpu", "--slots", "1"], env, name="worker")
    base, web = start_dashboard(env, spawn)
    from worker import api

    wait_until(lambda: api.list_workers(redis_conn) or worker.poll() is not None, 60, "the worker to advertise")
    assert worker.poll() is None, spawn.output(worker)
    return {"base": base, "conn": redis_conn, "spawn": spawn, "worker": worker, "web": web}


def chart_points(page: Any) -> int:
    """The live chart's point count, from the caption under the charts."""
    text = page.get_by_text(re.compile(r"Chart points: \d+")).first.inner_text(timeout=30_000)
    return int(re.search(r"Chart points: (\d+)", text).group(1))


def shot(page: Any, name: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:  # every plotly chart on the page has drawn its SVG
        page.wait_for_function(
            "() => [...document.querySelectorAll('[data-testid=\"stPlotlyChart\"]')]"
            ".every(e => e.querySelector('.main-svg'))", timeout=10_000)
    except PlaywrightTimeout:  # a screenshot is for people: a slow chart must not fail the test
        print(f"screenshot {name}: a chart had not drawn after 10 s")
    page.wait_for_timeout(500)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def settle(page: Any) -> None:
    """Wait until Streamlit has finished running the script: no "Running" status, no stale (greyed) elements."""
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(300)  # a rerun the last action started has had time to show its status
    page.wait_for_function(
        "() => !(document.querySelector('[data-testid=\"stStatusWidget\"]')?.innerText || '').includes('Running')"
        " && !document.querySelector('.stale-element, [data-stale=\"true\"]')",
        timeout=60_000)


def test_submit_watch_download_and_classify_in_a_real_browser(stack: dict[str, Any], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from worker import api

    conn, spawn = stack["conn"], stack["spawn"]
    started = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1500}, accept_downloads=True)
            page.set_default_timeout(60_000)

            # New job: the digits preset, 3 epochs, export on (the preset's default), submitted through the form
            page.goto(stack["base"] + "/")
            page.get_by_role("button", name=re.compile("Submit job")).wait_for()

            # an uploaded zip's health is shown before anything is submitted
            page.get_by_text("Upload a .zip of class folders").click()
            page.locator("input[type=file]").set_input_files(shapes_zip(tmp_path))
            page.get_by_text(re.compile("ready to train")).wait_for()
            settle(page)
            shot(page, "0-new-job-upload-health")
            page.get_by_text(re.compile("^digits — handwritten digits")).click()
            page.get_by_text(re.compile("ready to train")).wait_for(state="detached")  # that rerun has landed
            settle(page)
            epochs = page.get_by_label("Epochs", exact=True)
            epochs.fill(str(EPOCHS))
            epochs.press("Tab")
            page.get_by_label("Job name (optional)").fill("browser digits")
            expect(epochs).to_have_value(str(EPOCHS))
            assert page.get_by_label("Export ONNX when training ends").is_checked()
            shot(page, "1-new-job")
            page.get_by_role("button", name=re.compile("Submit job")).click()

            # lands on the job's own page: ?job=ID
            page.wait_for_url(re.compile(r"/job\?job=\d{8}-\d{6}-[0-9a-f]{6}"))
            job_id = re.search(r"job=([0-9a-f-]+)", page.url).group(1)
            assert api.job_status(conn, job_id)["config"]["train"]["epochs"] == EPOCHS

            def state() -> str:
                return api.job_status(conn, job_id)["state"]

            explain = lambda: f"state {state()}\n" + "\n".join(
                f"--- {p.args}\n{spawn.output(p)[-2500:]}" for p in spawn.procs)

            # the chart gains points while the job runs, without reloading the page
            wait_until(lambda: state() in ("running", "finished", "failed"), 60, "the job to start")
            page.get_by_text(re.compile(r"Chart points: \d+")).wait_for()
            page.evaluate("window.__sameDocument = true")  # gone if the browser reloaded the page
            first = chart_points(page)

            def grew_while_running() -> bool:
                current, now = chart_points(page), state()
                assert now in ("queued", "running"), f"the job ended ({now}) before the chart grew\n{explain()}"
                return current > first and now == "running"

            wait_until(grew_while_running, 150, f"the chart to grow past {first} points")
            assert page.evaluate("window.__sameDocument === true")
            # a screenshot once an epoch is drawn (skipped if the job was quicker than that)
            wait_until(lambda: api.job_status(conn, job_id)["epoch"] >= 1 or state() != "running", 120,
                       "the first epoch")
            if state() == "running":
                page.wait_for_timeout(2500)  # one fragment refresh
                shot(page, "2-job-running")

            # finished: the page redraws with the results by itself
            wait_until(lambda: state() in ("finished", "failed", "cancelled"), FINISH_TIMEOUT, "the job to end")
            assert state() == "finished", explain()
            page.get_by_text("Results", exact=True).wait_for(timeout=30_000)
            page.get_by_text("Test accuracy", exact=True).wait_for()
            settle(page)
            shot(page, "3-job-finished")
            page.get_by_text("Training curves", exact=True).evaluate("e => e.scrollIntoView({block: 'start'})")
            shot(page, "3b-job-curves")
            for tab in ("Misclassified", "Export"):
                page.get_by_role("tab", name=tab).click()
                page.get_by_role("tab", name=tab).evaluate("e => e.scrollIntoView({block: 'start'})")
                shot(page, f"3c-job-{tab.lower()}")

            # model.onnx through its download button, a link the server streams (app/downloads.py) into a new tab;
            # Chromium reports the download on this page: the very file of the job's export
            with page.expect_download() as info:
                page.get_by_test_id("stLinkButton").filter(has_text="model.onnx").get_by_role("link").click()
            saved = tmp_path / "model.onnx"
            info.value.save_as(saved)
            assert saved.read_bytes() == api.read_artifact(job_id, "onnx")
            classify_digits_with(saved, job_id)

            # every other page, for the record
            for name, path in (("4-jobs", "/jobs"), ("5-compare", f"/compare?jobs={job_id}"),
                               ("6-workers", "/workers"), ("7-try-it", f"/try?job={job_id}")):
                page.goto(stack["base"] + path)
                settle(page)
                assert not page.get_by_test_id("stException").count(), name
                if name == "7-try-it":
                    page.get_by_text(re.compile("Top-1 correct on")).wait_for()
                if name == "4-jobs":
                    page.get_by_text(job_id).first.wait_for(state="attached")  # a cell of the canvas table
                    select_first_row(page)
                    # the row's job lands in "Selected jobs", which the action buttons act on
                    page.get_by_test_id("stMultiSelect").get_by_text(re.compile(job_id)).wait_for()
                    expect(page.locator("button[data-testid^=stBaseButton]", has_text=re.compile("Open$"))) \
                        .to_be_enabled()
                    settle(page)
                shot(page, name)

            # a small real sweep on the same worker (3 one-epoch trials, one at a time), then its page
            sweep_id = api.create_sweep(str(ROOT / "configs" / "digits.yaml"),
                                        {"optim.lr": {"float": [1e-3, 1e-2], "log": True},
                                         "train.batch_size": {"choice": [32, 64]}},
                                        connection=conn, trials=3, parallel=1, pruner="none", seed=0,
                                        name="browser sweep", allow_local_paths=True,
                                        overrides=["train.epochs=1", "export.enabled=false", "data.image_size=16"])
            wait_until(lambda: api.sweep_status(conn, sweep_id, with_trials=False)["final"], FINISH_TIMEOUT,
                       "the sweep to finish")
            assert api.sweep_status(conn, sweep_id, with_trials=False)["state"] == "finished"
            page.goto(stack["base"] + f"/sweeps?sweep={sweep_id}")
            page.get_by_text("Best trial", exact=True).wait_for()
            page.get_by_text("Parameter importances (Optuna)").wait_for()
            settle(page)
            assert not page.get_by_test_id("stException").count()
            shot(page, "8-sweeps")
            page.goto(stack["base"] + "/")
            page.get_by_test_id("stCheckbox").filter(has_text=re.compile("^Sweep$")).click()
            page.get_by_text("Fields to vary").wait_for()
            settle(page)
            shot(page, "9-new-job-sweep-mode")
        finally:
            browser.close()
    print(f"browser test: {time.monotonic() - started:.0f} s")


def select_first_row(page: Any) -> None:
    """Tick the selection box of the table's first row (the table is a canvas: click by position)."""
    box = page.get_by_test_id("stDataFrame").first.bounding_box()
    header = 36  # px: Streamlit's default row height, the header row included
    page.mouse.click(box["x"] + 18, box["y"] + header + header / 2)


def shapes_zip(tmp_path: Path) -> Path:
    """A small uploadable dataset: three classes of coloured squares, one corrupt file."""
    import zipfile

    from tests.fixtures_worker import make_imagefolder

    folder = make_imagefolder(tmp_path / "shapes", per_class=12, size=24)
    (folder / "tri" / "corrupt.png").write_bytes(b"not a png")
    path = tmp_path / "shapes.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(tmp_path).as_posix())
    return path


def classify_digits_with(model: Path, job_id: str) -> None:
    """The downloaded model labels raw digits images of the job's test split (scikit-learn's 8x8 digits, scaled to
    0..255) with onnxruntime, through the exported predict.py's preprocessing and the export's preprocess.json."""
    import onnxruntime as ort
    from PIL import Image
    from sklearn.datasets import load_digits

    from core.predict_template import classify, preprocess_image
    from worker import api

    pp = json.loads(api.read_artifact(job_id, "export/preprocess.json"))
    labels = json.loads(api.read_artifact(job_id, "export/labels.json"))
    test_ids = json.loads(api.read_artifact(job_id, "split.json"))["test"][:60]
    digits = load_digits()
    images = [Image.fromarray(np.clip(np.rint(digits.images[i] * 255 / 16), 0, 255).astype(np.uint8), mode="L")
              for i in test_ids]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    top = classify(session, np.stack([preprocess_image(img, pp) for img in images]), labels, 1,
                   pp.get("input_name") or "input")
    right = [t[0]["label"] == str(digits.target[i]) for t, i in zip(top, test_ids, strict=True)]
    assert sum(right) >= 0.8 * len(right), f"{sum(right)} of {len(right)} test digits right"


def test_datasets_page_and_new_job_on_a_registered_dataset(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                                           tmp_path: Path) -> None:
    """A registered dataset with a queued job on it: the Datasets page shows its classes, images and the job; its
    "New job on" link opens New job on that version, and submitting sends `data.dataset: NAME:VERSION`."""
    from playwright.sync_api import sync_playwright

    from tests.fixtures_app import submit_digits
    from tests.fixtures_worker import make_imagefolder
    from worker import api

    require_chromium()
    folder = make_imagefolder(tmp_path / "shapes", per_class=12, size=48)
    (folder / "tri" / "corrupt.png").write_bytes(b"not a png")
    api.datasets.register(redis_conn, "shapes", str(folder))
    job = submit_digits(redis_conn, ["data.dataset=shapes:1", "train.batch_size=8", "data.image_size=16"],
                        name="on shapes")  # no worker here: it stays queued
    base, _ = start_dashboard({**job_env, "DATA_CACHE_DIR": str(tmp_path / "data-cache")}, spawn)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1500})
            page.set_default_timeout(60_000)
            page.goto(f"{base}/datasets?dataset=shapes&version=1")
            page.get_by_text("Jobs that trained on it (1)").wait_for()
            page.get_by_text("A few images per class").wait_for()
            for name in ("circle", "square", "tri"):  # each class beside its images
                page.locator("code").filter(has_text=re.compile(f"^{name}$")).first.wait_for()
            page.get_by_text(job).first.wait_for(state="attached")  # a cell of the jobs table (a canvas)
            page.locator("img[src*='/media/']").nth(11).wait_for()  # four images for each of the three classes
            settle(page)
            assert not page.get_by_test_id("stException").count()
            shot(page, "10-datasets")
            page.get_by_text("Jobs that trained on it (1)").evaluate("e => e.scrollIntoView({block: 'start'})")
            shot(page, "10b-datasets-jobs")

            page.get_by_text("New job on shapes:1").click()
            page.wait_for_url(re.compile(r"/(new)?\?dataset=shapes(%3A|:)1$"))
            page.get_by_role("button", name=re.compile("Submit job")).wait_for()
            page.get_by_text(re.compile(r"shapes:1.*3 classes, 36 images")).wait_for()
            settle(page)
            shot(page, "11-new-job-registered-dataset")
            batch = page.get_by_label("Batch size", exact=True)
            batch.fill("8")
            batch.press("Tab")
            settle(page)
            page.get_by_role("button", name=re.compile("Submit job")).click()
            page.wait_for_url(re.compile(r"/job\?job=\d{8}-\d{6}-[0-9a-f]{6}"))
            new_job = re.search(r"job=([0-9a-f-]+)", page.url).group(1)
            assert api.job_status(redis_conn, new_job)["config"]["data"]["dataset"] == "shapes:1"
            page.get_by_role("link", name="Dataset shapes:1").first.wait_for()
            settle(page)
            shot(page, "12-job-on-registered-dataset")
        finally:
            browser.close()
