"""One attempt of one job: the RQ job function runs it and leaves the job's status final (or recovering).

`run_attempt(job_id, ctx=)` is what RQ calls (by import path, with a JSON argument). Inside a `python -m worker run`
process the worker hands it its context (connection, name, devices, store, shutdown flag) as `ctx`
(worker/worker.py's `WorkerJob`); under a plain `rq worker` the context is built from RQ's current job, so the
function still works, without recovery.

`Attempt.run` is a sequence of named steps (claim → prepare, with `fetch_data` → rendezvous → launch → watch →
conclude → finish); each returns what the next needs, and every way an attempt ends is one `AttemptResult`. A node of
a multi-node job (worker/multinode.py) overrides the few hooks that differ: `claim`, `rendezvous`, `still_ours`,
`after_failed_exit`, `give_back` and `on_stage`; `primary` and `log_prefix` say the rest.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import redis
import yaml

from core import runfolder as rf
from worker import datasets, keys
from worker.artifacts import DATASET_REF_PREFIX
from worker.context import WorkerContext, rq_job_context
from worker.defaults import (
    ARTIFACT_SYNC_INTERVAL,
    CANCEL_POLL_INTERVAL,
    FINAL_WRITE_RETRY_SECONDS,
    NODE_FINISH_GRACE,
    STATUS_LOG_TAIL_LINES,
    STORE_FULL_BYTES,
    TERMINATE_GRACE,
)
from worker.errors import ArtifactError, JobFailed
from worker.launcher import Launched, Rendezvous, train_command, train_env
from worker.memlimit import MemoryExceeded, MemoryWatch
from worker.nodes import NodeState
from worker.outcome import AttemptResult, Outcome, last_words
from worker.record import JobRecord, claim_for_requeue, mark_final, mark_started
from worker.recovery import enqueue_next_attempt
from worker.states import FINAL_STATES, JobState
from worker.streaming import LogWriter
from worker.sweeps import TrialMonitor, trial_ended


def run_attempt(job_id: str, ctx: WorkerContext | None = None) -> dict[str, Any]:
    """RQ entry point. Raises JobFailed when the run failed, so RQ's failed registry agrees with our status."""
    result = Attempt(ctx or rq_job_context(), job_id).run()
    if result.failed_job:
        raise JobFailed(f"job {job_id} failed: {result.error}")
    return result.as_json()


def _retry_redis(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Retry a Redis write for up to FINAL_WRITE_RETRY_SECONDS: a final state must not be lost to a Redis restart."""
    deadline = time.monotonic() + FINAL_WRITE_RETRY_SECONDS
    delay = 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A run folder ready for the training command: where it is, the job's config file in it, ranks, resume or not."""

    run_dir: Path
    config_path: Path
    nproc: int
    resume: bool


@dataclasses.dataclass(frozen=True)
class CommandEnd:
    """How the training command ended: what stopped it (None: it exited by itself), its exit code, how long it ran,
    the pruner's reason when a sweep's pruner stopped it, and the memory it held when its memory bound did."""

    stopped_by: Outcome | None
    exit_code: int | None
    seconds: float
    prune_reason: str | None = None
    memory: MemoryExceeded | None = None


class Attempt:
    """One attempt of one job on this worker: `run` calls the steps below in order."""

    primary = True
    """This attempt writes the job's status, run folder and final state (of a multi-node job: node 0 only)."""
    log_prefix = ""
    """Put in front of every log line of this attempt (a node of a multi-node job: `[node i] `)."""

    def __init__(self, ctx: WorkerContext, job_id: str):
        self.ctx = ctx
        self.conn = ctx.connection
        self.job_id = keys.check_job_id(job_id)
        self.record = JobRecord(self.conn, self.job_id)
        self.store = ctx.store
        self.log: LogWriter | None = None
        self.log_file: Any = None
        self.sync_state: dict[str, tuple[int, int]] = {}
        self.run_dir: Path | None = None
        self.finished_seen: float | None = None
        """When this attempt first saw its job recorded finished by another node (poll_flags)."""

    # ------------------------------------------------------------------------------------------------------ run
    def run(self) -> AttemptResult:
        if not self.claim():
            return AttemptResult(self.job_id, None, Outcome.SKIPPED)
        sweep = self.record.get("sweep")  # a sweep's trial: its sweep learns when it ends
        self.ctx.current_job = self.job_id
        self.log = LogWriter(self.conn, self.job_id)
        try:
            result = self.steps()
        except Exception as err:  # a bug or an unexpected OS error must not leave the job `running` forever
            logging.getLogger("worker").exception("job %s: worker error", self.job_id)
            self.note(f"worker error: {type(err).__name__}: {err}")
            result = self.finish(JobState.FAILED, error=f"worker error: {err}", error_kind=type(err).__name__)
        finally:
            self.ctx.current_job = None
            if self.log_file is not None:
                self.log_file.close()
            self.log.close()
        if sweep and result.state in FINAL_STATES:
            trial_ended(self.conn, sweep)  # tell Optuna, enqueue the sweep's next trial
        return result

    def steps(self) -> AttemptResult:
        """The steps after the claim; the first that ends the attempt returns its result."""
        try:
            prepared = self.prepare()
            rendezvous = self.rendezvous()
            if isinstance(rendezvous, Outcome):
                return self._ended_before_launch(rendezvous)
            self.log_file = (prepared.run_dir / rf.JOB_LOG).open("a", encoding="utf-8")
        except (ArtifactError, OSError) as err:
            self.note(f"cannot prepare the run: {err}")
            message = str(err) if isinstance(err, ArtifactError) else \
                f"the artifact store {self.store.url} is not writable (preparing the run folder failed): {err}"
            return self.finish(JobState.FAILED, error=message, error_kind="ArtifactError")
        started = time.monotonic()
        proc = self.launch(prepared, rendezvous)
        return self.conclude(self.watch(proc, started))

    # ---------------------------------------------------------------------------------------------------- steps
    def claim(self) -> bool:
        """Claim the job and read its record; False when it is not ours to run (cancelled while queued, deleted,
        already running)."""
        from rq import get_current_job

        rq_job = get_current_job()
        rq_id = rq_job.id if rq_job is not None else self.job_id
        result = _retry_redis(mark_started, self.conn, self.job_id, self.ctx.worker_name, rq_id)
        return result == "ok" and self.record.refresh()

    def prepare(self) -> Prepared:
        """The run folder (downloaded from a remote store to resume) and the job's config file, data made local."""
        cfg = self.record.config
        data = dict(cfg.get("data") or {})
        dataset_ref = data.get("path")
        cfg["data"] = self.fetch_data(data)
        cfg["track"] = self._track(cfg.get("track") or {}, dataset_ref)
        run_dir = self.store.local_run_dir(self.job_id)
        resume = self.record.attempt > 0
        if resume and not self.store.is_local:
            n = self.store.sync_down(self.job_id, run_dir)
            self.note(f"downloaded {n} file(s) of the run folder from {self.store.url} to resume")
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir.parent / "job_config.yaml"
        tmp = config_path.with_name(f"{config_path.name}.{os.getpid()}.tmp")
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        os.replace(tmp, config_path)  # atomic: the nodes of a multi-node job on one shared store write it each
        self.run_dir = run_dir
        return Prepared(run_dir, config_path, self.record.gpus, resume)

    def fetch_data(self, data: dict[str, Any]) -> dict[str, Any]:
        """The config's `data` section with the dataset on this machine: a job beyond the tensor cache reads a prepared
        form's shards (`datasets.use_prepared`, prepared once for all workers); otherwise an uploaded zip or a
        registered in-place URL is fetched (synced once) into this machine's cache, and `path` points there."""
        path = data.get("path")
        data = datasets.use_prepared(self.conn, self.store, data, self.record, note=self.note)  # shards, when read
        if data.get("path") and datasets.needs_fetch(str(path)):
            self.note(f"fetching dataset {path}")
            data["path"] = str(datasets.fetch(self.store, str(path), (self.record.get("dataset") or {}).get("hash"),
                                              what=data.get("dataset") or ""))
        return data

    def _track(self, track: dict[str, Any], dataset_ref: Any) -> dict[str, Any]:
        """The config's `track` section with what only the worker knows: the MLflow run is named after the job and
        tagged with its id, this worker and the uploaded dataset's content hash (core/tracking.py)."""
        tags = {**dict(track.get("tags") or {}), "job_id": self.job_id, "worker": self.ctx.worker_name}
        if dataset_ref and str(dataset_ref).startswith(DATASET_REF_PREFIX):  # artifact:datasets/<sha256>.zip
            tags["dataset_hash"] = str(dataset_ref).rsplit("/", 1)[-1].removesuffix(".zip")
        return {**track, "run_name": track.get("run_name") or self.record.get("name") or self.job_id, "tags": tags}

    def rendezvous(self) -> Rendezvous | Outcome | None:
        """Hook: where the ranks of a multi-node job meet (None for a one-node job), or the Outcome that ended the
        attempt while this one waited for its peers."""
        return None

    def _ended_before_launch(self, outcome: Outcome) -> AttemptResult:
        """The attempt ended (cancelled, re-queued) while this one waited for its peers: nothing was launched."""
        if outcome is Outcome.CANCEL and self.primary:
            return self.finish(JobState.CANCELLED, outcome, error="cancelled by request")
        self.on_stage(NodeState.STOPPED)
        return AttemptResult(self.job_id, None, outcome)

    def launch(self, prepared: Prepared, rendezvous: Rendezvous | None) -> Launched:
        """Start the training command: in the worker's pre-started trainer when it can take it, else cold."""
        devices = self.ctx.training_devices(prepared.nproc) if self.ctx.devices else []
        where = f"GPU(s) {','.join(map(str, devices))}" if devices else f"{prepared.nproc} CPU rank(s) (gloo)"
        self.note(f"attempt {self.record.attempt} on worker {self.ctx.worker_name} ({socket.gethostname()}), {where}"
                  + (", resuming from the last checkpoint" if prepared.resume else ""))
        command = train_command(prepared.config_path, prepared.run_dir, nproc=prepared.nproc, resume=prepared.resume,
                                rendezvous=rendezvous)
        env = train_env(job_id=self.job_id, redis_url=self.ctx.redis_url, devices=devices, nproc=prepared.nproc,
                        advertise_addr=self.ctx.advertise_addr if rendezvous is not None else None)
        proc = self.ctx.warm.take(command, env, self.on_line) if self.ctx.warm is not None else None
        if proc is not None:
            self.note("running in the worker's pre-started training process")
            if self.record.get("sweep") and self.ctx.warm is not None:  # the sweep's next trial follows this one: have
                self.ctx.warm.start()  # its trainer ready when this one ends (imports overlap with training)
        else:
            proc = Launched(command.argv(), env, self.on_line)
        return proc

    def launched(self, proc: Launched) -> None:
        """The command is running (diagnostics in the status)."""
        self.on_stage(NodeState.RUNNING, pid=proc.pid)
        if self.primary:
            self.record.save(pid=proc.pid, run_dir=str(self.run_dir))

    def watch(self, proc: Launched, started: float) -> CommandEnd:
        """Wait for the command, uploading the run folder meanwhile (remote store); stop every rank on a cancel, a
        lost job, the time limit, the worker's shutdown or a sweep's pruner."""
        sweep, trial = self.record.get("sweep"), self.record.get("trial")
        monitor = TrialMonitor(self.conn, sweep, trial, self.job_id) if sweep and trial is not None else None
        if monitor is not None:
            monitor.prepare()
        self.launched(proc)
        stop_sync = threading.Event()
        syncer = None
        if not self.store.is_local:
            syncer = threading.Thread(target=self._syncer, args=(stop_sync,), daemon=True, name="artifact-sync")
            syncer.start()
        timeout = self.record.timeout
        memory = MemoryWatch(proc.pid, self.ctx.memory_limit)
        outcome, prune_reason, over, rc = None, None, None, None
        try:
            while (rc := proc.poll()) is None:
                outcome = Outcome.SHUTDOWN if self.ctx.shutdown.is_set() else self.poll_flags()
                if outcome is None and monitor is not None and (prune_reason := monitor.poll()):
                    outcome = Outcome.PRUNE
                if outcome is None and timeout and time.monotonic() - started > float(timeout):
                    outcome = Outcome.TIMEOUT
                if outcome is None and (over := memory.poll()) is not None:
                    outcome = Outcome.MEMORY
                if outcome is not None:
                    self.note({Outcome.CANCEL: "cancel requested", Outcome.LOST: "the job was taken over or deleted",
                               Outcome.TIMEOUT: f"time limit of {float(timeout or 0):g} s exceeded",
                               Outcome.SHUTDOWN: "worker shutting down", Outcome.PRUNE: str(prune_reason),
                               Outcome.MEMORY: over.message() if over else ""}[outcome] + ": stopping every rank")
                    rc = proc.stop(0.0 if outcome is Outcome.MEMORY else TERMINATE_GRACE)  # memory: no grace to grow
                    break
                time.sleep(CANCEL_POLL_INTERVAL)
        except BaseException as exc:  # cold shutdown (second Ctrl-C) or a bug: never leave ranks behind
            proc.stop(grace=1.0)
            stop_sync.set()
            if not isinstance(exc, Exception):  # the worker is going away: give the job back (a bug fails it)
                try:
                    self.give_back("worker stopped abruptly")
                except Exception as err:  # noqa: BLE001 - recovery by heartbeat expiry still applies
                    logging.getLogger("worker").warning("job %s: could not re-queue it: %s", self.job_id, err)
            raise
        finally:
            stop_sync.set()
            proc.wait_output()
            if syncer is not None:
                syncer.join(timeout=30)
        seconds = round(time.monotonic() - started, 1)
        if outcome is None and rc not in (0, None):
            outcome = self.after_failed_exit(rc)
        return CommandEnd(outcome, rc, seconds, prune_reason, over)

    def conclude(self, end: CommandEnd) -> AttemptResult:
        """The final state from how the command ended, said in the log and the run folder, then recorded."""
        rc, seconds = end.exit_code, end.seconds
        if end.stopped_by is Outcome.LOST:
            self.on_stage(NodeState.LOST)
            return AttemptResult(self.job_id, None, Outcome.LOST)
        if end.stopped_by is Outcome.SHUTDOWN:
            self._sync()
            return self.give_back("its worker shut down")
        fields: dict[str, Any] = {"exit_code": rc}
        if end.stopped_by is Outcome.CANCEL:
            state, fields["error"], msg = JobState.CANCELLED, "cancelled by request", f"cancelled after {seconds:g} s"
        elif end.stopped_by is Outcome.PRUNE:
            state, fields["error"], fields["error_kind"] = JobState.PRUNED, end.prune_reason, "Pruned"
            msg = f"pruned after {seconds:g} s"
        elif end.stopped_by is Outcome.TIMEOUT:
            state, fields["error_kind"] = JobState.FAILED, "Timeout"
            limit = float(self.record.timeout or 0)
            fields["error"] = msg = f"timed out: the job exceeded its time limit of {limit:g} s"
        elif end.stopped_by is Outcome.MEMORY and end.memory is not None:
            state, fields["error_kind"], fields["error"] = JobState.FAILED, "OutOfMemory", end.memory.message()
            msg = f"failed after {seconds:g} s: {fields['error']}"
        elif rc == 0:
            state, fields["error"], msg = JobState.FINISHED, None, f"finished in {seconds:g} s"
            fields.update(self._fields_from_report())
        else:
            state = JobState.FAILED
            fields["error"], fields["error_kind"] = self._error_from(rc)
            if full := self._store_full(fields["error"]):
                fields["error"], fields["error_kind"] = f"{full}: {fields['error']}", "ArtifactError"
            msg = f"failed with exit code {rc}: {fields['error']}"
        self.note(msg)
        self._mark_run(state, fields.get("error") or "")
        try:
            self._sync(final=True)  # after the last note, so the uploaded job.log is complete
        except ArtifactError as err:
            state, fields["error"], fields["error_kind"] = JobState.FAILED, str(err), "ArtifactError"
        return self.finish(state, end.stopped_by, **fields)

    def finish(self, state: JobState, why: Outcome | None = None, **fields: Any) -> AttemptResult:
        """Record the final state with `fields` (error, error_kind, exit_code, ...), the artifacts and, unless it
        finished, the log's tail. A job taken over meanwhile keeps the state it has (the result says which)."""
        self.on_stage(NodeState(state), exit_code=fields.get("exit_code"), error=fields.get("error"))
        said = {k: fields.get(k) for k in ("error", "error_kind", "exit_code")}
        if not self.primary:
            return AttemptResult(self.job_id, state, why, **said, primary=False)
        tail = list(self.log.tail)[-STATUS_LOG_TAIL_LINES:] if self.log else []
        files = []
        try:
            files = self.store.list_files(self.job_id)
        except (OSError, ArtifactError):
            pass
        artifacts = {**self.store.artifact_uris(self.job_id, files), "files": files,
                     "partial": state is not JobState.FINISHED}
        payload = {"artifacts": artifacts, "log_tail": tail if state is not JobState.FINISHED else [], **fields}
        if state is JobState.FINISHED:
            payload["progress"] = 1.0
        written = _retry_redis(mark_final, self.conn, self.job_id, self.ctx.worker_name, state, payload)
        if written != "ok":
            self.note(f"not recording {state.value}: the job is now {written}")
            state = JobState.parse(written)  # None: deleted
            if state is JobState.RECOVERING:  # given back by someone else: this attempt merely stopped
                self.on_stage(NodeState.STOPPED)
        return AttemptResult(self.job_id, state, why, **said)

    def give_back(self, reason: str) -> AttemptResult:
        """Give the job back (worker shutting down): recovering, re-enqueued at the front; not a recovery count."""
        state, attempt = _retry_redis(claim_for_requeue, self.conn, self.job_id, self.ctx.worker_name,
                                      max_recoveries=-1, reason=reason)
        if state == JobState.RECOVERING:
            enqueue_next_attempt(self.conn, self.job_id, attempt)
            self.note(f"re-queued ({reason}); it will resume from its last checkpoint")
        return AttemptResult(self.job_id, JobState.parse(state), Outcome.SHUTDOWN)

    # ---------------------------------------------------------------------------------------------------- hooks
    def still_ours(self) -> bool:
        """Hook: the running job (its record just refreshed) is still this attempt's: this worker runs it."""
        return self.record.worker == self.ctx.worker_name

    def after_failed_exit(self, rc: int) -> Outcome | None:
        """Hook: the command exited non-zero by itself: an outcome that overrides `failed` (lost, cancel), or None."""
        return None

    def on_stage(self, stage: NodeState, **fields: Any) -> None:
        """Hook: this attempt reached `stage` (running, its end, lost, stopped). A one-node attempt's stages are the
        job's own, recorded by the steps; a node of a multi-node job also records its own entry."""

    def poll_flags(self) -> Outcome | None:
        """CANCEL when a cancel was requested, LOST when the job is no longer ours (recovered elsewhere,
        deleted), None otherwise. Redis errors keep the run going: training does not need Redis."""
        try:
            self.record.refresh("cancel_requested", "worker", "attempt")
        except redis.exceptions.RedisError:
            return None
        if self.record.cancel_requested:
            return Outcome.CANCEL
        if self.record.state is JobState.FINISHED and self.still_ours():
            # another node of this attempt (node 0) recorded the job's success while our ranks were still leaving
            # the last collective: they end by themselves; lost only if they are still there after NODE_FINISH_GRACE
            if self.finished_seen is None:
                self.finished_seen = time.monotonic()
            return None if time.monotonic() - self.finished_seen < NODE_FINISH_GRACE else Outcome.LOST
        return None if self.record.state is JobState.RUNNING and self.still_ours() else Outcome.LOST

    # -------------------------------------------------------------------------------------------------- helpers
    def note(self, msg: str) -> None:
        """A line from the worker itself into the job's log."""
        self.on_line(f"[worker] {msg}\n", src="worker")

    def on_line(self, line: str, src: str = "train") -> None:
        line = self.log_prefix + line
        if self.log is not None:
            self.log.write(line, src)
        if self.log_file is not None:
            try:
                self.log_file.write(line if line.endswith("\n") else line + "\n")
                self.log_file.flush()
            except (OSError, ValueError):
                pass

    def _sync(self, final: bool = False) -> None:
        """Upload the run folder to a remote store (only the primary attempt writes it: rank 0 lives there)."""
        if self.store.is_local or self.run_dir is None or not self.primary:
            return
        try:
            n = self.store.sync_up(self.job_id, self.run_dir, self.sync_state)
            if final:
                self.note(f"uploaded the run folder to {self.store.url} ({n} changed file(s))")
        except (OSError, ArtifactError) as err:
            self.note(f"artifact upload failed: {err}")
            if final:
                raise ArtifactError(f"cannot upload the run folder to {self.store.url}: {err}") from None

    def _syncer(self, stop: threading.Event) -> None:
        """Remote store: upload the run folder while it trains (after each new checkpoint, at most every 10 s)."""
        last_sig = None
        ckpt = (self.run_dir or Path(".")) / rf.LAST_CHECKPOINT
        while not stop.wait(ARTIFACT_SYNC_INTERVAL):
            try:
                sig = ckpt.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if sig != last_sig:
                last_sig = sig
                self._sync()

    def _error_from(self, rc: int | None) -> tuple[str, str]:
        """Why the training command failed. One path: core's `error` event, which the Redis sink wrote into the
        status (`error`, `error_kind`). When that event never arrived (core failed before it had a sink, or could not
        reach Redis): the last words of the training output (`last_words`), else the exit code."""
        if self.record.refresh("error", "error_kind") and self.record.get("error"):
            return str(self.record.get("error")), str(self.record.get("error_kind", "TrainingError"))
        return last_words(list(self.log.tail) if self.log else []) or f"training exited with code {rc}", "TrainingError"

    def _store_full(self, error: str) -> str | None:
        """A message when the run folder's file system is (nearly) full: core's own error for a failed write is
        often cryptic (torch.save: "unexpected pos ..."), so the worker says what happened."""
        if self.run_dir is None:
            return None
        try:
            usage = shutil.disk_usage(self.run_dir)
        except OSError:
            return None
        free = usage.free
        if (free < STORE_FULL_BYTES and free < usage.total * 0.05) or "No space left on device" in error:
            return f"the artifact store {self.store.url} is full ({free:,} bytes free where the run folder is)"
        return None

    def _fields_from_report(self) -> dict[str, Any]:
        """A finished run whose events never reached Redis (the training process could not connect: a REDIS_URL it
        cannot use, a network that lets the worker through but not it) would show epoch 0 and no test accuracy.
        Then the status takes them from the run's report.json, and the log says why the charts are empty."""
        try:
            if not self.record.refresh("epoch") or self.record.epoch > 0:
                return {}
        except redis.exceptions.RedisError:
            return {}
        try:
            report = json.loads(((self.run_dir or Path(".")) / rf.REPORT).read_text(encoding="utf-8"))
            fields = {"epoch": int(report["epochs_completed"]), "test_acc": float(report["test"]["accuracy"])}
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        self.note("no epoch event of this run reached Redis (could the training process not connect to REDIS_URL?): "
                  "its charts are empty; epoch and test accuracy are taken from report.json")
        return fields

    def _mark_run(self, state: JobState, error: str) -> None:
        """A run stopped by a signal (cancel, time limit) may die before core writes its CANCELLED/FAILED marker:
        write it here, so the run folder (and its copy in the store) says it is partial."""
        if state is JobState.FINISHED or not self.primary or self.run_dir is None or not self.run_dir.is_dir():
            return
        if any((self.run_dir / marker).exists() for marker in rf.MARKERS):
            return
        marker = rf.CANCELLED if state in (JobState.CANCELLED, JobState.PRUNED) else rf.FAILED
        try:
            rf.mark(self.run_dir, marker, f"{error or state.value} (marked by worker {self.ctx.worker_name})")
        except OSError:
            pass

