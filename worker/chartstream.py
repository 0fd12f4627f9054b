"""Reading a job's event stream for charts: only the entries after the last id drawn, thinned on the server.

A stream holds up to ~20,000 entries (EVENT_STREAM_MAXLEN), nearly all `step` events. Sending all of them to the
dashboard costs more in parsing than every other part of the page, and a chart draws at most CHART_MAX_POINTS per
line anyway. So one Lua call reads the range and returns it flat (id, type, data per entry) with every non-step
entry and at most `max_steps` evenly spaced step entries (the last one always included). Later refreshes ask only
for what came after, which is a handful of entries.

It sits next to worker/streaming.py (same key, same entry format); `epoch_events` here is the one every client uses
(the Compare page, sweeps' objective, `worker.api`): it ships no step event at all.
"""
from __future__ import annotations

import json
from typing import Any

import redis

from worker import keys

# KEYS[1]: the events stream. ARGV[1]: XRANGE start ('-' or '(<id>'), ARGV[2]: most step entries to return (0: none).
# Reply: {entries scanned, id, type, data, id, type, data, ...}.
_READ = """
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+')
local max_steps = tonumber(ARGV[2])
local types, datas = {}, {}
local steps = 0
for i, e in ipairs(entries) do
  local f = e[2]
  local t, d = '', '{}'
  for j = 1, #f, 2 do
    if f[j] == 'type' then t = f[j + 1] elseif f[j] == 'data' then d = f[j + 1] end
  end
  types[i], datas[i] = t, d
  if t == 'step' then steps = steps + 1 end
end
local stride = 1
if max_steps > 0 and steps > max_steps then stride = math.ceil(steps / max_steps) end
local out = {#entries}
local seen = 0
for i, e in ipairs(entries) do
  local keep = true
  if types[i] == 'step' then
    seen = seen + 1
    keep = max_steps > 0 and (steps - seen) % stride == 0  -- anchored at the last step, which is always kept
  end
  if keep or i == #entries then
    out[#out + 1] = e[1]
    out[#out + 1] = types[i]
    out[#out + 1] = datas[i]
  end
end
return out
"""


def _text(b: bytes | str) -> str:
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else b


def chart_events_since(conn: redis.Redis, job_id: str, last_id: str = "0", *,
                       max_steps: int = 3000) -> tuple[list[dict[str, Any]], int]:
    """(events after `last_id` oldest first as {"id", "type", "data"}, how many stream entries that range held).

    Every non-step event is returned; step events are thinned to at most `max_steps` (0: none). The last entry of
    the range is always returned, so its id is the next call's `last_id`.
    """
    start = "(" + last_id if last_id not in ("0", "0-0", "-") else "-"
    reply = conn.eval(_READ, 1, keys.events(job_id), start, int(max_steps))
    scanned = int(reply[0])
    events = []
    for i in range(1, len(reply) - 2, 3):
        raw = _text(reply[i + 2])
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            data = {"raw": raw}
        events.append({"id": _text(reply[i]), "type": _text(reply[i + 1]), "data": data})
    return events, scanned


def epoch_events(conn: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    """The data of every epoch event of a job (what Compare overlays), without shipping its step events."""
    events, _ = chart_events_since(conn, job_id, "0", max_steps=0)
    return [e["data"] for e in events if e["type"] == "epoch"]
