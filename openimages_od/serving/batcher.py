"""Micro-batching of concurrent requests into one model call, off the event loop.

Requests ``submit`` an item and await its result. One collector task takes the
first waiting item, then keeps taking items until the batch holds
``max_batch`` or ``max_wait_ms`` has passed since the first, and runs the
batch function in a single worker thread (TensorFlow parallelises inside the
op; more threads would only contend). While a batch runs, new requests queue
up, so under load the next batch forms immediately with no waiting.

If a batch call fails (for example one image the header check accepted but
the decoder rejects), the items are retried one by one so only the bad one
fails. ``max_batch=1, max_wait_ms=0`` disables batching with the same code
path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["BatcherClosed", "MicroBatcher"]


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no new work."""


class Ticket:
    """Announces an item that will be submitted soon (see :meth:`MicroBatcher.ticket`)."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher = batcher
        self._open = True
        batcher._expected += 1

    def close(self) -> None:
        """The item was submitted or will never be; idempotent."""
        if self._open:
            self._open = False
            self._batcher._expected -= 1

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MicroBatcher(Generic[T, R]):
    """Collects items from concurrent coroutines into batches for a blocking function.

    Args:
        fn: ``fn(items) -> results`` (same length), blocking; runs in the worker thread.
        max_batch: largest batch.
        max_wait_ms: longest wait for more items after the first one arrives.
        on_batch: called with (batch size, seconds) after each model call (metrics).
    """

    def __init__(
        self,
        fn: Callable[[Sequence[T]], Sequence[R]],
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.fn = fn
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_ms)) / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="oiod-model")
        self._closing = False
        self._expected = 0
        self._last_batch = 0

    def ticket(self) -> Ticket:
        """Announce an item on its way (close it on submit or failure; a context manager)."""
        return Ticket(self)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="oiod-batcher")

    async def submit(self, item: T, ticket: Ticket | None = None) -> R:
        """Queue one item and wait for its result (exceptions propagate per item)."""
        if ticket is not None:
            ticket.close()
        if self._closing or self._queue is None:
            raise BatcherClosed("the service is shutting down")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def close(self) -> None:
        """Stop taking work, finish everything already queued, then stop the worker."""
        self._closing = True
        if self._queue is not None and self._task is not None:
            await self._queue.join()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        assert self._queue is not None
        q = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await q.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(q.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                # Wait only under load: another request is on its way, or the last call was a
                # real batch. A lone request at low load goes at once.
                if self._expected <= 0 and self._last_batch <= 1:
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(q.get(), remaining))
                except asyncio.TimeoutError:
                    break
            self._last_batch = len(batch)
            try:
                await self._execute(batch)
            finally:
                for _ in batch:
                    q.task_done()

    async def _execute(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        live = [(item, fut) for item, fut in batch if not fut.cancelled()]
        if not live:
            return
        items = [item for item, _ in live]
        t0 = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self.fn, items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            if len(items) == 1:
                self._record(1, t0)
                _set(live[0][1], exc=exc)
                return
            log.debug("batch of %d failed (%s); retrying items one by one", len(items), exc)
            for item, fut in live:
                t1 = time.perf_counter()
                try:
                    (res,) = await loop.run_in_executor(self._executor, self.fn, [item])
                    _set(fut, res)
                except Exception as exc1:
                    _set(fut, exc=exc1)
                self._record(1, t1)
            return
        self._record(len(items), t0)
        for (_, fut), res in zip(live, results):
            _set(fut, res)

    def _record(self, n: int, t0: float) -> None:
        if self.on_batch:
            self.on_batch(n, time.perf_counter() - t0)


def _set(fut: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
