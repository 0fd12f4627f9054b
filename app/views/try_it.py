"""Try it: classify images with a finished job's exported model.onnx (ONNX Runtime, the file its download button
serves), preprocessed exactly as its predict.py does. Images: the job's own test samples, or uploads."""
from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from app import predict, ui
from app.connection import artifact_store, require_redis
from app.defaults import IMAGE_UPLOAD_MAX_MB, TOP_K, TRY_MAX_IMAGES, TRY_SAMPLES_DEFAULT
from core import runfolder as rf
from worker import api
from worker.api import ArtifactError

conn = require_redis()
st.title("Try it")

job_id = ui.job_picker(conn, key="try:picker", current=st.query_params.get("job"), states={api.JobState.FINISHED},
                       label="Finished job")
if job_id is None:
    st.info("No finished job yet: when one finishes, its exported model can be tried here.")
    st.stop()
status = api.job_status(conn, job_id)
version = status.get("ended_at")
if rf.exported(rf.ONNX) not in ui.artifact_names(job_id, version):
    st.warning(f"This job has no exported {rf.ONNX} (export was off, or it failed): nothing to run.")
    st.stop()


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def classifier(job: str, version: float | None) -> predict.Classifier:
    return predict.load_classifier(job, store=artifact_store())


try:
    clf = classifier(job_id, version)
except (ArtifactError, ValueError) as err:
    st.error(f"Cannot load this job's model: {err}")
    st.stop()
report = ui.job_report(job_id, version) or {}
samples: list[dict[str, Any]] = report.get("samples") or []
st.caption(f"ONNX Runtime on `{rf.exported(rf.ONNX)}` of job `{job_id}` · input {clf.preprocess.get('color_mode')} "
           f"{'×'.join(str(v) for v in clf.preprocess.get('input_size', []))} · {len(clf.labels)} classes")

SAMPLES, UPLOAD = "Test images of this job", "Upload images"
source = st.segmented_control("Images", [SAMPLES, UPLOAD], default=SAMPLES if samples else UPLOAD, key="try:source",
                              required=True)
images: list[tuple[str, Any, str | None]] = []  # (name, PIL image, true label or None)
raw: list[tuple[str, bytes]] = []  # the same images as bytes, for a deployment
if source == SAMPLES:
    if not samples:
        st.info("This job saved no test samples; upload images instead.")
    by_name = {s["image"]: s for s in samples}
    names = st.multiselect("Test images", list(by_name), default=list(by_name)[:TRY_SAMPLES_DEFAULT],
                           key=f"try:samples:{job_id}",
                           format_func=lambda n: f"{n.rsplit('/', 1)[-1]} (label {by_name[n]['label']})")
    for name in names:
        data = ui.artifact_bytes(job_id, name, version)
        if data is None:
            st.warning(f"{name} is missing from the job's artifacts.")
            continue
        images.append((name, predict.open_image(data, preprocess=clf.preprocess), str(by_name[name]["label"])))
        raw.append((name.rsplit("/", 1)[-1], data))
else:
    uploads = st.file_uploader("Images", type=["png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff"],
                               accept_multiple_files=True, key="try:upload", max_upload_size=IMAGE_UPLOAD_MAX_MB)
    max_pixels = ((status.get("config") or {}).get("data") or {}).get("max_image_pixels")
    if uploads and len(uploads) > TRY_MAX_IMAGES:
        st.warning(f"{len(uploads)} images: the first {TRY_MAX_IMAGES} are classified (at most {TRY_MAX_IMAGES} "
                   "at once).")
    for up in (uploads or [])[:TRY_MAX_IMAGES]:
        try:
            images.append((up.name, predict.open_image(up.getvalue(), max_pixels=max_pixels,
                                                            preprocess=clf.preprocess), None))
            raw.append((up.name, up.getvalue()))
        except predict.ImageRejected as err:
            st.error(f"{up.name}: {err}")

HERE = "In the dashboard"
served = {f"Deployment {d['id']} ({d['ref']})": d["id"] for d in api.deployments.ready_for_job(conn, job_id)}
runner = st.radio("Run the model", [HERE, *served], horizontal=True, key="try:runner",
                  help="a ready deployment of a model version registered from this job answers over HTTP")
if images and runner != HERE:
    try:
        answer = api.deployments.classify(conn, served[runner], raw, TOP_K)
        results = [row["top"] for row in answer]
    except api.ModelError as err:
        st.error(str(err))
        st.stop()
elif images:
    results = predict.top_k(clf, [img for _, img, _ in images], TOP_K)
if images:
    correct = [r[0]["label"] == true for (_, _, true), r in zip(images, results) if true is not None]
    if correct:
        st.caption(f"Top-1 correct on {sum(correct)} of {len(correct)} test image(s).")
    for n, ((name, img, true), top) in enumerate(zip(images, results)):
        left, right = st.columns([1, 3], vertical_alignment="center")
        with left:
            st.image(img, width=128)
            verdict = "" if true is None else (" :green[:material/check:]" if top[0]["label"] == true
                                               else " :red[:material/close:]")
            truth = f" · true label **{true}**{verdict}" if true is not None else ""
            st.caption(f"{name.rsplit('/', 1)[-1]}{truth}")
        with right:
            st.markdown(f"Prediction: **{top[0]['label']}** ({top[0]['prob']:.1%})")
            st.dataframe(pd.DataFrame(top), hide_index=True, key=f"try:top:{n}", column_config={
                "label": st.column_config.TextColumn("label"),
                "prob": st.column_config.ProgressColumn("probability", min_value=0.0, max_value=1.0,
                                                        format="percent"),
            })
