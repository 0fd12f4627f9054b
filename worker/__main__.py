"""`python -m worker redis | run | submit | status | cancel | logs | list | workers` (see CONTRACTS.md).

Thin wrappers over the package's functions; every error a user can cause prints one line, not a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime
from typing import Any

from worker.defaults import PRIORITIES, STATUS_WAIT_CANCEL
from worker.errors import NoSuchJobError, SubmissionError, WorkerError


def _ts(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _conn() -> Any:
    from worker.connection import check, connect

    return check(connect())


# ----------------------------------------------------------------------------------------------------- commands
def cmd_redis(args: argparse.Namespace) -> int:
    import os
    import signal

    from worker.connection import redact
    from worker.server import run_foreground

    url = os.environ.get("REDIS_URL", "").strip()
    if url and not args.force:
        # honcho stops every process when one exits, so with an external Redis this line idles instead
        print(f"[redis] REDIS_URL is set ({redact(url)}): using that server, not starting the embedded one",
              flush=True)
        stop = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
        return 0
    return run_foreground(args.port)


def cmd_run(args: argparse.Namespace) -> int:
    from worker.artifacts import ArtifactStore
    from worker.connection import redact, wait_for_redis
    from worker.hardware import detect
    from worker.worker import TrainerWorker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        resources = detect(args.gpus, cpu=args.cpu, slots=args.slots)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    url, conn = wait_for_redis(args.wait)
    store = ArtifactStore()
    store.check_writable()
    prewarm = not args.no_prewarm and os.environ.get("WORKER_PREWARM", "1").strip().lower() not in ("0", "false", "no")
    worker = TrainerWorker(conn, redis_url=url, resources=resources, store=store, name=args.name, prewarm=prewarm)
    what = (f"GPU(s) {', '.join(str(g['index']) + ' ' + str(g['name']) for g in resources['gpus'])}"
            if resources["kind"] == "gpu" else f"CPU only, {resources['slots']} slot(s)")
    print(f"worker {worker.name}: {what}; Redis {redact(url)}; artifacts {store.url}", flush=True)
    worker.work(burst=args.burst, logging_level="INFO")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from worker.submit import submit_job

    submitted = submit_job(args.config, args.overrides, connection=_conn(), gpus=args.gpus, priority=args.priority,
                           allow_local_paths=True, timeout=args.timeout)
    if submitted.waiting:
        print(f"note: {submitted.waiting}")
    print(f"submitted job {submitted.job_id}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from worker.api import job_status

    st = job_status(_conn(), args.job)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    print(f"job        {st.get('id', args.job)}  ({st.get('name') or ''})")
    print(f"state      {st['state']}" + (f"  [{st['waiting']}]" if st.get("waiting") else ""))
    epochs = st.get("epochs") or "?"
    print(f"progress   {st['progress'] * 100:.0f}%  epoch {st['epoch']}/{epochs}"
          + (f"  best val acc {st['best_val_acc']:.4f}" if st.get("best_val_acc") is not None else ""))
    print(f"worker     {st.get('worker') or '-'}  attempt {st.get('attempt') or 0}  "
          f"recoveries {st.get('recoveries') or 0}")
    print(f"submitted  {_ts(st.get('submitted_at'))}  started {_ts(st.get('started_at'))}  "
          f"ended {_ts(st.get('ended_at'))}")
    if st.get("error"):
        print(f"error      {st['error']}")
    for line in st.get("log_tail") or []:
        print(f"  | {line}")
    arts = st.get("artifacts") or {}
    for k, v in arts.items():
        if k not in ("files", "partial"):
            print(f"artifact   {k:<8} {v}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from worker.api import cancel_job

    state = cancel_job(_conn(), args.job, wait=0.0 if args.no_wait else STATUS_WAIT_CANCEL)
    print(f"job {args.job}: {state}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from worker.api import follow_logs, job_status, logs_tail

    conn = _conn()
    job_status(conn, args.job)  # NoSuchJobError for a bad id
    if not args.follow:
        for entry in logs_tail(conn, args.job, args.lines):
            print(entry["line"])
        return 0
    idle_since = None
    for entry in follow_logs(conn, args.job):
        if entry:
            print(entry["line"], flush=True)
            idle_since = None
            continue
        if job_status(conn, args.job)["final"]:  # nothing new for a tick and the job is over: done
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 1.0:
                return 0
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from worker.api import list_jobs

    jobs = list_jobs(_conn(), {args.state} if args.state else None)
    if args.json:
        print(json.dumps(jobs, indent=2, default=str))
        return 0
    print(f"{'JOB':<23} {'STATE':<10} {'PROG':>5} {'EPOCH':>7} {'VAL ACC':>7} {'GPUS':>4}  {'SUBMITTED':<19}  NAME")
    for j in jobs:
        acc = f"{j['best_val_acc']:.4f}" if j.get("best_val_acc") is not None else "-"
        epochs = j.get("epochs") or "?"
        print(f"{j['id']:<23} {j['state']:<10} {j['progress'] * 100:>4.0f}% {j['epoch']:>3}/{epochs:<3} "
              f"{acc:>7} {j.get('gpus') or 1:>4}  {_ts(j.get('submitted_at')):<19}  {j.get('name') or ''}")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    from worker.presence import list_workers

    workers = list_workers(_conn())
    if args.json:
        print(json.dumps(workers, indent=2, default=str))
        return 0
    for w in workers:
        gpus = ", ".join(f"{g.get('name')} ({g.get('memory_mb')} MiB)" for g in w.get("gpus") or []) or "CPU"
        print(f"{w['name']}  {w.get('hostname')}  {w.get('state')}  job={w.get('current_job') or '-'}  "
              f"slots={w.get('slots')}  {gpus}  torch {w.get('torch')}")
    if not workers:
        print("no live worker")
    return 0


# ---------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker", description="Managed training jobs: Redis, workers, jobs.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("redis", help="run the embedded Redis in the foreground (127.0.0.1, password in var/redis/)")
    s.add_argument("--port", type=int, default=None, help="port (default: env REDIS_PORT or 6379)")
    s.add_argument("--force", action="store_true", help="start the embedded server even when REDIS_URL is set")
    s.set_defaults(func=cmd_redis)

    s = sub.add_parser("run", help="run a worker")
    s.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    s.add_argument("--gpus", default=None, help="GPU indices to use, e.g. 0,1 (default: all visible GPUs)")
    s.add_argument("--cpu", action="store_true", help="ignore GPUs: a CPU-only worker (jobs run as gloo ranks)")
    s.add_argument("--slots", type=int, default=None, help="CPU-only worker: most ranks per job (default min(CPUs, 8))")
    s.add_argument("--name", default=None, help="worker name (default host-pid-random)")
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for Redis at start-up (default 60)")
    s.add_argument("--no-prewarm", action="store_true",
                   help="do not keep a pre-started training process (env WORKER_PREWARM=0 does the same)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("submit", help="validate, upload the dataset if local, enqueue; prints the job id last")
    s.add_argument("config", help="YAML preset, e.g. configs/digits.yaml")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--gpus", type=int, default=1, help="GPUs (or CPU gloo ranks) for the job (default 1)")
    s.add_argument("--priority", choices=PRIORITIES, default="default")
    s.add_argument("--timeout", type=float, default=None, help="wall-clock limit in seconds (default: none)")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("status", help="a job's status")
    s.add_argument("job")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("cancel", help="cancel a queued or running job")
    s.add_argument("job")
    s.add_argument("--no-wait", action="store_true", help="do not wait for a running job to stop")
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser("logs", help="a job's log lines (every rank, plus the worker's notes)")
    s.add_argument("job")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    s.add_argument("-n", "--lines", type=int, default=200)
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("list", help="jobs, newest first")
    s.add_argument("--state", default=None, help="only jobs in this state")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("workers", help="live workers")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_workers)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WorkerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if args.command == "submit" or isinstance(err, (SubmissionError, NoSuchJobError)) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
