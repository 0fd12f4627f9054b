"""A multi-node job's nodes hash `trainer:job:<id>:nodes` (docs/redis.md): node rank → one JSON entry per node of
the current attempt. The one module that reads and writes it: each node (worker/multinode.py's `NodeRun`) saves its
own entry with `save_node`; `job_nodes` reads them for `job_status` (the CLI's `status`, the Job page's nodes table).
"""
from __future__ import annotations

import json
from typing import Any

import redis

from worker import gang, keys
from worker.record import JobRecord
from worker.states import WAITING_STATES, JobState, TextEnum


class NodeState(TextEnum):
    """A node's `state`. The job states' names mean the same for one node (node 0's final state is the job's)."""

    RESERVED = "reserved"
    """Shown, never stored: a worker of a gang that is still gathering."""
    STARTING = "starting"
    """The gang started the attempt; the node prepares its run folder and, node 1 and up, waits for node 0's address."""
    RUNNING = JobState.RUNNING.value
    FINISHED = JobState.FINISHED.value
    FAILED = JobState.FAILED.value
    CANCELLED = JobState.CANCELLED.value
    PRUNED = JobState.PRUNED.value
    LOST = "lost"
    """The attempt stopped being this node's while it ran (the job was re-queued by another node, or deleted)."""
    STOPPED = "stopped"
    """The node stopped because the attempt was re-queued (a member lost, its worker shut down) or ended before
    the node started."""


def save_node(record: JobRecord, entry: dict[str, Any]) -> None:
    """Write node `entry["node_rank"]`'s entry of attempt `entry["attempt"]`, merged into what that node wrote
    before in the same attempt (an earlier attempt's entry is replaced). Nothing is written once the job is gone:
    a deleted job must not come back as a nodes hash."""
    if not record.exists():
        return
    key, field = keys.nodes(record.id), str(entry["node_rank"])
    old = record.conn.hget(key, field)
    prev = json.loads(old) if old else {}
    if prev.get("attempt") == entry["attempt"]:
        entry = {**prev, **entry}
    record.conn.hset(key, field, json.dumps(entry))


def job_nodes(conn: redis.Redis, job_id: str, st: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The nodes of a multi-node job, by node rank: `node_rank`, `worker`, `host`, `addr`, `ranks`, `global_ranks`,
    `state` (a NodeState: `reserved` while the gang gathers; then `starting`, `running`, a final job state, `lost`,
    `stopped`), `attempt`, `pid`, `exit_code`. Empty for a one-node job. `st`: the job's fields, when read already."""
    if st is None:
        record = JobRecord.find(conn, job_id)
        st = record.fields if record else {}
    if int(st.get("num_nodes") or 1) <= 1:
        return []
    if st.get("state") in WAITING_STATES:
        return [{"node_rank": None, "worker": name, "state": NodeState.RESERVED.value, "ranks": st.get("gpus")}
                for name in gang.members(conn, job_id)]
    out = [json.loads(v) for v in conn.hvals(keys.nodes(job_id))]
    attempt = int(st.get("attempt") or 0)
    known = {n.get("node_rank") for n in out if n.get("attempt") == attempt}
    for rank, name in enumerate(gang.gang_of(st)):  # a node that has not written its entry yet
        if rank not in known:
            out.append({"node_rank": rank, "worker": name, "state": NodeState.STARTING.value, "ranks": st.get("gpus"),
                        "attempt": attempt})
    return sorted((n for n in out if n.get("attempt") == attempt), key=lambda n: n.get("node_rank") or 0)
