"""Bounded thread pools, one per kind of blocking work, each with a deadline.

The service never uses the event loop's shared default executor for request
work: a kind of work that stalls (a slow storage endpoint, a huge drawing)
must not take the threads another kind needs. Each :class:`WorkPool` has a
fixed number of threads and admits exactly that many jobs at once; a request
waits for a slot on the event loop (cancellable, bounded by the same deadline)
instead of queueing invisibly inside the executor. A slot is given back only
when the thread really finishes, so the pool's occupancy is never understated
after a caller gave up.

A thread cannot be killed, so the deadline stops the *work* only when the work
is bounded by itself: callers pass functions whose cost is bounded by their
input limits (pixel and byte limits) or by their own client timeouts (the
storage clients built for serving have short connect/read timeouts and few
attempts). ``on_timeout`` lets a caller signal the job to stop early.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from openimages_od.serving.errors import ApiError

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["Pools", "WorkPool"]


class WorkPool:
    """A fixed-size thread pool with admission control and a per-job deadline.

    Args:
        name: the kind of work (``fetch``, ``image``, ``draw``, ``output``); names threads and errors.
        workers: threads, and jobs admitted at once.
        timeout_s: default deadline for waiting for a slot plus running the job.
    """

    def __init__(self, name: str, workers: int, timeout_s: float) -> None:
        self.name = name
        self.workers = max(1, int(workers))
        self.timeout_s = float(timeout_s)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.workers, thread_name_prefix=f"oiod-{name}"
        )
        self._slots: asyncio.Semaphore | None = None
        self.running = 0

    async def run(
        self,
        fn: Callable[..., T],
        *args: Any,
        timeout_s: float | None = None,
        on_timeout: Callable[[], None] | None = None,
    ) -> T:
        """Run ``fn(*args)`` on a pool thread and return its result.

        Raises:
            ApiError: 503 ``busy`` when no thread frees up within the deadline, 504
                ``{name}_timeout`` when the job does not finish within it. Exceptions
                from ``fn`` propagate.
        """
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        slots = self._slots
        budget = self.timeout_s if timeout_s is None else timeout_s
        deadline = loop.time() + budget
        try:
            await asyncio.wait_for(slots.acquire(), budget)
        except asyncio.TimeoutError:
            raise ApiError(
                503, "busy", f"the server is busy ({self.name} workers all in use); retry later"
            ) from None
        self.running += 1

        def release(_: Any) -> None:
            def give_back() -> None:
                self.running -= 1
                slots.release()

            try:
                loop.call_soon_threadsafe(give_back)
            except RuntimeError:  # the loop closed while the job ran (shutdown): nothing to give back to
                pass

        try:
            cf = self._executor.submit(fn, *args)
        except RuntimeError:  # executor shut down
            self.running -= 1
            slots.release()
            raise ApiError(503, "shutting_down", "the service is shutting down") from None
        cf.add_done_callback(release)
        fut = asyncio.wrap_future(cf, loop=loop)
        # A caller that gave up must not leave an "exception never retrieved" behind.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            if on_timeout is not None:
                on_timeout()
            raise ApiError(
                504, f"{self.name}_timeout", f"the {self.name} step took longer than {budget:g}s"
            ) from None

    def close(self) -> None:
        """Stop taking jobs; queued ones are dropped, running ones finish on their own."""
        self._executor.shutdown(wait=False, cancel_futures=True)


class Pools:
    """The service's pools: storage work of fetches, image checks, drawing, output writes.

    Args:
        fetch_workers: threads for storage calls made for an image fetch.
        cpu_workers: threads for image checks/conversion, and (separately) for drawing.
        output_workers: threads for writing annotated images.
        fetch_timeout_s: deadline of a fetch step.
        work_timeout_s: deadline of an image check, a drawing or an output write.
    """

    def __init__(
        self,
        fetch_workers: int,
        cpu_workers: int,
        output_workers: int,
        fetch_timeout_s: float,
        work_timeout_s: float,
    ) -> None:
        self.fetch = WorkPool("fetch", fetch_workers, fetch_timeout_s)
        self.image = WorkPool("image", cpu_workers, work_timeout_s)
        self.draw = WorkPool("draw", cpu_workers, work_timeout_s)
        self.output = WorkPool("output", output_workers, work_timeout_s)

    def all(self) -> list[WorkPool]:
        return [self.fetch, self.image, self.draw, self.output]

    def close(self) -> None:
        for p in self.all():
            p.close()
