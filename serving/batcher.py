"""Dynamic micro-batching for the CNN, in the manner of Triton's dynamic batcher.

Requests queue on the event loop; a worker takes the first waiting item, then waits up to
``max_queue_delay_ms`` for more (never past ``max_batch_size``), and runs the whole batch in
a worker thread so ONNX Runtime never blocks the loop. With ``instances`` > 1 (Triton's
instance_group count) that many workers share the queue, each with a thread of its own, so
several batches run at once: on a CPU, two single-threaded runs get more images per second out
of two cores than one run split over both. The queue is bounded: a full queue refuses new work
at once instead of letting latency grow without limit.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np


class QueueFullError(RuntimeError):
    """The CNN queue is at capacity; the caller should shed or refuse the request."""


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 16
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 256
    instances: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.max_queue_delay_ms < 0 or self.instances < 1:
            raise ValueError(f"invalid batcher config {self}")


@dataclass(frozen=True)
class BatchResult:
    """One request's row of the batch output, with where its time went."""

    output: np.ndarray
    queue_ms: float
    compute_ms: float
    batch_size: int


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], config: BatcherConfig = BatcherConfig(),
                 on_batch: Callable[[int], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        """``clock`` (seconds) times the queue and the batches; tests pass a fake one."""
        self.run_batch = run_batch
        self.config = config
        self.on_batch = on_batch
        self._clock = clock
        self._queue: asyncio.Queue[_Item] | None = None
        self._workers: list[asyncio.Task] = []
        self._executor = ThreadPoolExecutor(max_workers=config.instances, thread_name_prefix="cnn")
        self.batch_sizes: list[int] = []
        self.running = 0
        """Batches in the model right now (at most ``instances``)."""

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.config.max_queue_size)
        self._workers = [asyncio.create_task(self._loop(), name=f"cnn-batcher-{i}") for i in range(self.config.instances)]

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            try:
                await worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue else 0

    async def submit(self, x: np.ndarray) -> BatchResult:
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() was not awaited")
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(x, fut, self._clock()))
        except asyncio.QueueFull:
            raise QueueFullError(f"CNN queue is full ({self.config.max_queue_size} waiting)") from None
        return await fut

    async def _collect(self) -> list[_Item]:
        items = [await self._queue.get()]
        deadline = self._clock() + self.config.max_queue_delay_ms / 1000.0
        while len(items) < self.config.max_batch_size:
            if not self._queue.empty():
                items.append(self._queue.get_nowait())
                continue
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [it for it in items if not it.future.cancelled()]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            if not items:
                continue
            start = self._clock()
            self.running += 1
            try:
                out = await loop.run_in_executor(self._executor, self.run_batch, np.stack([it.x for it in items]))
            except Exception as e:  # a failed batch fails its requests, never the worker
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
            finally:
                self.running -= 1
            compute_ms = (self._clock() - start) * 1000.0
            self.batch_sizes.append(len(items))
            del self.batch_sizes[:-10000]
            if self.on_batch:
                self.on_batch(len(items))
            for i, it in enumerate(items):
                if not it.future.done():
                    it.future.set_result(BatchResult(out[i], (start - it.enqueued) * 1000.0, compute_ms, len(items)))
