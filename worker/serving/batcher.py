"""Dynamic batching: requests that wait together run as one batch.

Up to `runs` batches run at once, each in a worker thread of `pool` (ONNX Runtime releases the GIL, so the event loop
keeps accepting requests meanwhile; `runs` is the server's model instances, worker/serving/model.py `instances`).
Requests queue while every instance is busy; the next batch takes everything queued, up to `max_batch` samples, as
soon as an instance is free. `max_delay` (seconds) is how long a batch waits for company after its first request: 0 (the default) adds
no latency at low load, and batches still form whenever the model is busy, which is exactly when they help.
`max_batch=1` turns batching off (one request per run, as a server without it).
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np


@dataclasses.dataclass
class _Request:
    x: np.ndarray
    future: asyncio.Future[np.ndarray]


class DynamicBatcher:
    """`await batcher.run(x)`: x's rows go through `infer` in a batch with other requests' rows."""

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], *, max_batch: int, max_delay: float,
                 pool: Executor, runs: int = 1, on_batch: Callable[[int], None] | None = None) -> None:
        self.infer = infer
        self.max_batch = max(1, int(max_batch))
        self.max_delay = max(0.0, float(max_delay))
        self.pool = pool
        """Where batches run: `runs` threads shared by every batcher of a server."""
        self._slots = asyncio.Semaphore(max(1, int(runs)))
        """Batches of this batcher that may run at once."""
        self._running: set[asyncio.Task[None]] = set()
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        """Requests in arrival order; None is retire()'s wake-up call."""
        self._wakeups = 0
        """Wake-up calls (None) in the queue."""
        self._carry: _Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._retired = False

    def depth(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize() - self._wakeups + (self._carry is not None)

    async def run(self, x: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        await self._queue.put(_Request(x, future))
        if self._task is None or self._task.done():  # first use, or a request that arrived after retire()
            self._task = loop.create_task(self._serve())
        return await future

    def retire(self) -> None:
        """Serve what is queued, then stop (a newer batcher takes new requests).

        The loop is woken with None rather than cancelled: a request that took this batcher just before the swap may
        still queue here after retire(), and a cancelled loop that had not yet ended would leave it waiting forever
        (run() restarts only a loop that is done). The loop ends only on an empty queue; a later request restarts it."""
        self._retired = True
        self._wakeups += 1
        self._queue.put_nowait(None)

    async def _next(self, timeout: float | None) -> _Request | None:
        """The next request; None on a timeout, an empty queue (timeout 0) or retire()'s wake-up call."""
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            item = await self._queue.get()
        elif timeout <= 0:
            if self._queue.empty():
                return None
            item = self._queue.get_nowait()
        else:
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                return None
        if item is None:
            self._wakeups -= 1
        return item

    async def _gather(self) -> list[_Request]:
        loop = asyncio.get_running_loop()
        first = await self._next(None)
        if first is None:  # retire() woke us: _serve decides whether to stop
            return []
        items, n = [first], len(first.x)
        deadline = loop.time() + self.max_delay
        while n < self.max_batch:
            item = await self._next(max(0.0, deadline - loop.time()))
            if item is None:
                break
            if n + len(item.x) > self.max_batch:
                self._carry = item  # it starts the next batch
                break
            items.append(item)
            n += len(item.x)
        return items

    async def _serve(self) -> None:
        while not (self._retired and self._queue.empty() and self._carry is None):
            await self._slots.acquire()  # the batch forms only once an instance is free: it takes all that queued
            items = await self._gather()
            live = [r for r in items if not r.future.done()]  # a client that went away is not computed for
            if not live:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(live))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, live: list[_Request]) -> None:
        try:
            batch = live[0].x if len(live) == 1 else np.concatenate([r.x for r in live])
            out = await asyncio.get_running_loop().run_in_executor(self.pool, self.infer, batch)
        except Exception as err:  # noqa: BLE001 - the error belongs to the requests, the server goes on
            for r in live:
                if not r.future.done():
                    r.future.set_exception(err)
            return
        finally:
            self._slots.release()
        if self.on_batch:
            self.on_batch(len(batch))
        start = 0
        for r in live:
            if not r.future.done():
                r.future.set_result(out[start:start + len(r.x)])
            start += len(r.x)
