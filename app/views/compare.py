"""Compare: overlay the per-epoch curves of several runs; list the settings that differ and the final metrics.
The chosen runs are kept in the URL (?jobs=ID,ID) so a comparison can be shared."""
from __future__ import annotations

from typing import Any

import streamlit as st

from app import ui
from app.charts import compare_figures
from app.connection import require_redis
from app.tables import differing_params, final_metrics, job_label, metrics_frame
from worker import api
from worker.api import NoSuchJobError

conn = require_redis()
st.title("Compare runs")


@st.cache_data(ttl=10, max_entries=64, show_spinner=False)
def epochs_of(job_id: str, version: float | None) -> list[dict[str, Any]]:
    """Epoch events of a job; `version` (its last update) keys the cache so a running job stays current."""
    return api.epoch_events(conn, job_id)


jobs = ui.recent_jobs(conn)
labels = {j["id"]: job_label(j) for j in jobs}
wanted = [i for i in (st.query_params.get("jobs") or "").split(",") if i]
for i in wanted:
    if i not in labels:
        try:
            labels[i] = job_label(api.job_status(conn, i))
        except NoSuchJobError:
            st.warning(f"No such job {i!r}; left out.")
wanted = [i for i in wanted if i in labels]
if wanted and st.session_state.get("cmp:jobs") != wanted:
    st.session_state["cmp:jobs"] = wanted
elif "cmp:jobs" in st.session_state:
    st.session_state["cmp:jobs"] = [i for i in st.session_state["cmp:jobs"] if i in labels]


def to_url() -> None:
    st.query_params["jobs"] = ",".join(st.session_state["cmp:jobs"])


picked = st.multiselect("Runs", list(labels), key="cmp:jobs", format_func=lambda i: labels.get(i, i),
                        on_change=to_url, placeholder="pick two or more jobs")
if not picked:
    st.info("Pick runs to compare (finished ones have the most to show).")
    st.stop()

statuses: dict[str, dict[str, Any]] = {}
for i in picked:
    try:
        statuses[i] = api.job_status(conn, i)
    except NoSuchJobError:
        st.warning(f"Job {i} no longer exists.")
short = {i: f"{i[-6:]} {(s.get('name') or '')[:24]}" for i, s in statuses.items()}
runs = {short[i]: epochs_of(i, s.get("updated_at")) for i, s in statuses.items()}
figs = compare_figures(runs)
left, right = st.columns(2)
left.plotly_chart(figs["loss"], key="cmp:loss")
right.plotly_chart(figs["accuracy"], key="cmp:accuracy")

st.subheader("Final metrics")
rows = {short[i]: final_metrics(s, ui.job_report(i, s.get("ended_at")) if s.get("state") == api.JobState.FINISHED
                                 else None)
        for i, s in statuses.items()}
st.dataframe(metrics_frame(rows))

st.subheader("Settings that differ")
configs = {short[i]: {**(s.get("config") or {}), "job": {"gpus": s.get("gpus"), "priority": s.get("priority")}}
           for i, s in statuses.items()}
diff = differing_params(configs)
if len(statuses) < 2:
    st.caption("Pick a second run to see what differs.")
elif diff.empty:
    st.info("These runs have identical settings.")
else:
    st.dataframe(diff)
