"""Dynamic micro-batching for the CNN, in the manner of Triton's dynamic batcher.

Requests queue on the event loop; a worker takes the first waiting item, then waits up to
``max_queue_delay_ms`` for more (never past ``max_batch_size``), and runs the whole batch in
a worker thread so ONNX Runtime never blocks the loop. With ``instances`` > 1 (Triton's
instance_group count) that many workers share the queue, each with a thread of its own, so
several batches run at once: on a CPU, two single-threaded runs get more images per second out
of two cores than one run split over both. The queue is bounded: a full queue refuses new work
at once instead of letting latency grow without limit. The queue is ordered by request
priority (serving/traffic/priorities.py: interactive before batch), then by arrival. A
request whose deadline can no longer be met by the time a worker takes it is shed (Triton's
queue policy with the REJECT timeout action): it gets DeadlineUnmeetableError, the CNN time
goes to requests that can still make it.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from catcascade.errors import CatcascadeError
from catcascade.serving.engines.thread_priority import lower_current_thread


class QueueFullError(CatcascadeError, RuntimeError):
    """The CNN queue is at capacity; the caller should shed or refuse the request."""


class DeadlineUnmeetableError(QueueFullError):
    """Shed from the queue: too little of the request's deadline is left for a batch to run."""


class BatchingConfig(BaseModel):
    """ServeConfig's ``batching`` section, taken by the batcher as it is (the Ray engine's
    ``@serve.batch`` reads the same limits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(16, ge=1, le=1024)
    max_queue_delay_ms: float = Field(0.0, ge=0, le=1000, description="0 = batch what is already queued (Triton "
                                      "default)")
    max_queue_size: int = Field(256, ge=1, description="requests waiting; beyond, refused at once (QueueFullError)")
    instances: int = Field(2, ge=1, le=64, description="batches run at once, each on its own thread (Triton's "
                           "instance_group count). On a CPU without cnn_threads, a lone batch uses every core and "
                           "overlapping batches one thread each")


@dataclass(frozen=True)
class BatchResult:
    """One request's row of the batch output, with where its time went."""

    output: np.ndarray
    queue_ms: float
    compute_ms: float
    batch_size: int


@dataclass(order=True)
class _Item:
    priority: int
    arrival: int
    x: np.ndarray = field(compare=False)
    future: asyncio.Future = field(compare=False)
    enqueued: float = field(compare=False)
    deadline: float | None = field(default=None, compare=False)
    """time.monotonic() instant the answer is due, or None."""


class DynamicBatcher:
    """The local CNN engine (serving.engines.cnn_engine.CnnEngine): decoded tensors in."""

    decodes_images = False
    """The front door decodes; this engine takes tensors (``submit``)."""

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], config: BatchingConfig = BatchingConfig(),
                 on_batch: Callable[[int], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                 thread_nice: int = 0):
        """``clock`` (seconds) times the queue and the batches; tests pass a fake one.
        ``thread_nice``: nice increment of the threads that run batches (ServeConfig.compute_nice;
        serving/engines/thread_priority.py)."""
        if not 0 <= thread_nice <= 19:
            raise ValueError(f"thread_nice must be 0-19 (a Linux nice increment), got {thread_nice}")
        self.run_batch = run_batch
        self.config = config
        self.on_batch = on_batch
        self._clock = clock
        self._queue: asyncio.PriorityQueue[_Item] | None = None
        self._arrivals = itertools.count()
        self._workers: list[asyncio.Task] = []
        self._executor = ThreadPoolExecutor(max_workers=config.instances, thread_name_prefix="cnn",
                                            initializer=lower_current_thread, initargs=(thread_nice,))
        self.batch_sizes: list[int] = []
        self.running = 0
        """Batches in the model right now (at most ``instances``)."""
        self.batch_s = 0.0
        """Recent time one batch takes in the model (decayed mean), for deadline shedding."""
        self.shed = 0

    async def start(self) -> None:
        self._queue = asyncio.PriorityQueue(self.config.max_queue_size)
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

    async def submit_encoded(self, data: bytes, priority: int = 0, deadline: float | None = None):
        raise NotImplementedError("DynamicBatcher takes decoded tensors (decodes_images is False): "
                                  "decode on the front door and call submit")

    async def submit(self, x: np.ndarray, priority: int = 0, deadline: float | None = None) -> BatchResult:
        """Queues one input; lower ``priority`` values are taken first, then first come.
        ``deadline`` (a time.monotonic() instant): past the point where a batch can still
        finish before it, the request is shed with DeadlineUnmeetableError."""
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() was not awaited")
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(priority, next(self._arrivals), x, fut, self._clock(), deadline))
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
        return self._shed([it for it in items if not it.future.cancelled()])

    def _shed(self, items: list[_Item]) -> list[_Item]:
        """Fails the items whose deadline comes before a batch could finish; keeps the rest."""
        now = time.monotonic()
        keep = []
        for it in items:
            if it.deadline is not None and it.deadline - now < self.batch_s:
                self.shed += 1
                it.future.set_exception(DeadlineUnmeetableError(
                    f"shed from the CNN queue: {max(0.0, it.deadline - now) * 1000:.0f} ms of the deadline left, "
                    f"a batch takes {self.batch_s * 1000:.0f} ms"))
            else:
                keep.append(it)
        return keep

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
            self.batch_s = compute_ms / 1000.0 if not self.batch_s else 0.8 * self.batch_s + 0.2 * compute_ms / 1000.0
            self.batch_sizes.append(len(items))
            del self.batch_sizes[:-10000]
            if self.on_batch:
                self.on_batch(len(items))
            for i, it in enumerate(items):
                if not it.future.done():
                    it.future.set_result(BatchResult(out[i], (start - it.enqueued) * 1000.0, compute_ms, len(items)))
