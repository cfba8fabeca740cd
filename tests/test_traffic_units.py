"""Unit tests of serving/traffic/: priority slots and the CNN queue's order, the response cache
and single-flight, tenant token buckets, and the config that wires them."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from catcascade.serving.batcher import BatchingConfig, DynamicBatcher
from catcascade.serving.traffic.admission import AdmissionConfig, AdmissionController, AdmissionRefused
from catcascade.serving.traffic.priorities import Priority, PrioritySlots
from catcascade.serving.traffic.response_cache import ResponseCache, ResponseCacheConfig, SingleFlight, cache_key
from catcascade.serving.traffic.tenant_budgets import ANONYMOUS, TenantBudgets, TenantBudgetsConfig, TokenBucket, TokenBucketConfig


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_priority_slots_serve_interactive_waiters_before_earlier_batch_ones():
    async def go():
        slots = PrioritySlots(capacity=1, max_waiting=10)
        assert await slots.acquire(Priority.BATCH)  # the one slot, taken
        order = []

        async def waiter(name, priority):
            assert await slots.acquire(priority)
            order.append(name)
            slots.release()

        tasks = [asyncio.create_task(waiter(f"batch{i}", Priority.BATCH)) for i in range(3)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(waiter(f"interactive{i}", Priority.INTERACTIVE)) for i in range(2)]
        await asyncio.sleep(0)
        assert slots.waiting == 5 and slots.in_use == 1
        assert not slots.try_acquire()  # a newcomer may not jump the queue
        slots.release()
        await asyncio.gather(*tasks)
        assert slots.in_use == 0 and slots.waiting == 0
        return order

    assert asyncio.run(go()) == ["interactive0", "interactive1", "batch0", "batch1", "batch2"]


def test_priority_slots_refuse_when_the_queue_is_full_or_the_wait_times_out():
    async def go():
        slots = PrioritySlots(capacity=1, max_waiting=1)
        assert await slots.acquire()
        waiting = asyncio.create_task(slots.acquire(Priority.BATCH))
        await asyncio.sleep(0)
        full = await slots.acquire(Priority.INTERACTIVE)  # the one waiting place is taken
        timed_out = await PrioritySlots(capacity=0, max_waiting=5).acquire(timeout=0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        slots.release()  # nobody waits any more: the slot is free again
        return full, timed_out, slots.in_use, slots.try_acquire()

    assert asyncio.run(go()) == (False, False, 0, True)


def test_priority_slots_zero_capacity_without_queue_sheds_at_once():
    async def go():
        return await PrioritySlots(capacity=0, max_waiting=0).acquire()

    assert asyncio.run(go()) is False


def test_cnn_queue_takes_interactive_requests_first():
    """A batch is running; batch requests queue, then interactive ones: the interactive ones
    run in the next batch, ahead of the batch requests queued before them."""
    import threading

    release = threading.Event()
    seen: list[list[float]] = []

    def run_batch(x):
        seen.append([float(v) for v in x[:, 0]])
        if len(seen) == 1:
            release.wait(10)
        return x

    async def go():
        b = DynamicBatcher(run_batch, BatchingConfig(max_batch_size=2, instances=1))
        await b.start()
        first = asyncio.create_task(b.submit(np.array([0.0], np.float32)))
        while not seen:
            await asyncio.sleep(0.001)
        later = [asyncio.create_task(b.submit(np.array([float(v)], np.float32), p))
                 for v, p in ((1, Priority.BATCH), (2, Priority.BATCH), (3, Priority.INTERACTIVE),
                              (4, Priority.INTERACTIVE))]
        while b.depth < 4:
            await asyncio.sleep(0.001)
        release.set()
        await asyncio.gather(first, *later)
        await b.stop()

    asyncio.run(go())
    assert seen == [[0.0], [3.0, 4.0], [1.0, 2.0]]


def test_cache_key_covers_image_mode_top_k_and_version():
    base = cache_key(b"img", 0, 3, "v1")
    assert base == cache_key(b"img", 0, 3, "v1") and len(base) == 32
    assert len({base, cache_key(b"img2", 0, 3, "v1"), cache_key(b"img", 1, 3, "v1"), cache_key(b"img", 0, 5, "v1"),
                cache_key(b"img", 0, 3, "v2")}) == 5


def test_response_cache_is_an_lru_bounded_in_entries_and_bytes():
    cache = ResponseCache(ResponseCacheConfig(max_entries=3, max_bytes=2000), size_of=len)
    for key in "abc":
        cache.put(key, "x" * 500)
    assert cache.get("a") == "x" * 500  # a is now the most recent
    cache.put("d", "y" * 500)  # 4 entries > 3: the least recent (b) goes
    assert cache.get("b") is None and len(cache) == 3
    cache.put("e", "z" * 900)  # 4 entries again: c goes (1900 bytes)
    cache.put("f", "w" * 700)  # 4 entries: a goes; 2100 bytes > 2000: d goes too
    assert [k for k in "abcdef" if cache.get(k) is not None] == ["e", "f"]
    assert cache.bytes == 1600 and cache.evictions == 4
    assert not cache.put("huge", "h" * 5000) and cache.get("huge") is None
    assert (cache.hits, cache.misses) == (3, 6)


def test_single_flight_runs_one_computation_for_concurrent_callers():
    calls = []

    async def go():
        flights = SingleFlight()
        gate = asyncio.Event()

        async def compute():
            calls.append(1)
            await gate.wait()
            return "answer"

        tasks = [asyncio.create_task(flights.run("k", compute)) for _ in range(100)]
        await asyncio.sleep(0)
        assert len(flights) == 1
        tasks[0].cancel()  # the first caller goes away: the others still get the answer
        gate.set()
        results = await asyncio.gather(*tasks[1:])
        assert len(flights) == 0
        again = await flights.run("k", compute)  # a later call computes anew
        return results, again

    results, again = asyncio.run(go())
    assert len(calls) == 2 and again == ("answer", False)
    assert {r for r in results} == {("answer", True)}


def test_single_flight_shares_the_exception():
    async def go():
        flights = SingleFlight()

        async def boom():
            await asyncio.sleep(0.01)
            raise ValueError("bad image")

        return await asyncio.gather(*(flights.run("k", boom) for _ in range(3)), return_exceptions=True)

    assert [type(r) for r in asyncio.run(go())] == [ValueError] * 3


def test_token_bucket_refills_at_its_rate_up_to_its_burst():
    clock = FakeClock()
    bucket = TokenBucket(TokenBucketConfig(rate_per_s=2.0, burst=3), clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.t = 0.5  # one token back
    assert bucket.take() and not bucket.take()
    clock.t = 100.0
    assert bucket.tokens == 3.0
    bucket.give_back()
    assert bucket.tokens == 3.0


def test_tenant_budgets_name_tenants_by_token_and_limit_each_alone():
    clock, registry = FakeClock(), CollectorRegistry()
    cfg = TenantBudgetsConfig(tenants={"alice": TokenBucketConfig(rate_per_s=0.0, burst=2)})
    budgets = TenantBudgets(cfg, ["alice", "bob"], registry=registry, clock=clock)
    assert budgets.tenants == ["alice", ANONYMOUS, "bob"]
    assert [budgets.allow_escalation("alice") for _ in range(3)] == [True, True, False]
    assert all(budgets.allow_escalation("bob") for _ in range(10))  # no budget of its own, no default
    budgets.give_back("alice")
    assert budgets.allow_escalation("alice")
    text = generate_latest(registry).decode()
    assert 'catcascade_tenant_escalations_total{outcome="over_budget",tenant="alice"} 1.0' in text
    assert 'catcascade_tenant_escalations_total{outcome="allowed",tenant="bob"} 10.0' in text
    assert 'catcascade_tenant_budget_tokens{tenant="alice"} 0.0' in text


def test_serve_config_tenants(tmp_path):
    from pydantic import ValidationError

    from catcascade.serving.config import ServeConfig

    cfg = ServeConfig(bundle=tmp_path, auth={"bearer_tokens": ["plain"], "tenants": {"alice": "tok-a"}},
                      tenant_budgets={"default": {"rate_per_s": 1, "burst": 5},
                                      "tenants": {"alice": {"rate_per_s": 0.5, "burst": 2}}})
    assert cfg.auth.tokens() == ["plain", "tok-a"]
    assert ServeConfig(bundle=tmp_path, auth={"bearer_tokens": ["x"]}).auth.tenants == {}  # old configs stay valid
    with pytest.raises(ValidationError, match="does not define"):
        ServeConfig(bundle=tmp_path, tenant_budgets={"tenants": {"carol": {"rate_per_s": 1, "burst": 1}}})
    with pytest.raises(ValidationError, match="share a token"):
        ServeConfig(bundle=tmp_path, auth={"tenants": {"a": "same", "b": "same"}})
    with pytest.raises(ValidationError, match="burst"):
        ServeConfig(bundle=tmp_path, auth={"tenants": {"a": "t"}},
                    tenant_budgets={"tenants": {"a": {"rate_per_s": 1, "burst": 0}}})


# --- edges the mutation run found untested (make mutation, docs/dev/testing.md) -----------------

def test_response_cache_replacing_a_key_counts_its_bytes_once_and_fills_to_the_exact_bound():
    cache = ResponseCache(ResponseCacheConfig(max_entries=10, max_bytes=1024), size_of=len)
    assert cache.put("a", "x" * 300) is True
    assert cache.put("a", "y" * 200) is True  # replaced: 200 bytes, not 500 or 100
    assert cache.bytes == 200 and len(cache) == 1 and cache.get("a") == "y" * 200
    assert cache.put("b", "z" * 824) is True  # 1024 bytes: exactly the bound, nothing evicted
    assert cache.bytes == 1024 and cache.evictions == 0 and len(cache) == 2
    alone = ResponseCache(ResponseCacheConfig(max_entries=10, max_bytes=1024), size_of=len)
    assert alone.put("full", "f" * 1024) is True and alone.get("full") is not None  # as large as the bound: kept


def test_single_flight_tolerates_a_computation_cancelled_under_it():
    """Cancelling the shared computation itself (server shutdown) must not make its clean-up
    callback raise into the event loop."""
    errors = []

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        flights = SingleFlight()
        gate = asyncio.Event()

        async def compute():
            await gate.wait()

        caller = asyncio.create_task(flights.run("k", compute))
        await asyncio.sleep(0)
        flights._flights["k"].cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0)  # the done callback runs
        assert len(flights) == 0

    asyncio.run(go())
    assert errors == []


def test_has_budget_is_true_from_exactly_one_token_and_spends_nothing():
    clock = FakeClock()
    budgets = TenantBudgets(TenantBudgetsConfig(default=TokenBucketConfig(rate_per_s=1.0, burst=1)), clock=clock)
    assert budgets.has_budget("t") and budgets.has_budget("t")  # asking spends nothing
    assert budgets.allow_escalation("t") and not budgets.has_budget("t")
    clock.t = 0.5
    assert not budgets.has_budget("t")  # half a token is not an escalation
    clock.t = 1.0  # refilled on the budgets' own clock: exactly one token
    assert budgets.has_budget("t") and budgets.allow_escalation("t")
    unlimited = TenantBudgets(TenantBudgetsConfig(tenants={"a": TokenBucketConfig(rate_per_s=0, burst=1)}), ["a"])
    assert unlimited.has_budget("b") and unlimited.has_budget(None)  # no budget of its own: unlimited


def test_tenant_requests_are_counted_by_tenant():
    registry = CollectorRegistry()
    budgets = TenantBudgets(TenantBudgetsConfig(), ["alice"], registry=registry)
    for tenant in ("alice", "alice", ANONYMOUS):
        budgets.count_request(tenant)
    text = generate_latest(registry).decode()
    assert 'catcascade_tenant_requests_total{tenant="alice"} 2.0' in text
    assert f'catcascade_tenant_requests_total{{tenant="{ANONYMOUS}"}} 1.0' in text


def _admission(t0: float = 0.0, **config):

    clock = FakeClock()
    clock.t = t0
    settings = {"safety_factor": 1.0, "slack_ms": 0.0, "halflife_s": 0.5, **config}
    return AdmissionController(AdmissionConfig(**settings), clock), clock


def test_admission_measures_busy_time_between_every_arrival_and_departure():
    adm, clock = _admission(initial_service_ms=20)
    a = adm.admit(None)
    clock.t = 0.05
    adm.admit(None)  # the stage was busy from 0 to 0.05 ...
    clock.t = 0.1
    a.served()  # ... and from 0.05 to 0.1: 0.1 s busy for one completion
    d = 0.5 ** (0.1 / 0.5)
    assert adm.service_s() == pytest.approx((0.020 * d + 0.1) / (d + 1.0), rel=1e-9)


def test_a_ticket_departs_once_whatever_is_called_after():
    adm, clock = _admission(initial_service_ms=20)
    served, released = adm.admit(None), adm.admit(None)
    served.served()
    served.release()
    served.served()
    released.release()
    released.release()
    released.served()
    assert adm.pending == 0 and not adm._waiting


def test_the_correction_starts_at_a_prediction_of_exactly_100_ms_is_clipped_and_fades():
    adm, clock = _admission(initial_service_ms=100)
    a = adm.admit(None)  # predicted: exactly 0.1 s
    clock.t = 0.3
    a.served()  # three times the prediction
    assert adm.correction == pytest.approx(0.8 + 0.2 * 3.0)
    # fades back to 1 with a half-life of 4 half-lives of busy time, read at any instant given
    assert adm.estimated_wait_s(now=0.3 + 2.0) == pytest.approx((1 + 0.4 * 0.5) * adm.expected_wait_s())
    assert adm.estimated_wait_s() == pytest.approx(1.4 * adm.expected_wait_s())  # the clock's own instant

    adm, clock = _admission(initial_service_ms=100)
    a = adm.admit(None)
    clock.t = 0.6
    a.served()  # six times: counts as four
    assert adm.correction == pytest.approx(0.8 + 0.2 * 4.0)

    adm, clock = _admission(initial_service_ms=200)
    a = adm.admit(None)
    clock.t = 0.1
    a.served()  # faster than predicted: counts as on time
    assert adm.correction == pytest.approx(1.0)

    adm, clock = _admission(initial_service_ms=200)
    a = adm.admit(None)
    clock.t = 0.3
    a.release()  # abandoned at 1.5 times the prediction: it waited at least that long
    assert adm.correction == pytest.approx(0.8 + 0.2 * 1.5)


def test_lateness_is_measured_against_the_corrected_prediction():
    adm, clock = _admission(initial_service_ms=100)
    a = adm.admit(None)
    clock.t = 0.3
    a.served()
    head = adm.admit(None)
    corrected = head.predicted_s * adm._correction_now(0.3 + 1.0)
    assert adm.lateness_s(0.3 + 1.0) == pytest.approx(1.0 - corrected)
    assert adm.lateness_s(0.3 + 0.01) == 0.0


def test_admission_admits_a_wait_of_exactly_the_time_left_and_refuses_a_deadline_already_gone():
    adm, clock = _admission(initial_service_ms=100)
    with pytest.raises(AdmissionRefused) as gone:
        adm.admit(0.0)  # nothing ahead, but the deadline is now
    assert gone.value.reason == "deadline"
    adm.admit(None)
    assert adm.estimated_wait_s() == 0.2
    assert adm.admit(0.2) is not None  # 0.2 s wait, 0.2 s left
    assert adm.refused == 1


def test_admission_refusals_say_how_long_and_how_many_and_are_counted():
    adm, clock = _admission(t0=10.0, initial_service_ms=750, max_queue_wait_ms=1000)
    adm.admit(None)
    with pytest.raises(AdmissionRefused):
        adm.admit(10.5)
    with pytest.raises(AdmissionRefused) as late:
        adm.admit(11.0)
    assert str(late.value) == ("server overloaded: 1 requests ahead, an estimated 1500 ms wait would miss the deadline "
                               "(1000 ms left); retry later or elsewhere")
    with pytest.raises(AdmissionRefused) as long_wait:
        adm.admit(None)
    assert str(long_wait.value) == ("server overloaded: 1 requests ahead, an estimated 1500 ms wait exceeds the 1000 ms "
                                    "limit for requests without a deadline")
    assert long_wait.value.reason == "queue_wait" and adm.refused == 3


def test_the_loop_lag_is_kept_from_the_time_left():
    adm, clock = _admission(initial_service_ms=100)
    adm.observe_loop_lag(0.5)
    adm.admit(None)  # 0.2 s wait for the next
    with pytest.raises(AdmissionRefused):
        adm.admit(0.6)  # 0.6 s left, less 0.5 s of loop lag
    assert adm.admit(0.8) is not None


def test_loop_lag_is_a_decayed_maximum():
    adm, clock = _admission(t0=3.0)
    adm.observe_loop_lag(0.4)
    assert adm.loop_lag_s == 0.4
    clock.t = 3.25
    adm.observe_loop_lag(0.1)  # 0.4 decayed over half a half-life is still larger
    assert adm.loop_lag_s == pytest.approx(0.4 * 0.5 ** 0.5)
    clock.t = 4.25
    adm.observe_loop_lag(0.2)
    assert adm.loop_lag_s == pytest.approx(0.2)


def test_the_loop_lag_watcher_measures_how_late_its_timer_fires(monkeypatch):
    import threading
    import time
    import types

    import catcascade.serving.traffic.admission as admission

    adm, clock = _admission()
    readings = iter([5.0, 5.07, 9.0, 9.01, 12.0])  # first sleep 50 ms late, the second on time
    slept = []

    here = threading.current_thread()  # servers other tests left running use the module's clock and sleep too

    async def sleep(period_s):
        if threading.current_thread() is not here:
            return await asyncio.sleep(period_s)
        slept.append(period_s)
        if len(slept) == 3:
            raise asyncio.CancelledError

    def monotonic():
        return next(readings) if threading.current_thread() is here else time.monotonic()

    monkeypatch.setattr(admission, "time", types.SimpleNamespace(monotonic=monotonic))
    monkeypatch.setattr(admission, "asyncio", types.SimpleNamespace(sleep=sleep))
    lags = []
    observe = adm.observe_loop_lag
    monkeypatch.setattr(adm, "observe_loop_lag", lambda lag: (lags.append(lag), observe(lag)))
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(adm.watch_loop_lag())  # the server's period: a 20 ms timer
    assert slept == [0.02, 0.02, 0.02]
    assert lags == [pytest.approx(0.05), 0.0] and adm.loop_lag_s == pytest.approx(0.05)
