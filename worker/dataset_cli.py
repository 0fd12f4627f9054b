"""`python -m worker dataset add | list | show | rm` (README "Datasets"): thin wrappers over worker.datasets.

Every refusal prints one line naming what is wrong and exits 2, with nothing registered or removed.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from worker.cliutil import (
    acting_user,
    add_mine,
    checked_connection,
    human_bytes,
    owner_filter,
    print_json,
    refusing,
    timestamp,
)
from worker.errors import ArtifactError, DatasetError

_refusing = refusing(DatasetError, ArtifactError)


def cmd_add(args: argparse.Namespace) -> int:
    from worker.datasets import register

    conn = checked_connection()
    done = register(conn, args.name, args.source, actor=acting_user(conn))
    v = done.version
    if not done.created:
        print(f"unchanged: {v.ref} already holds this content ({v.source}, hash {v.hash[:12]}); no new version")
    else:
        sampled = v.report.get("sampled")
        how = f", {sampled['images']} sampled images decoded" if sampled else ""
        print(f"registered {v.ref}: {len(v.classes)} classes, {v.num_images} images, {human_bytes(v.bytes)}{how}; "
              f"{'read in place from' if v.kind == 'in_place' else 'uploaded to'} {v.source}")
        for warning in v.report.get("warnings") or []:
            print(f"warning: {warning}")
        for bad in (v.report.get("skipped_files") or [])[:20]:
            print(f"skipped: {bad['file']}: {bad['reason']}")
    if args.prepare:
        _prepare(v, args.size)
    print(v.ref)
    return 0


def _prepare(v: Any, size: int | None) -> None:
    """`dataset add --prepare`: the form a job of the default preset would use (worker/datasets/prepared.py)."""
    from worker.artifacts import ArtifactStore
    from worker.datasets.prepared import ensure_prepared, input_size, local_copy

    store = ArtifactStore()
    side = size or input_size({}, v)

    live = sys.stderr.isatty()
    said = -1  # the last tenth said, where the output is not a terminal (a log file: a line per tenth)

    def progress(done: int, total: int, rate: float) -> None:
        nonlocal said
        line = f"preparing: {done}/{total} images, {rate:.0f}/s"
        if live:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif (tenth := 10 * done // max(total, 1)) > said:
            said = tenth
            print(line, file=sys.stderr, flush=True)

    from core.errors import DataError

    try:
        form = ensure_prepared(checked_connection(), store, v, size=side, color_mode="RGB",
                               local_source=lambda: local_copy(store, v), progress=progress)
    except DataError as err:
        raise DatasetError(f"registered {v.ref}, but preparing it failed: {err}") from None
    if live:
        print(file=sys.stderr)
    print(f"prepared {v.ref} {form['key']}: {form['encoding']} shards, {form['bytes_per_image']:.0f} bytes/image, "
          f"{form['url']}")


def _form_line(form: dict[str, Any]) -> str:
    """One prepared form in words: `224-RGB  raw, 12 shards, 9,000 images (train 6300, val 1800, test 900),
    200,220 B/image, prepared 2026-12-07 21:35:20 at 294 images/s`."""
    splits = ", ".join(f"{split} {n}" for split, n in (form.get("counts") or {}).items())
    return (f"{form['key']:<9} {form.get('encoding', '?')}, {form.get('shards', '?')} shards, "
            f"{form.get('images', 0):,} images ({splits}), {form.get('bytes_per_image', 0):,.0f} B/image, prepared "
            f"{timestamp(form.get('prepared_at'))} at {form.get('images_per_sec', 0):,.0f} images/s")


def cmd_list(args: argparse.Namespace) -> int:
    from worker.datasets import list_datasets, summary

    conn = checked_connection()
    rows = [summary(conn, name) for name in list_datasets(conn, owner=owner_filter(args, conn))]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no registered dataset (python -m worker dataset add NAME SOURCE)")
        return 0
    print(f"{'NAME':<24} {'LATEST':>6} {'VERSIONS':>8} {'CLASSES':>7} {'IMAGES':>8} {'SIZE':>9}  {'OWNER':<12} SOURCE")
    for r in rows:
        print(f"{r['name']:<24} {r['latest']:>6} {len(r['versions']):>8} {r['classes']:>7} {r['images']:>8} "
              f"{human_bytes(r['bytes']):>9}  {','.join(r['owners']):<12} {r['source']}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from worker.datasets import DatasetRef, dataset_versions, describe, get_version

    conn = checked_connection()
    ref = DatasetRef.parse(args.ref)
    versions = [get_version(conn, ref)] if ref.version is not None else dataset_versions(conn, ref.name)
    shown = [describe(conn, v) for v in versions]
    if args.json:
        print_json(shown[0] if ref.version is not None else {"name": ref.name, "versions": shown})
        return 0
    for d in shown:
        print(f"{d['ref']}  {'in place' if d['kind'] == 'in_place' else 'uploaded'}  {d['source']}")
        print(f"  hash      {d['hash']}")
        print(f"  created   {timestamp(d['created_at'])}  by {d['owner']}  from {d['origin']}")
        print(f"  images    {d['num_images']} in {len(d['classes'])} classes, {human_bytes(d['bytes'])}")
        for name, n in d["counts"].items():
            splits = "  ".join(f"{s} {c.get(name, 0)}" for s, c in (d["counts_by_split"] or {}).items())
            print(f"    {name:<20} {n:>7}" + (f"   ({splits})" if splits else ""))
        report = d["report"] or {}
        for warning in report.get("warnings") or []:
            print(f"  warning   {warning}")
        for bad in report.get("skipped_files") or []:
            print(f"  skipped   {bad['file']}: {bad['reason']}")
        forms = [_form_line(form) for form in d["prepared"]] or ["none"]
        for label, line in zip(["prepared"] + [""] * len(forms), forms):
            print(f"  {label:<9} {line}")
        jobs = ", ".join(f"{j['id']} ({j['state'] or 'deleted'})" for j in d["jobs"])
        print(f"  jobs      {jobs or 'none'}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from worker.datasets import remove

    conn = checked_connection()
    for v in remove(conn, args.ref, actor=acting_user(conn)):
        print(f"removed {v.ref}")
    return 0


def add_dataset_commands(sub: Any) -> None:
    """`dataset add|list|show|rm` under the `python -m worker` subparsers `sub`."""
    p = sub.add_parser("dataset", help="registered, versioned datasets (add, list, show, rm)")
    dsub = p.add_subparsers(dest="dataset_command", required=True)
    s = dsub.add_parser("add", help="register a new version of NAME from a folder, a .zip or a URL read in place")
    s.add_argument("name", help="lower-case letters, digits, . _ - (1-64 characters)")
    s.add_argument("source", help="a local folder or .zip (uploaded), or a URL read where it is: s3://bucket/prefix, "
                                  "gs://..., https://host/data.zip, file:///shared/path")
    s.add_argument("--prepare", action="store_true",
                   help="prepare shards now (otherwise the first job that needs them prepares them)")
    s.add_argument("--size", type=int, default=None,
                   help="with --prepare: the input side to prepare for (default: as a job's: 224 for photos)")
    s.set_defaults(func=_refusing(cmd_add))
    s = dsub.add_parser("list", help="every registered dataset with its latest version")
    s.add_argument("--json", action="store_true")
    add_mine(s)
    s.set_defaults(func=_refusing(cmd_list))
    s = dsub.add_parser("show", help="a dataset's versions (or one: NAME:VERSION), counts, health, jobs")
    s.add_argument("ref", metavar="NAME[:VERSION]")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_refusing(cmd_show))
    s = dsub.add_parser("rm", help="remove a version (NAME:VERSION) or every version (NAME); refused while in use")
    s.add_argument("ref", metavar="NAME[:VERSION]")
    s.set_defaults(func=_refusing(cmd_rm))
