"""Datasets: the registered datasets, one version's classes, health, images and jobs; register and remove versions.

The URL (?dataset=NAME&version=N) names what is shown. Everything comes from the registry through worker.api
(`datasets.summary`, `.describe`, `.register`, `.remove`), so the page refuses what `python -m worker dataset` refuses,
with the same messages, and writes nothing on a refusal. Thumbnails are read where the data lives, a few per class,
and kept for a while per version (a version never changes).
"""
from __future__ import annotations

from typing import Any

import streamlit as st

from app import people, ui
from app.auth import current_actor, guarded
from app.charts import counts_figure
from app.connection import REDIS_ERRORS, artifact_store, require_redis
from app.defaults import DATASET_THUMB_CLASSES, DATASET_THUMBS_PER_CLASS, DATASET_THUMBS_SECONDS
from app.register import register_upload, register_url
from app.tables import (
    SOURCE_KIND_LABELS,
    class_counts_frame,
    dataset_jobs_frame,
    datasets_frame,
    fmt_bytes,
    fmt_time,
    versions_frame,
)
from app.upload import UploadError, max_upload_mb
from worker import api
from worker.api import ArtifactError, DatasetError, PermissionDeniedError, datasets

conn = require_redis()
st.title("Datasets")
ui.show_flash()


@st.cache_data(ttl=DATASET_THUMBS_SECONDS, max_entries=32, show_spinner="Reading a few images per class…")
def version_thumbnails(ref: str, content_hash: str) -> dict[str, list[bytes]]:
    """Thumbnails by class of one version, keyed by the version and its hash; DatasetError (not cached: a source
    that was unreachable is tried again on the next view)."""
    return api.dataset_thumbnails(datasets.get_version(conn, ref), store=artifact_store(),
                                  per_class=DATASET_THUMBS_PER_CLASS, max_classes=DATASET_THUMB_CLASSES)


# ------------------------------------------------------------------------------------------------- registering
@guarded
def register() -> None:
    """The Register button's callback: the registry checks the source; its reason is shown, nothing registered."""
    name = (st.session_state.get("datasets:new:name") or "").strip()
    how = st.session_state.get("datasets:new:how")
    store = artifact_store()
    try:
        if how == "upload":
            upload = st.session_state.get("datasets:new:upload")
            if upload is None:
                raise DatasetError("choose a .zip of class folders to upload first")
            done = register_upload(conn, name, upload.getvalue(), store=store, actor=current_actor())
        else:
            done = register_url(conn, name, st.session_state.get("datasets:new:url") or "", store=store,
                                actor=current_actor())
    except (DatasetError, UploadError, ArtifactError, PermissionDeniedError) as err:
        st.session_state["datasets:new:error"] = str(err)
        return
    except REDIS_ERRORS as err:
        st.session_state["datasets:new:error"] = f"Redis is unreachable, nothing was registered: {err}"
        return
    st.session_state["datasets:new:error"] = None
    v = done.version
    ui.flash(f"Registered {v.ref}: {len(v.classes)} classes, {v.num_images:,} images." if done.created else
             f"Unchanged: {v.ref} already holds this content; no new version.")
    st.query_params.update({"dataset": v.name, "version": str(v.version)})


def register_form(current: str | None, expanded: bool) -> None:
    with st.expander("Register a dataset version", expanded=expanded, icon=":material/add_circle:"):
        st.caption("A new name makes version 1; an existing name its next version. The data is checked as "
                   "submission checks it (classes, unreadable images); nothing is registered when it is refused.")
        st.text_input("Dataset name", value=current or "", key="datasets:new:name",
                      help="1-64 lower-case letters, digits, '.', '_' or '-'")
        how = st.radio("Source", ["upload", "url"], key="datasets:new:how", horizontal=True,
                       format_func=lambda h: {"upload": "Upload a .zip", "url": "A URL read in place"}[h])
        if how == "upload":
            st.file_uploader("Dataset .zip", type=["zip"], key="datasets:new:upload",
                             max_upload_size=max_upload_mb(),
                             help=f"one folder per class (or train/val/test folders of class folders); at most "
                                  f"{max_upload_mb()} MB here, bigger data: a URL")
        else:
            st.text_input("URL", key="datasets:new:url", placeholder="s3://bucket/photos",
                          help="s3://, gs://, https://…/data.zip, or file:///… on a shared file system: workers "
                               "read it where it is; only a sample is read now")
        st.button("Register", type="primary", on_click=register, key="datasets:new:register",
                  icon=":material/library_add:")
        if err := st.session_state.get("datasets:new:error"):
            st.error(f"**Nothing was registered.** {err}", icon=":material/block:")


# ---------------------------------------------------------------------------------------------------- removing
@guarded
def remove(ref: str) -> None:
    st.session_state["datasets:confirm"] = None
    try:
        removed = datasets.remove(conn, ref, store=artifact_store(), actor=current_actor())
    except (DatasetError, ArtifactError, PermissionDeniedError) as err:
        ui.flash(f"Not removed: {err}", "error")
        return
    ui.flash(f"Removed {', '.join(v.ref for v in removed)}.")
    st.query_params.pop("version", None)


def remove_buttons(version: Any, jobs: list[Any]) -> None:
    if not people.may_manage(version.owner):  # a viewer, or a submitter looking at someone else's version
        return
    if st.session_state.get("datasets:confirm") != version.ref:
        st.button(f"Remove {version.ref}…", key="datasets:remove", icon=":material/delete:",
                  on_click=lambda: st.session_state.update({"datasets:confirm": version.ref}))
        return
    active = [j for j in jobs if j.state in {str(s) for s in api.ACTIVE_STATES}]
    st.warning(f"Remove **{version.ref}**? Jobs can no longer be submitted on it"
               + (" and its uploaded zip is deleted once no version refers to it" if version.kind == datasets.UPLOAD
                  else "; the data itself, read in place, is not touched")
               + ". This cannot be undone." + (f" {len(active)} active job(s) use it: it will be refused."
                                               if active else ""), icon=":material/warning:")
    c = st.columns([1, 1, 6])
    c[0].button("Yes, remove", type="primary", key="datasets:remove:yes", on_click=remove, args=(version.ref,))
    c[1].button("Keep", key="datasets:remove:no", on_click=lambda: st.session_state.update({"datasets:confirm": None}))


# ------------------------------------------------------------------------------------------------------ a version
def pick(label: str, options: list[Any], key: str, query_key: str, fmt: Any = str) -> Any:
    """A select box mirrored into the URL (?query_key=...); the URL wins when it names another option."""
    wanted = st.query_params.get(query_key)
    by_text = {str(o): o for o in options}
    if wanted in by_text and st.session_state.get(key) != by_text[wanted]:
        st.session_state[key] = by_text[wanted]
    elif st.session_state.get(key) not in options:
        st.session_state[key] = options[0]

    def to_url() -> None:
        st.query_params[query_key] = str(st.session_state[key])

    return st.selectbox(label, options, key=key, format_func=fmt, on_change=to_url)


def draw_version(version: Any, described: dict[str, Any]) -> None:
    report = version.report or {}
    st.subheader(version.ref)
    st.caption(f"{SOURCE_KIND_LABELS.get(version.kind, version.kind)} · `{version.source}` · registered "
               f"{fmt_time(version.created_at)} by {version.owner}")
    st.markdown(f"Content hash `{version.hash}`")
    sampled = report.get("sampled")
    c = st.columns(5)
    c[0].metric("Classes", len(version.classes))
    c[1].metric("Images", f"{version.num_images:,}")
    c[2].metric("Size", fmt_bytes(version.bytes))
    c[3].metric("Corrupt / skipped", len(report.get("skipped_files") or []),
                help="among the sampled images" if sampled else "every image was decoded at registration")
    c[4].metric("Checked", f"sample of {sampled['images']:,}" if sampled else "every image")
    for w in report.get("warnings") or []:
        st.warning(w, icon=":material/warning:")
    if report.get("skipped_files"):
        with st.expander(f"{len(report['skipped_files'])} corrupt or unusable file(s)", expanded=True):
            st.dataframe(report["skipped_files"], hide_index=True, key="datasets:skipped")

    left, right = st.columns([2, 3])
    with left:
        st.markdown("**Images per class**" + (" and split" if version.counts_by_split else ""))
        st.dataframe(class_counts_frame(version.counts, version.counts_by_split), hide_index=True,
                     key="datasets:counts", height="auto" if len(version.counts) <= 12 else 420)
        st.plotly_chart(counts_figure(version.counts), key="datasets:counts_chart")
    with right:
        st.markdown("**A few images per class**")
        try:
            thumbs = version_thumbnails(version.ref, version.hash)
        except DatasetError as err:
            thumbs = {}
            st.info(f"No images shown: {err}", icon=":material/image_not_supported:")
        for name, images in thumbs.items():
            row = st.columns([1, 5])
            row[0].markdown(f"`{name}`  \n{version.counts.get(name, 0):,} images")
            if images:
                row[1].image(images, width=64)
        if len(version.classes) > len(thumbs) and thumbs:
            st.caption(f"… and {len(version.classes) - len(thumbs)} more classes")

    jobs = [datasets.JobUse(**j) for j in described["jobs"]]
    st.markdown(f"**Jobs that trained on it** ({len(jobs)})")
    if jobs:
        st.dataframe(dataset_jobs_frame(jobs), hide_index=True, key="datasets:jobs", column_config={
            "job": st.column_config.LinkColumn("job", display_text=r"job\?job=(.*)"),
            "submitted": st.column_config.DatetimeColumn("submitted", format="YYYY-MM-DD HH:mm:ss"),
        })
    else:
        st.caption(f"None yet: on New job pick \"A registered dataset\", or `--set data.dataset={version.ref}`.")
    st.page_link(ui.PAGE_NEW, label=f"New job on {version.ref}", icon=":material/add_circle:",
                 query_params={"dataset": version.ref})

    prepared = described["prepared"]
    st.markdown("**Prepared forms**")
    if prepared:
        st.dataframe(prepared, hide_index=True, key="datasets:prepared")
    else:
        st.caption("None yet: the first job that needs one prepares it.")
    remove_buttons(version, jobs)


# --------------------------------------------------------------------------------------------------------- page
owner = people.owner_filter("datasets:owner")  # "Mine / Everyone" once users exist (None: everyone's)
names = datasets.list_datasets(conn, owner=owner)
rows = []
for n in names:
    try:
        rows.append(datasets.summary(conn, n))
    except DatasetError:  # removed between the two reads
        continue
current = st.query_params.get("dataset")
if people.may_submit():  # viewers register nothing
    register_form(current if current in names else None, expanded=not rows)
if not rows:
    st.info("No registered datasets yet" + (" of yours (choose Everyone above)" if owner else "")
            + ": register one above, or `python -m worker dataset add NAME SOURCE`.", icon=":material/dataset:")
    st.stop()

st.dataframe(datasets_frame(rows), hide_index=True, key="datasets:list", column_config={
    "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm"),
})
name = pick("Dataset", [r["name"] for r in rows], "datasets:name", "dataset")
try:
    versions = datasets.dataset_versions(conn, name)
except DatasetError as err:
    st.warning(str(err))
    st.stop()
latest = versions[-1].version
number = pick("Version", [v.version for v in reversed(versions)], f"datasets:version:{name}", "version",
              fmt=lambda n: f"{name}:{n}" + (" (latest)" if n == latest else ""))
if st.query_params.get("dataset") != name:
    st.query_params["dataset"] = name
version = next(v for v in versions if v.version == number)
with st.expander(f"All versions of {name} ({len(versions)})", expanded=len(versions) > 1):
    st.dataframe(versions_frame(versions), hide_index=True, key="datasets:versions")
draw_version(version, datasets.describe(conn, version))
