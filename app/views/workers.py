"""Workers: the live workers (a worker that stops heart-beating disappears within its TTL) and how to add one."""
from __future__ import annotations

from urllib.parse import urlsplit

import streamlit as st

from app import people
from app.auth import guarded
from app.connection import REDIS_ERRORS, require_redis
from app.defaults import WORKERS_REFRESH_SECONDS
from app.tables import workers_frame
from worker import api
from worker.api import redact, redis_url

conn = require_redis()
st.title("Workers")


def workers_table() -> None:
    try:
        workers = api.list_workers(conn)
    except REDIS_ERRORS as err:
        st.error(f"**Redis is unreachable.** {err}", icon=":material/cloud_off:")
        return
    if not workers:
        st.warning("No worker is running: submitted jobs wait in the queue until one starts (command below).",
                   icon=":material/power_off:")
        return
    gpus = sum(len(w.get("gpus") or []) for w in workers)
    busy = sum(1 for w in workers if w.get("state") == "busy")
    c = st.columns(3)
    c[0].metric("Workers", len(workers))
    c[1].metric("Busy", busy)
    c[2].metric("GPUs", gpus)
    st.dataframe(workers_frame(workers), hide_index=True, column_config={
        "slots": st.column_config.NumberColumn("slots", help="GPUs (or CPU ranks) one job may use on it"),
        "current job": st.column_config.TextColumn("current job"),
    })
    st.caption(f"Refreshes every {WORKERS_REFRESH_SECONDS:g} s.")


st.fragment(run_every=WORKERS_REFRESH_SECONDS)(guarded(workers_table))()

if not people.is_admin():  # how to join a worker to this Redis and store is the operators' business
    st.stop()
st.subheader("Add a worker")
url = redis_url()
host = urlsplit(url).hostname or "127.0.0.1"
artifacts = api.store_url()
st.markdown("On this machine (all its GPUs; a CPU-only machine runs jobs as CPU ranks):")
st.code("python -m worker run", language="bash")
st.markdown("On another machine with a checkout of this repository, pointed at the same Redis and artifact store "
            "(`--gpus` picks the GPUs it may use). Check the machine first: `python -m worker doctor` tests the torch "
            "build against the driver, the GPUs, NCCL/gloo, Redis, the store (and that it is this one) and free disk, "
            "and prints the fix for each problem (exit code 0 when the machine can serve):")
shared = artifacts if "://" in artifacts else "s3://bucket/prefix"
env = f"REDIS_URL='{redact(url)}' ARTIFACTS_DIR='{shared}'"
st.code(f"{env} python -m worker doctor\n{env} python -m worker run --gpus 0,1", language="bash")
notes = ["`***` stands for the Redis password (the embedded server keeps it in `var/redis/password`)."]
if host in ("127.0.0.1", "localhost", "::1"):
    notes.append("This Redis listens on the loopback interface only: workers on other machines need a Redis they "
                 "can reach (set `REDIS_URL` everywhere, e.g. a managed Redis with a password and TLS).")
if "://" not in artifacts:
    notes.append("The artifact store is a local folder: workers on other machines need a shared store "
                 "(`ARTIFACTS_DIR` as an fsspec URL such as `s3://bucket/prefix`).")
for n in notes:
    st.caption(n)
