"""Sweeps: every sweep with its progress; one sweep (?sweep=ID): its best trial (link to its job, downloads), the
objective per trial, a parallel-coordinates plot of parameters vs objective, Optuna's parameter importances and the
trials table (each row links to its job). A running sweep's view redraws itself every SWEEPS_REFRESH_SECONDS.

The sweep goes on without this page: workers drive it (docs/sweeps.md).
"""
from __future__ import annotations

from typing import Any

import streamlit as st

from app import people, ui
from app.auth import current_actor, guarded
from app.charts import importances_figure, objective_figure
from app.connection import require_redis
from app.defaults import SWEEPS_REFRESH_SECONDS
from app.tables import STATE_COLORS, STATE_ICONS, fmt_time, sweeps_frame, trials_frame
from worker import api
from worker.api import NoSuchSweepError, PermissionDeniedError

conn = require_redis()
st.title("Sweeps")
ui.show_flash()


@st.cache_data(ttl=30, max_entries=32, show_spinner=False)
def importances_of(sweep_id: str, complete: int) -> dict[str, float]:
    """Optuna's importances, recomputed when the number of complete trials changes."""
    return api.importances(conn, sweep_id)


def parallel_figure(sweep_id: str) -> Any:
    """Optuna's own parallel-coordinates plot of the sweep's study (None when it has nothing to draw yet)."""
    from optuna.visualization import plot_parallel_coordinate

    try:
        return plot_parallel_coordinate(api.optuna_study(conn, sweep_id))
    except (ValueError, RuntimeError):
        return None


@guarded
def cancel(sweep_id: str) -> None:
    try:
        ui.flash(f"Sweep {sweep_id}: {api.cancel_sweep(conn, sweep_id, actor=current_actor())}")
    except PermissionDeniedError as err:
        ui.flash(str(err), "error")


def badge(state: str) -> None:
    st.badge(state, icon=f":material/{STATE_ICONS.get(state, 'help')}:", color=STATE_COLORS.get(state, "gray"))


def draw_sweep(sweep_id: str) -> None:
    try:
        s = api.sweep_status(conn, sweep_id)
    except NoSuchSweepError as err:
        st.warning(str(err))
        return
    rows = s["trials_table"]
    keys = list(s.get("space") or {})
    head = st.columns([3, 1])
    head[0].subheader(f"{s.get('name')} · `{sweep_id}`")
    with head[1]:
        badge(s["state"])
    c = s["counts"]
    m = st.columns(1 + len(api.SHOWN_TRIAL_COUNTS))
    m[0].metric("Trials ended", f"{s['ended']}/{s['trials']}")
    for col, (k, n) in zip(m[1:], api.shown_counts(c).items()):
        col.metric(k.value.capitalize(), n)
    st.progress(s["progress"])
    st.caption(f"{s['direction']} {s['metric']} · sampler {s['sampler']} · pruner {s['pruner']} · "
               f"parallel {s['parallel']} · created {fmt_time(s.get('created_at'))} by {s.get('owner')}"
               + (f" · ended {fmt_time(s.get('ended_at'))}" if s.get("ended_at") else ""))
    if s.get("error"):
        st.error(s["error"], icon=":material/error:")
    if not s["final"] and people.may_manage(s.get("owner")):
        st.button("Cancel sweep", on_click=cancel, args=(sweep_id,), icon=":material/stop_circle:",
                  key="sweeps:cancel", help="cancels every queued and running trial")

    st.markdown("**Best trial**")
    if s.get("best_trial") is None:
        st.info("No trial has completed yet.")
    else:
        b = st.columns([1, 3])
        b[0].metric(f"Best {s['metric']}", f"{s['best_value']:.4f}", help=f"trial {s['best_trial']}")
        with b[1]:
            params = ", ".join(f"`{k}` = {v:.4g}" if isinstance(v, float) else f"`{k}` = {v}"
                               for k, v in (s.get("best_params") or {}).items())
            st.markdown(f"Trial **{s['best_trial']}**: {params}")
            st.page_link(ui.PAGE_JOB, label=f"Open its job {s['best_job']}", query_params={"job": s["best_job"]},
                         icon=":material/open_in_new:")
        best = api.job_status(conn, s["best_job"])
        ui.draw_downloads(s["best_job"], ui.artifact_names(s["best_job"], best.get("ended_at")), key="sweeps")

    left, right = st.columns(2)
    left.plotly_chart(objective_figure(rows, s["metric"], s["direction"]), key="sweeps:objective")
    with right:
        imp = importances_of(sweep_id, c[api.TrialCount.COMPLETE])
        if imp:
            st.plotly_chart(importances_figure(imp), key="sweeps:importances")
        else:
            st.info("Parameter importances appear once two trials have completed.")
    parallel = parallel_figure(sweep_id) if c[api.TrialCount.COMPLETE] else None
    if parallel is not None:
        parallel.update_layout(height=360, margin={"l": 60, "r": 20, "t": 50, "b": 20})
        st.plotly_chart(parallel, key="sweeps:parallel")

    st.markdown("**Trials**")
    st.dataframe(trials_frame(rows, keys), hide_index=True, key="sweeps:trials", column_config={
        "value": st.column_config.NumberColumn(s["metric"], format="%.4f"),
        "job": st.column_config.LinkColumn("job", display_text=r"job\?job=(.*)"),
    })


owner = people.owner_filter("sweeps:owner")  # "Mine / Everyone" once users exist (None: everyone's)
sweeps = api.list_sweeps(conn, owner=owner)
if not sweeps:
    st.info("No sweeps yet" + (" of yours (choose Everyone above)" if owner else "")
            + ": start one on New job (mode \"Sweep\") or with `python -m worker sweep`.")
    st.page_link(ui.PAGE_NEW, label="New sweep", icon=":material/add_circle:")
    st.stop()
st.dataframe(sweeps_frame(sweeps), hide_index=True, key="sweeps:list", column_config={
    "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
    "best": st.column_config.NumberColumn("best", format="%.4f"),
    "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm:ss"),
}, height=min(36 * (len(sweeps) + 1) + 3, 320))

ids = [s["id"] for s in sweeps]
names = {s["id"]: f"{s['id']} · {s.get('name') or ''}" for s in sweeps}
wanted = st.query_params.get("sweep")
if wanted and wanted not in names:
    try:
        names[wanted] = f"{wanted} · {api.sweep_status(conn, wanted, with_trials=False).get('name') or ''}"
        ids.insert(0, wanted)
    except NoSuchSweepError:
        st.warning(f"No such sweep {wanted!r}.")
        wanted = None
chosen = st.selectbox("Sweep", ids, index=ids.index(wanted) if wanted in ids else 0, key="sweeps:picked",
                      format_func=lambda i: names.get(i, i))
if chosen != st.query_params.get("sweep"):
    st.query_params["sweep"] = chosen
running = any(s["id"] == chosen and s["state"] == api.SweepState.RUNNING.value for s in sweeps)
st.fragment(run_every=SWEEPS_REFRESH_SECONDS if running else None)(guarded(draw_sweep))(chosen)
