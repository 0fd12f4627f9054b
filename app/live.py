"""A running job's chart series and figures, shared by every viewer of the job in this server process.

Each viewer's page refreshes every JOB_REFRESH_SECONDS. Before, every session kept its own series and built its own
four plotly figures on every refresh, so the server's CPU time grew by ~3 s per minute per open page (docs/benchmarks.md
"Live viewers"). Now the series of a job lives once per process: a refresh reads the stream entries after the last
one any viewer read (one small Redis call), and the figures are built once per new batch of entries and handed to every
viewer as they are. A viewer that opens the page later gets the same series at once.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any

import redis
import streamlit as st

from app.charts import live_figures
from app.defaults import LIVE_JOBS_CACHED
from app.tables import LiveSeries
from worker import api


@dataclasses.dataclass
class SharedSeries:
    """One job's series, the figures of its current version, and the lock every session takes to touch them."""

    job_id: str
    series: LiveSeries = dataclasses.field(default_factory=LiveSeries)
    version: int = 0
    """Bumped whenever new stream entries were folded in."""
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _figures: dict[str, Any] | None = None
    _figures_version: int = -1

    def refresh(self, conn: redis.Redis) -> int:
        """Fold in the stream entries after the last one read (by any viewer); returns how many were new."""
        with self.lock:
            events, scanned = api.chart_events_since(conn, self.job_id, self.series.last_id)
            new = self.series.add(events, scanned) if events else 0
            if new:
                self.version += 1
            return new

    def figures(self) -> dict[str, Any]:
        """The live figures of the current version (built by the first viewer that asks after a change)."""
        with self.lock:
            if self._figures is None or self._figures_version != self.version:
                self._figures = live_figures(self.series, revision=self.job_id)
                self._figures_version = self.version
            return self._figures


@st.cache_resource(max_entries=LIVE_JOBS_CACHED, show_spinner=False)
def shared_series(job_id: str) -> SharedSeries:
    """The process-wide series of `job_id` (the LIVE_JOBS_CACHED most recently used jobs are kept)."""
    return SharedSeries(job_id)
