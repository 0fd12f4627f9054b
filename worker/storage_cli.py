"""`python -m worker storage [--json]` and `python -m worker gc [--dry-run] [--json]` (README "Disk, retention and limits")."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from worker.cliutil import acting_user, checked_connection, human_bytes, print_json, timestamp


def cmd_storage(args: argparse.Namespace) -> int:
    from worker.artifacts import ArtifactStore
    from worker.storage import usage

    report = usage(checked_connection(), ArtifactStore())
    if args.json:
        print_json(report)
        return 0
    print(f"artifact store: {report['store']}")
    for place in report["disk"]:
        print(f"  disk ({place['what']}) {place['path']}: {human_bytes(place['free'])} free of "
              f"{human_bytes(place['total'])}")
    print(f"  new work is refused below {human_bytes(report['min_free_bytes'])} free (DISK_MIN_FREE_GB)")
    totals = report["totals"]
    print(f"\njobs: {len(report['jobs'])} run folders, {human_bytes(totals['jobs'])} "
          f"(checkpoints {human_bytes(totals['checkpoints'])})")
    for job in report["jobs"][:args.top]:
        print(f"  {job['job_id']}  {job['state'] or 'deleted':<10} {human_bytes(job['bytes']):>9}  "
              f"checkpoints {human_bytes(job['checkpoint_bytes']):>9}  ended {timestamp(job['ended_at'])}  "
              f"{job['name'] or ''}")
    if len(report["jobs"]) > args.top:
        print(f"  ... {len(report['jobs']) - args.top} more (--top N, or --json)")
    print(f"\nstored datasets: {len(report['datasets'])}, {human_bytes(totals['datasets'])} "
          f"(orphans {human_bytes(totals['orphan_datasets'])})")
    for ds in report["datasets"]:
        used = ", ".join(ds["used_by"][:4]) + (" ..." if len(ds["used_by"]) > 4 else "") or "nothing (orphan)"
        print(f"  {ds['key']}  {human_bytes(ds['bytes']):>9}  used by {used}")
    print(f"\nmodels: {len(report['models'])}")
    print("\ncaches on this machine:")
    for cache in report["caches"]:
        print(f"  {cache['cache']:<42} {human_bytes(cache['bytes']):>9}  {cache['path']}")
    mem = report["redis"]
    cap = human_bytes(mem["maxmemory"]) if mem["maxmemory"] else "no limit"
    print(f"\nredis: {human_bytes(mem['used_memory'])} used, maxmemory {cap} ({mem['maxmemory_policy']}), "
          f"{mem['keys']} keys")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from worker.artifacts import ArtifactStore
    from worker.retention import collect

    conn = checked_connection()
    removed = collect(conn, ArtifactStore(), dry_run=args.dry_run, actor=None if args.dry_run else acting_user(conn))
    if args.json:
        print_json({"dry_run": args.dry_run, "removed": [dataclasses.asdict(r) for r in removed],
                    "bytes": sum(r.bytes for r in removed)})
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for item in removed:
        print(f"{verb} {item.what}: {item.target} ({human_bytes(item.bytes)}): {item.reason}")
    print(f"{verb} {len(removed)} item(s), {human_bytes(sum(r.bytes for r in removed))}")
    return 0


def add_storage_commands(sub: Any) -> None:
    """`storage` and `gc` under the `python -m worker` subparsers `sub`."""
    s = sub.add_parser("storage", help="what each job, dataset and cache holds, free disk, Redis memory")
    s.add_argument("--json", action="store_true")
    s.add_argument("--top", type=int, default=20, help="job rows shown (largest first; default 20)")
    s.set_defaults(func=cmd_storage)
    s = sub.add_parser("gc", help="apply the retention policy (README 'Disk, retention and limits'); workers run it daily")
    s.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_gc)
