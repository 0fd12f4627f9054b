"""The benchmark: `python -m tests.bench [--quick] [--json FILE] [--no-docs]`. Not part of the pytest run.

Runs the sections below in this order (`--only` picks some by name), prints the table, and rewrites the "Latest run"
block of docs/benchmarks.md after a full run. What the rows measure: the package's docstring (tests/bench/__init__.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from core.runtime import keep_freed_memory
from tests.bench import (
    dashboard,
    digits,
    gpu,
    inference,
    memory,
    multinode,
    serving,
    shards,
    streaming,
    submit,
    sweep,
    training,
    transfer,
    viewers,
)
from tests.bench.harness import Row, Section, guard, log, machine, na, table, write_docs, write_json
from tests.bench.processes import redis_server, worker_available

SECTIONS: tuple[Section, ...] = tuple(m.SECTION for m in (
    training, streaming, submit, multinode, dashboard, sweep, viewers, inference, digits, transfer, memory, shards,
    serving, gpu))
"""Every family in the order of the table (its row numbers)."""


def run_section(section: Section, quick: bool) -> list[Row]:
    """The section's rows; a section that needs the worker gets a private redis-server of its own, or its n/a rows
    when worker/ cannot provide what it uses."""
    if not section.redis:
        return guard(section.label, lambda: section.run(quick), section.fallback)
    missing = worker_available()
    if missing:
        return [na(r.name, r.target, r.unit, missing, r.higher_is_better) for r in section.fallback]
    with redis_server() as url:
        return guard(section.label, lambda: section.run(quick, url), section.fallback)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and cases: a couple of minutes")
    p.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument("--only", default=None, help="comma-separated sections: " + ",".join(s.name for s in SECTIONS))
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    info = machine(keeps_freed_memory=keep_freed_memory())  # as in every training process (core.train.open_run)
    log(f"{info['cpu']}, {info['cores']} cores, GPU {info['gpu']}, load {info['load_avg']}")
    start = time.perf_counter()
    rows: list[Row] = []
    for section in SECTIONS:
        if (only is None or section.name in only) and section.available():
            rows += run_section(section, args.quick)
    seconds = time.perf_counter() - start
    print(table(rows))
    missed = [r.name for r in rows if r.met is False]
    print(f"\n{len(rows)} rows in {seconds:.0f} s; targets missed: {', '.join(missed) if missed else 'none'}")
    if args.json:
        write_json(rows, Path(args.json))
    if not args.no_docs and only is None:
        write_docs(rows, info, seconds, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
