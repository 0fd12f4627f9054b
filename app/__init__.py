"""The Streamlit dashboard: `streamlit run app/streamlit_app.py`.

Pages (app/views/) draw; the modules here shape data for them without drawing: data (tables and chart series),
charts (plotly figures), forms (presets and the New-job form), upload (dataset zips), predict (ONNX Runtime for
"Try it"). Connections and caches live in app/connection.py, shared widgets in app/ui.py.
"""
