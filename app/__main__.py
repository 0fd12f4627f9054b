"""`python -m app [STREAMLIT OPTION ...]`: start the dashboard (the Procfile's `web:` line), safe by default.

It listens on `DASHBOARD_ADDRESS` (default 127.0.0.1: this machine only) and `PORT` (default 8501). Any other address
exposes it, and then it refuses to start unless a login is configured (`DASHBOARD_PASSWORD`, or a password or an
`[auth]` section in .streamlit/secrets.toml) or `DASHBOARD_ALLOW_OPEN=1` says to run it open; single sign-on without
an allow-list is refused too (app/auth.py `startup_refusal`); the message says how to fix each. Exit code 2 when
refused. Extra arguments go to `streamlit run` as they are.

It serves `app/asgi.py`: the pages behind app/gate.py (requests under a Host name that is not an IP address, localhost
or in `DASHBOARD_HOSTS` are refused; no upload before sign-in), with Streamlit's upload ceiling set to the dashboard's
own cap (`DASHBOARD_MAX_UPLOAD_MB`) so that no request bigger than the documented cap is read.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("--server.address") for a in extra):
        print("error: set the address with DASHBOARD_ADDRESS=..., not --server.address", file=sys.stderr)
        return 2
    os.chdir(ROOT)  # Streamlit reads .streamlit/config.toml and secrets.toml from the working directory
    sys.path.insert(0, str(ROOT))
    from app.auth import startup_refusal
    from app.defaults import ADDRESS, ADDRESS_ENV, PORT, PORT_ENV
    from app.upload import max_upload_mb

    address = os.environ.get(ADDRESS_ENV, "").strip() or ADDRESS
    port = os.environ.get(PORT_ENV, "").strip() or str(PORT)
    refusal = startup_refusal(address)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr, flush=True)
        return 2
    cmd = [sys.executable, "-m", "streamlit", "run", "app/asgi.py", "--server.headless=true",
           f"--server.port={port}", f"--server.address={address}", f"--server.maxUploadSize={max_upload_mb()}",
           *extra]
    print(f"dashboard: http://{address}:{port}" + ("" if address != "0.0.0.0" else " (every interface)"), flush=True)
    os.execv(sys.executable, cmd)  # the same process id: honcho and the tests see the server itself
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
