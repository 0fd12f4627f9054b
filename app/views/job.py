"""Job: live progress while it runs, results and downloads once it has ended. The URL (?job=ID) names the job.

The live part is a fragment that reruns alone every JOB_REFRESH_SECONDS: it reads only the stream entries after
the last one read, into a series every viewer of the job shares with its figures (app/live.py), so a refresh neither
reloads the page nor loses points, and ten viewers cost the server little more than one. It stops refreshing once
the job is final and the page redraws once with the results.
"""
from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from app import people, ui
from app.auth import current_actor, guarded
from app.charts import confusion_figure
from app.connection import REDIS_ERRORS, artifact_store, require_redis
from app.defaults import CONFUSION_HEATMAP_MAX_CLASSES, GALLERY_MAX_IMAGES, JOB_REFRESH_SECONDS, LIVE_LOG_LINES
from app.live import SharedSeries, shared_series
from app.tables import (
    STATE_COLORS,
    STATE_ICONS,
    LiveSeries,
    data_path_text,
    export_rows,
    fmt_bytes,
    fmt_seconds,
    fmt_time,
    nodes_frame,
    per_class_frame,
    rank_kind,
    resources_text,
)
from core import runfolder as rf
from worker import api
from worker.api import (
    NAMED_ARTIFACTS,
    InvalidJobStateError,
    JobState,
    NoSuchJobError,
    PermissionDeniedError,
    SubmissionError,
)

SERIES_KEPT = 8  # jobs whose chart series a session keeps (the most recently viewed)

conn = require_redis()
if goto := st.session_state.pop("job:goto", None):
    st.switch_page(goto[0], query_params=goto[1])

st.title("Job")
ui.show_flash()
job_id = ui.job_picker(conn, key="job:picker", current=st.query_params.get("job") or st.session_state.get("job:last"))
if job_id is None:
    st.info("No jobs yet.")
    st.page_link(ui.PAGE_NEW, label="Submit one", icon=":material/add_circle:")
    st.stop()
if st.query_params.get("job") != job_id:
    st.query_params["job"] = job_id
st.session_state["job:last"] = job_id
try:
    status = api.job_status(conn, job_id)
except NoSuchJobError as err:
    st.error(str(err))
    st.stop()


def series_for(job: str) -> SharedSeries:
    """This job's chart series, shared with every other viewer of it (app/live.py); the session keeps a reference
    to the SERIES_KEPT most recently viewed under `job:series:<id>`."""
    order: list[str] = st.session_state.setdefault("job:series_order", [])
    if job in order:
        order.remove(job)
    order.append(job)
    while len(order) > SERIES_KEPT:
        st.session_state.pop(f"job:series:{order.pop(0)}", None)
    shared = shared_series(job)
    st.session_state[f"job:series:{job}"] = shared.series
    return shared


# --------------------------------------------------------------------------------------------------- header
@guarded
def cancel(job: str) -> None:
    try:
        state = api.cancel_job(conn, job, wait=0, actor=current_actor())
        ui.flash(f"Cancel requested: job {job} is {state}." if state != JobState.CANCELLED else f"Job {job} cancelled.")
    except (NoSuchJobError, InvalidJobStateError, PermissionDeniedError) as err:
        ui.flash(str(err), "error")


@guarded
def retry(job: str) -> None:
    try:
        new = api.retry_job(conn, job, store=artifact_store(), actor=current_actor())
    except (NoSuchJobError, InvalidJobStateError, SubmissionError, PermissionDeniedError) as err:
        ui.flash(str(err), "error")
        return
    ui.flash(f"Job {job} submitted again as {new}.")
    st.session_state["job:goto"] = (ui.PAGE_JOB, {"job": new})


@guarded
def register_model(job: str) -> None:
    """The Register button: a new version of the named model from this job (worker.api.models.register)."""
    name = (st.session_state.get("job:model:name") or "").strip()
    try:
        version = api.models.register(conn, job, name, store=artifact_store(), actor=current_actor())
        ui.flash(f"Registered [{version.ref}](/models?model={version.name}) from this job.")
    except (api.ModelError, PermissionDeniedError) as err:
        ui.flash(str(err), "error")


@guarded
def clone(job: str) -> None:
    st.session_state["job:goto"] = (ui.PAGE_NEW, {"clone": job})


st.subheader(status.get("name") or job_id)
cfg = status.get("config") or {}
st.caption(
    f"`{job_id}` · {cfg.get('model', {}).get('name', '?')} on {cfg.get('data', {}).get('name', '?')} · "
    + resources_text(status, rank_kind(status, {w.get("kind") for w in api.list_workers(conn) if w.get("kind")}))
    + f" · priority {status.get('priority') or 'default'} · "
    f"submitted {fmt_time(status.get('submitted_at'))} by {status.get('owner') or api.users.OPERATOR}"
    + (f" · retried from {status['retried_from']}" if status.get("retried_from") else "")
)
registered = status.get("dataset") or {}
if registered.get("version"):  # trained on a registered dataset version (worker/datasets: the job's `dataset`)
    st.page_link(ui.PAGE_DATASETS, label=f"Dataset {registered['ref']}", icon=":material/dataset:",
                 query_params={"dataset": registered["name"], "version": str(registered["version"])},
                 help="the exact version this job trained on; retry and clone reuse it")
    st.caption(f"Dataset content hash `{registered.get('hash')}`")
buttons = st.columns([1, 1, 1, 1, 4])
manage = people.may_manage(status.get("owner"))  # a viewer, or another submitter's job: no Cancel or Retry
if manage and not status["final"]:
    buttons[0].button("Cancel", icon=":material/stop_circle:", on_click=cancel, args=(job_id,), key="job:cancel")
elif manage:
    buttons[0].button("Retry", icon=":material/replay:", on_click=retry, args=(job_id,), key="job:retry")
if people.may_submit():
    buttons[1].button("Clone", icon=":material/content_copy:", on_click=clone, args=(job_id,), key="job:clone",
                      help="open New job pre-filled with this job's settings")
buttons[2].page_link(ui.PAGE_COMPARE, label="Compare", icon=":material/compare_arrows:",
                     query_params={"jobs": job_id})
if status["state"] == JobState.FINISHED:
    buttons[3].page_link(ui.PAGE_TRY, label="Try it", icon=":material/image_search:", query_params={"job": job_id})


def tensorboard_command(job: str) -> tuple[str, str]:
    """(the command that opens this job's TensorBoard event files, a note on where they are)."""
    store = artifact_store()
    if store.is_local:
        return f"tensorboard --logdir {store.local_run_dir(job) / rf.TENSORBOARD}", "on the machine of the store"
    uri = store.uri(f"{store.run_key(job)}/{rf.TENSORBOARD}")
    return (f"tensorboard --logdir {uri}", "TensorBoard reads s3:// and gs:// URLs with TensorFlow's file systems "
            "installed; otherwise copy that folder first")


with st.expander("Metrics in TensorBoard", icon=":material/insights:"):
    command, where = tensorboard_command(job_id)
    st.code(command, language="bash")
    st.caption(f"The run folder's `{rf.TENSORBOARD}/` event files ({where}); they grow while the job runs. MLflow: set "
               "MLFLOW_TRACKING_URI on the workers (README \"MLflow and TensorBoard\").")


# ------------------------------------------------------------------------------------------------ live part
def draw_status(s: dict[str, Any], series: LiveSeries) -> None:
    epochs = s.get("epochs")
    st.badge(s["state"], icon=f":material/{STATE_ICONS.get(s['state'], 'help')}:",
             color=STATE_COLORS.get(s["state"], "gray"))
    c = st.columns(5)
    c[0].metric("State", s["state"])
    c[1].metric("Epoch", f"{s.get('epoch') or 0} / {epochs or '?'}")
    c[2].metric("Best val accuracy", f"{s['best_val_acc']:.4f}" if s.get("best_val_acc") is not None else "–")
    c[3].metric("Elapsed" if not s["final"] else "Duration", fmt_seconds(s.get("duration")) or "–")
    c[4].metric("ETA", fmt_seconds(s.get("eta")) or ("done" if s["state"] == JobState.FINISHED else "–"))
    phase = s.get("phase") or series.phase
    st.progress(min(1.0, max(0.0, s["progress"])),
                text=f"{s['progress']:.0%}" + (f" · {phase}" if phase and not s["final"] else ""))
    if s.get("waiting"):
        st.info(f"Waiting: {s['waiting']}", icon=":material/hourglass_top:")
    if s.get("nodes"):
        st.markdown("**Nodes**")
        st.dataframe(nodes_frame(s["nodes"]), hide_index=True, column_config={
            "ranks": st.column_config.TextColumn("ranks", help="global DDP ranks on that node (rank 0 streams)"),
        })
    if s["state"] == JobState.QUEUED and not s.get("waiting"):
        st.info("Queued: it starts when a worker with enough GPUs is free.", icon=":material/hourglass_top:")
    if s["state"] == JobState.RECOVERING:
        st.warning(
            f"**Recovering.** Its worker {s.get('previous_worker') or ''} was lost"
            + (f" ({s['recovery_reason']})" if s.get("recovery_reason") else "")
            + "; the job resumes from its last checkpoint on the next free worker "
            + f"(recovery {s.get('recoveries') or 1}).",
            icon=":material/sync_problem:")
    if s["state"] == JobState.RUNNING and s.get("worker_alive") is False:
        st.warning(f"Worker {s.get('worker')} stopped sending heartbeats; the job will be recovered on another "
                   "worker if it does not come back.", icon=":material/heart_broken:")
    if s["state"] == JobState.RUNNING and s.get("cancel_requested"):
        st.info("Cancelling: its worker is stopping the training processes.", icon=":material/stop_circle:")
    if s["state"] == JobState.CANCELLED:
        st.info(f"Cancelled. {s.get('error') or ''}", icon=":material/stop_circle:")
    if s["state"] == JobState.FAILED:
        st.error(f"**Failed:** {s.get('error') or 'no error message'}", icon=":material/error:")


def draw_charts(shared: SharedSeries) -> None:
    figs, series = shared.figures(), shared.series
    names = list(figs)
    for row in range(0, len(names), 2):
        cols = st.columns(2)
        for col, name in zip(cols, names[row:row + 2]):
            with col:
                st.plotly_chart(figs[name], key=f"job:chart:{name}", config={"displaylogo": False})
    st.caption(f"Chart points: {series.points} (from {series.entries} stream entries, last id {series.last_id})",
               help="Each refresh reads only the stream entries after the last id drawn.")


def draw_log(s: dict[str, Any], job: str) -> None:
    lines = [e["line"] for e in api.logs_tail(conn, job, LIVE_LOG_LINES)]
    if not lines and s.get("log_tail"):
        lines = list(s["log_tail"])
    with st.expander(f"Log (last {LIVE_LOG_LINES} lines)", expanded=s["state"] != JobState.FINISHED):
        st.code("\n".join(lines) or "(no log lines yet)", language=None, height=300 if len(lines) > 12 else "content")


def live(job: str) -> None:
    """The refreshing part of a job that has not ended: status, charts from the new stream entries, log tail."""
    try:
        s = api.job_status(conn, job)
    except NoSuchJobError:
        st.warning(f"Job {job} was deleted.")
        return
    except REDIS_ERRORS as err:
        st.error(f"**Redis is unreachable.** {err}\n\nRetrying every {JOB_REFRESH_SECONDS:g} s.",
                 icon=":material/cloud_off:")
        return
    shared = series_for(job)
    try:
        shared.refresh(conn)
    except REDIS_ERRORS:
        pass  # drawn from what we have; the next refresh continues from the same id
    draw_status(s, shared.series)
    draw_charts(shared)
    draw_log(s, job)
    if s["final"]:
        st.rerun()  # once: the whole page redraws as an ended job (results first), without this fragment


def ended(job: str, s: dict[str, Any]) -> None:
    """A job that has ended: its status, results and downloads first, then its curves and log (no refreshing)."""
    shared = series_for(job)
    shared.refresh(conn)
    draw_status(s, shared.series)
    if s["state"] == JobState.FINISHED:
        draw_results(job, s)
    else:
        draw_log(s, job)
        files = ui.artifact_names(job, s.get("ended_at"))
        if any(NAMED_ARTIFACTS[k] in files for k in ("onnx", "pt")):
            ui.draw_downloads(job, files)
    st.subheader("Training curves")
    draw_charts(shared)
    if s["state"] == JobState.FINISHED:
        draw_log(s, job)


# --------------------------------------------------------------------------------------------------- results
def draw_results(job: str, s: dict[str, Any]) -> None:
    report = ui.job_report(job, s.get("ended_at"))
    files = ui.artifact_names(job, s.get("ended_at"))
    st.subheader("Results")
    if report is None:
        st.warning("This job has no report.json (it did not reach the test phase).")
        ui.draw_downloads(job, files)
        return
    test = report.get("test") or {}
    c = st.columns(5)
    c[0].metric("Test accuracy", f"{test.get('accuracy', 0):.4f}")
    c[1].metric("Test macro-F1", f"{test.get('macro_f1', 0):.4f}")
    c[2].metric("Top-5 accuracy", f"{test['top5_accuracy']:.4f}" if test.get("top5_accuracy") is not None else "–")
    c[3].metric("Test loss", f"{test['loss']:.4f}" if test.get("loss") is not None else "–")
    c[4].metric("Test images", f"{test.get('n', 0):,}")
    ui.draw_downloads(job, files)
    if s.get("state") == JobState.FINISHED and NAMED_ARTIFACTS["onnx"] in files and people.may_submit():
        with st.popover("Register model", icon=":material/deployed_code:"):
            st.text_input("Model name", key="job:model:name", value=(s.get("name") or "model").split(" ")[0].lower(),
                          help="a new version of this model (lower-case letters, digits, . _ -)")
            st.button("Register", key="job:model:register", on_click=register_model, args=(job,), type="primary")
    if path := data_path_text(report):
        st.caption(f"Data path: {path}")
    classes = (report.get("data") or {}).get("classes") or []
    tabs = st.tabs(["Confusion matrix", "Per class", "Misclassified", "Export"])
    with tabs[0]:
        matrix, top = test.get("confusion_matrix"), test.get("top_confusions")
        if matrix and (len(matrix) <= CONFUSION_HEATMAP_MAX_CLASSES or top is None):  # (older reports: no top)
            st.plotly_chart(confusion_figure(matrix, classes), key="job:confusion")
        elif top:  # a heatmap of hundreds of classes says nothing and weighs megabytes
            st.caption(f"{len(classes):,} classes: the commonest confusions (test) instead of the matrix")
            st.dataframe(pd.DataFrame(top), hide_index=True, key="job:top-confusions")
        elif top == [] and test.get("n"):
            st.info("No test image was misclassified.")
    with tabs[1]:
        st.dataframe(per_class_frame(report), hide_index=True, column_config={
            "precision": st.column_config.NumberColumn(format="%.3f"),
            "recall": st.column_config.NumberColumn(format="%.3f"),
            "f1": st.column_config.NumberColumn(format="%.3f"),
        })
    with tabs[2]:
        wrong = (report.get("misclassified") or [])[:GALLERY_MAX_IMAGES]
        if not wrong:
            st.info("No misclassified test images.")
        per_row = 8
        for start in range(0, len(wrong), per_row):
            cols = st.columns(per_row)
            for col, item in zip(cols, wrong[start:start + per_row]):
                data = ui.artifact_bytes(job, item["image"], s.get("ended_at"))
                if data:
                    col.image(data, width=84)
                col.caption(f"true **{item['true']}** → pred **{item['pred']}** ({item.get('confidence', 0):.0%})")
    with tabs[3]:
        draw_export(report)


def draw_export(report: dict[str, Any]) -> None:
    export = report.get("export")
    if not export:
        st.info("Not exported (export was off for this job).")
        return
    onnx, int8 = export.get("onnx") or {}, export.get("int8") or {}
    if export.get("error") or not export.get("ok", True):
        st.error(f"Export failed: {export.get('error') or 'see the log'}")
    deploy = export.get("deploy")
    if deploy:
        st.success(f"**Deploy `{deploy['file']}`.** {deploy['reason']}. The bundle's predict.py uses it when no model "
                   "is named.", icon=":material/rocket_launch:")
    c = st.columns(4)
    if onnx:
        c[0].metric("ONNX parity: max |Δlogit|", f"{onnx.get('max_abs_diff', float('nan')):.2e}")
        c[1].metric("ONNX top-1 agreement", f"{onnx.get('top1_agreement', 0):.2%}")
    if int8:
        gain = round(-100 * (int8.get("accuracy_drop") or 0.0), 2) + 0.0  # + 0.0: no "-0.00"
        c[2].metric("INT8 test accuracy", f"{int8.get('accuracy', 0):.4f}", delta=f"{gain:+.2f} pts vs FP32",
                    delta_color="normal" if gain else "off", delta_arrow="auto" if gain else "off")
        ratio = (onnx.get("bytes") or 0) / max(int8.get("bytes") or 1, 1)
        c[3].metric("INT8 size", fmt_bytes(int8.get("bytes")),
                    delta=f"{ratio:.1f}× smaller than FP32 ({fmt_bytes(onnx.get('bytes'))})" if ratio else None,
                    delta_color="off", delta_arrow="off")
    st.dataframe(export_rows(report), hide_index=True)


if status["final"]:
    ended(job_id, status)
else:
    st.fragment(run_every=JOB_REFRESH_SECONDS)(guarded(live))(job_id)
