"""Jobs: every job with its state and progress; filter by state; cancel, retry, clone, delete (with confirmation).

The table redraws itself every JOBS_REFRESH_SECONDS while some job can still change. Actions apply to the jobs in
the "Selected jobs" box, which selecting rows in the table fills.
"""
from __future__ import annotations

import streamlit as st

from app import people, ui
from app.auth import current_actor, guarded
from app.connection import REDIS_ERRORS, artifact_store, require_redis
from app.defaults import JOBS_PAGE_LIMIT, JOBS_REFRESH_SECONDS
from app.tables import any_active, job_label, jobs_frame, state_counts, state_label
from worker import api
from worker.api import (
    ArtifactError,
    InvalidJobStateError,
    NoSuchJobError,
    PermissionDeniedError,
    SubmissionError,
)

STATES = [s.value for s in api.JobState]

conn = require_redis()
if goto := st.session_state.pop("jobs:goto", None):
    st.switch_page(goto[0], query_params=goto[1])

st.title("Jobs")


# ------------------------------------------------------------------------------------------------------ actions
def picked() -> list[str]:
    return list(st.session_state.get("jobs:picked") or [])


def done(message: str, kind: str = "success") -> None:
    ui.flash(message, kind)
    st.session_state["jobs:picked"] = []
    st.session_state["jobs:table_gen"] = st.session_state.get("jobs:table_gen", 0) + 1  # clears the row selection


@guarded
def on_rows_selected() -> None:
    """Rows picked in the table fill the "Selected jobs" box (positions map to the ids drawn last)."""
    table = st.session_state.get(f"jobs:table:{st.session_state.get('jobs:table_gen', 0)}")
    shown = st.session_state.get("jobs:shown_ids") or []
    try:
        rows = list(table["selection"]["rows"])
    except (KeyError, TypeError):
        rows = []
    st.session_state["jobs:picked"] = [shown[r] for r in rows if r < len(shown)]


@guarded
def cancel_picked() -> None:
    msgs = []
    for job in picked():
        try:
            msgs.append(f"{job}: {api.cancel_job(conn, job, wait=0, actor=current_actor())}")
        except (NoSuchJobError, InvalidJobStateError, PermissionDeniedError) as err:
            msgs.append(str(err))
    done("Cancel: " + "; ".join(msgs))


@guarded
def retry_picked() -> None:
    msgs, kind = [], "success"
    for job in picked():
        try:
            msgs.append(f"{job} → new job {api.retry_job(conn, job, store=artifact_store(), actor=current_actor())}")
        except (NoSuchJobError, InvalidJobStateError, SubmissionError, PermissionDeniedError) as err:
            msgs.append(str(err))
            kind = "warning"
    done("Retry: " + "; ".join(msgs), kind)


@guarded
def open_picked(page: str, param: str) -> None:
    jobs = picked()
    if len(jobs) != 1:
        ui.flash("Select exactly one job for this.", "warning")
        return
    st.session_state["jobs:goto"] = (page, {param: jobs[0]})


@guarded
def ask_delete() -> None:
    st.session_state["jobs:confirm_delete"] = picked()


@guarded
def delete_confirmed() -> None:
    jobs = st.session_state.pop("jobs:confirm_delete", [])
    msgs, kind = [], "success"
    for job in jobs:
        try:
            api.delete_job(conn, job, store=artifact_store(), actor=current_actor())
            msgs.append(f"{job} deleted")
        except (NoSuchJobError, InvalidJobStateError, ArtifactError, PermissionDeniedError) as err:
            msgs.append(str(err))
            kind = "warning"
    done("; ".join(msgs), kind)


@guarded
def keep() -> None:
    st.session_state.pop("jobs:confirm_delete", None)


@guarded
def compare_picked() -> None:
    st.session_state["jobs:goto"] = (ui.PAGE_COMPARE, {"jobs": ",".join(picked())})


# -------------------------------------------------------------------------------------------------------- table
COLUMN_CONFIG = {
    "id": st.column_config.TextColumn("job", width="medium", pinned=True),
    "name": st.column_config.TextColumn("name", width="medium"),
    "status": st.column_config.TextColumn("status", width="small"),
    "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
    "epoch": st.column_config.TextColumn("epoch", width="small"),
    "best val acc": st.column_config.NumberColumn("best val acc", format="%.4f"),
    "duration / ETA": st.column_config.TextColumn("duration / ETA"),
    "resources": st.column_config.TextColumn("resources", help="GPUs, or CPU ranks on CPU workers, per node"),
    "worker": st.column_config.TextColumn("worker"),
    "submitted": st.column_config.DatetimeColumn("submitted", format="YYYY-MM-DD HH:mm:ss"),
}


def jobs_table() -> None:
    if goto := st.session_state.pop("jobs:goto", None):  # set by a button of this fragment
        st.switch_page(goto[0], query_params=goto[1])
    ui.show_flash()
    try:
        # the full run already listed the jobs (to decide on refreshing); the fragment's own reruns list them anew
        jobs = st.session_state.pop("jobs:prefetched", None)
        if jobs is None:
            jobs = api.list_jobs(conn, limit=JOBS_PAGE_LIMIT, owner=owner)
    except REDIS_ERRORS as err:
        st.error(f"**Redis is unreachable.** {err}", icon=":material/cloud_off:")
        return
    counts = state_counts(jobs)
    wanted = st.pills("Filter by status", STATES, selection_mode="multi", key="jobs:filter",
                      format_func=lambda s: f"{state_label(s, icon=True)} ({counts.get(s, 0)})")
    shown = [j for j in jobs if not wanted or j.get("state") in wanted]
    ids = [j["id"] for j in shown]
    st.session_state["jobs:shown_ids"] = ids
    if not jobs:
        st.info("No jobs yet.")
        st.page_link(ui.PAGE_NEW, label="Submit one", icon=":material/add_circle:")
        return
    kinds = {w.get("kind") for w in api.list_workers(conn) if w.get("kind")}
    st.dataframe(jobs_frame(shown, kinds), hide_index=True, column_config=COLUMN_CONFIG, on_select=on_rows_selected,
                 selection_mode="multi-row", key=f"jobs:table:{st.session_state.get('jobs:table_gen', 0)}",
                 height=min(36 * (len(shown) + 1) + 3, 560))
    st.caption(f"{len(shown)} of {len(jobs)} job(s)" + (" · refreshing while jobs are active" if any_active(jobs)
                                                           else ""))

    st.session_state["jobs:picked"] = [j for j in picked() if j in ids]
    labels = {j["id"]: job_label(j) for j in shown}
    st.multiselect("Selected jobs", ids, key="jobs:picked", format_func=lambda i: labels.get(i, i),
                   placeholder="select rows in the table, or pick jobs here")
    n = len(picked())
    states = {j["id"]: j.get("state") for j in shown}
    active = sum(1 for i in picked() if states.get(i) in api.ACTIVE_STATES)
    owners = {j["id"]: j.get("owner") for j in shown}
    submitter = people.may_submit()  # viewers get no changing button at all
    mine = all(people.may_manage(owners.get(i)) for i in picked())  # a submitter changes only their own jobs
    not_mine = None if mine else "only their owner or an admin may change others' jobs"
    b = st.columns(6)
    b[0].button("Open", on_click=open_picked, args=(ui.PAGE_JOB, "job"), disabled=n != 1,
                icon=":material/open_in_new:", key="jobs:open")
    if submitter:
        b[1].button("Cancel", on_click=cancel_picked, disabled=active == 0 or not mine, icon=":material/stop_circle:",
                    key="jobs:cancel", help=not_mine or "stop the selected queued, running or recovering jobs")
        b[2].button("Retry", on_click=retry_picked, disabled=n - active == 0 or not mine, icon=":material/replay:",
                    key="jobs:retry", help=not_mine or "submit the selected ended jobs again")
        b[3].button("Clone", on_click=open_picked, args=(ui.PAGE_NEW, "clone"), disabled=n != 1,
                    icon=":material/content_copy:", key="jobs:clone", help="open New job pre-filled with its settings")
    b[4].button("Compare", on_click=compare_picked, disabled=n < 2, icon=":material/compare_arrows:",
                key="jobs:compare")
    if submitter:
        b[5].button("Delete…", on_click=ask_delete, disabled=n == 0 or not mine, icon=":material/delete:",
                    key="jobs:delete", help=not_mine)
    pending = st.session_state.get("jobs:confirm_delete")
    if pending:
        running = [j["id"] for j in jobs if j["id"] in pending and not j.get("final")]
        st.warning(
            f"Delete {len(pending)} job(s) — {', '.join(pending)} — with their artifacts (models, checkpoints, "
            "logs)? This cannot be undone."
            + (f" {len(running)} of them are still active and will be cancelled first." if running else ""),
            icon=":material/delete_forever:")
        c = st.columns([1, 1, 6])
        c[0].button("Yes, delete", type="primary", on_click=delete_confirmed, key="jobs:delete_yes")
        c[1].button("Keep them", on_click=keep, key="jobs:delete_no")


owner = people.owner_filter("jobs:owner")  # "Mine / Everyone" once users exist (None: everyone's)
first = api.list_jobs(conn, limit=JOBS_PAGE_LIMIT, owner=owner)
st.session_state["jobs:prefetched"] = first
st.fragment(run_every=JOBS_REFRESH_SECONDS if any_active(first) else None)(guarded(jobs_table))()
