"""The front door's stages, one by one (serving/front_door/), over the real pipeline with a fake
CNN and VLM: validation, the tenant from the same parse that authenticates, routing, the cache
(per tenant, keyed on the answering version's content, never past a budget), admission and the
chain's order."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from catcascade.ensemble.escalation_policy import EscalationMode
from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.cascade_engine import ANONYMOUS, EngineIdentity
from catcascade.serving.front_door.authentication import Authenticator
from catcascade.serving.front_door.caching import CacheStage
from catcascade.serving.front_door.routing import Route, SingleVersion
from catcascade.serving.front_door.validation import MAX_REQUEST_ID, validated_request
from catcascade.serving.request_errors import InvalidRequestError, OverloadedError, UnknownVersionError
from catcascade.serving.status_codes import status_of
from catcascade.serving.traffic.response_cache import ResponseCacheConfig
from catcascade.serving.traffic.tenant_budgets import TenantBudgets, TenantBudgetsConfig
from tests.conftest import jpeg_bytes
from tests.fakes import FakeBatcher, FakeClock, FakeVerifier, fake_front_door, fake_pipeline, request_for

IMAGE = jpeg_bytes((40, 30), seed=3)


def run(coro):
    return asyncio.run(coro)


# --- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("message,error", [
    (pb.ClassifyRequest(request_id="x" * (MAX_REQUEST_ID + 1)), f"longer than {MAX_REQUEST_ID}"),
    (pb.ClassifyRequest(request_id="a\nb"), "printable"),
    (pb.ClassifyRequest(top_k=7), "top_k=7 exceeds the 6 known labels"),
    (pb.ClassifyRequest(escalation=9), "unknown escalation mode 9"),
    (pb.ClassifyRequest(priority=5), "unknown priority 5"),
    (pb.ClassifyRequest(model_version="v\t1"), "model_version must be"),
    (pb.ClassifyRequest(model_version="v" * (MAX_REQUEST_ID + 1)), "model_version must be"),
])
def test_validation_refuses_what_the_service_cannot_do(message, error):
    with pytest.raises(InvalidRequestError, match=error):
        validated_request(message, labels=6, deadline=None, tenant=ANONYMOUS)
    assert status_of(InvalidRequestError("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_validation_builds_the_one_request_type():
    r = validated_request(pb.ClassifyRequest(image=b"i", top_k=6, escalation=pb.ESCALATION_MODE_ALWAYS,
                                             priority=pb.PRIORITY_BATCH, explain=True, request_id="r1",
                                             model_version="v2"),
                          labels=6, deadline=12.5, tenant="acme", trace_headers={"traceparent": "00-x"})
    assert (r.image, r.top_k, r.mode, r.deadline, int(r.priority), r.tenant, r.explain, r.request_id,
            r.model_version) == (b"i", 6, EscalationMode.ALWAYS, 12.5, pb.PRIORITY_BATCH, "acme", True, "r1", "v2")
    assert r.trace_headers == {"traceparent": "00-x"}
    assert len(validated_request(pb.ClassifyRequest(), labels=6, deadline=None, tenant=None).request_id) == 32


# --- authentication and the tenant -----------------------------------------------------------

@pytest.mark.parametrize("header", ["Bearer tok-a", "bearer tok-a", "BEARER tok-a", "Bearer  tok-a", " Bearer tok-a "])
def test_every_spelling_the_check_accepts_names_the_same_tenant(header):
    auth = Authenticator(["tok-a", "plain"], {"alice": "tok-a"})
    assert auth.identify([("authorization", header)]) == "alice"


def test_unknown_or_missing_tokens_are_not_identified_and_plain_tokens_are_anonymous():
    auth = Authenticator(["tok-a", "plain"], {"alice": "tok-a"})
    assert auth.identify([("authorization", "Bearer nope")]) is None
    assert auth.identify([("authorization", "Basic tok-a")]) is None
    assert auth.identify([]) is None
    assert auth.identify([("authorization", "Bearer plain")]) == ANONYMOUS
    open_door = Authenticator([], {})
    assert not open_door.required and open_door.identify([]) == ANONYMOUS


# --- the cache stage -------------------------------------------------------------------------

class Engine:
    """An engine with a content key; answers from a real fake pipeline and counts its calls."""

    def __init__(self, content_key: str, bundle: str = "b:1", **pipeline):
        self.pipeline = fake_pipeline(**pipeline)
        self.labels = self.pipeline.labels
        self.identity = EngineIdentity(pb.ModelVersions(bundle=bundle), pb.ModelInfo(labels=self.labels), content_key)
        self.calls = 0

    def vlm_serving(self) -> bool:
        return True

    async def classify(self, request):
        self.calls += 1
        import dataclasses

        return dataclasses.replace(await self.pipeline.classify(request), versions=self.identity.versions)


def _door(engine, **stages):
    return fake_front_door(engine, **stages)


def _classify(door, tenant=ANONYMOUS, mode=pb.ESCALATION_MODE_NEVER, image=IMAGE):
    return door.classify(pb.ClassifyRequest(image=image, escalation=mode), tenant=tenant, deadline=None)


def test_the_cache_keys_on_the_answering_versions_content_not_its_name():
    cache = CacheStage(ResponseCacheConfig(enabled=True))
    v1, v2 = Engine("content-1", temperature=2.0), Engine("content-2", temperature=0.5)  # same name "b:1"

    async def go():
        first = await _door(v1, cache=cache).classify(pb.ClassifyRequest(image=IMAGE), tenant="t", deadline=None)
        again = await _door(v1, cache=cache).classify(pb.ClassifyRequest(image=IMAGE), tenant="t", deadline=None)
        other = await _door(v2, cache=cache).classify(pb.ClassifyRequest(image=IMAGE), tenant="t", deadline=None)
        return first, again, other

    first, again, other = run(go())
    assert again.cached and not first.cached and v1.calls == 1
    assert not other.cached and v2.calls == 1  # another version's content: computed on it
    assert other.labels[0].probability != pytest.approx(first.labels[0].probability)


def test_a_reused_answer_names_the_route_it_took_now():
    engine = Engine("same")
    cache = CacheStage(ResponseCacheConfig(enabled=True))
    canary = Route(engine, pb.ModelVersions(bundle="b:1", model_version="v2", route="canary"), engine.classify)
    live = Route(engine, pb.ModelVersions(bundle="b:1", model_version="v2", route="live"), engine.classify)

    async def go():
        req = request_for(IMAGE, mode=EscalationMode.NEVER)
        first = await cache.answer(req, canary, lambda: _door(engine).classify(
            pb.ClassifyRequest(image=IMAGE, escalation=pb.ESCALATION_MODE_NEVER), tenant=ANONYMOUS, deadline=None))
        return await cache.answer(req, live, lambda: pytest.fail("a hit computes nothing"))

    reused = run(go())
    assert reused.cached and reused.versions.route == "live"


def test_tenants_have_partitions_of_their_own():
    engine = Engine("k")
    cache = CacheStage(ResponseCacheConfig(enabled=True, max_entries=2))
    door = _door(engine, cache=cache)

    async def go():
        a = await _classify(door, "alice")
        b_first = await _classify(door, "bob")
        for i in range(5):  # bob fills his partition well past its bound
            await _classify(door, "bob", image=jpeg_bytes((40, 30), seed=100 + i))
        a_again = await _classify(door, "alice")
        return a, b_first, a_again

    a, b_first, a_again = run(go())
    assert not a.cached and not b_first.cached  # bob does not learn that alice sent it
    assert a_again.cached  # and did not evict alice's entry
    assert len(cache.partition("bob")) == 2 and len(cache.partition("alice")) == 1


def test_a_cached_escalation_is_not_handed_to_a_tenant_over_budget():
    budgets = TenantBudgets(TenantBudgetsConfig(tenants={"t": {"rate_per_s": 0.0, "burst": 1}}), ["t"],
                            clock=FakeClock())
    engine = Engine("k", verifier=FakeVerifier(), tenant_budgets=budgets)
    door = _door(engine, cache=CacheStage(ResponseCacheConfig(enabled=True), budgets), budgets=budgets)

    async def go():
        return [await _classify(door, "t", mode=pb.ESCALATION_MODE_ALWAYS) for _ in range(2)]

    paid, over = run(go())
    assert paid.escalated and not paid.cached
    assert not over.cached and not over.escalated
    assert over.escalation_reason == pb.ESCALATION_REASON_TENANT_BUDGET


def test_cache_metrics_cover_every_partition():
    registry = CollectorRegistry()
    door = _door(Engine("k"), cache=CacheStage(ResponseCacheConfig(enabled=True), registry=registry))

    async def go():
        for tenant in ("a", "a", "b"):
            await _classify(door, tenant)

    run(go())
    text = generate_latest(registry).decode()
    assert 'catcascade_response_cache_lookups_total{result="hit"} 1.0' in text
    assert 'catcascade_response_cache_lookups_total{result="miss"} 2.0' in text
    assert "catcascade_response_cache_entries 2.0" in text


# --- the chain -------------------------------------------------------------------------------

def test_the_chain_validates_before_it_routes_and_admits_only_what_it_computes():
    class CountingRouter(SingleVersion):
        routed = 0

        def route(self, request):
            CountingRouter.routed += 1
            return super().route(request)

    from catcascade.serving.front_door.chain import FrontDoor
    from catcascade.serving.metrics import ServiceMetrics

    engine = Engine("k")
    door = FrontDoor(CountingRouter(engine), ServiceMetrics(), max_inflight=0)
    with pytest.raises(InvalidRequestError):
        run(door.classify(pb.ClassifyRequest(image=IMAGE, top_k=99), tenant=ANONYMOUS, deadline=None))
    assert CountingRouter.routed == 0
    with pytest.raises(OverloadedError, match="0 requests in flight"):
        run(_classify(door))
    assert CountingRouter.routed == 1 and engine.calls == 0


def test_single_version_routes_everything_to_its_engine():
    engine = Engine("k", bundle="b:7")
    router = SingleVersion(engine)
    route = router.route(request_for(IMAGE))
    assert route.engine is engine and route.versions.bundle == "b:7" and router.live_engine() is engine
    assert router.model_info() is engine.identity.info
    assert router.served_versions() == ()
    with pytest.raises(UnknownVersionError, match="serves one bundle") as pinned:
        router.route(dataclasses.replace(request_for(IMAGE), model_version="v1"))
    assert status_of(pinned.value) == (grpc.StatusCode.NOT_FOUND, str(pinned.value))


def test_a_shadow_like_request_without_a_tenant_spends_no_budget():
    budgets = TenantBudgets(TenantBudgetsConfig(default={"rate_per_s": 0.0, "burst": 1}), clock=FakeClock())
    pipeline = fake_pipeline(FakeVerifier(), tenant_budgets=budgets)
    free = run(pipeline.classify(request_for(IMAGE, mode=EscalationMode.ALWAYS, tenant=None)))
    paid = run(pipeline.classify(request_for(IMAGE, mode=EscalationMode.ALWAYS)))
    assert free.escalated and paid.escalated  # the anonymous tenant's one token was still there


def test_explain_spends_the_tenants_budget_and_says_so_when_it_is_spent():
    budgets = TenantBudgets(TenantBudgetsConfig(default={"rate_per_s": 0.0, "burst": 1}), clock=FakeClock())
    verifier = FakeVerifier()
    pipeline = fake_pipeline(verifier, tenant_budgets=budgets)
    r = run(pipeline.classify(request_for(IMAGE, mode=EscalationMode.ALWAYS, explain=True)))
    assert r.escalated and r.rationale is None and verifier.explained == []
    assert r.rationale_error == "not generated: tenant 'anonymous' has spent its VLM escalation budget"


def test_fake_batcher_declares_where_it_decodes():
    assert FakeBatcher().decodes_images is False


# --- edges the mutation run found untested (make mutation, docs/dev/testing.md) -----------------

import dataclasses  # noqa: E402
import logging  # noqa: E402

from catcascade.cnn_stage.preprocessing import InvalidImageError  # noqa: E402
from catcascade.cnn_stage.topk import TopK  # noqa: E402
from catcascade.ensemble.escalation_policy import EscalationReason  # noqa: E402
from catcascade.serving.cascade_engine import CascadeResult, StageTimings  # noqa: E402
from catcascade.serving.front_door.authentication import BearerTokenInterceptor, TokenSet, bearer_credentials  # noqa: E402
from catcascade.serving.front_door.caching import reused  # noqa: E402
from catcascade.serving.front_door.chain import FrontDoor, result_to_proto  # noqa: E402
from catcascade.serving.front_door.observation import Observer, span_attributes  # noqa: E402
from catcascade.serving.metrics import ServiceMetrics  # noqa: E402
from catcascade.serving.observability.drift import DriftConfig  # noqa: E402
from catcascade.serving.traffic.admission import AdmissionConfig, AdmissionController, AdmissionRefused  # noqa: E402
from catcascade.vlm_stage.rationale import Rationale  # noqa: E402
from catcascade.vlm_stage.scoring import CandidateScores  # noqa: E402

TIMINGS = StageTimings(decode_ms=1.5, cnn_queue_ms=2.5, cnn_ms=3.5, vlm_ms=40.5, blend_ms=0.25, total_ms=50.0,
                       cnn_batch_size=3, rationale_ms=70.0)


def _result(escalated=True, rationale=True, vlm=True, bundle="b:1", **changes) -> CascadeResult:
    """A result with every field set to a value of its own, so a field mapped from the wrong one shows."""
    return dataclasses.replace(CascadeResult(
        labels=TopK((1, 0), ("Sphynx", "Bengal"), (0.75, 0.25)), cnn=TopK((0, 1), ("Bengal", "Sphynx"), (0.5, 0.4)),
        vlm=CandidateScores(("Bengal", "Sphynx"), (0.2, 0.7), 0.1, "qwen", "logprob") if vlm else None,
        escalated=escalated, reason=EscalationReason.LOW_CONFIDENCE if escalated else EscalationReason.CONFIDENT,
        detail="top-1 0.50 < 0.80", timings=TIMINGS,
        rationale=Rationale("the ears", "Sphynx", 17, "qwen-r") if rationale else None,
        versions=pb.ModelVersions(bundle=bundle, cnn="cnn:2", vlm="qwen", model_version="v3", route="canary")),
        **changes)


class ScriptedEngine:
    """An engine that answers ``result`` (or raises ``error``) and keeps the requests it got."""

    def __init__(self, result=None, error=None, bundle="b:1", labels=("Bengal", "Sphynx")):
        self.result, self.error, self.labels = result or _result(bundle=bundle), error, list(labels)
        self.identity = EngineIdentity(pb.ModelVersions(bundle=bundle), pb.ModelInfo(labels=self.labels), "k")
        self.requests = []
        self.gate: asyncio.Event | None = None

    def vlm_serving(self) -> bool:
        return True

    async def classify(self, request):
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.result


def test_a_result_becomes_a_response_field_by_field():
    r = result_to_proto("req-1", _result())
    assert r.request_id == "req-1" and r.escalated and r.escalation_detail == "top-1 0.50 < 0.80"
    assert r.escalation_reason == pb.ESCALATION_REASON_LOW_CONFIDENCE
    assert [(s.label, s.probability) for s in r.labels] == [("Sphynx", 0.75), ("Bengal", 0.25)]
    assert [(s.label, round(s.probability, 6)) for s in r.cnn_top_k] == [("Bengal", 0.5), ("Sphynx", 0.4)]
    t = r.timings
    assert (t.decode_ms, t.cnn_queue_ms, t.cnn_ms, t.vlm_ms, t.blend_ms, t.total_ms, t.cnn_batch_size,
            t.rationale_ms) == (1.5, 2.5, 3.5, 40.5, 0.25, 50.0, 3, 70.0)
    assert (r.rationale.text, r.rationale.label, r.rationale.tokens, r.rationale.model, r.rationale.error) == (
        "the ears", "Sphynx", 17, "qwen-r", "")
    assert [(s.label, round(s.probability, 6)) for s in r.vlm.candidates] == [("Bengal", 0.2), ("Sphynx", 0.7)]
    assert (round(r.vlm.none_probability, 6), r.vlm.model, r.vlm.scoring_mode) == (0.1, "qwen", "logprob")
    assert (r.versions.bundle, r.versions.model_version, r.versions.route) == ("b:1", "v3", "canary")
    failed = result_to_proto("req-2", _result(rationale=False, vlm=False, rationale_error="VLM down"))
    assert failed.rationale.error == "VLM down" and failed.rationale.text == "" and not failed.HasField("vlm")
    plain = result_to_proto("req-3", _result(escalated=False, rationale=False, vlm=False))
    assert not plain.HasField("rationale") and not plain.HasField("vlm")


def test_the_chain_hands_the_engine_the_validated_request_and_counts_the_tenant():
    class RecordingRouter(SingleVersion):
        def route(self, request):
            self.routed = request  # a repository routes on the image: it needs the request itself
            return super().route(request)

    engine = ScriptedEngine()
    router = RecordingRouter(engine)
    budgets = TenantBudgets(TenantBudgetsConfig(), ["alice"], registry=CollectorRegistry())
    door = FrontDoor(router, ServiceMetrics(), budgets=budgets)
    response = run(door.classify(pb.ClassifyRequest(image=b"img", top_k=2, request_id="r-9"), tenant="alice",
                                 deadline=123.0, trace_headers={"traceparent": "00-t"}))
    (request,) = engine.requests
    assert router.routed.image == b"img" and router.routed.request_id == "r-9"
    assert (request.image, request.top_k, request.deadline, request.tenant, request.request_id) == (
        b"img", 2, 123.0, "alice", "r-9")
    assert request.trace_headers == {"traceparent": "00-t"}
    assert response.request_id == "r-9" and response.labels[0].label == "Sphynx"
    assert budgets._metrics.requests.labels("alice")._value.get() == 1.0
    assert door.inflight == 0


def test_the_chain_names_the_tenant_from_the_authenticating_parse():
    door = FrontDoor(SingleVersion(ScriptedEngine()), ServiceMetrics(),
                     authenticator=Authenticator(["tok-a"], {"alice": "tok-a"}))
    assert door.tenant_of([("authorization", "bearer tok-a")]) == "alice"
    assert door.tenant_of([("authorization", "Bearer nope")]) == ANONYMOUS
    assert FrontDoor(SingleVersion(ScriptedEngine()), ServiceMetrics()).tenant_of([]) == ANONYMOUS


def test_the_chain_counts_requests_in_flight_and_refuses_past_its_limit():
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    metrics = ServiceMetrics()
    door = FrontDoor(SingleVersion(engine), metrics, max_inflight=2)

    async def go():
        first = [asyncio.create_task(_classify(door)) for _ in range(2)]
        while len(engine.requests) < 2:
            await asyncio.sleep(0)
        assert door.inflight == 2 and metrics.registry.get_sample_value("catcascade_inflight_requests") == 2.0
        with pytest.raises(OverloadedError, match="2 requests in flight \\(limit 2\\)"):
            await _classify(door)
        engine.gate.set()
        await asyncio.gather(*first)
        assert door.inflight == 0 and metrics.registry.get_sample_value("catcascade_inflight_requests") == 0.0
        engine.error, engine.gate = RuntimeError("engine broke"), None
        with pytest.raises(RuntimeError):
            await _classify(door)
        assert door.inflight == 0  # released on errors too

    run(go())


def test_the_chain_admits_on_the_cnn_answer_and_counts_refusals_by_reason():
    clock = FakeClock(100.0)
    admission = AdmissionController(AdmissionConfig(initial_service_ms=1000.0, slack_ms=0.0), clock=clock)
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    metrics = ServiceMetrics()
    door = FrontDoor(SingleVersion(engine), metrics, admission=admission)

    async def go():
        first = asyncio.create_task(door.classify(pb.ClassifyRequest(image=b"1"), tenant=ANONYMOUS, deadline=None))
        while not engine.requests:
            await asyncio.sleep(0)
        assert admission.pending == 1
        wait_ms = metrics.registry.get_sample_value("catcascade_admission_wait_estimate_milliseconds")
        assert wait_ms == pytest.approx(admission.estimated_wait_s() * 1000.0) and wait_ms >= 1000.0
        with pytest.raises(AdmissionRefused):  # one ahead, 1.5 s estimated, 0.5 s left
            await door.classify(pb.ClassifyRequest(image=b"2"), tenant=ANONYMOUS, deadline=100.5)
        assert metrics.registry.get_sample_value("catcascade_admission_refusals_total", {"reason": "deadline"}) == 1.0
        engine.requests[0].on_cnn_done()  # the CNN answered: the stage is free before the VLM is
        assert admission.pending == 0
        engine.gate.set()
        await first
        assert admission.pending == 0 and not admission._waiting

    run(go())


def test_an_invalid_image_frees_its_admission_place_as_served_and_is_counted_and_logged(caplog):
    clock = FakeClock(100.0)
    admission = AdmissionController(AdmissionConfig(), clock=clock)
    metrics = ServiceMetrics()
    door = FrontDoor(SingleVersion(ScriptedEngine(error=InvalidImageError("not a JPEG", "format"))), metrics,
                     admission=admission)
    completions = admission._completions
    with caplog.at_level(logging.INFO, logger="catcascade.serving.server"):
        with pytest.raises(InvalidImageError):
            run(door.classify(pb.ClassifyRequest(image=b"x", request_id="bad-1"), tenant=ANONYMOUS, deadline=None))
    assert admission.pending == 0 and admission._completions == pytest.approx(completions + 1.0)  # decoding was the work
    assert metrics.registry.get_sample_value("catcascade_images_refused_total", {"reason": "format"}) == 1.0
    (record,) = [r for r in caplog.records if r.getMessage().startswith("invalid image")]
    assert record.getMessage() == "invalid image request_id=bad-1: not a JPEG" and record.request_id == "bad-1"
    assert door.inflight == 0


def test_the_observer_records_each_stage_the_reason_drift_and_one_log_line(caplog):
    metrics = ServiceMetrics()
    observer = Observer(metrics, DriftConfig(window=10))
    live = ScriptedEngine(bundle="b:1")
    request = request_for(IMAGE)
    request = dataclasses.replace(request, request_id="obs-1")
    with caplog.at_level(logging.INFO, logger="catcascade.serving.server"):
        observer.computed(request, _result(bundle="b:1"), live)
    sample = metrics.registry.get_sample_value
    for stage, ms in (("decode", 1.5), ("cnn_queue", 2.5), ("cnn", 3.5), ("total", 50.0), ("vlm", 40.5),
                      ("blend", 0.25), ("rationale", 70.0)):
        assert sample("catcascade_stage_milliseconds_sum", {"stage": stage}) == ms, stage
        assert sample("catcascade_stage_milliseconds_count", {"stage": stage}) == 1.0, stage
    assert sample("catcascade_escalation_decisions_total", {"reason": "LOW_CONFIDENCE"}) == 1.0
    drift = observer.drift(live)
    assert drift.version == "b:1" and list(drift._confidences) == [0.5] and list(drift._escalated) == [True]
    assert list(drift._agreed) == [False]  # the VLM's top choice (Sphynx) is not the CNN's (Bengal)
    assert observer.drift(live) is drift  # one monitor per live version
    (record,) = [r for r in caplog.records if r.getMessage().startswith("classified")]
    assert record.getMessage() == ("classified request_id=obs-1 escalated=True reason=LOW_CONFIDENCE total_ms=50.0 "
                                   "version=v3")
    assert (record.request_id, record.escalation_reason, record.total_ms, record.model_version, record.route) == (
        "obs-1", "LOW_CONFIDENCE", 50.0, "v3", "canary")

    observer.computed(request, _result(escalated=False, rationale=False, vlm=False, bundle="b:1"), live)
    assert sample("catcascade_stage_milliseconds_count", {"stage": "vlm"}) == 1.0  # not escalated: no VLM time
    assert sample("catcascade_stage_milliseconds_count", {"stage": "rationale"}) == 1.0
    assert list(drift._escalated) == [True, False] and list(drift._agreed) == [False]  # no VLM, no vote
    agreeing = _result(bundle="b:1", vlm=False)
    agreeing = dataclasses.replace(agreeing, vlm=CandidateScores(("Bengal", "Sphynx"), (0.8, 0.1), 0.1, "qwen", "logprob"))
    observer.computed(request, agreeing, live)
    assert list(drift._agreed) == [False, True]
    observer.computed(request, _result(bundle="b:1"), live)  # back to two confidences for what follows
    drift._confidences.pop(), drift._confidences.pop(), drift._escalated.pop(), drift._escalated.pop()
    assert sample("catcascade_drift_answers_total", {"version": "b:1", "escalated": "true"}) == 3.0
    observer.computed(request, _result(bundle="b:0"), live)  # an answer of another version: not this one's drift
    assert len(drift._confidences) == 2
    swapped = ScriptedEngine(bundle="b:2")
    assert observer.drift(swapped) is not drift and observer.drift(swapped).version == "b:2"
    assert Observer(metrics).drift(live) is None  # drift off


def test_the_log_line_names_the_bundle_when_no_repository_version_answered(caplog):
    observer = Observer(ServiceMetrics())
    result = _result(versions=pb.ModelVersions(bundle="b:1"), timings=StageTimings(total_ms=12.34567))
    with caplog.at_level(logging.INFO, logger="catcascade.serving.server"):
        observer.computed(request_for(IMAGE), result, ScriptedEngine())
    (record,) = [r for r in caplog.records if r.getMessage().startswith("classified")]
    assert record.getMessage().endswith("total_ms=12.3 version=b:1") and record.model_version == "b:1"
    assert record.total_ms == 12.35  # the structured field keeps two decimals


def test_the_chain_observes_on_the_live_version_and_drift_knows_its_reference():
    from catcascade.ensemble.confidence_histogram import ConfidenceHistogram

    reference = ConfidenceHistogram(edges=[0.0, 0.5, 1.0], counts=[3, 7])
    engine = ScriptedEngine(result=_result(bundle="b:1"))
    engine.identity = dataclasses.replace(engine.identity, confidence_reference=None)
    metrics = ServiceMetrics()
    observer = Observer(metrics, DriftConfig(window=10))
    door = FrontDoor(SingleVersion(engine), metrics, observer=observer)
    run(_classify(door))
    assert list(observer.drift(engine)._confidences) == [0.5]
    assert metrics.registry.get_sample_value("catcascade_drift_answers_total",
                                             {"version": "b:1", "escalated": "true"}) == 1.0
    other = ScriptedEngine(bundle="b:2")
    other.identity = dataclasses.replace(other.identity, confidence_reference=reference)
    monitor = observer.drift(other)
    assert monitor.reference is reference and monitor.edges == [0.0, 0.5, 1.0]


def test_span_attributes_name_the_request_the_answer_and_its_versions():
    request = pb.ClassifyRequest(priority=pb.PRIORITY_BATCH, escalation=pb.ESCALATION_MODE_ALWAYS)
    response = result_to_proto("span-1", _result())
    response.cached = True
    assert span_attributes(request, response) == {
        "catcascade.request_id": "span-1", "catcascade.escalated": True,
        "catcascade.escalation_reason": "ESCALATION_REASON_LOW_CONFIDENCE", "catcascade.cached": True,
        "catcascade.priority": "PRIORITY_BATCH", "catcascade.mode": "ESCALATION_MODE_ALWAYS",
        "catcascade.version.bundle": "b:1", "catcascade.version.cnn": "cnn:2", "catcascade.version.vlm": "qwen"}


# --- authentication: the interceptor and the token's edges --------------------------------------

class _Details:
    def __init__(self, method, metadata=()):
        self.method, self.invocation_metadata = method, metadata


class _AbortContext:
    def __init__(self):
        self.aborted = None

    async def abort(self, code, details):
        self.aborted = (code, details)
        raise grpc.RpcError()


def _handlers():
    def des(b):
        return b

    def ser(m):
        return m

    async def unary(request, context):
        return "ok"

    async def streaming(request, context):
        yield "ok"

    return {
        "unary_unary": grpc.unary_unary_rpc_method_handler(unary, des, ser),
        "unary_stream": grpc.unary_stream_rpc_method_handler(streaming, des, ser),
        "stream_unary": grpc.stream_unary_rpc_method_handler(unary, des, ser),
        "stream_stream": grpc.stream_stream_rpc_method_handler(streaming, des, ser),
    }


@pytest.mark.parametrize("shape", ["unary_unary", "unary_stream", "stream_unary", "stream_stream"])
def test_the_interceptor_refuses_unknown_callers_with_a_handler_of_the_same_shape(shape):
    handler = _handlers()[shape]
    refused = []
    interceptor = BearerTokenInterceptor(Authenticator(["tok"]), on_refused=refused.append)

    asked = []

    async def continuation(details):
        asked.append(details)
        return handler

    async def go():
        allowed = _Details("/x.Cascade/Classify", [("authorization", "Bearer tok")])
        ok = await interceptor.intercept_service(continuation, allowed)
        assert asked == [allowed]  # the handler looked up is the call's own
        assert ok is handler and refused == []
        denied = await interceptor.intercept_service(continuation, _Details("/x.Cascade/Classify"))
        assert denied is not handler and refused == ["/x.Cascade/Classify"]
        assert (denied.request_streaming, denied.response_streaming) == (handler.request_streaming,
                                                                         handler.response_streaming)
        assert denied.request_deserializer is handler.request_deserializer
        assert denied.response_serializer is handler.response_serializer
        behaviour = next(b for b in (denied.unary_unary, denied.unary_stream, denied.stream_unary,
                                     denied.stream_stream) if b is not None)
        context = _AbortContext()
        with pytest.raises(grpc.RpcError):
            out = behaviour(None, context)
            if hasattr(out, "__anext__"):
                await out.__anext__()
            else:
                await out
        assert context.aborted == (grpc.StatusCode.UNAUTHENTICATED,
                                   "missing or invalid bearer token (metadata 'authorization: Bearer <token>')")

    run(go())


def test_the_interceptor_lets_health_checks_and_unknown_methods_through():
    refused = []
    interceptor = BearerTokenInterceptor(Authenticator(["tok"]), on_refused=refused.append)
    handler = _handlers()["unary_unary"]

    async def go():
        async def found(details):
            return handler

        async def not_found(details):
            return None

        health = await interceptor.intercept_service(found, _Details("/grpc.health.v1.Health/Check"))
        missing = await interceptor.intercept_service(not_found, _Details("/x.Cascade/Nope"))
        return health, missing

    health, missing = run(go())
    assert health is handler and missing is None and refused == []
    quiet = BearerTokenInterceptor(Authenticator(["tok"]))  # no counter: still refuses
    assert run(quiet.intercept_service(lambda d: _found(handler), _Details("/x.Cascade/Classify"))) is not handler


async def _found(handler):
    return handler


def test_only_spaces_and_tabs_around_the_token_are_dropped():
    assert bearer_credentials("Bearer \t tok-a\t") == "tok-a"
    assert bearer_credentials("Bearer \x0btok-a") == "\x0btok-a"  # RFC 9110 whitespace is space and tab
    assert bearer_credentials("Bearer XtokX") == "XtokX"
    assert bearer_credentials("Bearer") is None and bearer_credentials(None) is None
    tokens = TokenSet(["tok-a"])
    assert tokens.accepts("bearer tok-a") and not tokens.accepts("Bearer tok-b") and not tokens.accepts(None)
    assert not tokens.accepts("Basic tok-a")
    with pytest.raises(ValueError, match="^a token set needs at least one token$"):
        TokenSet([])
    assert Authenticator(["t"]).required is True and Authenticator([]).required is False


def test_a_request_id_of_exactly_the_limit_is_accepted():
    r = validated_request(pb.ClassifyRequest(request_id="x" * MAX_REQUEST_ID), labels=6, deadline=None, tenant=None)
    assert r.request_id == "x" * MAX_REQUEST_ID
    with pytest.raises(InvalidRequestError, match="^request_id must be printable characters \\(no control"):
        validated_request(pb.ClassifyRequest(request_id="a\tb"), labels=6, deadline=None, tenant=None)


# --- the cache stage: identical requests in flight, top_k, eviction counts, budgets ------------

def test_identical_requests_in_flight_share_one_computation_and_different_ones_do_not():
    engine = ScriptedEngine(result=_result(escalated=False, rationale=False, vlm=False))
    engine.gate = asyncio.Event()
    registry = CollectorRegistry()
    cache = CacheStage(ResponseCacheConfig(enabled=True), registry=registry)
    door = _door(engine, cache=cache)

    def ask(image, request_id, tenant="t"):
        return door.classify(pb.ClassifyRequest(image=image, request_id=request_id), tenant=tenant, deadline=None)

    async def go():
        tasks = [asyncio.create_task(ask(b"same", "r1")), asyncio.create_task(ask(b"same", "r2")),
                 asyncio.create_task(ask(b"other", "r3")), asyncio.create_task(ask(b"same", "r4", tenant="u"))]
        while len(engine.requests) < 3:
            await asyncio.sleep(0)
        engine.gate.set()
        return await asyncio.gather(*tasks)

    first, second, other, other_tenant = run(go())
    assert [r.image for r in engine.requests] == [b"same", b"other", b"same"]  # one per (tenant, image)
    assert not first.cached and second.cached and not other.cached and not other_tenant.cached
    assert [r.request_id for r in (first, second, other, other_tenant)] == ["r1", "r2", "r3", "r4"]
    assert second.versions.bundle == "b:1" and second.labels[0].label == "Sphynx"
    assert registry.get_sample_value("catcascade_response_cache_lookups_total", {"result": "shared"}) == 1.0


def test_a_degraded_answer_in_flight_is_not_shared():
    degraded = _result(escalated=False, rationale=False, vlm=False, reason=EscalationReason.VLM_UNAVAILABLE)
    engine = ScriptedEngine(result=degraded)
    engine.gate = asyncio.Event()
    door = _door(engine, cache=CacheStage(ResponseCacheConfig(enabled=True)))

    async def go():
        tasks = [asyncio.create_task(_classify(door, "t", image=b"same")) for _ in range(2)]
        while not engine.requests:
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        engine.gate.set()
        return await asyncio.gather(*tasks)

    answers = run(go())
    assert len(engine.requests) == 2 and not any(a.cached for a in answers)  # each computed its own


def test_top_k_is_part_of_the_cache_key():
    engine = Engine("k")
    door = _door(engine, cache=CacheStage(ResponseCacheConfig(enabled=True)))

    async def go():
        out = []
        for k in (1, 0, 2, 0):
            out.append(await door.classify(pb.ClassifyRequest(image=IMAGE, top_k=k,
                                                              escalation=pb.ESCALATION_MODE_NEVER),
                                           tenant="t", deadline=None))
        return out

    one, default, two, default_again = run(go())
    assert [r.cached for r in (one, default, two, default_again)] == [False, False, False, True]
    assert len(one.labels) == 1 and len(two.labels) == 2 and len(default.labels) > 2
    assert engine.calls == 3


def test_evictions_are_counted_one_by_one_and_the_byte_gauge_follows():
    registry = CollectorRegistry()
    cache = CacheStage(ResponseCacheConfig(enabled=True, max_entries=1), registry=registry)
    door = _door(Engine("k"), cache=cache)

    async def go():
        for seed in range(3):
            await _classify(door, "t", image=jpeg_bytes((40, 30), seed=200 + seed))

    run(go())
    assert registry.get_sample_value("catcascade_response_cache_evictions_total") == 2.0
    assert registry.get_sample_value("catcascade_response_cache_bytes") == cache.partition("t").bytes > 0
    assert registry.get_sample_value("catcascade_response_cache_entries") == 1.0


def test_a_cached_escalation_is_handed_to_a_tenant_with_budget_left_and_costs_it_nothing():
    budgets = TenantBudgets(TenantBudgetsConfig(tenants={"t": {"rate_per_s": 0.0, "burst": 2}}), ["t"],
                            clock=FakeClock())
    engine = Engine("k", verifier=FakeVerifier(), tenant_budgets=budgets)
    door = _door(engine, cache=CacheStage(ResponseCacheConfig(enabled=True), budgets), budgets=budgets)

    async def go():
        return [await _classify(door, "t", mode=pb.ESCALATION_MODE_ALWAYS) for _ in range(3)]

    paid, *hits = run(go())
    assert paid.escalated and not paid.cached
    assert all(h.cached and h.escalated for h in hits) and engine.calls == 1
    assert budgets.bucket("t").tokens == 1.0  # the hits spent nothing


def test_a_reused_answer_reports_its_own_time():
    import time

    route = Route(None, pb.ModelVersions(bundle="b:1", route="live"), None)
    stored = result_to_proto("old", _result())
    out = reused(stored, "new", route, time.perf_counter() - 0.25)
    assert out.request_id == "new" and out.cached and out.versions.route == "live"
    assert 250.0 <= out.timings.total_ms < 5000.0 and out.timings.vlm_ms == 0.0
    assert out.labels == stored.labels and not stored.cached  # the stored answer is not changed


def test_an_escalated_answer_in_flight_is_shared_with_a_tenant_that_has_budget():
    budgets = TenantBudgets(TenantBudgetsConfig(tenants={"t": {"rate_per_s": 0.0, "burst": 5}}), ["t"],
                            clock=FakeClock())
    engine = ScriptedEngine()  # answers escalated
    engine.gate = asyncio.Event()
    door = _door(engine, cache=CacheStage(ResponseCacheConfig(enabled=True), budgets), budgets=budgets)

    async def go():
        tasks = [asyncio.create_task(_classify(door, "t", mode=pb.ESCALATION_MODE_ALWAYS, image=b"same"))
                 for _ in range(2)]
        while not engine.requests:
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        engine.gate.set()
        return await asyncio.gather(*tasks)

    first, shared = run(go())
    assert len(engine.requests) == 1 and not first.cached and shared.cached and shared.escalated
