"""The dashboard's entry point: `streamlit run app/streamlit_app.py`, started by `python -m app` (Procfile `web:`).

It builds the navigation over the pages in app/views/ and runs the chosen one. A page that loses Redis halfway
gets the Redis-down banner instead of a traceback. With users registered, a password or OIDC configured, nothing but
the sign-in form is drawn until the session has signed in (app/auth.py); admins also get the Users and Audit pages.
A server listening beyond loopback with no login (a `streamlit run --server.address 0.0.0.0` started by hand, past
`python -m app`'s check), or with single sign-on and no allow-list, draws only the refusal.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run` puts app/ on sys.path, not the repository root
    sys.path.insert(0, str(ROOT))

import streamlit as st

from app.auth import current_actor, require_login, startup_refusal
from app.connection import REDIS_ERRORS, redis_down

st.set_page_config(page_title="Image-classifier training", page_icon=":material/model_training:", layout="wide")

PAGES = [
    st.Page("views/new_job.py", title="New job", icon=":material/add_circle:", url_path="new", default=True),
    st.Page("views/jobs.py", title="Jobs", icon=":material/list:", url_path="jobs"),
    st.Page("views/job.py", title="Job", icon=":material/monitoring:", url_path="job"),
    st.Page("views/compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    st.Page("views/sweeps.py", title="Sweeps", icon=":material/tune:", url_path="sweeps"),
    st.Page("views/datasets.py", title="Datasets", icon=":material/dataset:", url_path="datasets"),
    st.Page("views/models.py", title="Models", icon=":material/deployed_code:", url_path="models"),
    st.Page("views/workers.py", title="Workers", icon=":material/memory:", url_path="workers"),
    st.Page("views/try_it.py", title="Try it", icon=":material/image_search:", url_path="try"),
]
ADMIN_PAGES = [
    st.Page("views/settings.py", title="Settings", icon=":material/settings:", url_path="settings"),
    st.Page("views/users.py", title="Users", icon=":material/group:", url_path="users"),
    st.Page("views/audit.py", title="Audit", icon=":material/history:", url_path="audit"),
]

refusal = startup_refusal(st.get_option("server.address"))
if refusal:
    st.error(refusal, icon=":material/lock:")
    st.stop()
if not require_login():  # users' tokens, DASHBOARD_PASSWORD, secrets, or OIDC (app/auth.py)
    st.stop()
page = st.navigation(PAGES + (ADMIN_PAGES if current_actor().is_admin else []))
try:
    page.run()
except REDIS_ERRORS as err:
    redis_down(str(err))
