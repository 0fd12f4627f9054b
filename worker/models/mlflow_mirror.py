"""The model registry mirrored into MLflow's, so MLflow users see the same versions and aliases.

When the job's run folder holds mlflow.json (the job tracked to MLflow) or MLFLOW_TRACKING_URI is set, `register`
logs the version's ONNX file (the one it serves) as an MLflow ONNX model into the job's MLflow run (or a new run in
experiment `REGISTRY_EXPERIMENT` when the job had none) and registers it under the same name in MLflow's registry;
`model alias` sets or deletes the same alias there. MLflow numbers its versions itself, so a version's `mlflow` record
(`MlflowRecord`) keeps MLflow's number and the tracking URI, and aliases are mirrored onto that number.

MLflow is a mirror, never a condition: an unreachable or refusing server prints one warning line and the version is
registered with `mlflow: null` (an alias moves here all the same).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from core import runfolder as runfiles
from core.tracking import MLFLOW_HTTP_DEFAULTS
from worker.artifacts import ArtifactStore
from worker.errors import ArtifactError

REGISTRY_EXPERIMENT = "model-registry"
"""MLflow experiment of the runs made for versions whose job had no MLflow run of its own."""


@dataclasses.dataclass(frozen=True)
class MlflowTarget:
    """Where a job's version goes in MLflow: the tracking server, and the job's run when it tracked one."""

    tracking_uri: str
    run_id: str | None = None
    experiment_id: str | None = None


@dataclasses.dataclass(frozen=True)
class MlflowRecord:
    """A mirrored version, as kept in `ModelVersion.mlflow`."""

    name: str
    version: int
    """MLflow's own version number (it differs from ours when MLflow already had versions of this name)."""
    uri: str
    """`models:/NAME/VERSION`, what `mlflow models serve -m` and `mlflow.pyfunc.load_model` take."""
    tracking_uri: str
    run_id: str

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MlflowRecord | None:
        if not data:
            return None
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})


def _warn(message: str) -> None:
    print(f"warning: mlflow: {message}", file=sys.stderr, flush=True)


def _describe(err: BaseException) -> str:
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {text}"


def target_for(store: ArtifactStore, job_id: str) -> MlflowTarget | None:
    """The job's MLflow run (its mlflow.json), else MLFLOW_TRACKING_URI with no run, else None (no mirror)."""
    saved: dict[str, Any] = {}
    try:
        if runfiles.MLFLOW_RUN in store.list_files(job_id):
            saved = json.loads(store.read_bytes(job_id, runfiles.MLFLOW_RUN))
    except (ArtifactError, OSError, ValueError):
        saved = {}
    if saved.get("tracking_uri") and saved.get("run_id"):
        return MlflowTarget(saved["tracking_uri"], saved["run_id"], saved.get("experiment_id"))
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return MlflowTarget(env) if env else None


def _client(tracking_uri: str) -> Any:
    for key, value in MLFLOW_HTTP_DEFAULTS.items():  # fail fast: no minutes of MLflow's own retries
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def mirror_version(version: Any, store: ArtifactStore, target: MlflowTarget) -> MlflowRecord | None:
    """Log `version`'s served ONNX file into MLflow and register it under the version's name; None (one warning line)
    when MLflow cannot be reached or refuses."""
    try:
        import mlflow
        import mlflow.onnx
        import onnx

        client = _client(target.tracking_uri)
        run_id, experiment_id, own_run = target.run_id, target.experiment_id, False
        if run_id is None:
            exp = client.get_experiment_by_name(REGISTRY_EXPERIMENT)
            experiment_id = exp.experiment_id if exp is not None else client.create_experiment(REGISTRY_EXPERIMENT)
            run = client.create_run(experiment_id, run_name=f"register {version.ref}",
                                    tags={"job_id": version.job_id, "model": version.ref})
            run_id, own_run = run.info.run_id, True
        elif experiment_id is None:
            experiment_id = client.get_run(run_id).info.experiment_id
        mlflow.set_tracking_uri(target.tracking_uri)  # log_model reads the process-wide URI and experiment
        mlflow.set_experiment(experiment_id=experiment_id)
        model = onnx.load_from_string(store.read_key(version.key(version.deploy)))
        info = mlflow.onnx.log_model(model, name=f"{version.name}-v{version.version}", run_id=run_id,
                                     registered_model_name=version.name, save_as_external_data=False)
        if own_run:
            client.set_terminated(run_id, status="FINISHED")
        number = int(info.registered_model_version)
        return MlflowRecord(version.name, number, f"models:/{version.name}/{number}", target.tracking_uri, run_id)
    except Exception as err:  # noqa: BLE001 - a mirror never fails the registration
        _warn(f"{version.ref} registered here but not in MLflow at {target.tracking_uri} ({_describe(err)})")
        return None


def mirror_alias(record: MlflowRecord, alias: str) -> bool:
    """Point MLflow's `alias` of the model at the mirrored version; False (one warning line) when MLflow fails."""
    try:
        _client(record.tracking_uri).set_registered_model_alias(record.name, alias, str(record.version))
        return True
    except Exception as err:  # noqa: BLE001 - the alias moved here; MLflow catches up on the next move
        _warn(f"alias {record.name}@{alias} not set in MLflow at {record.tracking_uri} ({_describe(err)})")
        return False


def delete_alias(record: MlflowRecord, alias: str) -> bool:
    try:
        _client(record.tracking_uri).delete_registered_model_alias(record.name, alias)
        return True
    except Exception as err:  # noqa: BLE001 - as mirror_alias
        _warn(f"alias {record.name}@{alias} not deleted in MLflow at {record.tracking_uri} ({_describe(err)})")
        return False
