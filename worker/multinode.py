"""One node of a multi-node job: what each worker of a started gang runs (the RQ job `train_node`).

The gang (worker/gang.py) made the attempt `running` and ordered its workers: the i-th is node rank i. Node 0 picks
a free port on its advertised address and publishes `addr:port` in the job's `rendezvous` field; every node then
runs torchrun (`python -m worker.torchrun --nnodes N --nproc-per-node G --rdzv-backend bound-static --rdzv-endpoint
ADDR:PORT --rdzv-conf rank=i,...`: the static rendezvous, its store bound to ADDR only, id `<job>-a<attempt>`), so
global rank 0 is on node 0 and streams the events as a one-node job does.

Ownership: node 0's worker is the job's `worker` and records the final state; the other nodes record only their own
entry in `trainer:job:<id>:nodes`. Only node 0 writes (and uploads) the run folder; every node downloads it to
resume. Log lines of node i carry the prefix `[node i]`.

Faults: a node whose command fails by itself first checks whether a member of the gang died (its advertisement
expires within WORKER_HEARTBEAT_TTL): then it re-queues the whole job (`gang.requeue_running`), which stops every
other node (they poll the attempt number), and a new gang resumes from the last checkpoint. Otherwise the failure is
the job's own. A machine that vanishes without closing its connections is caught by the recovery scan and by the
process-group timeout (CORE_DIST_TIMEOUT) that the nodes run with.
"""
from __future__ import annotations

import socket
import time
from typing import Any

import redis

from worker import gang
from worker.attempt import Attempt
from worker.context import WorkerContext
from worker.defaults import CANCEL_POLL_INTERVAL, MAX_RECOVERIES, PEER_END_WAIT, RENDEZVOUS_TIMEOUT
from worker.errors import JobFailed
from worker.launcher import Rendezvous
from worker.nodes import NodeState, job_nodes, save_node
from worker.outcome import AttemptResult, Outcome, last_words
from worker.presence import heartbeat_ttl
from worker.states import JobState


def primary_address() -> str:
    """This host's primary address: the source address of its default route (no packet is sent), else the
    address its hostname resolves to, else 127.0.0.1."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the route, a UDP connect sends nothing
            return str(sock.getsockname()[0])
    except OSError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def free_port(addr: str) -> int:
    """A TCP port free on `addr` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr, 0))
        return int(sock.getsockname()[1])


class NodeRun(Attempt):
    """One node (rank `node_rank` of the gang) of one attempt of a multi-node job on this worker. It overrides the
    hooks that differ from a one-node attempt: `claim` (the gang already started the attempt), `rendezvous`,
    `still_ours` (the attempt number), `after_failed_exit` (a lost peer), `give_back` (the whole gang), `on_stage`
    (its entry in the nodes hash) and `_error_from` (which node said what); only node 0 is `primary`."""

    def __init__(self, ctx: WorkerContext, job_id: str, attempt: int):
        super().__init__(ctx, job_id)
        self.attempt = attempt
        self.node_rank = -1
        self.members: list[str] = []
        self.nnodes = 0
        self.primary = False

    # --------------------------------------------------------------------------------------------- Attempt hooks
    def claim(self) -> bool:
        me = self.ctx.worker_name
        gang.unreserve(self.conn, me, self.job_id)
        if not self.record.refresh() or self.record.state is not JobState.RUNNING \
                or self.record.attempt != self.attempt or me not in self.record.gang:
            return False
        self.members = self.record.gang
        self.node_rank = self.members.index(me)
        self.nnodes = len(self.members)
        self.primary = self.node_rank == 0  # node 0 holds global rank 0, which writes the run folder
        self.log_prefix = f"[node {self.node_rank}] "
        ranks = self.record.gpus
        self.on_stage(NodeState.STARTING, ranks=ranks,
                      global_ranks=[self.node_rank * ranks + i for i in range(ranks)])
        return True

    def rendezvous(self) -> Rendezvous | Outcome:
        """Node 0 publishes a free port on its address; the others wait for it (or for the attempt to end)."""
        run_id = f"{self.job_id}-a{self.attempt}"
        if self.node_rank == 0:
            addr = self.ctx.advertise_addr
            port = free_port(addr)
            self.record.save(rendezvous={"attempt": self.attempt, "addr": addr, "port": port})
            self.note(f"rendezvous at {addr}:{port} (id {run_id}) for {self.nnodes} nodes")
            return Rendezvous(addr, port, self.nnodes, 0, run_id)
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT
        while time.monotonic() < deadline:
            outcome = self.poll_flags()
            if outcome:
                return self._ended_before_start(outcome)
            self.record.refresh("rendezvous")
            info = self.record.get("rendezvous", {})
            if info.get("attempt") == self.attempt:
                return Rendezvous(str(info["addr"]), int(info["port"]), self.nnodes, self.node_rank, run_id)
            time.sleep(CANCEL_POLL_INTERVAL)
        what = f"node 0 ({self.members[0]}) did not publish its address within {RENDEZVOUS_TIMEOUT} s"
        if not self._requeue_if_member_lost(what):
            gang.requeue_running(self.conn, self.job_id, self.attempt, max_recoveries=MAX_RECOVERIES, reason=what)
        return self._ended_before_start(Outcome.LOST)

    def _ended_before_start(self, outcome: Outcome) -> Outcome:
        self.note({Outcome.CANCEL: "cancelled before this node started",
                   Outcome.LOST: "the attempt ended before this node started"}.get(outcome, str(outcome)))
        return outcome

    def still_ours(self) -> bool:
        """Still this attempt (node 0's worker is the job's `worker`; every node checks the attempt number)."""
        return self.record.attempt == self.attempt

    def _requeue_if_member_lost(self, what: str) -> bool:
        dead = gang.dead_workers(self.conn, [m for m in self.members if m != self.ctx.worker_name])
        if not dead:
            return False
        state, new_attempt = gang.requeue_running(
            self.conn, self.job_id, self.attempt, max_recoveries=MAX_RECOVERIES,
            reason=f"{what}: worker(s) {', '.join(dead)} of the gang stopped heartbeating")
        self.note(f"{what}; worker(s) {', '.join(dead)} of the gang are gone: "
                  + (f"re-queued as attempt {new_attempt}" if state == JobState.RECOVERING else f"the job is {state}"))
        return True

    def after_failed_exit(self, rc: int) -> Outcome | None:
        """A peer's death makes this node's ranks fail too (their connections close): wait up to one heartbeat TTL
        for a member's advertisement to expire before calling the failure the job's own."""
        deadline = time.monotonic() + heartbeat_ttl() + 2.0
        while True:
            outcome = self.poll_flags()
            if outcome:
                return outcome
            if self._requeue_if_member_lost(f"this node's command exited with code {rc}"):
                return Outcome.LOST
            if time.monotonic() >= deadline:
                return None
            time.sleep(CANCEL_POLL_INTERVAL)

    def _error_from(self, rc: int | None) -> tuple[str, str]:
        """A node other than node 0 says its own ranks' last words (the status's error is rank 0's, on node 0); node 0
        adds what the other nodes said, where it differs (`peer_errors`: where a failure may have begun)."""
        if not self.primary:
            own = last_words(list(self.log.tail) if self.log else [])
            return (own, "TrainingError") if own else super()._error_from(rc)
        error, kind = super()._error_from(rc)
        return "; ".join([error, *self.peer_errors(error)]), kind

    def peer_errors(self, mine: str) -> list[str]:
        """Node 0's view of a failed attempt names where it may have begun: each other node's own last words
        (`node N (worker W): ...`) that differ from node 0's. The other nodes record theirs when their ranks have
        exited, which after a failure in one rank is within about a second of node 0's; waits up to PEER_END_WAIT for
        their entries to leave `running`."""
        deadline = time.monotonic() + PEER_END_WAIT
        while True:
            peers = [n for n in job_nodes(self.conn, self.job_id) if n.get("node_rank") != self.node_rank]
            if time.monotonic() >= deadline or all(n.get("state") not in (NodeState.STARTING, NodeState.RUNNING)
                                                   for n in peers):
                break
            time.sleep(CANCEL_POLL_INTERVAL)
        return [f"node {n['node_rank']} (worker {n.get('worker')}): {n['error']}" for n in peers
                if n.get("state") == NodeState.FAILED and n.get("error") and n["error"] != mine]

    def give_back(self, reason: str) -> AttemptResult:
        """The whole gang's attempt goes back to waiting (the other nodes notice the new attempt number and stop)."""
        state, new_attempt = gang.requeue_running(self.conn, self.job_id, self.attempt, max_recoveries=-1,
                                                  reason=f"worker {self.ctx.worker_name}: {reason}")
        self.on_stage(NodeState.STOPPED)
        if state == JobState.RECOVERING:
            self.note(f"re-queued as attempt {new_attempt} ({reason}); a new gang resumes from the last checkpoint")
        return AttemptResult(self.job_id, JobState.parse(state), Outcome.SHUTDOWN, primary=self.primary)

    def on_stage(self, stage: NodeState, **fields: Any) -> None:
        """This node's entry (worker, host, addr, ranks, state, attempt, ...) in the job's nodes hash."""
        try:
            save_node(self.record, {"node_rank": self.node_rank, "worker": self.ctx.worker_name,
                                    "host": socket.gethostname(), "addr": self.ctx.advertise_addr,
                                    "attempt": self.attempt, "state": stage, **fields})
        except redis.exceptions.RedisError:
            pass


def train_node(job_id: str, attempt: int, ctx: WorkerContext | None = None) -> dict[str, Any]:
    """RQ entry point of one node (enqueued by its own worker into its private queue when the gang started); `ctx`
    is that worker's context (worker/worker.py's `WorkerJob` passes it)."""
    if ctx is None:
        raise JobFailed("a node of a multi-node job runs only inside `python -m worker run`")
    result = NodeRun(ctx, job_id, int(attempt)).run()
    if result.failed_job:
        raise JobFailed(f"job {job_id} failed: {result.error}")
    return result.as_json()
