"""Row 9, live viewers (tests/viewers.py): the dashboard server's CPU seconds per viewer-minute with N real Chromium
pages on a running job's page, the jobs page and the workers page, side by side with N = 0: ≤ 0.6 (1 % of a core)."""
from __future__ import annotations

import statistics

from tests.bench.harness import Row, Section, log, na

VIEWERS = 3
"""Chromium pages of the viewers row (each its own Streamlit session)."""
VIEWER_PAGES = ("job", "jobs", "workers")


def viewer_row_name(page: str) -> str:
    return f"live viewers: {page} page, server CPU s per viewer-minute ({VIEWERS} Chromium pages vs none)"


def bench_viewers(quick: bool, url: str) -> list[Row]:
    """What an open page costs the dashboard's server (tests/viewers.py): its CPU time over windows with 0 and with
    VIEWERS pages open, alternating; the difference per viewer and minute."""
    from tests.viewers import CHROMIUM, STEP_EVERY, chromium, live_dashboard, measure

    if not CHROMIUM.exists():
        return [na(viewer_row_name(p), 0.6, "CPU s", f"{CHROMIUM} missing (apt-get install -y chromium)", False)
                for p in VIEWER_PAGES]
    seconds, reps = (20.0, 1) if quick else (40.0, 2)
    rows = []
    with live_dashboard(url) as stack, chromium() as browser:
        for page in VIEWER_PAGES:
            res = measure(stack, page, VIEWERS, seconds, reps, browser)
            idle, busy = statistics.median(res[0]), statistics.median(res[VIEWERS])
            per_viewer = (busy - idle) / VIEWERS
            rows.append(Row(viewer_row_name(page), per_viewer, 0.6, "CPU s", higher_is_better=False, note=(
                f"server CPU s per minute: {idle:.2f} with no viewer, {busy:.2f} with {VIEWERS} "
                f"(= {per_viewer / 60:.2%} of a core per viewer); {reps}×{seconds:.0f} s windows per side, "
                f"alternating; a running job streaming a step event every {STEP_EVERY:g} s")))
            log(f"row 9: {page}: {per_viewer:.2f} CPU s per viewer-minute ({idle:.2f} → {busy:.2f})")
    return rows


SECTION = Section("viewers", "row 9", bench_viewers,
                  tuple(Row(viewer_row_name(p), None, 0.6, "CPU s", False) for p in VIEWER_PAGES), redis=True)
