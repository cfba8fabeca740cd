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
from catcascade.serving.request_errors import InvalidRequestError, OverloadedError
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
])
def test_validation_refuses_what_the_service_cannot_do(message, error):
    with pytest.raises(InvalidRequestError, match=error):
        validated_request(message, labels=6, deadline=None, tenant=ANONYMOUS)
    assert status_of(InvalidRequestError("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_validation_builds_the_one_request_type():
    r = validated_request(pb.ClassifyRequest(image=b"i", top_k=6, escalation=pb.ESCALATION_MODE_ALWAYS,
                                             priority=pb.PRIORITY_BATCH, explain=True, request_id="r1"),
                          labels=6, deadline=12.5, tenant="acme", trace_headers={"traceparent": "00-x"})
    assert (r.image, r.top_k, r.mode, r.deadline, int(r.priority), r.tenant, r.explain, r.request_id) == (
        b"i", 6, EscalationMode.ALWAYS, 12.5, pb.PRIORITY_BATCH, "acme", True, "r1")
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
