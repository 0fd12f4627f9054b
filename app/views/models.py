"""Models: the registered models, one model's versions side by side, its aliases (moved with a button) and its
deployments (deploy, undeploy). The URL (?model=NAME) names the model shown. Everything goes through worker.api
(`models`, `deployments`), so the page refuses what `python -m worker model|deploy` refuses, with the same messages.
"""
from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from app import people, ui
from app.auth import current_actor, guarded
from app.connection import require_redis
from app.tables import fmt_bytes, fmt_time
from worker.api import MAX_GPUS_PER_JOB, ModelError, PermissionDeniedError, deployments, models

conn = require_redis()
st.title("Models")
ui.show_flash()


@guarded
def move_alias(name: str) -> None:
    alias = (st.session_state.get("models:alias:name") or "").strip()
    version = st.session_state.get("models:alias:version")
    try:
        before = models.set_alias(conn, name, alias, int(version), actor=current_actor())
        ui.flash(f"{name}@{alias} → {version}" + (f" (was {before})" if before not in (None, version) else ""))
    except (ModelError, PermissionDeniedError) as err:
        ui.flash(str(err), "error")


@guarded
def deploy(name: str) -> None:
    target = st.session_state.get("models:deploy:ref") or name
    try:
        dep, token = deployments.create(conn, target,
                                        replicas=int(st.session_state.get("models:deploy:replicas") or 1),
                                        gpus=int(st.session_state.get("models:deploy:gpus") or 0),
                                        actor=current_actor())
        st.session_state["models:token"] = (dep.id, token)
        ui.flash(f"deployment {dep.id} of {target} is starting on the workers")
    except (ModelError, PermissionDeniedError) as err:
        ui.flash(str(err), "error")


@guarded
def undeploy(dep_id: str) -> None:
    try:
        deployments.stop(conn, dep_id, actor=current_actor())
        ui.flash(f"deployment {dep_id} stopped")
    except (ModelError, PermissionDeniedError) as err:
        ui.flash(str(err), "error")


def versions_frame(versions: list[Any], aliases: dict[str, int]) -> pd.DataFrame:
    rows = []
    for v in versions:
        rows.append({
            "version": v.version, "aliases": ", ".join(sorted(a for a, n in aliases.items() if n == v.version)),
            "accuracy": v.metrics.get("accuracy"), "macro F1": v.metrics.get("macro_f1"),
            "latency (ms, batch 1)": v.metrics.get("latency_ms_batch1"), "serves": v.deploy,
            "size": fmt_bytes(v.files.get(v.deploy, 0)), "dataset": v.dataset or "",
            "job": f"/job?job={v.job_id}", "owner": v.owner, "created": fmt_time(v.created_at)})
    return pd.DataFrame(rows)


owner = people.owner_filter("models:owner")  # "Mine / Everyone" once users exist (None: everyone's)
names = models.list_models(conn, owner=owner)
if not names:
    st.info("No model is registered yet" + (" by you (choose Everyone above)" if owner else "") + ". Register a "
            "finished job's export from its Job page, or `python -m worker model register JOB --name NAME`.")
    st.stop()
st.dataframe(pd.DataFrame([{**{k: s[k] for k in ("name", "latest")}, "versions": len(s["versions"]),
                            "aliases": ", ".join(f"{a}→{v}" for a, v in sorted(s["aliases"].items())),
                            "accuracy": s["metrics"].get("accuracy"), "owner": ", ".join(s.get("owners") or [])}
                           for s in (models.summary(conn, n) for n in names)]),
             hide_index=True, key="models:list")
name = st.query_params.get("model") if st.query_params.get("model") in names else names[0]
name = st.selectbox("Model", names, index=names.index(name), key="models:pick")
st.query_params["model"] = name
versions = models.model_versions(conn, name)
aliases = models.aliases(conn, name)

st.subheader(f"{name}: versions")
st.dataframe(versions_frame(versions, aliases), hide_index=True, key="models:versions", column_config={
    "accuracy": st.column_config.NumberColumn(format="%.4f"),
    "macro F1": st.column_config.NumberColumn(format="%.4f"),
    "latency (ms, batch 1)": st.column_config.NumberColumn(format="%.2f"),
    "job": st.column_config.LinkColumn("job", display_text=r"job\?job=(.*)")})

left, right = st.columns(2)
with left:
    st.markdown("**Aliases**")
    st.markdown("  \n".join(f"`{a}` → version {v}" for a, v in sorted(aliases.items())) or "None yet.")
    if people.may_submit():  # viewers move and deploy nothing
        with st.form("models:alias"):
            st.text_input("Alias", value="production", key="models:alias:name")
            st.selectbox("Version", [v.version for v in reversed(versions)], key="models:alias:version")
            st.form_submit_button("Point the alias at this version", on_click=move_alias, args=(name,))
if people.may_submit():
    with right:
        st.markdown("**Deploy**")
        with st.form("models:deploy"):
            refs = [name, *(f"{name}@{a}" for a in sorted(aliases)),
                    *(f"{name}:{v.version}" for v in reversed(versions))]
            st.selectbox("What to serve", refs, key="models:deploy:ref",
                         help="NAME: the latest version now; NAME@ALIAS: follows the alias as it moves")
            st.number_input("Replicas", min_value=1, max_value=16, value=1, key="models:deploy:replicas")
            st.number_input("GPUs per replica", min_value=0, max_value=MAX_GPUS_PER_JOB, value=0,
                            key="models:deploy:gpus",
                            help="0: CPU. Otherwise hosted only by a worker with that many GPUs free of its training "
                                 "job")
            st.form_submit_button("Deploy", on_click=deploy, args=(name,), type="primary")

token = st.session_state.pop("models:token", None)
if token:
    st.success(f"Bearer token of {token[0]} (shown once): `{token[1]}`")

st.subheader("Deployments")
mine = [d for d in deployments.listing(conn, owner=owner) if d["ref"].split("@")[0].split(":")[0] == name]
if not mine:
    st.caption("None. Deploy a version above, or `python -m worker deploy MODEL_REF`.")
for d in mine:
    cols = st.columns([2, 2, 1, 4, 1])
    cols[0].markdown(f"`{d['id']}`  \n{d.get('owner') or ''}")
    cols[1].markdown(d["ref"])
    cols[2].markdown(d["state"])
    cols[3].markdown(" · ".join(f"{h.get('url') or '-'} on {h['worker']}" for h in d["replica_hosts"]) or "–")
    if d["waiting"]:
        cols[3].caption(f"Waiting: {d['waiting']}")
    if d["state"] != deployments.STOPPED and people.may_manage(d.get("owner")):
        cols[4].button("Undeploy", key=f"models:undeploy:{d['id']}", on_click=undeploy, args=(d["id"],))
