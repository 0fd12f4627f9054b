"""The dashboard is safe by default (README "Dashboard access"): `python -m app` (the Procfile's `web:` line) listens on
loopback only; exposed (`DASHBOARD_ADDRESS=0.0.0.0`) it refuses to start without a login, saying how to set one up,
unless `DASHBOARD_ALLOW_OPEN=1`; exposed with a password it serves the sign-in form first, and then uploads and Redis
work as usual (a real Chromium, a real redis-server, a real `streamlit run`)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import free_port
from tests.fixtures_app import APP, ROOT
from tests.fixtures_worker import run_cli
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, require_chromium, settle, shapes_zip, wait_http

LOGIN_VARS = ("DASHBOARD_PASSWORD", "DASHBOARD_ADDRESS", "DASHBOARD_ALLOW_OPEN")


@pytest.fixture
def web_env(job_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """job_env without any dashboard login or address setting, on a free port."""
    env = {k: v for k, v in job_env.items() if k not in LOGIN_VARS}
    return {**env, "PORT": str(free_port()), "DATA_CACHE_DIR": str(tmp_path / "data-cache")}


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on."""
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def start_dashboard(spawn: Any, env: dict[str, str]) -> tuple[Any, str]:
    proc = spawn.python(["app"], env, name="dashboard")
    base = f"http://127.0.0.1:{env['PORT']}"
    wait_http(f"{base}/_stcore/health", 90, proc, spawn)
    return proc, base


def test_default_listens_on_loopback_only(web_env: dict[str, str], spawn: Any, redis_conn: Any) -> None:
    proc, _ = start_dashboard(spawn, web_env)
    assert listening(proc.pid) == {("127.0.0.1", int(web_env["PORT"]))}  # execv: the server is that very process


def test_exposed_without_login_refuses_and_says_how_to_fix_it(web_env: dict[str, str]) -> None:
    res = run_cli(["app"], {**web_env, "DASHBOARD_ADDRESS": "0.0.0.0"}, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    message = res.stderr
    assert "Refusing to serve the dashboard on 0.0.0.0" in message
    for fix in ("DASHBOARD_PASSWORD=", "[auth]", "ssh -L 8501:127.0.0.1:8501", "DASHBOARD_ALLOW_OPEN=1"):
        assert fix in message, fix
    assert "http://" not in res.stdout  # nothing was started


def test_a_hand_started_exposed_server_draws_only_the_refusal(job_env: dict[str, str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`streamlit run --server.address 0.0.0.0` skips `python -m app`: the entry page refuses instead, until a login
    or DASHBOARD_ALLOW_OPEN=1 is set."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    for var in LOGIN_VARS:
        monkeypatch.delenv(var, raising=False)
    before = st.get_option("server.address")
    st.config.set_option("server.address", "0.0.0.0")
    try:
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        assert not at.exception
        assert not at.title and len(at.error) == 1 and "Refusing to serve" in at.error[0].value
        monkeypatch.setenv("DASHBOARD_ALLOW_OPEN", "1")
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        assert not at.exception and at.title[0].value == "New job"
        monkeypatch.delenv("DASHBOARD_ALLOW_OPEN")
        monkeypatch.setenv("DASHBOARD_PASSWORD", "pw")
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        assert not at.exception and [t.value for t in at.title] == ["Sign in"]
    finally:
        st.config.set_option("server.address", before)


@pytest.mark.browser
def test_exposed_with_a_password_gates_then_uploads_and_submits(web_env: dict[str, str], spawn: Any,
                                                                redis_conn: Any, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    from worker import api

    require_chromium()
    env = {**web_env, "DASHBOARD_ADDRESS": "0.0.0.0", "DASHBOARD_PASSWORD": "correct horse"}
    proc, base = start_dashboard(spawn, env)
    assert listening(proc.pid) == {("0.0.0.0", int(env["PORT"]))}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            page.set_default_timeout(60_000)
            page.goto(base + "/jobs")
            page.get_by_role("heading", name="Sign in").wait_for()
            settle(page)
            assert not page.get_by_test_id("stSidebarNav").count()  # no navigation, no page before signing in
            assert not page.get_by_text("Submit job").count()
            page.get_by_label("Password", exact=True).fill("wrong")
            page.get_by_role("button", name="Sign in").click()
            page.get_by_text("Wrong password.").wait_for()
            page.get_by_label("Password", exact=True).fill("correct horse")
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("button", name=re.compile("Submit job")).wait_for()  # signed in: the dashboard
            assert page.get_by_test_id("stSidebarNav").count()
            page.get_by_text("Upload a .zip of class folders").click()
            page.locator("input[type=file]").set_input_files(shapes_zip(tmp_path))
            page.get_by_text(re.compile("ready to train")).wait_for()
            settle(page)
            batch = page.get_by_label("Batch size", exact=True)
            batch.fill("8")
            batch.press("Tab")
            page.get_by_role("button", name=re.compile("Submit job")).click()
            page.wait_for_url(re.compile(r"/job\?job=\d{8}-\d{6}-[0-9a-f]{6}"))
            job_id = re.search(r"job=([0-9a-f-]+)", page.url).group(1)
        finally:
            browser.close()
    job = api.job_status(redis_conn, job_id)
    assert job["state"] == "queued"
    assert job["config"]["data"]["path"].startswith("artifact:datasets/")


def test_procfile_starts_the_dashboard_through_the_safe_launcher() -> None:
    web = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    assert web.split(":", 1)[1].split() == ["python", "-m", "app"]


def _handshake(port: int, host: str, path: str = "/_stcore/stream") -> str:
    """The status line a websocket upgrade to the dashboard gets under this Host header."""
    import base64
    import os
    import socket

    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: streamlit"
                      "\r\n\r\n").encode())
        return sock.recv(4096).decode("latin-1").split("\r\n", 1)[0]


def _get(url: str, host: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def test_a_forged_host_gets_neither_the_page_nor_the_websocket(web_env: dict[str, str], spawn: Any,
                                                               redis_conn: Any) -> None:
    """DNS rebinding: a page under the attacker's name that re-resolves to 127.0.0.1 must not drive the loopback
    dashboard. IP addresses, localhost and DASHBOARD_HOSTS names are served."""
    env = {**web_env, "DASHBOARD_HOSTS": "dash.example.org,*.corp.example"}
    _, base = start_dashboard(spawn, env)
    port = int(env["PORT"])
    for host in ("rebind.attacker.example", "dash.example.org.attacker.example", "corp.example"):
        status, body = _get(base + "/", f"{host}:{port}")
        assert status == 400 and "not allowed" in body and "DASHBOARD_HOSTS" in body, (host, status)
        assert " 101 " not in _handshake(port, f"{host}:{port}") + " ", host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "dash.example.org", "ci.corp.example"):
        assert _get(base + "/", host)[0] == 200, host
        assert " 101 " in _handshake(port, host), host


def test_no_upload_is_read_before_sign_in(web_env: dict[str, str], spawn: Any, redis_conn: Any) -> None:
    """A session that only sees the sign-in form cannot push a file into the server's memory: its upload is refused
    by the gate (403) until it signs in, and again after it logs out."""
    from playwright.sync_api import sync_playwright
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    require_chromium()
    env = {**web_env, "DASHBOARD_PASSWORD": "correct horse"}
    _, base = start_dashboard(spawn, env)
    session: list[str] = []

    def frame(payload: bytes | str) -> None:
        if isinstance(payload, bytes):
            msg = ForwardMsg()
            msg.ParseFromString(payload)
            if msg.WhichOneof("type") == "new_session" and not session:
                session.append(msg.new_session.initialize.session_id)

    def upload() -> tuple[int, str]:
        import urllib.error
        import urllib.request

        body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.zip\"\r\n\r\nPK\x05\x06" + \
            b"\0" * 18 + b"\r\n--b--\r\n"
        req = urllib.request.Request(f"{base}/_stcore/upload_file/{session[0]}/f1", data=body, method="PUT",
                                     headers={"Content-Type": "multipart/form-data; boundary=b"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.on("websocket", lambda ws: ws.on("framereceived", frame))
            page.goto(base + "/")
            page.get_by_role("heading", name="Sign in").wait_for()
            assert session, "no session id seen on the websocket"
            status, text = upload()
            assert status == 403 and "sign in before uploading" in text
            page.get_by_label("Password", exact=True).fill("correct horse")
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("button", name="Log out").wait_for()
            page.get_by_role("heading", name="Sign in").wait_for(state="detached")  # the form is gone once signed in
            assert "sign in before uploading" not in upload()[1]  # past the gate (Streamlit's own checks decide)
            page.get_by_role("button", name="Log out").click()
            page.get_by_role("button", name="Log out").wait_for(state="detached")  # the log-out has run on the server
            page.get_by_role("heading", name="Sign in").wait_for()
            status, text = upload()
            assert status == 403 and "sign in before uploading" in text
        finally:
            browser.close()
