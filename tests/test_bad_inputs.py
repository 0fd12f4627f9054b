"""The bad-input corpus (tests/corpus/make_cases.py) through both front doors, against the real test Redis and a real
worker process:

- the CLI: `python -m worker submit CONFIG --set ...` (its `main()` in this process for every case; a real
  subprocess for a few, to prove the interpreter-level exit code) must exit 2 with the case's message;
- the dashboard: `app.upload.check_upload` (the New-job page's upload validation) for dataset cases, then the shared
  `worker.api.submit_job` with the dashboard's arguments (`allow_local_paths=False`) for every case.

For a refused case: the message matches, nothing is enqueued (our index, every RQ queue, no RQ job record), the
worker and Redis are still alive, and no file appears anywhere but the content-addressed extraction cache (the
artifact store, var/, the repository's var/ and /tmp are snapshotted before and after). An accepted case (class names
with spaces and non-ASCII letters, a few broken files among good ones) is enqueued with the report's classes and
warnings, and then deleted.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.corpus.make_cases import CASES, OK_BATCH, Case, make_all
from tests.fixtures_worker import run_cli, wait_for
from worker import api, keys
from worker.errors import SubmissionError

CACHE_ENTRY = re.compile(r"^[0-9a-f]{16}$")
SAVED_UPLOAD = re.compile(r"^[0-9a-f]{64}\.zip$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("corpus"))


def enqueued(conn: Any) -> dict[str, int]:
    """Everything "nothing was enqueued" must keep at zero."""
    return {
        "jobs index": conn.zcard(keys.jobs_index()),
        "job hashes": sum(1 for _ in conn.scan_iter(match="trainer:job:*")),
        "rq queues": sum(conn.llen(k) for k in conn.scan_iter(match="rq:queue:*")),
        "rq jobs": sum(1 for _ in conn.scan_iter(match="rq:job:*")),
    }


def tree(*roots: Path) -> set[str]:
    """Every path under the roots (files and folders), for before/after comparison."""
    out: set[str] = set()
    for root in roots:
        if root.is_dir():
            out |= {str(p) for p in root.rglob("*")}
    return out


def tmp_top() -> set[str]:
    return {str(p) for p in Path("/tmp").iterdir() if "corpus" in p.name or "evil" in p.name}


def stray_files(before: set[str], after: set[str], cache: Path, uploads: Path, upload_kept: bool) -> list[str]:
    """New paths, except complete extractions in the content-addressed cache (`<cache>/<16 hex>/...`), the
    dashboard's uploads folder, and (when the upload itself was valid and only the config was refused) the upload
    saved under its hash, kept so the user can fix the config and submit it again."""
    bad = []
    for path in sorted(after - before):
        rel = Path(path).relative_to(cache).parts if path.startswith(str(cache) + "/") else None
        if rel and CACHE_ENTRY.match(rel[0]):
            continue
        if path == str(uploads) or (upload_kept and Path(path).parent == uploads and SAVED_UPLOAD.match(Path(path).name)):
            continue
        bad.append(path)
    return bad


def cli_args(case: Case, material: Path) -> list[str]:
    if case.kind == "dataset":
        args = ["submit", str(ROOT / "configs" / "digits.yaml"), "--set", "data.name=imagefolder",
                "--set", f"data.path={material}", "--set", "data.image_size=12", "--set", OK_BATCH]
    else:
        args = ["submit", str(material)]
    for item in case.overrides:
        args += ["--set", item]
    return [*args, "--gpus", str(case.gpus)]


def dashboard_submit(case: Case, material: Path, conn: Any) -> str:
    """What the New-job page does: validate an upload with check_upload, submit a config dict with the shared
    submission function (no local paths from the browser). Returns the job id; raises with the user's message."""
    from app.upload import check_upload

    overrides = list(case.overrides)
    if case.kind == "dataset":
        checked = check_upload(material.read_bytes(), display_name="dataset.zip", thumbnails_per_class=1)
        if case.accepted and case.warning:
            assert any(re.search(case.warning, w) for w in checked.report["warnings"]), checked.report["warnings"]
        if case.classes:
            assert checked.report["classes"] == sorted(case.classes), checked.report["classes"]
        config = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text(encoding="utf-8"))
        return api.submit_job(config, ["data.image_size=12", OK_BATCH, *overrides], connection=conn, gpus=case.gpus,
                              dataset_path=checked.path).job_id
    raw = material.read_text(encoding="utf-8")
    config = yaml.safe_load(raw)  # the page holds a dict; a non-mapping reaches submit_job as it is
    return api.submit_job(config, overrides, connection=conn, gpus=case.gpus).job_id


def test_corpus_is_refused_with_its_message_and_leaves_no_trace(
        corpus: dict[str, Path], redis_conn: Any, redis_server: Any, job_env: dict[str, str], spawn: Any,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.__main__ import main as worker_cli

    cache = tmp_path / "data-cache"
    monkeypatch.setenv("DATA_CACHE_DIR", str(cache))
    env = {**job_env, "DATA_CACHE_DIR": str(cache)}
    # RQ's suspension, set before the worker starts (a worker already blocked in its dequeue would still take the
    # next job): the worker stays up and advertised (so the GPU check is real) but takes nothing, so the
    # accepted cases stay queued until they are deleted
    from rq.suspension import suspend

    suspend(redis_conn)
    # a live 2-slot worker: the GPU check is real, and it must survive every case without picking anything up
    worker = spawn.python(["worker", "run", "--cpu", "--slots", "2"], env, name="worker")
    wait_for(lambda: api.list_workers(redis_conn), 60, "the worker to advertise itself",
             explain=lambda: spawn.output(worker))
    watched = [Path(job_env["ARTIFACTS_DIR"]), Path(job_env["TRAINER_VAR_DIR"]), ROOT / "var", cache]
    uploads = Path(job_env["TRAINER_VAR_DIR"]) / "uploads"

    failures: list[str] = []
    for case in CASES:
        material = corpus[case.name]
        before, before_tmp = tree(*watched), tmp_top()

        # ---- the CLI (exit 2 and the message on stderr; exit 0 and the job id last for an accepted case)
        capsys.readouterr()
        rc = worker_cli(cli_args(case, material))
        out = capsys.readouterr()
        if case.accepted:
            if rc != 0:
                failures.append(f"{case.name}: CLI exit {rc}, expected 0: {out.err.strip()}")
            else:
                job_id = out.out.split()[-1]
                st = api.job_status(redis_conn, job_id)
                if case.classes and st["dataset"]["classes"] != sorted(case.classes):
                    failures.append(f"{case.name}: CLI job classes {st['dataset']['classes']}")
                api.delete_job(redis_conn, job_id)
        else:
            if rc != 2 or not re.search(case.expect, out.err):
                failures.append(f"{case.name}: CLI exit {rc}, stderr {out.err.strip()!r}; expected 2 and "
                                f"/{case.expect}/")
            if not out.err.startswith("error: ") or "Traceback" in out.err:
                failures.append(f"{case.name}: CLI message is not one clean line: {out.err!r}")

        # ---- the dashboard's validation and the shared submission function
        upload_kept = False
        try:
            if case.cli_only:
                raise SubmissionError(case.expect)
            job_id = dashboard_submit(case, material, redis_conn)
        except Exception as err:  # noqa: BLE001 - UploadError / SubmissionError carry the user's message
            if case.accepted:
                failures.append(f"{case.name}: dashboard refused an accepted case: {type(err).__name__}: {err}")
            elif type(err).__name__ not in ("UploadError", "SubmissionError") or not re.search(case.expect, str(err)):
                failures.append(f"{case.name}: dashboard said {type(err).__name__}: {err!r}; expected "
                                f"/{case.expect}/")
            elif str(tmp_path) in str(err) or "/uploads/" in str(err):
                failures.append(f"{case.name}: dashboard message shows a server path: {err}")
            upload_kept = type(err).__name__ == "SubmissionError"
        else:
            if not case.accepted:
                failures.append(f"{case.name}: dashboard accepted it as job {job_id}")
            api.delete_job(redis_conn, job_id)

        # ---- nothing enqueued, nothing written, nobody died
        counts = enqueued(redis_conn)
        if any(counts.values()):
            failures.append(f"{case.name}: left {counts} in Redis")
            redis_conn.flushall()
        if not case.accepted:
            stray = stray_files(before, tree(*watched), cache, uploads, upload_kept) + sorted(tmp_top() - before_tmp)
            if stray:
                failures.append(f"{case.name}: wrote {stray[:5]}")
        if worker.poll() is not None or redis_server.proc.poll() is not None:
            failures.append(f"{case.name}: the worker or Redis died")
            break

    assert not failures, "\n".join(failures)
    assert not (ROOT.parent / "evil-corpus.png").exists() and not Path("/tmp/evil-corpus.png").exists()
    assert redis_conn.ping() and api.list_workers(redis_conn)[0]["state"] in ("idle", "suspended")


@pytest.mark.parametrize("name", ["zip_slip", "unknown_key", "too_many_gpus"])
def test_cli_subprocess_exits_2_and_enqueues_nothing(name: str, corpus: dict[str, Path], redis_conn: Any,
                                                      job_env: dict[str, str]) -> None:
    """The same refusals through a real `python -m worker submit` process (exit code and stderr as a user sees)."""
    from worker.presence import advertise

    advertise(redis_conn, "box-1", {"name": "box-1", "hostname": "box", "kind": "cpu", "slots": 2}, ttl=60)
    case = next(c for c in CASES if c.name == name)
    out: subprocess.CompletedProcess[str] = run_cli(["worker", *cli_args(case, corpus[name])],
                                                    {**job_env, "DATA_CACHE_DIR": job_env["TRAINER_VAR_DIR"]})
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert re.search(case.expect, out.stderr) and "Traceback" not in out.stderr, out.stderr
    assert out.stdout == ""  # no job id printed
    assert not any(enqueued(redis_conn).values())
    assert os.path.exists(job_env["TRAINER_VAR_DIR"]) is False or not any(
        p.name.endswith(".png") for p in Path(job_env["TRAINER_VAR_DIR"]).rglob("*"))
