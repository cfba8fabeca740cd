from __future__ import annotations

import asyncio
import re
import threading
import time

import numpy as np
import pytest

from catcascade.serving.batcher import BatchingConfig, DynamicBatcher, QueueFullError


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    calls = []

    def run(batch):
        calls.append(len(batch))
        return batch.sum(axis=1, keepdims=True)

    async def go():
        b = DynamicBatcher(run, BatchingConfig(max_batch_size=4, max_queue_delay_ms=20, instances=1))
        await b.start()
        res = await asyncio.gather(*(b.submit(np.full(3, i, dtype=np.float32)) for i in range(10)))
        await b.stop()
        return res

    res = asyncio.run(go())
    assert [float(r.output[0]) for r in res] == [3.0 * i for i in range(10)]
    assert max(calls) == 4 and sum(calls) == 10 and len(calls) < 10
    assert all(r.batch_size in calls for r in res)


async def _until(condition, what: str, timeout_s: float = 30.0) -> None:
    """Polls ``condition`` on the event loop (other tasks run in between) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.001)


def test_full_queue_refuses_at_once():
    gate = threading.Event()

    def run(batch):
        assert gate.wait(30)
        return batch

    async def go():
        b = DynamicBatcher(run, BatchingConfig(max_batch_size=1, max_queue_size=2, instances=1))
        await b.start()
        first = asyncio.create_task(b.submit(np.zeros(1)))
        await _until(lambda: b.running == 1 and b.depth == 0, "the worker holds item 1 in run()")
        queued = [asyncio.create_task(b.submit(np.full(1, i + 1.0))) for i in range(2)]
        await _until(lambda: b.depth == 2, "two items wait in the queue")
        with pytest.raises(QueueFullError, match="2 waiting"):
            await b.submit(np.zeros(1))
        gate.set()
        out = await asyncio.gather(first, *queued)
        await b.stop()
        return out

    assert [float(r.output[0]) for r in asyncio.run(go())] == [0.0, 1.0, 2.0]


def test_failed_batch_fails_its_requests_but_not_the_worker():
    state = {"fail": True}

    def run(batch):
        if state.pop("fail", False):
            raise RuntimeError("boom")
        return batch

    async def go():
        b = DynamicBatcher(run, BatchingConfig(max_batch_size=1, instances=1))
        await b.start()
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(np.ones(2))
        ok = await b.submit(np.ones(2))
        await b.stop()
        return ok

    assert asyncio.run(go()).output.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("instances", [1, 2])
def test_instances_run_that_many_batches_at_once(instances):
    """The first batches are held in the model until `instances` of them are inside it at once
    and the event loop has seen that many running (what the catcascade_cnn_batches_running
    gauge reads); then every batch runs freely. With one instance batches never overlap, with
    two they do, and every request gets its own row."""
    lock = threading.Lock()
    state = {"running": 0, "peak": 0}
    gate = threading.Event()

    def run(batch):
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
        try:
            assert gate.wait(30), "batches never overlapped"
        finally:
            with lock:
                state["running"] -= 1
        return batch * 2

    seen_running = []

    async def go():
        b = DynamicBatcher(run, BatchingConfig(max_batch_size=2, instances=instances))
        await b.start()
        pending = asyncio.gather(*(b.submit(np.full(1, i, dtype=np.float32)) for i in range(8)))

        def all_instances_busy():
            seen_running.append(b.running)
            return b.running == instances and state["running"] == instances

        await _until(all_instances_busy, f"{instances} batches run at once")
        gate.set()
        res = await pending
        assert b.running == 0
        await b.stop()
        return res

    res = asyncio.run(go())
    assert [float(r.output[0]) for r in res] == [2.0 * i for i in range(8)]
    assert state["peak"] == instances and max(seen_running) == instances


def test_instances_must_be_positive():
    with pytest.raises(ValueError):
        BatchingConfig(instances=0)


class StepClock:
    """A fake clock: time moves only when the test (or the fake model) says so."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_timings_come_from_the_clock():
    """Batch A enters the model at t=0 and is held there while B queues and 2 ms pass; the
    model then takes 5 ms per batch. A: queue 0 ms, model 7 ms; B: queue 7 ms, model 5 ms."""
    clock, gate = StepClock(), threading.Event()

    def run(batch):
        assert gate.wait(30)
        clock.t += 0.005
        return batch + 1

    async def go():
        b = DynamicBatcher(run, BatchingConfig(max_batch_size=1, instances=1), clock=clock)
        await b.start()
        a = asyncio.create_task(b.submit(np.zeros(1)))
        await _until(lambda: b.running == 1 and b.depth == 0, "A is in the model")
        second = asyncio.create_task(b.submit(np.ones(1)))
        await _until(lambda: b.depth == 1, "B is queued")
        clock.t += 0.002
        gate.set()
        out = await asyncio.gather(a, second)
        await b.stop()
        return out

    ra, rb = asyncio.run(go())
    assert (ra.queue_ms, ra.compute_ms, ra.batch_size) == (pytest.approx(0.0, abs=1e-9), pytest.approx(7.0), 1)
    assert (rb.queue_ms, rb.compute_ms, rb.batch_size) == (pytest.approx(7.0), pytest.approx(5.0), 1)
    assert ra.output.tolist() == [1.0] and rb.output.tolist() == [2.0]


def test_batch_sizes_reach_the_callback_and_a_bounded_history():
    sizes, names = [], set()

    def run(batch):
        names.add(threading.current_thread().name.split("_")[0])
        return batch

    async def go():
        b = DynamicBatcher(run, BatchingConfig(max_batch_size=4, instances=1), on_batch=sizes.append)
        b.batch_sizes.extend([7] * 10000)
        await b.start()
        tasks = {t.get_name() for t in asyncio.all_tasks()}
        await asyncio.gather(*(b.submit(np.zeros(1)) for _ in range(6)))
        await b.stop()
        return b.batch_sizes, tasks

    history, tasks = asyncio.run(go())
    assert sizes == [4, 2] and len(history) == 10000 and history[-2:] == [4, 2] and history[0] == 7
    assert names == {"cnn"} and "cnn-batcher-0" in tasks


def test_requests_cancelled_while_queued_are_dropped_and_the_worker_goes_on():
    gate, seen = threading.Event(), []

    def run(batch):
        seen.append(batch[:, 0].tolist())
        assert gate.wait(30)
        return batch

    async def go():
        b = DynamicBatcher(run, BatchingConfig(max_batch_size=4, instances=1))
        await b.start()
        first = asyncio.create_task(b.submit(np.full(1, 1.0)))
        await _until(lambda: b.running == 1, "batch 1 is in the model")
        dropped = asyncio.create_task(b.submit(np.full(1, 2.0)))
        await _until(lambda: b.depth == 1, "item 2 is queued")
        dropped.cancel()
        gate.set()
        await first
        await _until(lambda: b.depth == 0 and b.running == 0, "the cancelled item is collected and skipped")
        last = await asyncio.wait_for(b.submit(np.full(1, 3.0)), 30)
        await b.stop()
        return last

    assert asyncio.run(go()).output.tolist() == [3.0]
    assert seen == [[1.0], [3.0]]


def test_submit_before_start_is_a_clear_error():
    b = DynamicBatcher(lambda x: x)
    with pytest.raises(RuntimeError, match=r"^DynamicBatcher\.start\(\) was not awaited$"):
        asyncio.run(b.submit(np.zeros(1)))
    assert b.depth == 0


@pytest.mark.parametrize("field", ["max_batch_size", "max_queue_size", "instances"])
def test_config_fields_must_be_positive(field):
    assert getattr(BatchingConfig(**{field: 1}), field) == 1  # the smallest valid value
    with pytest.raises(ValueError, match=rf"^1 validation error for BatchingConfig\n{field}\n"):
        BatchingConfig(**{field: 0})


def test_queue_delay_may_be_zero_but_not_negative():
    assert BatchingConfig(max_queue_delay_ms=0).max_queue_delay_ms == 0
    with pytest.raises(ValueError, match=r"^1 validation error for BatchingConfig\nmax_queue_delay_ms\n"):
        BatchingConfig(max_queue_delay_ms=-1)


def test_queue_delay_waits_for_more_requests_to_fill_a_batch():
    """With a (long) queue delay the worker holds a lone request until the batch fills; a full
    batch goes at once, long before the delay is over."""
    calls = []

    def run(batch):
        calls.append(len(batch))
        return batch

    async def go():
        b = DynamicBatcher(run, BatchingConfig(max_batch_size=3, max_queue_delay_ms=1000, instances=1))  # the longest allowed
        await b.start()
        first = asyncio.create_task(b.submit(np.zeros(1)))
        await _until(lambda: b.depth == 0, "the worker holds request 1 and waits for more")
        assert b.running == 0 and not calls
        rest = [asyncio.create_task(b.submit(np.ones(1))) for _ in range(2)]
        out = await asyncio.wait_for(asyncio.gather(first, *rest), 30)
        await b.stop()
        return out

    out = asyncio.run(go())
    assert calls == [3] and [r.batch_size for r in out] == [3, 3, 3]


def test_stop_without_start_is_harmless():
    b = DynamicBatcher(lambda x: x)
    asyncio.run(b.stop())
    assert b.depth == 0 and b.running == 0


def test_the_batch_time_estimate_is_a_decayed_mean_and_sheds_what_cannot_make_it():
    """Batch times from the clock: 10 s, then 20 s -> 0.8 * 10 + 0.2 * 20 = 12 s. A request
    with 5 s of its deadline left cannot make a 12 s batch: shed, with both figures said."""
    clock = StepClock()
    took = iter([10.0, 20.0])

    def run(batch):
        clock.t += next(took)
        return batch

    async def go():
        b = DynamicBatcher(run, BatchingConfig(max_batch_size=1, instances=1), clock=clock)
        await b.start()
        await b.submit(np.zeros(1))
        first = b.batch_s
        await b.submit(np.zeros(1))
        errors = []
        for _ in range(2):
            try:
                await b.submit(np.zeros(1), deadline=time.monotonic() + 5.0)
            except Exception as e:  # noqa: BLE001 - checked below
                errors.append(e)
        await b.stop()
        return first, b.batch_s, b.shed, errors

    first, second, shed, errors = asyncio.run(go())
    assert first == pytest.approx(10.0) and second == pytest.approx(12.0)
    from catcascade.serving.batcher import DeadlineUnmeetableError

    assert shed == 2 and all(isinstance(e, DeadlineUnmeetableError) for e in errors)
    left = int(re.match(r"shed from the CNN queue: (\d+) ms of the deadline left, a batch takes 12000 ms$",
                        str(errors[0])).group(1))
    assert 1000 <= left <= 5000


@pytest.mark.parametrize("nice", [0, 19])
def test_thread_nice_takes_linux_nice_increments(nice):
    b = DynamicBatcher(lambda x: x, thread_nice=nice)
    asyncio.run(b.stop())
    assert b.running == 0


@pytest.mark.parametrize("nice", [-1, 20])
def test_thread_nice_outside_0_to_19_is_refused(nice):
    with pytest.raises(ValueError, match=rf"^thread_nice must be 0-19 \(a Linux nice increment\), got {nice}$"):
        DynamicBatcher(lambda x: x, thread_nice=nice)
