"""Audit (admins only): who submitted, cancelled, deleted, registered, deployed, changed a user or a setting, signed in
or failed to; when, and from where. Newest first, filtered by user and action; the download holds every entry of the
chosen user (or everyone) as JSON lines, what `python -m worker audit --json` prints (worker/audit.py).
"""
from __future__ import annotations

import io
import json

import pandas as pd
import streamlit as st

from app.auth import current_actor, guarded
from app.connection import require_redis
from app.defaults import AUDIT_PAGE_LIMIT
from app.tables import fmt_time
from worker.api import PermissionDeniedError, audit, users

conn = require_redis()
st.title("Audit")
try:
    current_actor().require(users.Action.ADMIN, "read the audit log")
except PermissionDeniedError as err:
    st.error(str(err), icon=":material/block:")
    st.stop()

ACTIONS = [a.value for a in audit.AuditAction]
EVERYONE = "(everyone)"

names = [EVERYONE, *sorted({users.OPERATOR, *(u.name for u in users.list_users(conn))})]
c = st.columns([1, 3])
who = c[0].selectbox("User", names, key="audit:user", accept_new_options=True,
                     help="a registered user, or type any name the log holds (an e-mail address, anonymous, system)")
actions = c[1].multiselect("Actions", ACTIONS, key="audit:actions", placeholder="every action")
actor = None if who in (None, EVERYONE) else who
shown = audit.newest(conn, limit=AUDIT_PAGE_LIMIT, actor=actor, actions=set(actions) or None)


@guarded
def export() -> bytes:
    """Every entry of the chosen user as JSON lines, read when the button is clicked (not on every run)."""
    out = io.StringIO()
    audit.export_jsonl(conn, out, actor=actor)
    return out.getvalue().encode()


st.download_button("Download as JSON lines", data=lambda: export() or b"", file_name="audit.jsonl",
                   mime="application/jsonl", on_click="ignore", icon=":material/download:", key="audit:download")
if not shown:
    st.info("No entries" + (" for this choice." if actor or actions else " yet."))
    st.stop()
st.dataframe(pd.DataFrame([{
    "when": fmt_time(e.ts), "user": e.actor, "role": e.role, "action": e.action, "target": e.target,
    "from": e.source + (f" {e.address}" if e.address else ""),
    "detail": json.dumps(e.detail, default=str) if e.detail else ""} for e in shown]),
    hide_index=True, key="audit:table")
st.caption(f"{len(shown)} entr{'y' if len(shown) == 1 else 'ies'}, newest first"
           + (f" (the newest {AUDIT_PAGE_LIMIT}: the download has them all)" if len(shown) >= AUDIT_PAGE_LIMIT else ""))
