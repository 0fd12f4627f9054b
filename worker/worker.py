"""The worker process: RQ's SimpleWorker plus an advertisement, a heartbeat thread and the recovery scan.

Why SimpleWorker (no fork per job): the job function only supervises a child process tree (guard → torchrun →
ranks), so a fork buys nothing, and running in the worker's main thread lets it stop that tree itself on cancel,
timeout or shutdown. RQ's main loop is busy while a job runs, so the heartbeat thread keeps RQ's own worker and
execution heartbeats alive too (RQ would otherwise call a long job abandoned).

On SIGTERM/SIGINT (honcho stop, Ctrl-C) a busy worker stops its job's processes and re-queues the job, which resumes
from its checkpoint on the next worker: an hours-long job is not lost to a restart, and does not hold the restart up.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

import redis
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker, WorkerStatus

from worker import deploy_host, devices, gang, keys, notify, retention
from worker.artifacts import ArtifactStore
from worker.context import WorkerContext
from worker.defaults import (
    DISK_CHECK_INTERVAL,
    GANG_POLL_INTERVAL,
    GC_CHECK_INTERVAL,
    HEARTBEAT_INTERVAL,
    JOB_RESULT_TTL,
    RECOVERY_SCAN_INTERVAL,
    SWEEP_SCAN_INTERVAL,
)
from worker.diskspace import low_disk
from worker.launcher import WarmTrainer, train_env
from worker.presence import advertise, heartbeat_ttl, withdraw
from worker.queues import CONTEXT_FUNCTIONS, JOB_FUNCTIONS, NODE_FUNCTION
from worker.record import JobRecord
from worker.recovery import find_orphans, heal_stuck_recoveries, recover_orphans
from worker.states import JobState
from worker.sweeps import heal_sweeps

log = logging.getLogger("worker")

RQ_WORKER_TTL = 30
"""Seconds: RQ's own worker-key TTL base (RQ adds 60), and its idle dequeue timeout is this minus 15."""


class WorkerJob(Job):
    """RQ's job as a `TrainerWorker` runs it: `execute_job` sets `context`, and a job function of
    `queues.CONTEXT_FUNCTIONS` receives it as its `ctx` argument (explicitly: no module global; the stored payload
    stays the job id alone). Under a plain `rq worker` (RQ's own job class) those functions get no context and build
    one from RQ's current job. `Job._execute` is the one RQ method overridden (tests/test_rq_shape.py pins it)."""

    context: WorkerContext | None = None

    def _execute(self) -> Any:
        if self.context is None or self.func_name not in CONTEXT_FUNCTIONS:
            return super()._execute()
        return self.func(*self.args, ctx=self.context, **self.kwargs)


def foreign_job_refusal(job: Job) -> str | None:
    """Why this RQ job must not run here, or None: a function other than the product's own (queues.JOB_FUNCTIONS),
    or a success/failure/stopped callback (RQ would import and call it). Read from the stored names only: nothing
    the job names is imported."""
    try:
        func = job.func_name
    except Exception as err:  # noqa: BLE001 - an undecodable payload is refused like a foreign one
        return f"refused RQ job {job.id}: its payload cannot be read ({type(err).__name__})"
    callbacks = [n for n in (job._success_callback_name, job._failure_callback_name, job._stopped_callback_name) if n]
    if func not in JOB_FUNCTIONS or callbacks:
        what = f"names {func!r}" + (f" with callbacks {', '.join(callbacks)}" if callbacks else "")
        return (f"refused RQ job {job.id}: it {what}; this worker runs only {', '.join(sorted(JOB_FUNCTIONS))}, "
                "without callbacks")
    return None


def default_name() -> str:
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:60] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


class TrainerWorker(SimpleWorker):
    """An RQ worker that serves the train:g{1..slots}:{priority} queues and supervises training runs."""

    def __init__(
        self,
        connection: redis.Redis,
        *,
        redis_url: str,
        resources: dict[str, Any],
        store: ArtifactStore,
        name: str | None = None,
        ttl: int | None = None,
        prewarm: bool = True,
        advertise_addr: str | None = None,
    ):
        self.resources = resources
        self.slots = int(resources["slots"])
        self.adv_ttl = ttl or heartbeat_ttl()
        super().__init__(
            keys.queues_for_slots(self.slots),
            name=name or default_name(),
            connection=connection,
            serializer=JSONSerializer,
            worker_ttl=RQ_WORKER_TTL,
            job_class=WorkerJob,
        )
        self.store = store
        self.store_id = store.identity()
        self.ctx = WorkerContext(connection=connection, redis_url=redis_url, worker_name=self.name,
                                 devices=resources.get("devices"), store=store)
        if advertise_addr:
            self.ctx.advertise_addr = advertise_addr
        self.gang_timeout = gang.reservation_timeout()
        self._reserved_for: str | None = None
        self._single_first = False
        if prewarm:
            first = (resources.get("devices") or [])[:1]
            self.ctx.warm = WarmTrainer(train_env(job_id="", redis_url=redis_url, devices=first, nproc=1))
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._born = time.time()
        self._healthy_since: float | None = time.monotonic()
        self._last_scan = 0.0
        self._last_sweep_scan = 0.0
        self._sweep_thread: threading.Thread | None = None
        self._deliverer: notify.Deliverer | None = None
        self._deploy_thread: threading.Thread | None = None
        self._gc_thread: threading.Thread | None = None
        self._last_gc_check = -GC_CHECK_INTERVAL
        self._low_disk: str | None = None
        self._disk_checked = -DISK_CHECK_INTERVAL
        self._current_rq_job: Job | None = None
        self._burst = False

    # ------------------------------------------------------------------------------------------------- presence
    def advertisement(self) -> dict[str, Any]:
        r = self.resources
        return {
            "name": self.name, "hostname": socket.gethostname(), "pid": os.getpid(), "kind": r["kind"],
            "gpus": r.get("gpus") or [], "slots": self.slots, "torch": r.get("torch"), "cuda": r.get("cuda"),
            "python": r.get("python"), "state": self._public_state(),
            "current_job": self.ctx.current_job or "", "started_at": self._born,
            "queues": self.queue_names(), "artifacts": self.store.url, "store_id": self.store_id,
            "warm": self.ctx.warm.state() if self.ctx.warm is not None else "off",
            "addr": self.ctx.advertise_addr, "reserved_for": self._reserved_for or "",
            "low_disk": self._low_disk or "",
        }

    def _public_state(self) -> str:
        """idle, busy, reserved, suspended or starting (RQ's state is an Enum whose str() is not its value)."""
        if self.ctx.current_job:
            return "busy"
        if self._reserved_for:
            return "reserved"
        if self._low_disk:
            return "low disk"
        state = self.get_state()
        return str(getattr(state, "value", state))

    def beat(self) -> None:
        """One heartbeat: advertisement, RQ's heartbeats while busy, and (when due) the recovery scan."""
        try:
            advertise(self.connection, self.name, self.advertisement(), self.adv_ttl)
            job = self._current_rq_job
            if job is not None:
                execution = self.execution
                if execution is not None:
                    self.maintain_heartbeats(job, execution)
            if self._healthy_since is None:
                self._healthy_since = time.monotonic()
            self._maybe_scan()
            self._maybe_scan_sweeps()
            self._keep_house()
        except redis.exceptions.RedisError as err:
            if self._healthy_since is not None:
                log.warning("worker %s: Redis unreachable (%s); training continues, retrying", self.name, err)
            self._healthy_since = None

    def _may_judge_others(self) -> bool:
        """Only a worker that has itself been heartbeating for a whole TTL may call others dead: after a Redis
        restart every advertisement may have expired at once, and live workers need one TTL to re-appear."""
        return self._healthy_since is not None and time.monotonic() - self._healthy_since >= self.adv_ttl

    def _maybe_scan(self) -> None:
        now = time.monotonic()
        if now - self._last_scan < RECOVERY_SCAN_INTERVAL or not self._may_judge_others():
            return
        self._last_scan = now
        recovered = recover_orphans(self.connection, by=self.name)
        recovered += heal_stuck_recoveries(self.connection, by=self.name)
        if recovered:
            log.warning("worker %s: re-queued orphaned job(s) %s", self.name, ", ".join(recovered))

    def _maybe_scan_sweeps(self) -> None:
        """Advance the active sweeps (workers drive sweeps: nothing else would notice a half-done step), in a thread
        of its own: a first scan imports Optuna and replays journals, which must never delay a heartbeat."""
        now = time.monotonic()
        if now - self._last_sweep_scan < SWEEP_SCAN_INTERVAL or (self._sweep_thread and self._sweep_thread.is_alive()):
            return
        self._last_sweep_scan = now
        self._sweep_thread = threading.Thread(target=heal_sweeps, args=(self.connection,), name="sweep-scan",
                                              daemon=True)
        self._sweep_thread.start()

    def _keep_house(self) -> None:
        """The background duties beside jobs, each in a thread of its own so a heartbeat never waits: delivering
        notifications (worker/notify.py) and, once a day, the retention policy (worker/retention.py)."""
        if self._deliverer is None or not self._deliverer.is_alive():
            self._deliverer = notify.Deliverer(self.connection, self.name)
            self._deliverer.start()
        if self._deploy_thread is None or not self._deploy_thread.is_alive():
            host = deploy_host.Host(self.connection, self.name, deploy_host.serve_address(self.ctx.advertise_addr),
                                    ledger=self.ctx.ledger)
            self._deploy_thread = threading.Thread(target=host.loop, args=(self._hb_stop,), name="deployments",
                                                   daemon=True)
            self._deploy_thread.start()
        now = time.monotonic()
        if now - self._last_gc_check >= GC_CHECK_INTERVAL and not (self._gc_thread and self._gc_thread.is_alive()):
            self._last_gc_check = now
            self._gc_thread = threading.Thread(target=self._daily_gc, name="retention", daemon=True)
            self._gc_thread.start()

    def _daily_gc(self) -> None:
        try:
            removed = retention.daily(self.connection, self.store, socket.gethostname())
        except Exception:
            log.exception("worker %s: retention run failed", self.name)
            return
        if removed:
            log.info("worker %s: retention removed %d item(s), %d bytes", self.name, len(removed),
                     sum(r.bytes for r in removed))

    def _heartbeat_loop(self) -> None:
        while not self._hb_stop.wait(HEARTBEAT_INTERVAL):
            try:
                self.beat()
            except Exception:  # the heartbeat must outlive any bug in one beat, or the worker looks dead
                log.exception("worker %s: heartbeat failed", self.name)

    def _recover_before_burst(self) -> None:
        """A burst worker started after a crash first adopts the orphans (waiting one TTL so it may judge)."""
        try:
            if not find_orphans(self.connection):
                return
        except redis.exceptions.RedisError:
            return
        log.info("worker %s: orphaned running job(s) found; recovering them first", self.name)
        while not self._may_judge_others():
            time.sleep(0.5)
        self._last_scan = 0.0
        self._maybe_scan()

    # ---------------------------------------------------------------------------------------- multi-node gangs
    def _gang_turn(self) -> tuple[Job, Queue] | None:
        """Reserve this idle worker for a waiting multi-node job, or follow its reservation: when the gang started,
        the node to run (as an RQ job in this worker's private queue, so RQ's bookkeeping holds); else None."""
        conn = self.connection
        job_id = gang.reserved_job(conn, self.name)
        if job_id is None:
            if self._reserved_for:  # released (timed out, cancelled, dropped): a single-node job first, if any
                self._single_first = True
                self._reserved_for = None
                return None
            if self._single_first:
                return None
            spare = self._spare_slots()
            if not spare:
                return None
            job_id = gang.try_reserve(conn, self.name, spare)
            if job_id is None:
                return None
            log.info("worker %s: reserved for multi-node job %s", self.name, job_id)
        self._reserved_for = job_id
        what, node_rank, attempt = gang.poll(conn, job_id, self.name, timeout=self.gang_timeout)
        if what == "released":
            self._reserved_for = None
            self._single_first = True
            return None
        if what != "start":
            return None
        self._reserved_for = None
        queue = Queue(keys.node_queue(self.name), connection=conn, serializer=JSONSerializer)
        queue.enqueue_call(NODE_FUNCTION, args=[job_id, attempt], timeout=-1,
                           job_id=keys.rq_node_job_id(job_id, attempt, node_rank), result_ttl=JOB_RESULT_TTL,
                           failure_ttl=JOB_RESULT_TTL,
                           description=f"train {job_id} (attempt {attempt}, node {node_rank})")
        log.info("worker %s: gang of job %s complete: running node %d", self.name, job_id, node_rank)
        return self.queue_class.dequeue_any([queue], None, connection=conn, job_class=self.job_class,
                                            serializer=self.serializer,
                                            death_penalty_class=self.death_penalty_class)

    def _leave_gang(self) -> None:
        """A worker leaving while reserved: out of the gang still gathering, or, when the gang just started
        without it running its node, the attempt goes back to waiting (not counted as a recovery)."""
        job_id = gang.reserved_job(self.connection, self.name)
        if job_id is None:
            return
        if gang.drop(self.connection, job_id, [self.name]) < 0:
            record = JobRecord.find(self.connection, job_id, "gang", "attempt")
            if record is not None and record.state is JobState.RUNNING and self.name in record.gang:
                gang.requeue_running(self.connection, job_id, record.attempt, max_recoveries=-1,
                                     reason=f"worker {self.name} shut down before its node started")
        gang.unreserve(self.connection, self.name, job_id)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None,
                                     max_idle_time: int | None = None) -> tuple[Job, Queue] | None:
        """RQ's idle loop, plus the multi-node jobs. All that differs from RQ's own: each round first looks at the
        waiting gangs (gang.py: the rules), a reserved worker takes no single-node job, and the RQ queues are looked
        at by RQ's own loop for at most a second per round (`max_idle_time=1`), so a gang is seen within about a
        second. tests/test_rq_shape.py pins the shape of the RQ code this relies on."""
        self.set_state(WorkerStatus.IDLE)
        idle_since = time.monotonic()
        wait = 1.0
        while True:
            if self._disk_is_low():  # take no job (single or gang) until space is freed; say why in the listing
                if timeout is None:
                    return None
                self.heartbeat()
                time.sleep(1.0)
                continue
            try:
                node = self._gang_turn()
                if node is None and self._reserved_for:  # RQ's loop (and its heartbeat) waits with the gang
                    self.heartbeat()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
                log.error("worker %s: could not reach Redis (%s); retrying in %g s", self.name, err, wait)
                time.sleep(wait)
                wait = min(wait * 2, 30.0)
                continue
            wait = 1.0
            if node is not None:
                self.heartbeat()
                return node
            if self._reserved_for:
                time.sleep(GANG_POLL_INTERVAL)
                continue
            if not self._listen_to_what_fits():  # every GPU serves a deployment: no job fits until one ends
                if timeout is None:
                    return None
                self.heartbeat()
                time.sleep(1.0)
                continue
            single_first, self._single_first = self._single_first, False
            look_once = timeout is None or single_first  # burst, or just released by a gang: no blocking
            result = super().dequeue_job_and_maintain_ttl(None if look_once else 1, None if look_once else 1)
            if result is not None or timeout is None:  # burst: nothing queued, and no gang (a reserved worker
                return result                           # waits above; one released by the timeout ends here too)
            if max_idle_time is not None and time.monotonic() - idle_since > max_idle_time:
                return None

    def _spare_slots(self) -> int:
        """Devices a job may take here now: all slots on a CPU worker, the GPUs no deployment replica holds on a GPU
        worker (worker/devices.py)."""
        if not self.ctx.devices:
            return self.slots
        return min(self.slots, self.ctx.ledger.spare_for_training())

    def _listen_to_what_fits(self) -> bool:
        """Point RQ's loop at the queues of jobs that fit the spare devices (`_ordered_queues`, which RQ's default
        dequeue strategy never reorders); False when none fits."""
        spare = self._spare_slots()
        fits = set(keys.queues_for_slots(spare)) if spare else set()
        self._ordered_queues = [q for q in self.queues if q.name in fits]
        return bool(self._ordered_queues)

    def _disk_is_low(self) -> bool:
        """Below the free-disk floor (worker.storage)? Looked at every DISK_CHECK_INTERVAL seconds; logged once per
        episode. A job already running goes on: stopping it would lose work, and its checkpoints keep the last good
        file when the disk fills (core.runfolder.replacing)."""
        now = time.monotonic()
        if now - self._disk_checked >= DISK_CHECK_INTERVAL:
            self._disk_checked = now
            was, self._low_disk = self._low_disk, low_disk(self.store)
            if self._low_disk and not was:
                log.warning("worker %s: taking no jobs: %s", self.name, self._low_disk)
            elif was and not self._low_disk:
                log.info("worker %s: disk space is back; taking jobs again", self.name)
        return bool(self._low_disk)

    # ---------------------------------------------------------------------------------------------- RQ hooks
    def execute_job(self, job: Job, queue: Queue) -> None:
        refusal = foreign_job_refusal(job)
        if refusal:  # anyone who can write to Redis could queue any function: run only ours, import nothing
            log.warning("worker %s: %s", self.name, refusal)
            job.retries_left = 0
            self.handle_job_failure(job, queue, exc_string=refusal)
            return
        if isinstance(job, WorkerJob):  # always (our job_class): the job function receives this worker's context
            job.context = self.ctx
        if not self._take_devices(job, queue):
            return
        self._current_rq_job = job
        try:
            super().execute_job(job, queue)
        finally:
            self.ctx.ledger.give_back(devices.TRAINING)
            self._current_rq_job = None
            self._prewarm()

    def _take_devices(self, job: Job, queue: Queue) -> bool:
        """Hold the GPUs the job needs (worker/devices.py); a job that a deployment replica beat to them between the
        dequeue and now goes back where it was: to the front of its queue, or, a node of a multi-node job, the
        attempt back to waiting (as when a worker leaves before its node starts). CPU workers hold nothing."""
        if not self.ctx.devices:
            return True
        job_id = str(job.args[0]) if job.args else ""
        record = JobRecord.find(self.connection, job_id, "gpus", "attempt", "gang") if job_id else None
        if record is None or self.ctx.ledger.take(devices.TRAINING, record.gpus) is not None:
            return True
        reason = f"worker {self.name}: a deployment replica took the GPUs job {job_id} was to use; re-queued"
        log.warning("%s", reason)
        if queue.name == keys.node_queue(self.name):
            job.delete()
            gang.requeue_running(self.connection, job_id, record.attempt, max_recoveries=-1, reason=reason)
            gang.unreserve(self.connection, self.name, job_id)
        else:
            queue.enqueue_job(job, at_front=True)
        return False

    def _prewarm(self) -> None:
        """Start the next warm trainer, unless a burst worker is about to find its queues empty and exit."""
        if self.ctx.warm is None or self.ctx.shutdown.is_set() or self._stop_requested:
            return
        try:
            if self._burst and not any(q.count for q in self.queues):
                return
        except redis.exceptions.RedisError:
            pass
        try:
            self.ctx.warm.start()
        except OSError as err:  # no process could start (out of memory, pids): the next job starts cold
            log.warning("worker %s: could not pre-start a trainer: %s", self.name, err)

    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()
        self.ctx.shutdown.set()  # the running job (if any) is stopped and re-queued; see the module docstring

    def work(self, burst: bool = False, **kwargs: Any) -> bool:  # type: ignore[override]
        self._burst = burst
        self._prewarm()
        self.beat()
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._hb_thread.start()
        try:
            if burst:
                self._recover_before_burst()
            return super().work(burst=burst, **kwargs)
        finally:
            self._hb_stop.set()
            self._hb_thread.join(timeout=5)
            if self._deliverer is not None:
                self._deliverer.stop()
            if self._deploy_thread is not None:  # it ends its servers once the heartbeat's stop is set
                self._deploy_thread.join(timeout=15)
            if self.ctx.warm is not None:
                self.ctx.warm.stop()
            try:
                self._leave_gang()
                withdraw(self.connection, self.name)
            except redis.exceptions.RedisError:
                pass
