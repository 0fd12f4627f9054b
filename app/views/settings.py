"""Settings (admins only: a hook sees every job's events): the notification webhooks (README "Notifications"), each with its events and its recent deliveries; a
form adds one (URL, events, optional signing secret) and a button removes one. Everything goes through worker.api
(`notify`), so the page refuses what `python -m worker notify add` refuses, with the same messages, saving nothing.
"""
from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from app import ui
from app.auth import current_actor, guarded
from app.connection import REDIS_ERRORS, require_redis
from app.defaults import HOOK_LOG_SHOWN, SETTINGS_REFRESH_SECONDS
from app.tables import fmt_time
from worker.api import HookError, PermissionDeniedError, notify

conn = require_redis()
st.title("Settings")
ui.show_flash()


@guarded
def add_hook() -> None:
    url = (st.session_state.get("settings:hook:url") or "").strip()
    events = list(st.session_state.get("settings:hook:events") or [])
    secret = (st.session_state.get("settings:hook:secret") or "").strip() or None
    try:
        hook = notify.add_hook(conn, url, events, secret, actor=current_actor())
    except (HookError, PermissionDeniedError) as err:
        ui.flash(str(err), "error")
        return
    for key in ("settings:hook:url", "settings:hook:secret"):
        st.session_state[key] = ""
    ui.flash(f"Webhook {hook.id} added: {hook.url}" + (" (Slack format)" if hook.slack else ""))


@guarded
def remove_hook(hook_id: str) -> None:
    try:
        notify.remove_hook(conn, hook_id, actor=current_actor())
        ui.flash(f"Webhook {hook_id} removed")
    except (HookError, PermissionDeniedError) as err:
        ui.flash(str(err), "error")


def log_frame(entries: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{"time": fmt_time(e["at"]), "event": e["event"], "about": e.get("id") or "",
                          "try": e["attempt"], "result": "ok" if e["ok"] else "failed",
                          "status": "" if e.get("status") is None else str(e["status"]), "error": e.get("error") or ""}
                         for e in entries])


def hooks_box() -> None:
    """The hooks and their delivery logs (redrawn every SETTINGS_REFRESH_SECONDS: deliveries arrive on their own)."""
    try:
        hooks = notify.list_hooks(conn)
    except REDIS_ERRORS as err:
        st.error(f"**Redis is unreachable.** {err}", icon=":material/cloud_off:")
        return
    if not hooks:
        st.caption("No webhook yet: add one below, or `python -m worker notify add URL`.")
    for hook in hooks:
        with st.container(border=True, key=f"settings:hook:{hook.id}"):
            left, right = st.columns([6, 1])
            left.markdown(f"`{hook.id}` **{hook.url}**" + (" · signed" if hook.secret else "")
                          + (" · Slack format" if hook.slack else ""))
            left.caption("Events: " + ", ".join(hook.events) + f" · added {fmt_time(hook.created_at)}")
            right.button("Remove", key=f"settings:hook:rm:{hook.id}", on_click=remove_hook, args=(hook.id,))
            entries = notify.delivery_log(conn, hook.id, HOOK_LOG_SHOWN)
            if entries:
                st.dataframe(log_frame(entries), hide_index=True, key=f"settings:hook:log:{hook.id}")
            else:
                st.caption("Nothing delivered yet.")


st.subheader("Notifications")
st.caption("Webhooks are told when jobs end, sweeps finish, model versions are registered, aliases move and "
           "deployments fail: a JSON POST (Slack's format for hooks.slack.com URLs), signed with HMAC-SHA256 when a "
           "secret is set, retried with backoff. The workers deliver them.")
st.fragment(run_every=SETTINGS_REFRESH_SECONDS)(guarded(hooks_box))()

with st.form("settings:hook:add"):
    st.markdown("**Add a webhook**")
    st.text_input("URL", key="settings:hook:url", placeholder="https://example.org/hook")
    st.multiselect("Events", list(notify.EVENTS), default=list(notify.EVENTS), key="settings:hook:events")
    st.text_input("Secret (optional)", key="settings:hook:secret", type="password",
                  help="Each body is signed: X-Trainer-Signature: sha256=HMAC-SHA256(secret, body)")
    st.form_submit_button("Add webhook", on_click=add_hook, type="primary")
