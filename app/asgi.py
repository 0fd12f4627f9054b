"""The dashboard as an ASGI app (`streamlit run app/asgi.py`, what `python -m app` starts): Streamlit's own server
with app/gate.py's middleware in front (the Host check and the upload gate), plus the streamed download route
(app/downloads.py). AppTest and a plain `streamlit run app/streamlit_app.py` use the entry page without them (their
download links then answer 404)."""
from __future__ import annotations

import streamlit as st
from starlette.middleware import Middleware

from app.downloads import ROUTES
from app.gate import Gate

app = st.App("streamlit_app.py", routes=ROUTES, middleware=[Middleware(Gate)])
