"""Small widgets more than one page draws: the job picker, flash messages, cached report reads."""
from __future__ import annotations

import functools
import json
from typing import Any

import redis
import streamlit as st

from app import downloads
from app.connection import artifact_store
from app.defaults import JOB_PICKER_LIMIT
from app.tables import job_label
from core import runfolder as rf
from worker import api
from worker.api import NAMED_ARTIFACTS, ArtifactError, NoSuchJobError

PAGE_NEW = "views/new_job.py"
PAGE_JOBS = "views/jobs.py"
PAGE_JOB = "views/job.py"
PAGE_COMPARE = "views/compare.py"
PAGE_WORKERS = "views/workers.py"
PAGE_TRY = "views/try_it.py"
PAGE_SWEEPS = "views/sweeps.py"
PAGE_DATASETS = "views/datasets.py"
PAGE_MODELS = "views/models.py"


def flash(message: str, kind: str = "success") -> None:
    """Remember a message for the next run (callbacks run before the page draws)."""
    st.session_state.setdefault("ui:flash", []).append((kind, message))


def show_flash() -> None:
    for kind, message in st.session_state.pop("ui:flash", []):
        getattr(st, kind)(message)


def recent_jobs(conn: redis.Redis, states: set[str] | None = None) -> list[dict[str, Any]]:
    return api.list_jobs(conn, states, limit=JOB_PICKER_LIMIT)


def job_picker(conn: redis.Redis, *, key: str, current: str | None, states: set[str] | None = None,
               label: str = "Job", query_key: str = "job") -> str | None:
    """A select box over recent jobs (the current one always offered); the chosen id, or None when there is none.

    The choice is mirrored into the URL (`?job=ID`), so the page can be shared and survives a refresh; a URL that
    names another job than the box remembers wins (the box follows links and st.switch_page).
    """
    jobs = recent_jobs(conn, states)
    ids = [j["id"] for j in jobs]
    labels = {j["id"]: job_label(j) for j in jobs}
    if current and current not in labels:
        try:
            status = api.job_status(conn, current)
            if states is None or status.get("state") in states:
                ids.insert(0, current)
                labels[current] = job_label(status)
        except NoSuchJobError:
            pass
    if not ids:
        return None
    if current in ids and st.session_state.get(key) != current:
        st.session_state[key] = current
    elif st.session_state.get(key) not in ids:
        st.session_state[key] = ids[0]

    def to_url() -> None:
        st.query_params[query_key] = st.session_state[key]

    return st.selectbox(label, ids, format_func=lambda i: labels.get(i, i), key=key, on_change=to_url)


@st.cache_data(ttl=300, max_entries=64, show_spinner=False)
def job_report(job_id: str, version: float | None) -> dict[str, Any] | None:
    """report.json of a job (None when it has none); `version` (the job's end time) keys the cache."""
    try:
        return json.loads(api.read_artifact(job_id, "report", store=artifact_store()))
    except (ArtifactError, NoSuchJobError, ValueError, OSError):
        return None


@st.cache_data(ttl=300, max_entries=512, show_spinner=False)
def artifact_bytes(job_id: str, name: str, version: float | None) -> bytes | None:
    """Bytes of a small artifact (gallery images, samples); None when missing."""
    try:
        return api.read_artifact(job_id, name, store=artifact_store())
    except (ArtifactError, NoSuchJobError, OSError):
        return None


@st.cache_data(ttl=30, max_entries=64, show_spinner=False)
def artifact_names(job_id: str, version: float | None) -> list[str]:
    try:
        return api.artifact_files(job_id, store=artifact_store())
    except (ArtifactError, NoSuchJobError, OSError):
        return []


def read_artifact(job: str, short: str) -> bytes:
    return api.read_artifact(job, short, store=artifact_store())


def draw_downloads(job: str, files: list[str], key: str = "job") -> None:
    """Download buttons for a job's models (disabled for what it did not produce); the Job and Sweeps pages."""
    st.markdown("**Downloads**")
    cols = st.columns(4)
    for col, (short, label) in zip(cols, (("onnx", rf.ONNX), ("int8", rf.INT8_ONNX), ("pt", rf.STATE_DICT),
                                          ("bundle", rf.BUNDLE))):
        if NAMED_ARTIFACTS[short] in files and downloads.streamed():  # a link the server streams (app/downloads.py)
            col.link_button(label, downloads.download_url(job, short), icon=":material/download:",
                            key=f"{key}:download:{short}")
        elif NAMED_ARTIFACTS[short] in files:  # no route (not `python -m app`): Streamlit's button, file in memory
            col.download_button(label, data=functools.partial(read_artifact, job, short), file_name=f"{job}-{label}",
                                mime="application/zip" if label.endswith(".zip") else "application/octet-stream",
                                on_click="ignore", icon=":material/download:", key=f"{key}:download:{short}")
        else:
            col.button(label, disabled=True, key=f"{key}:download:{short}", icon=":material/download:",
                       help="this job did not produce it (export off, or the export failed)")
