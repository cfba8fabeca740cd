from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batcher import BatcherConfig, DynamicBatcher, QueueFullError


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    calls = []

    def run(batch):
        calls.append(len(batch))
        return batch.sum(axis=1, keepdims=True)

    async def go():
        b = DynamicBatcher(run, BatcherConfig(max_batch_size=4, max_queue_delay_ms=20))
        await b.start()
        res = await asyncio.gather(*(b.submit(np.full(3, i, dtype=np.float32)) for i in range(10)))
        await b.stop()
        return res

    res = asyncio.run(go())
    assert [float(r.output[0]) for r in res] == [3.0 * i for i in range(10)]
    assert max(calls) == 4 and sum(calls) == 10 and len(calls) < 10
    assert all(r.batch_size in calls for r in res)


def test_full_queue_refuses_at_once():
    gate = threading.Event()

    def run(batch):
        gate.wait(5)
        return batch

    async def go():
        b = DynamicBatcher(run, BatcherConfig(max_batch_size=1, max_queue_size=2))
        await b.start()
        first = asyncio.create_task(b.submit(np.zeros(1)))
        await asyncio.sleep(0.05)  # the worker holds item 1 in run()
        queued = [asyncio.create_task(b.submit(np.zeros(1))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError):
            await b.submit(np.zeros(1))
        gate.set()
        await asyncio.gather(first, *queued)
        await b.stop()

    asyncio.run(go())


def test_failed_batch_fails_its_requests_but_not_the_worker():
    state = {"fail": True}

    def run(batch):
        if state.pop("fail", False):
            raise RuntimeError("boom")
        return batch

    async def go():
        b = DynamicBatcher(run, BatcherConfig(max_batch_size=1))
        await b.start()
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(np.ones(2))
        ok = await b.submit(np.ones(2))
        await b.stop()
        return ok

    assert asyncio.run(go()).output.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("instances", [1, 2])
def test_instances_run_that_many_batches_at_once(instances):
    """Each batch waits until `instances` batches are running together (or times out): with
    one instance they never overlap, with two they do, and every request gets its own row."""
    lock = threading.Lock()
    state = {"running": 0, "peak": 0}
    barrier = threading.Barrier(instances, timeout=0.3)

    def run(batch):
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        time.sleep(0.01)  # long enough for the event loop to see the batch running
        with lock:
            state["running"] -= 1
        return batch * 2

    seen_running = []

    async def go():
        b = DynamicBatcher(run, BatcherConfig(max_batch_size=2, instances=instances))
        await b.start()
        pending = asyncio.gather(*(b.submit(np.full(1, i, dtype=np.float32)) for i in range(8)))
        while not pending.done():
            seen_running.append(b.running)  # what the catcascade_cnn_batches_running gauge reads
            await asyncio.sleep(0.001)
        res = await pending
        assert b.running == 0
        await b.stop()
        return res

    res = asyncio.run(go())
    assert [float(r.output[0]) for r in res] == [2.0 * i for i in range(8)]
    assert state["peak"] == instances and max(seen_running) == instances


def test_instances_must_be_positive():
    with pytest.raises(ValueError):
        BatcherConfig(instances=0)
