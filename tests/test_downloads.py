"""Downloads are streamed (app/downloads.py): a real dashboard server (`python -m app`, with a password) serves a
300 MiB model file of a job to an HTTP client while its own memory grows by a few MiB, not by the file; the link works
only for the session that was given it while that session is signed in, and only for that job and file."""
from __future__ import annotations

import http.client
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from tests.fixtures_app import TEST_WORKER, submit_digits
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, require_chromium
from tests.test_dashboard_access import start_dashboard, web_env  # noqa: F401 - web_env is a fixture

BIG = 300 * 2**20
"""The model file's size: a sparse file, so the test writes nothing to disk."""

GROWTH_LIMIT = 48 * 2**20
"""How much the server's RSS may grow while it serves the file (a few 1 MiB chunks, buffers, allocator slack)."""


def seed_job_with_big_model(conn: Any) -> tuple[str, Path]:
    """A finished job whose run folder holds only export/model.onnx, BIG bytes of a sparse file."""
    from worker.artifacts import ArtifactStore
    from worker.queues import discard_rq_job
    from worker.record import JobRecord, mark_final, mark_started
    from worker.states import JobState

    job_id = submit_digits(conn)
    discard_rq_job(conn, JobRecord.fetch(conn, job_id).rq_job)
    assert mark_started(conn, job_id, TEST_WORKER, job_id) == "ok"
    store = ArtifactStore()
    model = store.local_run_dir(job_id) / "export" / "model.onnx"
    model.parent.mkdir(parents=True)
    with model.open("wb") as f:
        f.truncate(BIG)
    assert mark_final(conn, job_id, TEST_WORKER, JobState.FINISHED, {"artifacts": store.artifact_uris(job_id)}) == "ok"
    return job_id, model


def get(base: str, path: str, *, on_chunk: Any = None) -> tuple[int, int, str]:
    """GET `path`: (status, body bytes, the first 200 bytes of the body as text), reading 1 MiB at a time and
    calling `on_chunk()` after each piece."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        total, head = 0, b""
        while chunk := resp.read(2**20):
            if not head:
                head = chunk[:200]
            total += len(chunk)
            if on_chunk is not None:
                on_chunk()
        return resp.status, total, head.decode(errors="replace")
    finally:
        conn.close()


def test_a_big_download_is_streamed_and_only_to_a_signed_in_session(
        web_env: dict[str, str], spawn: Any, redis_conn: Any) -> None:  # noqa: F811 - the fixture
    from playwright.sync_api import sync_playwright

    require_chromium()
    job_id, model = seed_job_with_big_model(redis_conn)
    proc, base = start_dashboard(spawn, {**web_env, "DASHBOARD_PASSWORD": "correct horse"})
    server = psutil.Process(proc.pid)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(base + "/")
            page.get_by_label("Password", exact=True).fill("correct horse")
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("link", name=re.compile(r"^\S*\s*Job$")).click()  # the Job page: the newest job, ours
            link = page.get_by_test_id("stLinkButton").filter(has_text="model.onnx").get_by_role("link")
            href = link.get_attribute("href")
            assert href and href.startswith(f"/download/{job_id}/onnx?grant="), href

            before = server.memory_info().rss
            peak = [before]
            status, size, _ = get(base, href, on_chunk=lambda: peak.append(server.memory_info().rss))
            assert (status, size) == (200, BIG)
            assert max(peak) - before < GROWTH_LIMIT, f"server RSS grew by {(max(peak) - before) / 2**20:.0f} MiB"
            assert os.path.getsize(model) == BIG

            grant = href.split("grant=", 1)[1]
            for path in (f"/download/{job_id}/onnx",  # no grant
                         f"/download/{job_id}/onnx?grant=forged",
                         f"/download/{job_id}/pt?grant={grant}",  # another file of the job
                         f"/download/{job_id}/..%2F..%2F..%2Fetc%2Fpasswd?grant={grant}",  # out of the run
                         # folder: the server's own check answers 400 before the route's
                         f"/download/20200101-000000-abcdef/onnx?grant={grant}"):  # another job
                status, size, text = get(base, path)
                refused = (status, "not valid" in text) in ((403, True), (400, False))
                assert size < 1000 and refused, (path, status, text)

            page.get_by_role("button", name="Log out").click()
            page.get_by_role("heading", name="Sign in").wait_for()
            status, size, text = get(base, href)  # the link the session had, after it logged out
            assert (status, size > 100) == (403, False) and "sign in to download" in text
        finally:
            browser.close()
