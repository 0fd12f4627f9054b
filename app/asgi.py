"""The dashboard as an ASGI app (`streamlit run app/asgi.py`, what `python -m app` starts): Streamlit's own server
with app/gate.py's middleware in front (the Host check and the upload gate), plus the streamed download route
(app/downloads.py). AppTest and a plain `streamlit run app/streamlit_app.py` use the entry page without them (their
pages then offer Streamlit's own download button, which reads the whole file into memory)."""
from __future__ import annotations

import streamlit as st
from starlette.middleware import Middleware

from app.downloads import routes
from app.gate import Gate

app = st.App("streamlit_app.py", routes=routes(), middleware=[Middleware(Gate)])
