"""Dynamic micro-batching: concurrent requests for one model share a forward pass.

A CPU forward pass over 16 short texts costs little more than over one, so throughput comes from
batching. The first waiting request waits at most `max_wait_ms` for company; while a batch runs, new
requests pile up and form the next batch at once, so under load batches grow by themselves and when
idle a lone request pays only the wait. Each request's texts stay together in one batch, so one
response never mixes two model versions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

log = logging.getLogger(__name__)
Context = TypeVar("Context")


class BatcherStopped(RuntimeError):
    """Raised to callers that arrive after stop() began."""


class Overloaded(RuntimeError):
    """Raised at once when the queue is full, or when a request's deadline passes before its answer: under
    more load than the model can take, a quick refusal the client can retry beats a hang."""


@dataclass
class _Job(Generic[Context]):
    texts: list[str]
    future: asyncio.Future[tuple[Context, np.ndarray]] = field(repr=False)
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[Context]):
    """Queue → batches → `run_batch(texts)` on an executor thread → each caller gets its slice.

    `run_batch` returns `(context, rows)`, one row per text; a caller receives `(context, its rows)`.
    """

    def __init__(
        self,
        run_batch: Callable[[list[str]], tuple[Context, np.ndarray]],
        executor: Executor,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[int, float], None] | None = None,
        max_queue: int | None = None,
        deadline_seconds: float | None = None,
    ) -> None:
        """`max_queue`: most texts waiting (a request that would pass it is refused, unless the queue is empty);
        `deadline_seconds`: most time a request waits for its answer."""
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch
        self.max_queue = max_queue
        self.deadline = deadline_seconds
        self._jobs: deque[_Job[Context]] = deque()
        self._queued_texts = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def submit(self, texts: list[str]) -> tuple[Context, np.ndarray]:
        if not self.running or self._stopping:
            raise BatcherStopped("the batcher is not running")
        if self.max_queue is not None and self._queued_texts and self._queued_texts + len(texts) > self.max_queue:
            raise Overloaded(
                f"{self._queued_texts} texts are waiting for this model (serve.max_queue={self.max_queue})"
            )
        job = _Job(texts, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._queued_texts += len(texts)
        self._arrived.set()
        if self.deadline is None:
            return await job.future
        try:
            # shield: on timeout the future is left for the batch loop, which skips callers that are done.
            return await asyncio.wait_for(asyncio.shield(job.future), self.deadline)
        except TimeoutError:
            job.future.cancel()
            if job in self._jobs:  # still queued: it will not take a place in a batch
                self._jobs.remove(job)
                self._queued_texts -= len(texts)
            raise Overloaded(f"no answer within {self.deadline:g} s (serve.request_timeout_seconds)") from None

    async def stop(self) -> None:
        """Finish every queued request, then stop."""
        self._stopping = True
        if self._task is not None:
            self._arrived.set()
            await self._task

    async def _wait_for_company(self) -> None:
        # Measured from the oldest request's arrival: one that queued during the previous batch has
        # already waited and goes at once.
        deadline = self._jobs[0].arrived + self.max_wait
        while self._queued_texts < self.max_batch_size and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                # Waiting on an Event (not on a queue) is safe to time out: no item can be lost.
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Job[Context]]:
        batch = [self._jobs.popleft()]
        size = len(batch[0].texts)
        while self._jobs and size + len(self._jobs[0].texts) <= self.max_batch_size:
            job = self._jobs.popleft()
            batch.append(job)
            size += len(job.texts)
        self._queued_texts -= size
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._jobs:
                if self._stopping:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if self.max_wait > 0:
                await self._wait_for_company()
            if not self._jobs:  # the ones waiting passed their deadline meanwhile
                continue
            batch = self._take_batch()
            texts = [text for job in batch for text in job.texts]
            started = time.perf_counter()
            try:
                context, rows = await loop.run_in_executor(self.executor, self.run_batch, texts)
                if self.on_batch:
                    self.on_batch(len(texts), time.perf_counter() - started)
            except Exception as exc:  # handed to every waiting caller; the loop keeps serving
                log.exception("batch of %d texts failed", len(texts))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            offset = 0
            for job in batch:
                if not job.future.done():  # a caller that went away is skipped
                    job.future.set_result((context, rows[offset : offset + len(job.texts)]))
                offset += len(job.texts)
