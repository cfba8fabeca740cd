"""The feature-interaction matrix of issue 22, through the real gRPC server (local engine) and
the real ModelAdmin service: each feature checked by value in bundle mode and in model-
repository mode with a canary and with a shadow, and each cross-feature defect pinned.

Two servers for the whole module, each with every feature on (response cache, tenants with
budgets, in-memory tracing, tightened decode limits, a VLM floor that short deadlines miss):
one over a bundle, one over a model repository whose routing each test sets. The modes share
the repository server (its routing changes between them), so every test uses images of its own.

The tests after the matrix pin the cross-feature defects issue 22 found (their docstrings say
which): each failed, by its assertion, on the code before the one request path (0c22781).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import pytest

from benchmarks.hostile_images import jpeg_many_scans
from catcascade.ensemble.bundle import load_bundle
from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.api import cascade_pb2_grpc as pb_grpc
from catcascade.client import CatcascadeClient, EscalationReason
from catcascade.serving.config import ServeConfig
from catcascade.client.model_admin import ModelAdminClient
from tests.conftest import GrpcServerThread, jpeg_bytes
from tests.test_integration_model_lifecycle import make_version

pytestmark = pytest.mark.integration

# bob and frank may escalate without limit; the others each belong to one test (per server)
TOKENS = {name: f"tok-{name}" for name in ("bob", "frank", "alice", "carol", "dave", "erin")}
BURSTS = {"alice": 3, "carol": 1, "dave": 1, "erin": 3}
ADMIN_TOKEN = "admin-secret"
CACHE_ENTRIES = 16
VLM_MIN_BUDGET_MS = 3000  # an ALWAYS request with a deadline under ~3 s is answered CNN-only (DEADLINE)
N_LABELS = 12
ALWAYS, BUDGET = EscalationReason.REQUESTED_ALWAYS, EscalationReason.TENANT_BUDGET

MODES = ["bundle", "canary", "shadow"]
SHADOW_OK = {"version": "v1t", "route": "shadow", "outcome": "ok"}  # copies the candidate answered
DEFECT_MODES = ["bundle", "canary"]  # (a shadow spends budgets of its own: see the shadow test)


def _config(vllm_url: str, **where) -> ServeConfig:
    return ServeConfig(port=0, vlm={"urls": [vllm_url]}, auth={"tenants": TOKENS},
                       tenant_budgets={"tenants": {t: {"rate_per_s": 0.0001, "burst": b} for t, b in BURSTS.items()}},
                       cache={"enabled": True, "max_entries": CACHE_ENTRIES}, tracing={"exporter": "memory"},
                       limits={"max_aspect_ratio": 2, "max_jpeg_scans": 20, "vlm_min_budget_ms": VLM_MIN_BUDGET_MS},
                       **where)


@pytest.fixture(scope="module")
def bundle_server(demo_bundle, vllm_server):
    server = GrpcServerThread(_config(vllm_server.url, bundle=demo_bundle)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model_repo(demo_bundle, tmp_path_factory) -> Path:
    """v1 is the demo bundle; v1t has the SAME manifest name:version (so the same display
    strings: bundle, CNN hash, adapter) but twice the temperature and another escalation
    threshold; v2 renames the labels (``_v2``) and says version 2."""
    repo = tmp_path_factory.mktemp("matrix-models")
    make_version(repo, "v1", demo_bundle)
    make_version(repo, "v1t", demo_bundle, temperature_scale=2.0)
    make_version(repo, "v2", demo_bundle, label_suffix="_v2")
    for name, change in (("v1t", lambda m: setattr(m.cascade.escalation, "threshold", 0.35)),
                         ("v2", lambda m: setattr(m, "version", m.version + "-v2"))):
        bundle = load_bundle(repo / name)
        change(bundle.manifest)
        bundle.save()
    (repo / "routing.yaml").write_text("live: v1\n")
    return repo


@pytest.fixture(scope="module")
def repo_server(model_repo, vllm_server):
    server = GrpcServerThread(_config(vllm_server.url, models={
        "repository": str(model_repo), "admin_port": 0, "admin_tokens": [ADMIN_TOKEN], "poll_interval_s": 0.2,
        "drain_timeout_s": 20})).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(repo_server):
    with ModelAdminClient(f"127.0.0.1:{repo_server.servicer.front_door.router.admin_port}", ADMIN_TOKEN) as a:
        yield a


_MODE_NAMES = {pb.TRAFFIC_MODE_CANARY: "canary", pb.TRAFFIC_MODE_SHADOW: "shadow"}


def route(admin: ModelAdminClient, live: str = "v1", candidate: str | None = None, mode: str = "canary",
          share: float = 1.0) -> None:
    """Puts the repository's routing in this state through the admin service (no change, no call)."""
    r = admin.list().routing
    if r.candidate and (r.candidate != candidate or _MODE_NAMES.get(r.mode) != mode
                        or abs(r.share - share) > 1e-6 or r.live != live):
        admin.set_candidate(None)
    if r.live != live:
        admin.promote(live)
    if candidate is not None and admin.list().routing.candidate != candidate:
        admin.set_candidate(candidate, mode, share)
    r = admin.list().routing
    assert (r.live, r.candidate or None) == (live, candidate), r


@dataclass
class Served:
    """One serving mode: the server, the pipeline that answers its live requests, and the
    versions an answer must carry."""

    mode: str
    server: GrpcServerThread
    answering: Callable
    route: str
    model_version: str
    bundle: str

    def client(self, tenant: str = "bob", **kw) -> CatcascadeClient:
        return CatcascadeClient(self.server.target, token=TOKENS[tenant], timeout_s=60, **kw)

    def seed(self, n: int) -> int:
        """Images of their own per mode (canary and shadow share the repository server's cache)."""
        return 100_000 * (MODES.index(self.mode) + 1) + n

    def assert_answered_as_expected(self, r) -> None:
        assert (r.versions.route, r.versions.model_version, r.versions.bundle) == \
            (self.route, self.model_version, self.bundle), r.versions


@pytest.fixture
def served(mode, request, demo_bundle) -> Served:
    if mode == "bundle":
        s = request.getfixturevalue("bundle_server")
        return Served(mode, s, lambda: s.servicer.front_door.router.live_engine(), "", "",
                      load_bundle(demo_bundle).version_string)
    s, admin, repo = (request.getfixturevalue(f) for f in ("repo_server", "admin", "model_repo"))
    router = s.servicer.front_door.router
    if mode == "canary":  # every request to v2
        route(admin, "v1", "v2", "canary", 1.0)
        return Served(mode, s, lambda: router.candidate.pipeline, "canary", "v2",
                      load_bundle(repo / "v2").version_string)
    route(admin, "v1", "v1t", "shadow", 1.0)  # every request copied to v1t, answered by v1
    return Served(mode, s, lambda: router.live.pipeline, "live", "v1", load_bundle(repo / "v1").version_string)


def _wait_for(predicate, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _sample(server, name: str, labels: dict) -> float:
    return server.servicer.metrics.registry.get_sample_value(name, labels) or 0.0


def _probs(r) -> list[float]:
    return [s.probability for s in r.labels]


def _noise_png(side: int, seed: int) -> bytes:
    """Random pixels: PNG cannot compress them, so the file is about side*side*3 bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ============================================================ kept in every mode (no marker)


@pytest.mark.parametrize("mode", MODES, scope="module")
class TestEveryFeatureInEveryMode:
    def test_configured_decode_limits_refuse_a_wide_image_and_a_many_scan_jpeg(self, served):
        s = served.server
        before = {why: _sample(s, "catcascade_images_refused_total", {"reason": why}) for why in ("aspect", "scans")}
        with served.client() as c:
            for data, why, says in ((jpeg_bytes(size=(96, 32), seed=served.seed(1)), "aspect", "aspect ratio of 3:1"),
                                    (jpeg_many_scans(64, 60), "scans", "more than 20 scans")):
                with pytest.raises(grpc.RpcError) as err:
                    c.classify(data, mode="never")
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in err.value.details(), why
            r = c.classify(jpeg_bytes(size=(60, 32), seed=served.seed(2)), mode="never")  # 1.9:1 passes
        served.assert_answered_as_expected(r)
        assert len(r.labels) == 3
        assert {why: _sample(s, "catcascade_images_refused_total", {"reason": why}) - before[why]
                for why in before} == {"aspect": 1, "scans": 1}

    def test_a_5_mb_image_is_accepted_with_the_default_message_limit(self, served):
        data = _noise_png(1300, served.seed(3))
        assert len(data) > 5_000_000
        if served.mode == "shadow":  # earlier requests' copies have landed
            _wait_for(lambda: served.server.servicer.front_door.router._shadow_inflight == 0,
                      "earlier shadow copies")
        copies = _sample(served.server, "catcascade_model_requests_total", SHADOW_OK)
        with served.client() as c:
            r = c.classify(data, mode="never")
        served.assert_answered_as_expected(r)
        assert len(r.labels) == 3 and r.escalation_reason == EscalationReason.REQUESTED_NEVER
        if served.mode == "shadow":  # and its copy ran on the candidate
            _wait_for(lambda: _sample(served.server, "catcascade_model_requests_total", SHADOW_OK) == copies + 1,
                      "the shadow copy of the 5 MB image")

    def test_priority_reaches_the_vlm_and_an_unknown_one_is_refused(self, served):
        import json

        verifier = served.answering().verifier
        bodies: list[dict] = []

        async def record(request):
            if request.url.path.endswith("/chat/completions"):
                bodies.append(json.loads(request.content))

        verifier._client.event_hooks["request"].append(record)
        try:
            with served.client() as c:
                batch = c.classify(jpeg_bytes(seed=served.seed(4)), mode="always", priority="batch")
                interactive = c.classify(jpeg_bytes(seed=served.seed(5)), mode="always", priority="interactive")
        finally:
            verifier._client.event_hooks["request"].remove(record)
        for r in (batch, interactive):
            served.assert_answered_as_expected(r)
            assert r.escalated and r.escalation_reason == ALWAYS and r.vlm is not None
        assert [b.get("priority", 0) for b in bodies] == [1, 0]
        with grpc.insecure_channel(served.server.target) as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.CatClassifierStub(channel).Classify(
                    pb.ClassifyRequest(image=jpeg_bytes(seed=served.seed(6)), priority=7), timeout=30,
                    metadata=(("authorization", f"Bearer {TOKENS['bob']}"),))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown priority 7" in err.value.details()

    def test_a_deadline_too_short_for_the_vlm_gets_the_cnn_answer_and_says_why(self, served):
        with served.client() as c:
            c.model_info()  # connected first: on a busy machine connecting could take the short deadline
            # whatever the CNN took, less than the VLM's floor is left of 2.9 s
            r = c.classify(jpeg_bytes(seed=served.seed(7)), mode="always", timeout_s=2.9)
        served.assert_answered_as_expected(r)
        assert not r.escalated and r.vlm is None and len(r.labels) == 3
        assert r.escalation_reason == EscalationReason.DEADLINE and "ms left of the deadline" in r.escalation_detail

    def test_the_request_span_carries_the_answering_versions(self, served):
        rid = f"span-{served.mode}"
        with served.client() as c:
            r = c.classify(jpeg_bytes(seed=served.seed(8)), mode="never", request_id=rid)
        served.assert_answered_as_expected(r)
        spans = served.server.servicer.tracing.memory_exporter.get_finished_spans()
        [request] = [sp for sp in spans if sp.name == "catcascade.Classify"
                     and sp.attributes.get("catcascade.request_id") == rid]
        assert {k: request.attributes[f"catcascade.version.{k}"] for k in ("bundle", "cnn", "vlm")} == \
            {"bundle": served.bundle, "cnn": r.versions.cnn, "vlm": r.versions.vlm}
        assert r.versions.vlm != "" and not request.attributes["catcascade.cached"]
        children = {sp.name for sp in spans if sp.parent is not None and sp.parent.span_id == request.context.span_id}
        assert {"decode", "cnn_queue", "cnn"} <= children

    def test_admission_refuses_what_the_queue_cannot_serve_in_time(self, served):
        """With the answering version's decode threads held, four requests queue; a fifth
        whose deadline the queue cannot meet is refused at once with RESOURCE_EXHAUSTED."""
        s, pipe = served.server, served.answering()
        refused_before = _sample(s, "catcascade_admission_refusals_total", {"reason": "deadline"})
        release = threading.Event()
        # more blockers than decode threads (2 by default): the extra ones wait in the pool's queue
        busy = [pipe._decode_pool.submit(release.wait) for _ in range(16)]
        try:
            with grpc.insecure_channel(s.target) as channel:
                stub = pb_grpc.CatClassifierStub(channel)
                auth = (("authorization", f"Bearer {TOKENS['bob']}"),)

                def call(n: int, timeout: float):
                    req = pb.ClassifyRequest(image=jpeg_bytes(size=(32, 32), seed=served.seed(100 + n)),
                                             escalation=pb.ESCALATION_MODE_NEVER)
                    return stub.Classify.future(req, timeout=timeout, metadata=auth)

                queued = [call(n, 60) for n in range(4)]
                _wait_for(lambda: pipe.decode_waiting >= 4, "four requests waiting for a decode thread")
                time.sleep(1.0)  # they are late now: the estimate knows the queue is stuck
                error = call(4, 0.5).exception()  # waiting out the deadline would be DEADLINE_EXCEEDED
                assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                assert "server overloaded" in error.details() and "would miss the deadline" in error.details()
                release.set()
                answers = [f.result() for f in queued]
        finally:
            release.set()
            for f in busy:
                f.result(timeout=60)
        assert all(len(a.labels) == 3 and a.versions.route == served.route for a in answers)
        assert _sample(s, "catcascade_admission_refusals_total", {"reason": "deadline"}) == refused_before + 1


# ================================================= the response cache across versions (repository)


def test_after_a_promote_a_repeated_image_gets_the_new_versions_probabilities(repo_server, admin):
    """Defect pinned (issue 22; failed on 0c22781, before the one request path): the response cache keys on the
    live version's display strings (bundle name:version, CNN hash, adapter), not on the answering version's
    content: after a promote to a version with the same display strings, the old version's answer comes back
    cached."""
    route(admin, "v1")
    image = jpeg_bytes(seed=201)
    with CatcascadeClient(repo_server.target, token=TOKENS["bob"], timeout_s=60) as c:
        on_v1 = c.classify(image, mode="never")
        admin.promote("v1t")
        again = c.classify(image, mode="never")
        reference = c.classify(image, mode="never", top_k=N_LABELS)  # a key never asked before: computed by v1t
    assert on_v1.versions.model_version == "v1" and reference.versions.model_version == "v1t"
    assert not reference.cached and _probs(on_v1) != pytest.approx(_probs(reference)[:3], abs=1e-4)
    assert not again.cached, f"v1's answer came back cached on v1t: {_probs(again)} (v1: {_probs(on_v1)})"
    assert again.versions.model_version == "v1t"
    assert _probs(again) == pytest.approx(_probs(reference)[:3], abs=1e-6)


def test_after_a_rollback_a_repeated_image_gets_the_restored_versions_probabilities(repo_server, admin):
    """Defect pinned (issue 22; failed on 0c22781, before the one request path): the response cache keys on the
    live version's display strings: after a rollback, the rolled-back version's answer comes back cached."""
    route(admin, "v1")
    image = jpeg_bytes(seed=202)
    with CatcascadeClient(repo_server.target, token=TOKENS["bob"], timeout_s=60) as c:
        admin.promote("v1t")
        on_v1t = c.classify(image, mode="never")
        assert admin.rollback().routing.live == "v1"
        again = c.classify(image, mode="never")
        reference = c.classify(image, mode="never", top_k=N_LABELS)  # computed by v1
    assert on_v1t.versions.model_version == "v1t" and reference.versions.model_version == "v1"
    assert not reference.cached and _probs(on_v1t) != pytest.approx(_probs(reference)[:3], abs=1e-4)
    assert not again.cached, f"v1t's answer came back cached on v1: {_probs(again)} (v1t: {_probs(on_v1t)})"
    assert again.versions.model_version == "v1"
    assert _probs(again) == pytest.approx(_probs(reference)[:3], abs=1e-6)


def test_after_a_canary_is_cleared_live_traffic_never_gets_the_canarys_answer(repo_server, admin):
    """Defect pinned (issue 22; failed on 0c22781, before the one request path): the response cache keys on the
    live version's display strings, whatever version answered: the canary's answer is stored under the live
    key and, after the canary is cleared, handed to live traffic labelled canary/v2."""
    route(admin, "v1", "v2", "canary", 1.0)
    image = jpeg_bytes(seed=203)
    with CatcascadeClient(repo_server.target, token=TOKENS["bob"], timeout_s=60) as c:
        on_canary = c.classify(image, mode="never")
        admin.set_candidate(None)
        after = c.classify(image, mode="never")
    assert (on_canary.versions.route, on_canary.versions.model_version) == ("canary", "v2")
    assert (after.versions.route, after.versions.model_version) == ("live", "v1"), after.versions
    assert not after.cached and not any(s.label.endswith("_v2") for s in after.labels)


# ======================================== a version pinned by name, through both protocols (repository)


def test_a_request_pinned_to_a_served_version_runs_there_and_is_never_shadowed(repo_server, admin):
    """``model_version`` (native) picks the live version or the candidate by name, whatever the
    routing says; a pinned request makes no shadow copy; an unserved name is NOT_FOUND."""
    route(admin, "v1", "v1t", "shadow", 1.0)
    pinned_ok = {"version": "v1t", "route": "pinned", "outcome": "ok"}
    before, copies = _sample(repo_server, "catcascade_model_requests_total", pinned_ok), \
        _sample(repo_server, "catcascade_model_requests_total", SHADOW_OK)
    with CatcascadeClient(repo_server.target, token=TOKENS["bob"], timeout_s=60) as c:
        on_candidate = c.classify(jpeg_bytes(seed=501), mode="never", model_version="v1t")
        on_live = c.classify(jpeg_bytes(seed=502), mode="never", model_version="v1")
        routed = c.classify(jpeg_bytes(seed=503), mode="never")  # answered by v1, copied to v1t
        with pytest.raises(grpc.RpcError) as unserved:
            c.classify(jpeg_bytes(seed=504), mode="never", model_version="v2")  # staged, not served
    assert (on_candidate.versions.route, on_candidate.versions.model_version) == ("pinned", "v1t")
    assert (on_live.versions.route, on_live.versions.model_version) == ("pinned", "v1")
    assert (routed.versions.route, routed.versions.model_version) == ("live", "v1")
    assert unserved.value.code() == grpc.StatusCode.NOT_FOUND and "v1, v1t" in unserved.value.details()
    assert _sample(repo_server, "catcascade_model_requests_total", pinned_ok) == before + 1
    _wait_for(lambda: _sample(repo_server, "catcascade_model_requests_total", SHADOW_OK) > copies, "the shadow copy")
    time.sleep(0.3)  # a copy of a pinned request, were one made, would have run by now too
    assert _sample(repo_server, "catcascade_model_requests_total", SHADOW_OK) == copies + 1


def test_open_inference_serves_each_version_of_the_repository(repo_server, admin):
    """KServe v2: the served versions are the model's versions (metadata, readiness, Triton's
    repository index), ``model_version`` pins ModelInfer to one, and an unserved one is NOT_FOUND."""
    tc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    route(admin, "v1", "v2", "canary", 1.0)
    c = tc.InferenceServerClient(repo_server.target)
    headers = {"authorization": f"Bearer {TOKENS['bob']}"}
    assert c.get_model_metadata("catcascade", headers=headers).versions == ["v1", "v2"]
    assert [(m.name, m.version, m.state) for m in c.get_model_repository_index(headers=headers).models] == [
        ("catcascade", "v1", "READY"), ("catcascade", "v2", "READY")]
    assert c.is_model_ready("catcascade", "v2", headers=headers)
    assert not c.is_model_ready("catcascade", "v1t", headers=headers)

    def answer(version: str, seed: int):
        image = tc.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([jpeg_bytes(seed=seed)], dtype=np.object_))
        result = c.infer("catcascade", [image], model_version=version, headers=headers)
        versions = json.loads(result.as_numpy("versions")[0])
        return result.get_response().model_version, versions, result.as_numpy("labels")[0][0].decode()

    assert answer("v1", 511)[:2] == ("v1", {**answer("v1", 511)[1], "model_version": "v1", "route": "pinned"})
    version, versions, label = answer("", 512)  # routed: the canary takes every request
    assert (versions["model_version"], versions["route"]) == ("v2", "canary") and label.endswith("_v2")
    with pytest.raises(InferenceServerException) as unserved:
        answer("v1t", 513)
    assert unserved.value.status() == "StatusCode.NOT_FOUND" and "v1, v2" in unserved.value.message()


# ========================================================================== tenant budgets


def test_shadow_copies_do_not_spend_the_live_tenants_vlm_budget(repo_server, admin):
    """Defect pinned (issue 22; failed on 0c22781, before the one request path): shadow copies run under the
    live request's tenant and spend its VLM budget: the live tenant's third escalation comes back
    TENANT_BUDGET."""
    route(admin, "v1", "v1t", "shadow", 1.0)
    shadowed = SHADOW_OK
    answers = []
    with CatcascadeClient(repo_server.target, token=TOKENS["erin"], timeout_s=60) as c:
        for n in range(BURSTS["erin"]):
            copies = _sample(repo_server, "catcascade_model_requests_total", shadowed)
            answers.append(c.classify(jpeg_bytes(seed=300 + n), mode="always"))
            # the copy has run before the next request: what it spent is spent
            _wait_for(lambda: _sample(repo_server, "catcascade_model_requests_total", shadowed) > copies,
                      "the shadow copy")
    assert all(r.versions.route == "live" for r in answers)
    assert [r.escalation_reason for r in answers] == [ALWAYS] * BURSTS["erin"], [r.escalation_detail for r in answers]


@pytest.mark.parametrize("mode", DEFECT_MODES)
def test_explain_does_not_reach_the_vlm_after_the_tenants_budget_is_spent(served):
    """Defect pinned (issue 22; failed on 0c22781, before the one request path): explain=true reaches the VLM
    after the tenant's escalation budget is spent (the rationale call is not charged to the tenant)."""
    verifier = served.answering().verifier
    with served.client("carol") as c:
        spent = c.classify(jpeg_bytes(seed=served.seed(400)), mode="always")
        sent = verifier.requests_sent
        r = c.classify(jpeg_bytes(seed=served.seed(401)), mode="always", explain=True)
    assert spent.escalated and spent.escalation_reason == ALWAYS
    assert r.escalation_reason == BUDGET and not r.escalated
    assert verifier.requests_sent == sent, "the rationale was asked of the VLM"
    assert r.rationale is not None and not r.rationale.text and "budget" in r.rationale.error


@pytest.mark.parametrize("mode", DEFECT_MODES)
def test_a_cache_hit_does_not_give_an_over_budget_tenant_an_escalated_answer(served):
    """Defect pinned (issue 22; failed on 0c22781, before the one request path): the response cache answers
    before the tenant's budget is checked: an over-budget tenant gets another tenant's cached escalated
    answer."""
    image = jpeg_bytes(seed=served.seed(500))
    with served.client("bob") as bob, served.client("dave") as dave:
        escalated = bob.classify(image, mode="always")
        spent = dave.classify(jpeg_bytes(seed=served.seed(501)), mode="always")
        r = dave.classify(image, mode="always")
    assert escalated.escalated and spent.escalated  # dave's one escalation is spent
    assert r.escalation_reason == BUDGET, (r.escalation_reason, r.cached)
    assert not r.escalated and r.vlm is None and not r.cached
    served.assert_answered_as_expected(r)


@pytest.mark.parametrize("mode", DEFECT_MODES)
def test_every_accepted_bearer_spelling_names_the_same_tenant(served):
    """Defect pinned (issue 22; failed on 0c22781, before the one request path): the interceptor accepts
    'bearer', 'BEARER' and two spaces, but the tenant lookup (serving/auth.py bearer_token) needs exactly
    'Bearer ': other spellings count as anonymous and escape the tenant's budget."""
    token = TOKENS["alice"]
    spellings = [f"Bearer {token}", f"bearer {token}", f"BEARER {token}", f"Bearer  {token}", f"bearer {token}",
                 f"BEARER {token}"]
    reasons = []
    with grpc.insecure_channel(served.server.target) as channel:
        stub = pb_grpc.CatClassifierStub(channel)
        for n, value in enumerate(spellings):
            req = pb.ClassifyRequest(image=jpeg_bytes(seed=served.seed(600 + n)), escalation=pb.ESCALATION_MODE_ALWAYS)
            reasons.append(EscalationReason(stub.Classify(req, timeout=60, metadata=(("authorization", value),))
                                            .escalation_reason))
    assert reasons == [ALWAYS] * 3 + [BUDGET] * 3, reasons


# ===================================================================== the cache across tenants


@pytest.mark.parametrize("mode", DEFECT_MODES)
def test_one_tenants_answer_is_not_a_cache_hit_for_another(served):
    """Defect pinned (issue 22; failed on 0c22781, before the one request path): the response cache is shared
    across tenants: cached=true tells one tenant what another sent."""
    image = jpeg_bytes(seed=served.seed(700))
    with served.client("bob") as bob, served.client("frank") as frank:
        first, repeat = bob.classify(image, mode="never"), bob.classify(image, mode="never")
        other = frank.classify(image, mode="never")
    assert not first.cached and repeat.cached  # the cache works within a tenant
    assert not other.cached
    assert _probs(other) == pytest.approx(_probs(first), abs=1e-6)


@pytest.mark.parametrize("mode", DEFECT_MODES)
def test_one_tenants_entries_are_not_evicted_by_anothers(served):
    """Defect pinned (issue 22; failed on 0c22781, before the one request path): the response cache is one LRU
    for all tenants: one tenant's entries evict another's."""
    image = jpeg_bytes(seed=served.seed(800))
    with served.client("bob") as bob, served.client("frank") as frank:
        assert not bob.classify(image, mode="never").cached
        for n in range(CACHE_ENTRIES + 1):  # more than the cache holds
            frank.classify(jpeg_bytes(size=(16, 16), seed=served.seed(900 + n)), mode="never")
        again = bob.classify(image, mode="never")
    assert again.cached
