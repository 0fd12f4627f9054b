"""A real S3 server for the tests: moto's `moto_server` (from moto[server]) on 127.0.0.1 and a free port, used through
s3fs as any bucket would be, and stopped when the test ends.

- `private_s3(log_dir)`: a context manager yielding an `S3Server` once the server answers.
- `S3Server.endpoint_url`, `.storage_options` (what `fsspec`/`s3fs` take), `.env` (the same for subprocesses:
  AWS_* variables and the endpoint), `.fs()` (a fresh s3fs filesystem), `.bucket(name)` (creates it, returns
  `s3://name`), `.object_gets(bucket)` (the object keys GET from the server so far: what was downloaded).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from tests.fixtures_redis import free_port, stop

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
"""moto accepts any credentials; these keep botocore from looking for real ones."""

_ANSI = r"(?:\x1b\[[0-9;]*m)*"
_REQUEST_LINE = re.compile(rf'"{_ANSI}(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/[0-9.]+{_ANSI}" (\d+)')
"""A request line of the server's log; werkzeug colours some statuses (a ranged GET's 206) with ANSI escapes."""


@dataclasses.dataclass
class S3Server:
    endpoint_url: str
    log_path: Path
    proc: subprocess.Popen[bytes]

    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs options reaching this server (pass to fsspec.filesystem("s3", **storage_options))."""
        return {"key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                "client_kwargs": {"endpoint_url": self.endpoint_url}}

    @property
    def env(self) -> dict[str, str]:
        """Environment that points botocore (so s3fs in any process) at this server."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL_S3": self.endpoint_url}

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def bucket(self, name: str) -> str:
        """Create bucket `name` (if missing) and return its URL `s3://name`."""
        fs = self.fs()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path with query, status) of every request the server logged so far."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return [(m, p, int(s)) for m, p, s in _REQUEST_LINE.findall(text)]

    def object_gets(self, bucket: str) -> list[str]:
        """Keys of `bucket` whose content was downloaded (GET of an object, not a listing), in request order."""
        out = []
        for method, target, _ in self.requests():
            parts = urlsplit(target)
            path = unquote(parts.path)
            if method != "GET" or not path.startswith(f"/{bucket}/") or "list-type" in parts.query:
                continue
            key = path[len(bucket) + 2:]
            if key:
                out.append(key)
        return out


@contextlib.contextmanager
def private_s3(log_dir: Path, start_timeout: float = 30.0) -> Iterator[S3Server]:
    """Start moto_server on 127.0.0.1 and a free port (log in `log_dir/moto.log`); stop it on exit."""
    import urllib.request

    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "moto.log"
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    env = {**os.environ, **CREDENTIALS, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + start_timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"moto_server did not start: {log_path.read_text()}") from None
                    time.sleep(0.1)
            yield S3Server(endpoint_url=url, log_path=log_path, proc=proc)
        finally:
            stop(proc)


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A fresh S3 server for one test; this process's environment points botocore at it (subprocesses get
    `server.env`)."""
    with private_s3(tmp_path / "s3") as server:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        yield server
