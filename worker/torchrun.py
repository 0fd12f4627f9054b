"""`python -m worker.torchrun ARGS...`: torchrun (`torch.distributed.run`) with one more rendezvous backend,
`bound-static`, that a multi-node job's nodes use instead of torchrun's `static`.

Why: torchrun's static rendezvous has node 0's agent host the job's TCPStore (the key-value store every rank of every
node meets in: the process group's addresses, barriers), and c10d's TCPStore listens on every interface (`::`), not
only on the address the workers advertise (WORKER_ADDR). The store is unauthenticated: anything that reaches the
port on any of the machine's networks could read or write the job's rendezvous keys. torch has no option for the
store's bind address, but `TCPStore(master_listen_fd=...)` takes a socket the caller has bound and listens on that
one; `bound-static` hands it one bound to the rendezvous address itself. Everything else is torchrun's static
rendezvous, unchanged: the subclass only creates the store before the base class would (tests/test_multinode.py
checks the listening sockets of a 2-node job; tests/test_rq_shape.py-style pinning: `test_bound_static_shape`).

Arguments are torchrun's, with `--rdzv-backend=bound-static --rdzv-endpoint=ADDR:PORT --rdzv-conf=rank=N,...` in
place of `--master-addr/--master-port/--node-rank` (worker/launcher.py builds them). A one-machine job with several
ranks uses it too, at `127.0.0.1:0` (instead of `--standalone`, whose c10d store also listens on every interface):
port 0 lets the kernel pick a free port, which the ranks are then told.
"""
from __future__ import annotations

import socket
import sys

from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous, create_rdzv_handler

from worker.defaults import BOUND_STATIC
from worker.outcome import SUMMARY_TAG


class BoundStaticTCPRendezvous(StaticTCPRendezvous):
    """torchrun's static rendezvous whose store (node 0) listens on the rendezvous address only."""

    def get_backend(self) -> str:
        return BOUND_STATIC  # torchrun checks that the handler is the backend it asked for

    def next_rendezvous(self):  # type: ignore[no-untyped-def]  # torch's signature
        if self._store is None and self.rank == 0:  # the base class then uses this store as it would its own
            family = socket.AF_INET6 if ":" in self.master_addr else socket.AF_INET
            listener = socket.create_server((self.master_addr, self.master_port), family=family, backlog=1024)
            self.master_port = listener.getsockname()[1]  # port 0 (one machine): the one the kernel picked
            self._store = TCPStore(self.master_addr, self.master_port, self.world_size, True, self.timeout,
                                   multi_tenant=True, master_listen_fd=listener.detach())  # the store owns the fd
        return super().next_rendezvous()


def create_bound_handler(params: RendezvousParameters) -> RendezvousHandler:
    """torchrun's static handler's parsing, then our class. `rank` arrives as text from `--rdzv-conf` (torchrun puts
    an int there only for its own `static`)."""
    if "rank" in params.config:
        params.config["rank"] = int(params.config["rank"])
    base = create_rdzv_handler(params)
    assert isinstance(base, StaticTCPRendezvous)
    return BoundStaticTCPRendezvous(base.master_addr, base.master_port, base.rank, base.world_size, base.run_id,
                                    int(base.timeout.total_seconds()))


def main(argv: list[str] | None = None) -> None:
    """torchrun with `bound-static` registered. When ranks fail, one line per failed rank (`[torchrun] rank R (local
    rank L) exited with code C`, worker.outcome's SUMMARY_TAG) and exit code 1, in place of torchrun's own traceback
    of itself and its summary box: the ranks' own `error` lines just above stay the last words of the output (what
    a job's error is taken from, worker/outcome.py `last_words`)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    rendezvous_handler_registry.register(BOUND_STATIC, create_bound_handler)
    try:
        torchrun_main(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as err:
        for rank, failure in sorted(err.failures.items()):
            print(f"{SUMMARY_TAG} rank {rank} (local rank {failure.local_rank}) exited with code {failure.exitcode}",
                  file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
