"""`python -m worker redis | run | submit | status | cancel | logs | list | workers | doctor | sweep | sweep-status |
sweep-cancel | sweeps | sweep-dashboard | dataset | ...` (README "Jobs and workers", docs/sweeps.md, README "Datasets",
README "Users and roles": changing commands act as `users.cli_actor`; PermissionDeniedError exits 3).

Thin wrappers over the package's functions; every error a user can cause prints one line, not a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from datetime import datetime
from collections.abc import Callable
from typing import Any

from worker.cliutil import acting_user, add_mine, owner_filter
from worker.defaults import PRIORITIES, STATUS_WAIT_CANCEL
from worker.errors import (
    InsecureRedisError,
    NoSuchJobError,
    NoSuchSweepError,
    PermissionDeniedError,
    SubmissionError,
    UserError,
    WorkerError,
)


def _ts(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _printed_json(args: argparse.Namespace, data: Any) -> bool:
    """With `--json`: print `data` as JSON (what scripts parse) and say so; the command then prints nothing else."""
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    return bool(args.json)


def _conn() -> Any:
    from worker.connection import check, connect

    return check(connect())


# ----------------------------------------------------------------------------------------------------- commands
def cmd_redis(args: argparse.Namespace) -> int:
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
    from worker.multinode import primary_address

    addr = (args.advertise_addr or os.environ.get("WORKER_ADDR", "").strip() or primary_address())
    worker = TrainerWorker(conn, redis_url=url, resources=resources, store=store, name=args.name, prewarm=prewarm,
                           advertise_addr=addr)
    what = (f"GPU(s) {', '.join(str(g['index']) + ' ' + str(g['name']) for g in resources['gpus'])}"
            if resources["kind"] == "gpu" else f"CPU only, {resources['slots']} slot(s)")
    print(f"worker {worker.name}: {what}; Redis {redact(url)}; artifacts {store.url}; address {addr}", flush=True)
    worker.work(burst=args.burst, logging_level="INFO")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from worker.submit import submit_job

    conn = _conn()
    submitted = submit_job(args.config, args.overrides, connection=conn, gpus=args.gpus, nodes=args.nodes,
                           priority=args.priority, allow_local_paths=True, timeout=args.timeout,
                           actor=acting_user(conn))
    if submitted.waiting:
        print(f"note: {submitted.waiting}")
    print(f"submitted job {submitted.job_id}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from worker.api import job_status

    st = job_status(_conn(), args.job)
    if _printed_json(args, st):
        return 0
    print(f"job        {st.get('id', args.job)}  ({st.get('name') or ''})")
    print(f"owner      {st['owner']}")
    print(f"state      {st['state']}" + (f"  [{st['waiting']}]" if st.get("waiting") else ""))
    epochs = st.get("epochs") or "?"
    print(f"progress   {st['progress'] * 100:.0f}%  epoch {st['epoch']}/{epochs}"
          + (f"  best val acc {st['best_val_acc']:.4f}" if st.get("best_val_acc") is not None else ""))
    print(f"worker     {st.get('worker') or '-'}  attempt {st.get('attempt') or 0}  "
          f"recoveries {st.get('recoveries') or 0}")
    for node in st.get("nodes") or []:
        rank = "-" if node.get("node_rank") is None else node["node_rank"]
        print(f"node {rank:<5} {node.get('worker')}  {node.get('host') or ''} {node.get('addr') or ''}  "
              f"{node.get('ranks') or '?'} rank(s)  {node.get('state')}")
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

    conn = _conn()
    state = cancel_job(conn, args.job, wait=0.0 if args.no_wait else STATUS_WAIT_CANCEL, actor=acting_user(conn))
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

    conn = _conn()
    jobs = list_jobs(conn, {args.state} if args.state else None, owner=owner_filter(args, conn))
    if _printed_json(args, jobs):
        return 0
    print(f"{'JOB':<23} {'STATE':<10} {'PROG':>5} {'EPOCH':>7} {'VAL ACC':>7} {'GPUS':>4}  {'SUBMITTED':<19}  "
          f"{'OWNER':<12} NAME")
    for j in jobs:
        acc = f"{j['best_val_acc']:.4f}" if j.get("best_val_acc") is not None else "-"
        epochs = j.get("epochs") or "?"
        print(f"{j['id']:<23} {j['state']:<10} {j['progress'] * 100:>4.0f}% {j['epoch']:>3}/{epochs:<3} "
              f"{acc:>7} {j.get('gpus') or 1:>4}  {_ts(j.get('submitted_at')):<19}  {j['owner']:<12} "
              f"{j.get('name') or ''}")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    from worker.presence import list_workers

    workers = list_workers(_conn())
    if _printed_json(args, workers):
        return 0
    for w in workers:
        gpus = ", ".join(f"{g.get('name')} ({g.get('memory_mb')} MiB)" for g in w.get("gpus") or []) or "CPU"
        reserved = f"  reserved for {w['reserved_for']}" if w.get("reserved_for") else ""
        print(f"{w['name']}  {w.get('hostname')} {w.get('addr') or ''}  {w.get('state')}{reserved}  "
              f"job={w.get('current_job') or '-'}  "
              f"slots={w.get('slots')}  {gpus}  torch {w.get('torch')}")
    if not workers:
        print("no live worker")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from worker.sweeps import create_sweep

    conn = _conn()
    sweep_id = create_sweep(args.config, args.space, connection=conn, trials=args.trials, parallel=args.parallel,
                            metric=args.metric, direction=args.direction, sampler=args.sampler, pruner=args.pruner,
                            name=args.name, overrides=args.overrides, gpus=args.gpus, priority=args.priority,
                            allow_local_paths=True, seed=args.seed, actor=acting_user(conn))
    print(f"created sweep {sweep_id}")
    return 0


def _value(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from worker.sweeps import sweep_status

    st = sweep_status(_conn(), args.sweep)
    if _printed_json(args, st):
        return 0
    c = st["counts"]
    print(f"sweep      {st['id']}  ({st.get('name') or ''})  owner {st['owner']}")
    print(f"state      {st['state']}  {st['ended']}/{st['trials']} trials ended, parallel {st['parallel']}")
    print("trials     " + "  ".join(f"{k} {c[k]}" for k in c))
    print(f"objective  {st['direction']} {st['metric']}  sampler {st['sampler']}  pruner {st['pruner']}")
    if st.get("best_trial") is not None:
        params = ", ".join(f"{k}={_value(v)}" for k, v in (st.get("best_params") or {}).items())
        print(f"best       trial {st['best_trial']}  {st['metric']} {_value(st.get('best_value'))}  "
              f"job {st.get('best_job')}  ({params})")
    if st.get("error"):
        print(f"error      {st['error']}")
    keys_ = list(st.get("space") or {})
    print(f"{'#':>3} {'STATE':<10} {'VALUE':>8} {'EPOCH':>5}  {'JOB':<23} " + " ".join(f"{k:>16}" for k in keys_))
    for t in st["trials_table"]:
        print(f"{t['number']:>3} {t['state']:<10} {_value(t['value']):>8} {t['epoch']:>5}  {t['job'] or '-':<23} "
              + " ".join(f"{_value(t['params'].get(k)):>16}" for k in keys_))
    return 0


def cmd_sweep_cancel(args: argparse.Namespace) -> int:
    from worker.sweeps import cancel_sweep

    conn = _conn()
    print(f"sweep {args.sweep}: {cancel_sweep(conn, args.sweep, actor=acting_user(conn))}")
    return 0


def cmd_sweeps(args: argparse.Namespace) -> int:
    from worker.sweeps import list_sweeps, shown_counts

    conn = _conn()
    sweeps = list_sweeps(conn, owner=owner_filter(args, conn))
    if _printed_json(args, sweeps):
        return 0
    print(f"{'SWEEP':<23} {'STATE':<10} {'ENDED':>7} {'DONE':>4} {'PRUN':>4} {'FAIL':>4} {'RUN':>4} {'QUEU':>4} "
          f"{'BEST':>8}  {'OWNER':<12} NAME")
    for s in sweeps:
        counts = " ".join(f"{n:>4}" for n in shown_counts(s["counts"]).values())
        print(f"{s['id']:<23} {s['state']:<10} {s['ended']:>3}/{s['trials']:<3} {counts} "
              f"{_value(s.get('best_value')):>8}  {s['owner']:<12} {s.get('name') or ''}")
    return 0


def cmd_sweep_dashboard(args: argparse.Namespace) -> int:
    from worker.study import storage_for
    from worker.sweeps import read_sweep

    conn = _conn()
    read_sweep(conn, args.sweep)  # NoSuchSweepError for a bad id
    try:
        from optuna_dashboard import run_server
    except ImportError:
        print("error: optuna-dashboard is not installed: pip install optuna-dashboard", file=sys.stderr)
        return 2
    print(f"optuna-dashboard for sweep {args.sweep} on http://{args.host}:{args.port}/", flush=True)
    run_server(storage_for(conn, args.sweep), host=args.host, port=args.port)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from worker.doctor import main as doctor

    return doctor(as_json=args.json)


# ---------------------------------------------------------------------------------------------------------- CLI
def _command(sub: Any, name: str, func: Callable[[argparse.Namespace], int], help: str, *ids: str,
             with_json: bool = False) -> argparse.ArgumentParser:
    """A subcommand that runs `func`: its positional `ids` (job, sweep) and, `with_json`, the --json flag."""
    s = sub.add_parser(name, help=help)
    for arg in ids:
        s.add_argument(arg)
    if with_json:
        s.add_argument("--json", action="store_true")
    s.set_defaults(func=func)
    return s


def _add_job_options(s: argparse.ArgumentParser, *, gpus_per: str, set_help: str | None = None) -> None:
    """What `submit` and `sweep` share: the config, --set overrides, --gpus and --priority of the job (each trial's)."""
    s.add_argument("config", help="YAML preset, e.g. configs/digits.yaml")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    s.add_argument("--gpus", type=int, default=1, help=f"GPUs (or CPU gloo ranks) {gpus_per} (default 1)")
    s.add_argument("--priority", choices=PRIORITIES, default="default")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker", description="Managed training jobs: Redis, workers, jobs.")
    sub = p.add_subparsers(dest="command", required=True)

    s = _command(sub, "redis", cmd_redis,
                 "run the embedded Redis in the foreground (127.0.0.1, password in var/redis/)")
    s.add_argument("--port", type=int, default=None, help="port (default: env REDIS_PORT or 6379)")
    s.add_argument("--force", action="store_true", help="start the embedded server even when REDIS_URL is set")

    s = _command(sub, "run", cmd_run, "run a worker")
    s.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    s.add_argument("--gpus", default=None, help="GPU indices to use, e.g. 0,1 (default: all visible GPUs)")
    s.add_argument("--cpu", action="store_true", help="ignore GPUs: a CPU-only worker (jobs run as gloo ranks)")
    s.add_argument("--slots", type=int, default=None, help="CPU-only worker: most ranks per job (default min(CPUs, 8))")
    s.add_argument("--name", default=None, help="worker name (default host-pid-random)")
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for Redis at start-up (default 60)")
    s.add_argument("--advertise-addr", default=None,
                   help="address other machines reach this worker at, for multi-node jobs (env WORKER_ADDR; "
                        "default: this host's primary address)")
    s.add_argument("--no-prewarm", action="store_true",
                   help="do not keep a pre-started training process (env WORKER_PREWARM=0 does the same)")

    s = _command(sub, "submit", cmd_submit, "validate, upload the dataset if local, enqueue; prints the job id last")
    _add_job_options(s, gpus_per="for the job, on each node")
    s.add_argument("--nodes", type=int, default=1,
                   help="workers (machines) the job spans: one DDP job of nodes x gpus ranks (default 1)")
    s.add_argument("--timeout", type=float, default=None, help="wall-clock limit in seconds (default: none)")

    _command(sub, "status", cmd_status, "a job's status", "job", with_json=True)
    s = _command(sub, "cancel", cmd_cancel, "cancel a queued or running job", "job")
    s.add_argument("--no-wait", action="store_true", help="do not wait for a running job to stop")
    s = _command(sub, "logs", cmd_logs, "a job's log lines (every rank, plus the worker's notes)", "job")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    s.add_argument("-n", "--lines", type=int, default=200)
    s = _command(sub, "list", cmd_list, "jobs, newest first", with_json=True)
    s.add_argument("--state", default=None, help="only jobs in this state")
    add_mine(s)
    _command(sub, "workers", cmd_workers, "live workers", with_json=True)

    s = _command(sub, "sweep", cmd_sweep, "hyper-parameter search: every trial is a job; prints the sweep id")
    _add_job_options(s, gpus_per="per trial", set_help="override the base config (as for submit)")
    s.add_argument("--space", required=True,
                   help="SPACE.yaml: dotted keys → {float|int: [low, high]} or {choice: [...]}")
    s.add_argument("--trials", type=int, required=True, help="trials in all")
    s.add_argument("--parallel", type=int, default=1, help="most trials queued or running at once (default 1)")
    s.add_argument("--metric", default="val_acc", help="the epoch metric to optimise (default val_acc)")
    s.add_argument("--direction", choices=("maximize", "minimize"), default=None,
                   help="default: minimize for losses and seconds, else maximize")
    s.add_argument("--sampler", default="tpe", help="tpe (default), random or grid")
    s.add_argument("--pruner", default="median", help="median (default), hyperband or none")
    s.add_argument("--name", default=None, help="a label (default: model on dataset)")
    s.add_argument("--seed", type=int, default=None, help="sampler seed (default: random)")
    _command(sub, "sweep-status", cmd_sweep_status, "a sweep's state, best trial and trials", "sweep", with_json=True)
    _command(sub, "sweep-cancel", cmd_sweep_cancel, "cancel a sweep and every queued or running trial", "sweep")
    add_mine(_command(sub, "sweeps", cmd_sweeps, "sweeps, newest first", with_json=True))
    s = _command(sub, "sweep-dashboard", cmd_sweep_dashboard,
                 "open a sweep's study in optuna-dashboard (pip install optuna-dashboard)", "sweep")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)

    _command(sub, "doctor", cmd_doctor, "can this machine serve jobs? checks each part and prints the fix (exit 1: no)",
             with_json=True)
    from worker.dataset_cli import add_dataset_commands  # dataset add|list|show|rm

    add_dataset_commands(sub)
    from worker.storage_cli import add_storage_commands  # storage, gc

    add_storage_commands(sub)
    from worker.model_cli import add_model_commands  # model register|alias|list|show|rm

    add_model_commands(sub)
    from worker.notify_cli import add_notify_commands  # notify add|list|rm|log

    add_notify_commands(sub)
    from worker.user_cli import add_user_commands  # login, whoami, user add|list|role|limits|token|rm, audit

    add_user_commands(sub)
    return p


READER_GONE_EXIT = 128 + signal.SIGPIPE
"""Exit status when stdout's reader went away (`| head`, `| grep -q`): 141, what a shell reports for a Unix tool that
SIGPIPE ended (`yes | head`). The CLI ends quietly with it instead of a BrokenPipeError traceback (README)."""


def _reader_gone() -> int:
    """stdout's reader closed the pipe: point stdout at /dev/null so Python's flush at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return READER_GONE_EXIT


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away shows up here (a short output sits in the buffer until exit)
        return code
    except BrokenPipeError:
        return _reader_gone()
    except PermissionDeniedError as err:  # README "Users and roles": nothing was changed
        print(f"error: {err}", file=sys.stderr)
        return 3
    except WorkerError as err:
        print(f"error: {err}", file=sys.stderr)
        refused = args.command in ("submit", "sweep") or isinstance(err, (SubmissionError, NoSuchJobError,
                                                                           NoSuchSweepError, InsecureRedisError,
                                                                           UserError))
        return 2 if refused else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
