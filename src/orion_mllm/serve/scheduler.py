"""A bounded request queue in front of the engine: batches compatible jobs, refuses when full.

The engine is synchronous and holds the model, so one worker runs it in a thread while the web
server's event loop keeps accepting requests. Jobs wait in a bounded queue (``QueueFull`` ->
HTTP 429); the worker takes the oldest job plus every queued job of the same kind and settings (up
to ``max_batch``, after waiting ``batch_wait_s`` for more to arrive) and runs them as one engine
batch, which gives the same results as running them one by one (tested in the inference issue).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The server already holds ``max_queue`` waiting requests."""


@dataclass
class Job:
    kind: str  # jobs of the same kind and key may share an engine batch
    key: Any
    payload: Any
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]
    cancelled: bool = False


class Scheduler:
    def __init__(
        self,
        run_batch: Callable[[str, list[Job]], list[Any]],
        *,
        max_queue: int = 32,
        max_batch: int = 8,
        batch_wait_s: float = 0.005,
    ) -> None:
        self.run_batch = run_batch  # (kind, jobs) -> one result per job; runs in the worker thread
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self._pending: list[Job] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.batches_run = 0

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, kind: str, key: Any, payload: Any) -> Job:
        """Queue a job (raises ``QueueFull``); await ``job.future`` for its result."""
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"the server is busy: {len(self._pending)} requests are already waiting")
        job = Job(kind, key, payload, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        assert self._wake is not None, "Scheduler.start() was not awaited"
        self._wake.set()
        return job

    def _take_batch(self) -> list[Job]:
        self._pending = [j for j in self._pending if not j.cancelled]
        if not self._pending:
            return []
        first = self._pending[0]
        batch = [j for j in self._pending if j.kind == first.kind and j.key == first.key][: self.max_batch]
        taken = {id(j) for j in batch}
        self._pending = [j for j in self._pending if id(j) not in taken]
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await asyncio.sleep(self.batch_wait_s)  # let concurrent requests join the batch
                batch = self._take_batch()
                if not batch:
                    break
                try:
                    results = await loop.run_in_executor(None, self.run_batch, batch[0].kind, batch)
                except Exception as err:  # one failing batch fails its requests, never the server
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(err)
                    continue
                finally:
                    self.batches_run += 1
                for job, result in zip(batch, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(result)
