"""Webhooks (README "Notifications"): a real HTTP receiver started by the test, a real worker delivering, real jobs.

A job that finishes on the worker is announced, signed; a hook that fails twice is retried until it answers; a
hook that hangs delays nobody's job; each delivery attempt is in the hook's log; bad hooks are refused.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_app import seed_finished_job, submit_digits
from tests.fixtures_runs import digits_run_exported
from tests.fixtures_worker import run_cli, wait_for
from worker import api

FAST = ["train.epochs=1", "export.enabled=false", "data.image_size=8"]


class Receiver:
    """Records every POST; `/flaky` answers 500 to its first two, `/slow` answers after 20 s."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.flaky_calls = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/slow":
                    time.sleep(20)
                status = 200
                if self.path == "/flaky":
                    receiver.flaky_calls += 1
                    status = 500 if receiver.flaky_calls <= 2 else 200
                receiver.got.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                     "status": status})
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.got if r["path"] == path and r["status"] == 200]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


def add(args: list[str], env: dict[str, str]) -> str:
    res = run_cli(["worker", "notify", "add", *args], env)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()[-1]


@pytest.mark.slow  # 40-57 s on 2 idle cores; the default suite stays near its 20-minute aim
def test_hooks_hear_of_jobs_and_models(redis_conn: Any, job_env: dict[str, str], spawn: Any, receiver: Receiver,
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    model_job = seed_finished_job(redis_conn, digits_run_exported(tmp_path_factory)[0])  # before a worker could take it
    signed = add([receiver.url + "/jobs", "--secret", "s3cret", "--events", "job.finished,job.failed"], job_env)
    flaky = add([receiver.url + "/flaky", "--events", "model.registered"], job_env)
    add([receiver.url + "/slow", "--events", "job.finished"], job_env)
    worker = spawn.python(["worker", "run", "--cpu", "--slots", "1", "--no-prewarm"], job_env, name="worker")

    job_id = submit_digits(redis_conn, FAST, name="announced")
    wait_for(lambda: api.job_status(redis_conn, job_id)["state"] == "finished", 240, "the job to finish")
    finished_at = time.monotonic()
    wait_for(lambda: receiver.events("/jobs"), 60, "the job.finished delivery",
             explain=lambda: spawn.output(worker)[-3000:])
    (event,) = receiver.events("/jobs")
    assert event["event"] == "job.finished" and event["id"] == job_id and event["name"] == "announced"
    assert event["state"] == "finished" and "val_acc" in event["metrics"] and job_id in event["url"]
    raw = next(r for r in receiver.got if r["path"] == "/jobs")
    expected = "sha256=" + hmac.new(b"s3cret", raw["body"], hashlib.sha256).hexdigest()
    assert raw["headers"]["X-Trainer-Signature"] == expected
    assert time.monotonic() - finished_at < 30  # the hanging hook held up neither the job nor this delivery

    assert run_cli(["worker", "model", "register", model_job, "--name", "digits"], job_env).returncode == 0
    wait_for(lambda: receiver.events("/flaky"), 60, "model.registered, after two failed tries")
    (registered,) = receiver.events("/flaky")
    assert registered["event"] == "model.registered" and registered["model"] == "digits"
    log = json.loads(run_cli(["worker", "notify", "log", flaky, "--json"], job_env).stdout)
    assert [(e["attempt"], e["ok"], e["status"]) for e in reversed(log)] == [(1, False, 500), (2, False, 500),
                                                                            (3, True, 200)]
    listed = json.loads(run_cli(["worker", "notify", "list", "--json"], job_env).stdout)
    assert {h["id"]: h["last"]["ok"] for h in listed if h["last"]}[signed] is True
    assert all("secret" not in h for h in listed)


def test_bad_hooks_are_refused(redis_conn: Any, job_env: dict[str, str]) -> None:
    for args, message in ((["ftp://x/y"], "give an http:// or https:// URL"),
                          (["http://127.0.0.1:1/x", "--events", "job.exploded"], "unknown event(s) job.exploded")):
        res = run_cli(["worker", "notify", "add", *args], job_env)
        assert res.returncode == 2 and message in res.stderr, res.stderr
    res = run_cli(["worker", "notify", "rm", "nope"], job_env)
    assert res.returncode == 2 and "no hook 'nope'" in res.stderr
    assert json.loads(run_cli(["worker", "notify", "list", "--json"], job_env).stdout) == []


def test_no_hook_no_stream(redis_conn: Any, job_env: dict[str, str], tmp_path: Path) -> None:
    """Without hooks nothing accumulates in Redis for nobody."""
    from worker import keys, notify

    notify.emit(redis_conn, "job.finished", {"id": "x"})
    assert not redis_conn.exists(keys.notify_events())
