"""New job: start from a preset (or a cloned job), edit it in a form, check the dataset's health, submit.
With the "Sweep" toggle on, the form is the trials' base config, and the Sweep section picks the fields that vary, their ranges
or choices, the number of trials and how many run at once; "Start sweep" opens the Sweeps page (?sweep=ID).

Validation is core's, through worker.api.submit_job (the one submission function): its messages are placed under
the fields they name, and nothing is enqueued until they are all fixed. After a submit the Job page opens (?job=ID).
"""
from __future__ import annotations

from typing import Any

import streamlit as st

from app import forms, people, ui
from app.auth import current_actor, guarded
from app.charts import counts_figure
from app.connection import REDIS_ERRORS, artifact_store, require_redis, try_redis
from app.register import register_saved
from app.tables import SOURCE_KIND_LABELS, fmt_bytes
from app.upload import CheckedUpload, UploadError, check_upload, max_upload_mb
from worker import api
from worker.api import ArtifactError, DatasetError, NoSuchJobError, PermissionDeniedError, SubmissionError, datasets

conn = require_redis()
if submitted := st.session_state.pop("new:submitted", None):
    st.switch_page(ui.PAGE_JOB, query_params={"job": submitted})

if sweep_made := st.session_state.pop("new:sweep_created", None):
    st.switch_page(ui.PAGE_SWEEPS, query_params={"sweep": sweep_made})

st.title("New job")
ui.show_flash()
if not people.may_submit():
    st.info(f"You are signed in as {current_actor().name} ({current_actor().role.value}): viewers see every job, "
            "sweep, dataset and model but submit nothing. An admin can give you the submitter role.",
            icon=":material/visibility:")
    st.stop()
sweep_mode = st.toggle("Sweep", key="new:sweep",
                       help="many jobs (trials) that vary the fields you pick, searched by Optuna")

# ------------------------------------------------------------------------------------- where the config starts
clone_id = st.query_params.get("clone")
clone: dict[str, Any] | None = None
if clone_id:
    try:
        clone = api.job_status(conn, clone_id)
    except NoSuchJobError as err:
        st.warning(f"Cannot clone: {err}")
CLONE = "__clone__"
options = ([CLONE] if clone else []) + forms.preset_names()
choice = st.selectbox(
    "Start from", options, key=f"new:preset:{clone_id or ''}",
    format_func=lambda o: f"a copy of job {clone_id} ({clone.get('name')})" if o == CLONE and clone else f"preset {o}",
    help="YAML presets from configs/; every value below can be changed",
)
if choice == CLONE and clone:
    raw: dict[str, Any] = clone.get("config") or {}
    init = forms.initial_values(raw, gpus=int(clone.get("gpus") or 1), nodes=int(clone.get("num_nodes") or 1),
                                priority=clone.get("priority") or "default")
    init["name"] = f"{clone.get('name') or ''} (copy)".strip()
else:
    raw = forms.load_preset(choice)
    init = forms.initial_values(raw)
prefix = f"new:{clone_id}:" if choice == CLONE else f"new:{choice}:"
errors: dict[str, str] = st.session_state.get("new:errors", {}) if st.session_state.get("new:errors_for") == prefix \
    else {}


# ------------------------------------------------------------------------------------------------------ dataset
def checked_upload(upload: Any, color_mode: str) -> tuple[CheckedUpload | None, str | None]:
    """Save and inspect an upload once per (file, colour mode); kept in the session for the submit."""
    key = (upload.file_id, color_mode)
    memo = st.session_state.get("new:upload")
    if not memo or memo["key"] != key:
        try:
            with st.spinner("Checking the dataset…"):
                result = check_upload(upload.getvalue(), color_mode=color_mode, display_name=upload.name)
            memo = {"key": key, "result": result, "error": None}
        except UploadError as err:
            memo = {"key": key, "result": None, "error": str(err)}
        st.session_state["new:upload"] = memo
    return memo["result"], memo["error"]


def show_health(checked: CheckedUpload, file_name: str) -> None:
    r = checked.report
    st.success(f"**{file_name}** ({fmt_bytes(checked.bytes)}): {len(r['classes'])} classes, "
               f"{r['num_images']:,} images — ready to train.", icon=":material/check_circle:")
    c = st.columns(4)
    c[0].metric("Classes", len(r["classes"]))
    c[1].metric("Images", f"{r['num_images']:,}")
    c[2].metric("Skipped / corrupt", len(r["skipped_files"]))
    c[3].metric("Imbalance (largest / smallest)", f"{r['imbalance_ratio']:g}×")
    for w in r["warnings"]:
        st.warning(w, icon=":material/warning:")
    sizes = r["image_sizes"]
    common = ", ".join(f"{w}×{h} ({n})" for (w, h), n in sizes["common"])
    st.caption(f"Image sizes: from {sizes['min'][0]}×{sizes['min'][1]} to {sizes['max'][0]}×{sizes['max'][1]} px; "
               f"most common: {common}" + (f"; pre-split folders: {', '.join(r['splits_found'])}"
                                             if r.get("splits_found") else ""))
    left, right = st.columns([2, 3])
    with left:
        st.plotly_chart(counts_figure(r["counts"]), key="new:counts")
    with right:
        st.markdown("**A few images per class**")
        for name, thumbs in list(r["thumbnails"].items())[:20]:
            row = st.columns([1, 5])
            row[0].markdown(f"`{name}`  \n{r['counts'].get(name, 0)} images")
            if thumbs:
                row[1].image(thumbs, width=56)
        if len(r["thumbnails"]) > 20:
            st.caption(f"… and {len(r['thumbnails']) - 20} more classes")
    if r["skipped_files"]:
        with st.expander(f"{len(r['skipped_files'])} file(s) will be skipped"):
            st.dataframe(r["skipped_files"], hide_index=True)


def registered_picker(wanted: str | None) -> str | None:
    """A registered dataset and version (the latest unless `wanted`, NAME or NAME:VERSION, names another);
    NAME:VERSION, or None when nothing is registered."""
    names = datasets.list_datasets(conn)
    if not names:
        st.info("No registered datasets yet: upload a .zip (it is registered), or register one on the Datasets "
                "page.", icon=":material/dataset:")
        st.page_link(ui.PAGE_DATASETS, label="Datasets", icon=":material/dataset:")
        return None
    try:
        want = datasets.DatasetRef.parse(wanted) if wanted else None
    except DatasetError:
        want = None
    cols = st.columns([2, 1, 3])
    name = cols[0].selectbox("Registered dataset", names, key=prefix + "registered:name",
                             index=names.index(want.name) if want and want.name in names else len(names) - 1)
    versions = [v.version for v in reversed(datasets.dataset_versions(conn, name))]
    asked = want.version if want and want.name == name else None
    if asked is not None and asked not in versions:
        st.warning(f"{want} no longer exists (removed); versions of {name}: {', '.join(map(str, versions))}.")
    number = cols[1].selectbox("Version", versions, key=prefix + f"registered:version:{name}",
                               index=versions.index(asked) if asked in versions else 0,
                               format_func=lambda n: f"{n} (latest)" if n == versions[0] else str(n))
    version = datasets.get_version(conn, datasets.DatasetRef(name, number))
    with cols[2]:
        st.caption(f"**{version.ref}**: {len(version.classes)} classes, {version.num_images:,} images, "
                   f"{fmt_bytes(version.bytes)}, {SOURCE_KIND_LABELS.get(version.kind, version.kind)}; hash "
                   f"`{version.hash[:12]}`")
        st.page_link(ui.PAGE_DATASETS, label=f"{version.ref} on the Datasets page", icon=":material/dataset:",
                     query_params={"dataset": name, "version": str(number)})
    return version.ref


st.subheader("Dataset")
linked = st.query_params.get("dataset")  # "New job on NAME:VERSION" from the Datasets page
choices = list(forms.BUILTIN_DATASETS) + [forms.REGISTERED, forms.UPLOAD]
start = forms.REGISTERED if linked and choice != CLONE else forms.default_dataset(raw)
if start == forms.CLONED:
    choices.insert(0, forms.CLONED)
dataset = st.radio("Dataset", choices, index=choices.index(start) if start in choices else 0,
                   format_func=lambda d: forms.DATASET_LABELS[d], key=prefix + "dataset", label_visibility="collapsed")
upload_result: CheckedUpload | None = None
registered_ref: str | None = None
if dataset == forms.REGISTERED:
    registered_ref = registered_picker(linked if choice != CLONE else (raw.get("data") or {}).get("dataset"))
if dataset == forms.UPLOAD:
    upload = st.file_uploader(
        "Dataset .zip", type=["zip"], key=prefix + "upload", max_upload_size=max_upload_mb(),
        help=f"A .zip holding one folder per class (or train/val/test folders of class folders); at most "
             f"{max_upload_mb()} MB",
    )
    if upload is None:
        st.info("Upload a .zip of class folders: its health is checked here before anything is submitted.")
    else:
        mode = st.session_state.get(prefix + "data.color_mode", init.get("data.color_mode") or "RGB")
        upload_result, upload_error = checked_upload(upload, mode)
        if upload_error:
            st.error(f"**This dataset cannot be used:** {upload_error}", icon=":material/block:")
        elif upload_result is not None:
            show_health(upload_result, upload.name)
            if st.session_state.get(prefix + "upload:name_for") != upload.file_id \
                    or prefix + "upload:name" not in st.session_state:  # a new file: its own name
                st.session_state[prefix + "upload:name_for"] = upload.file_id
                st.session_state[prefix + "upload:name"] = api.suggest_dataset_name(upload.name)
            st.text_input("Register as dataset", key=prefix + "upload:name",
                          help="submitting registers the upload as the next version of this dataset (the same "
                               "content again: its existing version); the job trains on that version, and a retry "
                               "or clone reuses it without uploading again")
            if mode == "L":
                st.caption("Colour mode is L (greyscale), as in this preset: images train, and are shown here, in "
                           "greyscale. Choose RGB under \"Model and data\" for colour images.")
elif dataset == forms.CLONED:
    st.caption(f"The cloned job's uploaded dataset: `{(raw.get('data') or {}).get('path')}`")
elif dataset.startswith("cifar"):
    st.caption("CIFAR trains on a worker that has the files in data/ (or set data.download on a machine with "
               "internet); a worker without them fails the job with that reason.")
if errors.get("dataset"):
    st.error(errors["dataset"], icon=":material/error:")


# --------------------------------------------------------------------------------------------------------- form
def widget(field: forms.Field, value: Any, key: str) -> None:
    if field.kind == "select":
        opts = list(field.options)
        if value not in opts and value is not None:
            opts.append(value)  # a cloned job's value stays selectable
        st.selectbox(field.label, opts, index=opts.index(value) if value in opts else 0, key=key, help=field.help)
    elif field.kind == "bool":
        st.checkbox(field.label, value=bool(value), key=key, help=field.help)
    elif field.kind == "int":
        st.number_input(field.label, value=None if value is None else int(value), step=1, key=key, help=field.help,
                        min_value=None if field.min_value is None else int(field.min_value),
                        max_value=None if field.max_value is None else int(field.max_value))
    elif field.kind == "float":
        st.number_input(field.label, value=float(value or 0.0), min_value=field.min_value, step=field.step,
                        format=field.fmt, key=key, help=field.help)
    else:
        st.text_input(field.label, value=value or "", key=key, help=field.help)
    if field.key in errors:
        st.error(errors[field.key], icon=":material/error:")


def register_upload(prefix: str, conn_now: Any, cfg: dict[str, Any], checked: CheckedUpload) -> None:
    """Register the checked upload under the name given (DatasetError: nothing registered) and point the config at
    the version: the job trains on `data.dataset: NAME:VERSION`, so a retry or clone never uploads it again."""
    name = (st.session_state.get(prefix + "upload:name") or "").strip()
    try:
        done = register_saved(conn_now, name, checked.path, store=artifact_store(), actor=current_actor())
    except ArtifactError as err:
        raise DatasetError(str(err)) from None
    cfg["data"]["dataset"] = done.version.ref


def dataset_missing(dataset: str, checked: CheckedUpload | None, registered: str | None) -> str | None:
    """Why the dataset choice cannot be submitted yet (None: it can)."""
    if dataset == forms.UPLOAD and checked is None:
        memo = st.session_state.get("new:upload") or {}
        return f"dataset: {memo.get('error') or 'upload a .zip of class folders first'}"
    if dataset == forms.REGISTERED and not registered:
        return "dataset: pick a registered dataset (none is registered yet: upload a .zip, or use the Datasets page)"
    return None


@guarded
def submit(prefix: str, raw: dict[str, Any], dataset: str, checked: CheckedUpload | None,
           registered: str | None) -> None:
    """The form's callback: submit_job validates everything before it writes; its message lands on the fields.
    An upload is registered only once the config, GPUs and nodes passed (check_request), so a refused form
    registers nothing."""
    st.session_state["new:errors_for"] = prefix
    values = {f.key: st.session_state.get(prefix + f.key) for f in forms.fields()}
    cfg = forms.build_config(raw, values, dataset, registered)
    if missing := dataset_missing(dataset, checked, registered):
        st.session_state["new:errors"] = {"dataset": missing}
        return
    conn_now, why = try_redis()
    if conn_now is None:
        st.session_state["new:errors"] = {"": f"Redis is unreachable, nothing was submitted: {why}"}
        return
    request = {"connection": conn_now, "gpus": int(values["gpus"] or 0), "nodes": int(values["nodes"] or 0),
               "priority": values["priority"], "name": (values["name"] or "").strip() or None}
    try:
        if dataset == forms.UPLOAD and checked is not None:
            cfg["data"]["dataset"] = (st.session_state.get(prefix + "upload:name") or "").strip() or "dataset"
            api.check_request(cfg, actor=current_actor(), **request)  # role and limits too: nothing registered
            register_upload(prefix, conn_now, cfg, checked)
        job_id = api.submit_job(cfg, store=artifact_store(), actor=current_actor(), **request).job_id
    except DatasetError as err:
        st.session_state["new:errors"] = {"dataset": f"dataset: {err}"}
        return
    except PermissionDeniedError as err:  # the role, or a per-user limit (jobs, GPUs, priority high)
        st.session_state["new:errors"] = {"": str(err)}
        return
    except SubmissionError as err:
        st.session_state["new:errors"] = forms.errors_by_field(err.errors)
        return
    except REDIS_ERRORS as err:
        st.session_state["new:errors"] = {"": f"Redis is unreachable, nothing was submitted: {err}"}
        return
    st.session_state["new:errors"] = {}
    st.session_state["new:submitted"] = job_id
    ui.flash(f"Job {job_id} submitted.")


# ----------------------------------------------------------------------------------------------------- sweep mode
def sweep_widgets(prefix: str, init: dict[str, Any]) -> None:
    """What a sweep varies and how (drawn outside the form, so picking a field shows its range at once)."""
    st.subheader("Sweep")
    st.caption("Every trial is an ordinary job: the form below is its base config, and each trial changes the "
               "fields picked here. Every range end and choice is checked like a job's config before anything starts.")
    fields_ = {f.key: f for f in forms.sweepable()}
    chosen = st.multiselect("Fields to vary", list(fields_), key=prefix + "sweep:vary",
                            format_func=lambda k: f"{fields_[k].label} ({k})",
                            placeholder="pick the fields the trials try different values of")
    for key in chosen:
        f, value = fields_[key], init.get(key)
        cols = st.columns([2, 2, 2, 1])
        cols[0].markdown(f"**{f.label}**  \n`{key}`")
        if f.kind in ("select", "bool"):
            options = list(f.options) if f.kind == "select" else [True, False]
            cols[1].multiselect("Choices", options, default=options if f.kind == "bool" else [value]
                                if value in options else [], key=prefix + f"sweep:{key}:choices")
        elif f.kind == "int":
            base = int(value or 1)
            cols[1].number_input("Low", value=max(1, base // 2), step=1, key=prefix + f"sweep:{key}:low")
            cols[2].number_input("High", value=base * 2, step=1, key=prefix + f"sweep:{key}:high")
        else:
            base = float(value or 0.1)
            cols[1].number_input("Low", value=base / 10, format="%g", key=prefix + f"sweep:{key}:low")
            cols[2].number_input("High", value=base * 10, format="%g", key=prefix + f"sweep:{key}:high")
            cols[3].checkbox("log", value=key == "optim.lr", key=prefix + f"sweep:{key}:log")
    c = st.columns(6)
    c[0].number_input("Trials", min_value=1, value=8, step=1, key=prefix + "sweep:trials")
    c[1].number_input("Parallel", min_value=1, value=2, step=1, key=prefix + "sweep:parallel",
                      help="most trials queued or running at once")
    c[2].selectbox("Metric", api.EPOCH_METRICS, key=prefix + "sweep:metric", help="an epoch metric to optimise")
    c[3].selectbox("Direction", ["auto", "maximize", "minimize"], key=prefix + "sweep:direction",
                   help="auto: minimize losses and seconds, maximize the rest")
    c[4].selectbox("Sampler", api.SAMPLERS, key=prefix + "sweep:sampler")
    c[5].selectbox("Pruner", api.PRUNERS, key=prefix + "sweep:pruner",
                   help="stops trials whose epoch metric falls behind early")
    if err := st.session_state.get("new:sweep_error") if st.session_state.get("new:errors_for") == prefix else None:
        st.error(f"**Nothing was started.** {err}", icon=":material/block:")


def sweep_space(prefix: str) -> dict[str, Any]:
    fields_ = {f.key: f for f in forms.sweepable()}
    space = {}
    for key in st.session_state.get(prefix + "sweep:vary") or []:
        g = lambda name: st.session_state.get(prefix + f"sweep:{key}:{name}")  # noqa: E731
        space[key] = forms.space_entry(fields_[key], g("low"), g("high"), bool(g("log")), g("choices"))
    return space


@guarded
def start_sweep(prefix: str, raw: dict[str, Any], dataset: str, checked: CheckedUpload | None,
                registered: str | None) -> None:
    """The form's callback in Sweep mode: create_sweep validates the space and the config before it writes."""
    st.session_state["new:errors_for"] = prefix
    st.session_state["new:errors"] = {}
    st.session_state["new:sweep_error"] = None
    values = {f.key: st.session_state.get(prefix + f.key) for f in forms.fields()}
    cfg = forms.build_config(raw, values, dataset, registered)
    if missing := dataset_missing(dataset, checked, registered):
        st.session_state["new:errors"] = {"dataset": missing}
        return
    space = sweep_space(prefix)
    if not space:
        st.session_state["new:sweep_error"] = "Pick at least one field to vary."
        return
    if int(values.get("nodes") or 1) > 1:
        st.session_state["new:sweep_error"] = "nodes: a sweep's trials run on one node each; set Nodes to 1."
        return
    conn_now, why = try_redis()
    if conn_now is None:
        st.session_state["new:sweep_error"] = f"Redis is unreachable: {why}"
        return
    g = lambda name: st.session_state.get(prefix + f"sweep:{name}")  # noqa: E731
    try:
        if dataset == forms.UPLOAD and checked is not None:
            register_upload(prefix, conn_now, cfg, checked)
        sweep_id = api.create_sweep(
            cfg, space, connection=conn_now, trials=int(g("trials")), parallel=int(g("parallel")),
            metric=g("metric"), direction=None if g("direction") == "auto" else g("direction"),
            sampler=g("sampler"), pruner=g("pruner"), name=(values["name"] or "").strip() or None,
            gpus=int(values["gpus"] or 0), priority=values["priority"], store=artifact_store(), actor=current_actor(),
        )
    except (SubmissionError, DatasetError, PermissionDeniedError) as err:
        st.session_state["new:sweep_error"] = str(err)
        return
    except REDIS_ERRORS as err:
        st.session_state["new:sweep_error"] = f"Redis is unreachable: {err}"
        return
    st.session_state["new:sweep_created"] = sweep_id
    ui.flash(f"Sweep {sweep_id} started.")


if sweep_mode:
    sweep_widgets(prefix, init)

SECTIONS = {
    "Model and data": ["model.name", "model.pretrained", "model.freeze", "data.image_size", "data.color_mode",
                       "data.augment"],
    "Training": ["train.epochs", "train.batch_size", "optim.name", "optim.lr", "optim.weight_decay", "sched.name",
                 "train.amp", "train.label_smoothing", "train.feature_cache", "data.feature_views"],
    "Resources and export": ["gpus", "nodes", "priority", "name", "export.enabled", "export.int8"],
}
by_key = {f.key: f for f in forms.fields()}
with st.form(prefix + "form", border=True):
    columns = st.columns(len(SECTIONS), gap="large")
    for col, (title, keys) in zip(columns, SECTIONS.items()):
        with col:
            st.markdown(f"**{title}**")
            for k in keys:
                if forms.shown(k, init):
                    widget(by_key[k], init.get(k), prefix + k)
    if errors:
        st.error("**Nothing was submitted.**  \n" + "  \n".join(errors.values()), icon=":material/block:")
    if sweep_mode:
        st.form_submit_button("Start sweep", type="primary", on_click=start_sweep,
                              args=(prefix, raw, dataset, upload_result, registered_ref), icon=":material/tune:")
    else:
        st.form_submit_button("Submit job", type="primary", on_click=submit,
                              args=(prefix, raw, dataset, upload_result, registered_ref),
                              icon=":material/rocket_launch:")
