"""Dynamic batching: requests that arrive within a short window run as one forward pass.

A bounded queue holds waiting requests (``Busy`` when it is full, so the server answers 503 rather
than growing without limit). One task takes the first waiting request, gathers more for at most
``window`` seconds or until ``max_rows`` rows, runs the model once in a worker thread (the event
loop keeps accepting), and hands each request its rows. ``close()`` lets the queue drain first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch


class Busy(Exception):
    """The queue is full."""


class Closed(Exception):
    """The batcher is shutting down."""


class Batcher:
    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_rows: int = 256,
        window: float = 0.005,
        max_queue: int = 64,
    ):
        self.forward = forward
        self.max_rows = max_rows
        self.window = window
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dkit-forward")
        self.batches = 0  # forward passes run, and the requests they served: public counters
        self.requests = 0
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, x: torch.Tensor, timeout: float) -> torch.Tensor:
        """The model's output for ``x``; ``Busy`` when the queue is full, ``TimeoutError`` after ``timeout``."""
        if self._closing:
            raise Closed()
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((x, fut))
        except asyncio.QueueFull:
            raise Busy() from None
        return await asyncio.wait_for(fut, timeout)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            rows = len(items[0][0])
            deadline = loop.time() + self.window
            while rows < self.max_rows:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    break
                items.append(item)
                rows += len(item[0])
            live = [(x, f) for x, f in items if not f.done()]  # a timed-out request is dropped
            try:
                if live:
                    out = await loop.run_in_executor(self.pool, self.forward, torch.cat([x for x, _ in live]))
                    self.batches += 1
                    self.requests += len(live)
                    start = 0
                    for x, f in live:
                        if not f.done():
                            f.set_result(out[start : start + len(x)])
                        start += len(x)
            except Exception as e:  # noqa: BLE001 - the model failed: every waiting request hears it
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
            finally:
                for _ in items:
                    self.queue.task_done()

    async def close(self, drain: float = 30.0) -> None:
        """Refuse new requests, let the waiting ones finish (at most ``drain`` seconds), stop."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), drain)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.pool.shutdown(wait=True)
