"""The serving core under faults a hostile review found (issue #11): a cancelled half-open
probe, a hung vLLM (frozen with SIGSTOP, thawed with SIGCONT), stream deadlines and orphaned
streams, and an overload burst with deadlines. Real gRPC server, real ONNX Runtime CNN, the
session's real vLLM server. Figures from the same scenarios: docs/reliability.md."""
from __future__ import annotations

import time

import pytest

from benchmarks.reliability import (burst_in_subprocess, cancelled_probe, health_status, hung_vllm, measure_capacity,
                                    orphaned_streams, random_jpegs, stream_deadline, wait_for)
from catcascade.serving.circuit_breaker import BreakerState
from catcascade.serving.config import ServeConfig
from catcascade.serving.server import VLM_HEALTH_NAME
from tests.conftest import GrpcServerThread, ServeProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def make_server(demo_bundle, vllm_server, grpc_server):
    """Fresh servers on the session's vLLM. Tests here freeze that vLLM: on the way out, wait
    until it answers again and the session server's breaker has closed, so later tests find
    the VLM as they expect."""
    started = []

    def make(**overrides) -> GrpcServerThread:
        vlm = {"urls": [vllm_server.url], **overrides.pop("vlm", {})}
        server = GrpcServerThread(ServeConfig(bundle=demo_bundle, port=0, vlm=vlm, **overrides)).start()
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()
    breaker = grpc_server.servicer.front_door.router.live_engine().breaker
    closed = wait_for(lambda: grpc_server.on_loop(lambda: breaker.state) == BreakerState.CLOSED, 90, 0.2)
    assert closed is not None, "the session server's VLM breaker did not close again after vLLM was thawed"


def test_breaker_recovers_after_its_probe_is_cancelled(make_server, vllm_server):
    """The half-open probe is a user request whose client cancels it: the probe slot must be
    given back (before: stuck half-open, every escalation "breaker open" until a restart)."""
    server = make_server(breaker={"health_period_s": 0, "failure_threshold": 1, "cooldown_s": 0.5},
                         vlm={"call_budget_s": 1.5})
    outcome = cancelled_probe(server, vllm_server, 1.5)
    assert outcome.codes["CANCELLED"] == 1 and outcome.codes["OK"] >= 2, outcome.details
    assert outcome.reasons["VLM_UNAVAILABLE"] >= 1  # the call that opened the breaker (server budget)
    assert outcome.reasons["REQUESTED_ALWAYS"] == 1, outcome.notes  # escalations resumed
    assert server.on_loop(lambda: server.servicer.front_door.router.live_engine().breaker.state) == BreakerState.CLOSED
    assert server.servicer.front_door.router.live_engine().inflight_escalations == 0
    assert health_status(server.target, VLM_HEALTH_NAME) == "SERVING" or \
        wait_for(lambda: health_status(server.target, VLM_HEALTH_NAME) == "SERVING", 10) is not None


def test_hung_vllm_opens_the_breaker_whatever_the_client_deadlines(make_server, vllm_server):
    """vLLM frozen under ALWAYS load whose deadlines (1 s) are shorter than the server's VLM
    budget (5 s): the watchdog still sees the hang, health reads NOT_SERVING and stays so
    while frozen, escalations are answered CNN-only at once, and all recover after the thaw."""
    # 300 ms kept to answer (100 by default): on a loaded machine the calls answered at their
    # deadline's edge before the watchdog saw the hang otherwise risk missing it
    server = make_server(breaker={"health_period_s": 0.5, "health_timeout_s": 1.5, "cooldown_s": 2.0},
                         limits={"reply_margin_ms": 300})
    out = hung_vllm(server.target, vllm_server, seconds_before=2.0, seconds_hung=7.0, concurrency=4,
                    deadline_s=1.0, seconds_after=2.0)
    notes = "\n".join(out.notes)
    # CNN answers throughout. On a machine shared with a CPU-heavy job admission refuses some
    # calls that reach the handler with little of their 1 s left (8% seen beside a mutation
    # run): a fast RESOURCE_EXHAUSTED, never a call left to time out.
    assert set(out.codes) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, out.details
    assert out.codes["OK"] >= 0.75 * out.sent and out.codes["DEADLINE_EXCEEDED"] <= 0.01 * out.sent, out.details
    assert all("overloaded" in d for d in out.details if d.startswith("RESOURCE_EXHAUSTED")), out.details
    assert "NOT_SERVING" in out.notes[0] and "never" not in out.notes[0], notes
    assert out.notes[1].startswith("health samples during the freeze after detection: 0 SERVING"), notes
    assert "SERVING again" in out.notes[3] and "not" not in out.notes[3], notes
    assert out.reasons["VLM_UNAVAILABLE"] > out.reasons["DEADLINE"], out.reasons  # at once, not at the deadline
    assert out.reasons["REQUESTED_ALWAYS"] > 0


def test_hung_vllm_under_long_deadlines_fails_by_the_server_budget(make_server, vllm_server):
    """Without the watchdog, calls with long deadlines end by the server's own VLM budget,
    count as failures and open the breaker (before: each waited the client's whole deadline)."""
    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.client import CatcascadeClient

    server = make_server(breaker={"health_period_s": 0, "failure_threshold": 2, "cooldown_s": 30},
                         vlm={"call_budget_s": 1.0})
    img = random_jpegs(1, seed=8)[0]
    with vllm_server.paused(), CatcascadeClient(server.target, timeout_s=60) as c:
        first = [c.classify(img, mode="always") for _ in range(2)]
        t0 = time.perf_counter()
        after = c.classify(img, mode="always")
        fast_ms = (time.perf_counter() - t0) * 1000.0
        assert wait_for(lambda: health_status(server.target, VLM_HEALTH_NAME) == "NOT_SERVING", 10) is not None
    assert all(r.escalation_reason == pb.ESCALATION_REASON_VLM_UNAVAILABLE and "budget" in r.escalation_detail
               for r in first), [r.escalation_detail for r in first]
    assert all(r.timings.vlm_ms < 30_000 for r in first)
    assert after.escalation_reason == pb.ESCALATION_REASON_VLM_UNAVAILABLE and "open" in after.escalation_detail
    assert fast_ms < min(r.timings.total_ms for r in first)  # answered without waiting on the VLM


def test_stream_messages_end_with_the_streams_deadline(make_server, vllm_server):
    """A stream with a 2 s deadline, vLLM frozen: each message is answered CNN-only (reason
    DEADLINE) before the stream's deadline (before: no message carried the deadline, the
    stream ran into DEADLINE_EXCEEDED with no answers)."""
    server = make_server(breaker={"health_period_s": 0}, limits={"reply_margin_ms": 400})  # room on a busy machine
    out = stream_deadline(server.target, vllm_server, deadline_s=2.0, messages=4)
    assert out.codes == {"OK": 4} and out.reasons == {"DEADLINE": 4}, (out.codes, out.reasons, out.notes)
    assert out.notes[0].startswith("stream ended OK"), out.notes
    assert max(out.latencies_ms["OK"]) < 2000.0
    assert server.servicer.front_door.router.live_engine().inflight_escalations == 0


def test_cancelled_streams_free_their_escalation_slots(make_server, vllm_server):
    """Streams that disconnect while their escalations wait on a frozen vLLM give the slots
    back at once (before: held for the VLM timeout, everyone else's escalations SHED)."""
    server = make_server(breaker={"health_period_s": 0}, vlm={"timeout_s": 60, "call_budget_s": 60},
                         limits={"max_concurrent_escalations": 8})
    out = orphaned_streams(server, vllm_server, n_streams=2, per_stream=4, after_requests=8)
    assert "8 escalation slots held" in out.notes[0] and "all free" in out.notes[0], out.notes
    assert out.codes == {"OK": 8} and "SHED" not in out.reasons, (out.reasons, out.notes, out.details)
    assert out.reasons["REQUESTED_ALWAYS"] == 8


def test_overload_burst_is_refused_fast_not_left_to_time_out(demo_bundle, vllm_server, tmp_path):
    """Four times the server's capacity for 1 s, every call with a 1 s deadline, from another
    process: the excess gets RESOURCE_EXHAUSTED and what is admitted is answered (before: 208
    of 800 DEADLINE_EXCEEDED, no RESOURCE_EXHAUSTED). A small server (batches of one) keeps the
    burst near what gRPC takes in on two shared cores. Timing on a shared machine is noisy:
    the bounds are loose, the benchmark has the figures. The server runs in a process of its
    own: in this one, coverage tracing, pytest's heap and the other servers' threads slowed it
    unevenly (admitted calls then missed their deadlines in full runs, not when run alone)."""
    import os

    if os.getloadavg()[0] > 2 * (os.cpu_count() or 1):
        # the burst is calibrated against this server's capacity measured a moment before; other
        # processes competing for the cores make that measurement meaningless
        pytest.skip(f"machine too busy for a calibrated overload burst (load average {os.getloadavg()[0]:.1f})")
    config = {"bundle": str(demo_bundle), "vlm": {"urls": []}, "batching": {"max_batch_size": 1, "instances": 1},
              "cnn_threads": 1}

    def cancelled_in_handler() -> float:  # admitted (past admission), then cancelled by the deadline
        return server.metric("catcascade_requests_total", {"method": "Classify", "code": "CANCELLED"})

    # This server has no VLM, but the session's vLLM shares the cores: after each step its CPU
    # worker spins a core for a second (a health probe from another test's server is enough),
    # which would take half the CPU away between measuring the capacity and the burst.
    with ServeProcess(config, tmp_path) as server, vllm_server.paused():
        # the median of three: one measurement beside a CPU-heavy neighbour can be 40% off
        capacity = sorted(measure_capacity(server.target, "never") for _ in range(3))[1]
        before = cancelled_in_handler()
        out = burst_in_subprocess(server.target, int(4 * capacity * 1.0), 1.0, "never", rate=4 * capacity)
        admitted_then_late = cancelled_in_handler() - before
    assert set(out.codes) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, out.details
    assert out.codes["OK"] > 0 and out.codes["RESOURCE_EXHAUSTED"] >= out.sent // 4, out.codes
    assert any("overloaded" in d for d in out.details)
    # What reaches the handler is refused rather than left to time out (without admission about
    # 90% of such a burst ends in DEADLINE_EXCEEDED and almost none is refused): few admitted
    # calls are then cancelled by their deadline (that happens when the shared machine's CPU
    # drops within the second after admission, which no estimate foresees). The client's other
    # DEADLINE_EXCEEDED are calls that spent their whole second in gRPC's intake, before any
    # handler ran: on two cores shared with the client, how many depends on the machine (the
    # benchmark has the figures), so they are not asserted here.
    assert out.codes["RESOURCE_EXHAUSTED"] > 3 * admitted_then_late, (out.codes, admitted_then_late)
    # How fast refusals come back is a timing, measured by `make bench-reliability` (a refusal's
    # latency is mostly the time gRPC took to hand the call to the handler, which on a loaded
    # machine can exceed an answer's): not asserted here.
