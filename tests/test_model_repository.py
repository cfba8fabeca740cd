"""The model repository's parts that need no server: routing file, version order, the canary
split, the agreement numbers, config edges and the vLLM adapter client's error handling."""
from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest
from pydantic import ValidationError

from catcascade.serving.model_repository.agreement import AgreementWindow
from catcascade.serving.model_repository.config import ModelsConfig, Routing, RoutingFileEmpty, read_routing, write_routing
from catcascade.serving.model_repository.repository import list_versions, natural_key, repository_fingerprint
from catcascade.serving.model_repository.traffic_split import in_share
from catcascade.vlm_stage.vllm_client import AdapterLoadError, VllmAdapterAdmin
from tests.fakes import request_for


def _version(repo, name):
    (repo / name).mkdir()
    (repo / name / "manifest.json").write_text("{}")


def test_versions_sort_naturally_and_skip_hidden_and_manifestless_folders(tmp_path):
    for name in ("v10", "v2", "v1", ".v3.tmp"):
        _version(tmp_path, name)
    (tmp_path / "notes").mkdir()
    assert list_versions(tmp_path) == ["v1", "v2", "v10"]
    assert sorted(["2024-01-10", "2024-01-02", "2023-12-31"], key=natural_key) == ["2023-12-31", "2024-01-02",
                                                                                    "2024-01-10"]


def test_fingerprint_changes_with_a_version_file_or_the_routing_file(tmp_path):
    _version(tmp_path, "v1")
    before = repository_fingerprint(tmp_path, "routing.yaml")
    assert repository_fingerprint(tmp_path, "routing.yaml") == before
    (tmp_path / "routing.yaml").write_text("live: v1\n")
    after_routing = repository_fingerprint(tmp_path, "routing.yaml")
    assert after_routing != before
    (tmp_path / "v1" / "cnn.onnx").write_bytes(b"x")
    assert repository_fingerprint(tmp_path, "routing.yaml") != after_routing


def test_routing_file_round_trips_and_is_validated(tmp_path):
    path = tmp_path / "routing.yaml"
    assert read_routing(path) is None
    r = Routing(live="v1", candidate="v2", mode="canary", share=0.2, previous="v0", seed=7)
    write_routing(path, r)
    assert read_routing(path) == r
    assert not list(tmp_path.glob(".*tmp"))  # written atomically through a temporary file
    for bad, message in (("live: v1\ncandidate: v1\n", "already the live version"),
                         ("live: ../v1\n", "folder name"),
                         ("live: v1\nshare: 1.5\n", "less than or equal to 1"),
                         ("live: v1\nmode: blue-green\n", "canary"),
                         ("live: v1\ncolour: red\n", "Extra inputs")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            read_routing(path)
    path.write_text("live: [v1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        read_routing(path)
    path.write_text(" \n")
    with pytest.raises(RoutingFileEmpty):
        read_routing(path)


def test_an_empty_routing_file_is_a_write_in_progress_not_a_switch_to_the_newest(tmp_path, monkeypatch):
    """``echo "live: x" > routing.yaml`` truncates the file first: a poll that lands in
    between read an empty routing and put the newest version (by name) live."""
    import catcascade.serving.model_repository.loading as loading

    monkeypatch.setattr(loading, "_png", lambda size: b"warm-up")
    router, built = _router_on(tmp_path)
    routing = router.models.routing_path

    async def scenario():
        await router.reload()
        assert router.live.name == "v1"
        routing.write_text("")
        await router.reload(cause="repository changed")
        assert router.live.name == "v1" and not router.rejected
        routing.write_text("live: v2\n")
        await router.reload(cause="repository changed")
        assert router.live.name == "v2"
        await router.aclose()

    asyncio.run(scenario())
    (tmp_path / "again").mkdir()
    fresh, _ = _router_on(tmp_path / "again")
    fresh.models.routing_path.write_text("  \n")

    async def start_up():  # nothing serves yet: an empty file means what no file means
        await fresh.reload()
        assert fresh.live.name == "v2"
        await fresh.aclose()

    asyncio.run(start_up())


def test_canary_split_is_deterministic_uniform_and_seeded():
    inputs = [os.urandom(64) for _ in range(20_000)]
    picked = [in_share(x, 0.2, seed=0) for x in inputs]
    assert abs(sum(picked) / len(inputs) - 0.2) < 0.015  # 5 standard deviations
    assert picked == [in_share(x, 0.2, seed=0) for x in inputs]  # the same input, the same route
    other_seed = [in_share(x, 0.2, seed=1) for x in inputs]
    assert other_seed != picked and abs(sum(other_seed) / len(inputs) - 0.2) < 0.015
    assert not any(in_share(x, 0.0) for x in inputs[:100]) and all(in_share(x, 1.0) for x in inputs[:100])


def test_agreement_window_reports_agreement_escalations_and_latency_percentiles():
    clock = iter([100.0, 112.5]).__next__
    w = AgreementWindow("v1", "v2", clock=clock)
    for i in range(100):
        w.live.record(float(i + 1), escalated=i < 10)
        w.candidate.record(2.0 * (i + 1), escalated=i < 30)
    w.candidate.record_error()
    for i in range(50):
        w.compare("Bengal", "Bengal" if i < 45 else "Sphynx")
    rep = w.report()
    assert rep["compared"] == 50 and rep["top1_agreement"] == pytest.approx(0.9)
    assert rep["live"]["escalation_rate"] == pytest.approx(0.10)
    assert rep["candidate"]["escalation_rate"] == pytest.approx(0.30)  # errors are not answers
    assert rep["candidate"]["requests"] == 101 and rep["candidate"]["errors"] == 1
    assert rep["live"]["latency_p50_ms"] == pytest.approx(50.5) and rep["candidate"]["latency_p50_ms"] == pytest.approx(101.0)
    assert rep["live"]["latency_p95_ms"] == pytest.approx(95.05)
    assert rep["window_s"] == pytest.approx(12.5)


def test_serve_config_takes_a_bundle_or_a_repository_not_both(tmp_path):
    from catcascade.serving.config import ServeConfig

    assert ServeConfig(models={"repository": str(tmp_path)}).bundle is None
    with pytest.raises(ValidationError, match="not both"):
        ServeConfig(bundle=tmp_path, models={"repository": str(tmp_path)})
    with pytest.raises(ValidationError, match="nothing to serve"):
        ServeConfig()
    with pytest.raises(ValidationError, match="model repository not found"):
        ServeConfig(models={"repository": str(tmp_path / "missing")})
    with pytest.raises(ValidationError, match="file name inside the repository"):
        ServeConfig(models={"repository": str(tmp_path), "routing_file": "../routing.yaml"})


def test_serve_flags_build_a_repository_config(tmp_path):
    from catcascade.cli import build_parser
    from catcascade.serving.commands import serve_config_from_args

    args = build_parser().parse_args(["serve", "--models", str(tmp_path), "--admin-port", "0"])
    cfg = serve_config_from_args(args)
    assert cfg.bundle is None and cfg.models.repository == tmp_path and cfg.models.admin_port == 0


def test_admin_tokens_are_required_and_must_differ_from_client_tokens(monkeypatch):
    from catcascade.serving.model_repository.admin import run_admin_server

    async def start(tokens, client_tokens):
        async with run_admin_server(None, "127.0.0.1", 0, tokens, client_tokens=client_tokens):
            pass

    with pytest.raises(ValueError, match="no admin token"):
        asyncio.run(start([], []))
    with pytest.raises(ValueError, match="must differ from the client tokens"):
        asyncio.run(start(["shared", "a"], ["shared"]))
    monkeypatch.setenv("CATCASCADE_ADMIN_TOKENS", "x, y")
    assert ModelsConfig(repository=".", admin_tokens=["z"]).tokens() == ["z", "x", "y"]


def _admin(handler, urls=("http://a", "http://b")):
    calls = []

    def record(request: httpx.Request) -> httpx.Response:
        calls.append((str(request.url), json.loads(request.content) if request.content else None))
        return handler(request)

    return VllmAdapterAdmin(list(urls), transport=httpx.MockTransport(record)), calls


def test_adapter_load_that_one_server_refuses_is_undone_on_the_others():
    def handler(request):
        if request.url.host == "b" and request.url.path == "/v1/load_lora_adapter":
            return httpx.Response(500, json={"error": {"message": "LoRA rank 512 is greater than max_lora_rank 16"}})
        return httpx.Response(200, text="Success")

    admin, calls = _admin(handler)
    with pytest.raises(AdapterLoadError, match="refused adapter 'cats-1'.*max_lora_rank 16"):
        asyncio.run(admin.load("cats-1", "/adapters/one"))
    assert calls == [("http://a/v1/load_lora_adapter", {"lora_name": "cats-1", "lora_path": "/adapters/one"}),
                     ("http://b/v1/load_lora_adapter", {"lora_name": "cats-1", "lora_path": "/adapters/one"}),
                     ("http://a/v1/unload_lora_adapter", {"lora_name": "cats-1"})]


def test_adapter_load_explains_a_server_without_runtime_loading_and_accepts_an_identical_reload():
    admin, _ = _admin(lambda request: httpx.Response(404, json={"detail": "Not Found"}), urls=["http://a"])
    with pytest.raises(AdapterLoadError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        asyncio.run(admin.load("cats-1", "/adapters/one"))

    def already(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "cats-1", "root": "/adapters/one"}]})
        return httpx.Response(400, json={"error": {"message": "The lora adapter 'cats-1' has already been loaded."}})

    admin, calls = _admin(already, urls=["http://a"])
    asyncio.run(admin.load("cats-1", "/adapters/one"))  # the same folder: nothing to do
    with pytest.raises(AdapterLoadError, match="already been loaded"):
        asyncio.run(admin.load("cats-1", "/adapters/other"))


def test_adapter_unload_tolerates_a_server_that_no_longer_has_it():
    admin, calls = _admin(lambda request: httpx.Response(404 if request.url.host == "a" else 200))
    asyncio.run(admin.unload("cats-1"))
    assert [c[0] for c in calls] == ["http://a/v1/unload_lora_adapter", "http://b/v1/unload_lora_adapter"]
    admin, _ = _admin(lambda request: httpx.Response(500, text="boom"), urls=["http://a"])
    with pytest.raises(AdapterLoadError, match="HTTP 500: boom"):
        asyncio.run(admin.unload("cats-1"))


def _cnn_only_bundle(root, labels=("a", "b", "c")):
    """A bundle folder that load_bundle accepts (the ONNX file's contents are not run here)."""
    from catcascade.ensemble.bundle import Bundle, BundleManifest, sha256_file

    root.mkdir()
    (root / "cnn.onnx").write_bytes(b"onnx bytes")
    preprocess = {"image_size": 32, "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}
    cnn = {"architecture": "convnext_atto", "sha256": sha256_file(root / "cnn.onnx")}
    Bundle(root, BundleManifest(name="cats", version="2", labels=list(labels), preprocess=preprocess, cnn=cnn)).save()
    return root


def test_stage_assembles_a_version_from_a_cnn_bundle_the_live_vlm_and_fitted_settings(tmp_path):
    from catcascade.ensemble.bundle import VlmSpec, load_bundle
    from catcascade.serving.model_repository.staging import stage_version

    repo = tmp_path / "models"
    repo.mkdir()
    new = _cnn_only_bundle(tmp_path / "new")
    live = _cnn_only_bundle(tmp_path / "live")
    (live / "vlm" / "base").mkdir(parents=True)
    (live / "vlm" / "adapter").mkdir()
    (live / "vlm" / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    b = load_bundle(live)
    b.manifest.vlm = VlmSpec(base_model="vlm/base", adapter_dir="vlm/adapter", adapter_name="cats")
    b.save()
    cascade = tmp_path / "cascade.json"
    cascade.write_text('{"escalation": {"metric": "margin", "threshold": 0.25}}')

    path = stage_version(new, repo, "v2", vlm_from=live, cascade=cascade)
    staged = load_bundle(path)
    assert path == repo / "v2" and list_versions(repo) == ["v2"]
    assert staged.manifest.vlm.base_model == str((live / "vlm" / "base").resolve())
    assert (path / "vlm" / "adapter" / "adapter_config.json").read_text() == '{"r": 8}'
    assert staged.manifest.cascade.escalation.metric == "margin" and staged.manifest.cascade.escalation.threshold == 0.25
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]

    from catcascade.ensemble.bundle import BundleError

    with pytest.raises(BundleError, match="versions are immutable"):
        stage_version(new, repo, "v2")
    with pytest.raises(BundleError, match="needs a vlm section"):
        stage_version(new, repo, "v3", adapter=live / "vlm" / "adapter")
    (new / "cnn.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match="sha256"):
        stage_version(new, repo, "v4")
    assert list_versions(repo) == ["v2"] and not [p for p in repo.iterdir() if p.name.startswith(".")]


def test_adapter_load_skips_unreachable_servers_and_says_which():
    from catcascade.vlm_stage.vllm_client import AdapterServersUnreachable

    def handler(request):
        if request.url.host == "a":
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, text="Success")

    admin, calls = _admin(handler)
    with pytest.raises(AdapterServersUnreachable, match="cannot reach vLLM at http://a") as err:
        asyncio.run(admin.load("cats-1", "/adapters/one"))
    assert err.value.loaded_on == ["http://b"]  # the reachable server keeps it


def test_adapter_pool_loads_on_a_server_that_was_down_or_lost_its_adapters(tmp_path):
    """vLLM forgets runtime-loaded adapters when it restarts: the pool reloads them."""
    from catcascade.serving.model_repository.adapters import AdapterPool, adapter_digest

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    state = {"up": False, "served": set()}
    posts = []

    def handler(request):
        if not state["up"]:
            raise httpx.ConnectError("connection refused")
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": n, "root": None} for n in state["served"]]})
        body = json.loads(request.content)
        posts.append((request.url.path, body["lora_name"]))
        if request.url.path == "/v1/load_lora_adapter":
            state["served"].add(body["lora_name"])
        return httpx.Response(200, text="Success")

    async def scenario():
        pool = AdapterPool(["http://v"], transport=httpx.MockTransport(handler))
        name = await pool.acquire("cats", folder)  # vLLM still starting: not a refusal
        assert name == f"cats-{adapter_digest(folder)[:12]}" and pool.loaded == [name]
        assert await pool.reconcile() == []  # still down
        state["up"] = True
        assert await pool.reconcile() == [("http://v", name)]
        assert await pool.reconcile() == []  # nothing missing
        state["served"].clear()  # vLLM restarted
        assert await pool.reconcile() == [("http://v", name)]
        await pool.release(name)
        assert pool.loaded == [] and posts[-1] == ("/v1/unload_lora_adapter", name)
        await pool.aclose()

    asyncio.run(scenario())


class _RemoteCnn:
    decodes_images = True  # nothing for the loader's CNN warm-up to batch here
    depth = running = 0  # what the service's gauges read


class _FakeCascade:
    """What the router calls for a version (serving.engine_builder.build_engine in the server):
    an engine whose requests wait on ``gate`` and answer with the version's first label."""

    def __init__(self, labels, preprocess_config, identity):
        self.labels = labels
        self.preprocess_config = preprocess_config
        self.identity = identity
        self.cnn = _RemoteCnn()
        self.inflight_escalations = 0
        self.gate: asyncio.Event | None = None
        self.started = 0
        self.closed = False

    def vlm_serving(self) -> bool:
        return False

    async def classify(self, request):
        from catcascade.cnn_stage.topk import TopK
        from catcascade.ensemble.escalation_policy import EscalationReason
        from catcascade.serving.cascade_engine import CascadeResult, StageTimings

        self.started += 1
        if self.gate is not None and request.image != b"warm-up":
            await self.gate.wait()
        top = TopK((0,), (self.labels[0],), (1.0,))
        return CascadeResult(top, top, None, False, EscalationReason.CONFIDENT, "", StageTimings(total_ms=1.0),
                             versions=self.identity.versions)


def _router_on(tmp_path, **models):
    import contextlib

    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.serving.config import ServeConfig
    from catcascade.serving.metrics import ServiceMetrics
    from catcascade.serving.model_repository.router import ModelRouter

    repo = tmp_path / "models"
    repo.mkdir()
    _cnn_only_bundle(repo / "v1", labels=("a", "b"))
    _cnn_only_bundle(repo / "v2", labels=("a2", "b2"))
    (repo / "routing.yaml").write_text("live: v1\n")
    built = {}

    @contextlib.asynccontextmanager
    async def factory(cfg, b, metrics):
        from catcascade.serving.cascade_engine import EngineIdentity

        identity = EngineIdentity(pb.ModelVersions(bundle=b.version_string), pb.ModelInfo(labels=b.labels))
        cascade = _FakeCascade(b.labels, b.preprocess, identity)
        built.setdefault(cfg.bundle.name, []).append(cascade)
        try:
            yield cascade
        finally:
            cascade.closed = True

    cfg = ServeConfig(models={"repository": str(repo), **models})
    return ModelRouter(cfg.models, cfg, ServiceMetrics(), factory), built


def test_a_swap_leaves_requests_in_flight_on_their_version_and_releases_it_after_them(tmp_path, monkeypatch):
    import catcascade.serving.model_repository.loading as loading

    monkeypatch.setattr(loading, "_png", lambda size: b"warm-up")
    router, built = _router_on(tmp_path)

    async def scenario():
        await router.reload()
        v1 = built["v1"][0]
        v1.gate = asyncio.Event()
        in_flight = [asyncio.create_task(router.classify(request_for(b"img-%d" % i))) for i in range(3)]
        while v1.started < 4:  # the warm-up request, then the three
            await asyncio.sleep(0)
        await router.promote("v2")  # loads and warms v2, then swaps, while v1's three wait
        after = await router.classify(request_for(b"img-new"))
        assert after.versions.model_version == "v2" and after.labels.labels == ("a2",)
        assert not v1.closed and [v.name for v in router.draining] == ["v1"]
        v1.gate.set()
        done = await asyncio.gather(*in_flight)
        assert [r.versions.model_version for r in done] == ["v1"] * 3
        assert [r.labels.labels for r in done] == [("a",)] * 3
        for _ in range(100):
            if v1.closed:
                break
            await asyncio.sleep(0.01)
        assert v1.closed and not router.draining
        assert router.model_info().versions.model_version == "v2" and router.routing.previous == "v1"
        await router.aclose()
        assert built["v2"][0].closed

    asyncio.run(scenario())


def test_a_shadow_copy_never_holds_up_the_live_answer_and_excess_copies_are_dropped(tmp_path, monkeypatch):
    import catcascade.serving.model_repository.loading as loading

    monkeypatch.setattr(loading, "_png", lambda size: b"warm-up")
    router, built = _router_on(tmp_path, shadow_max_concurrency=1)

    async def scenario():
        await router.reload()
        await router.set_candidate("v2", "shadow", 1.0)
        shadow = built["v2"][0]
        shadow.gate = asyncio.Event()  # shadow copies hang until released
        first = await asyncio.wait_for(router.classify(request_for(b"one")), 5)
        second = await asyncio.wait_for(router.classify(request_for(b"two")), 5)
        assert first.versions.model_version == second.versions.model_version == "v1"
        assert first.versions.route == "live" and first.labels.labels == ("a",)
        assert router.window.shadow_dropped == 1  # one copy was running: the second was not started
        shadow.gate.set()
        for _ in range(100):
            if router.window.compared:
                break
            await asyncio.sleep(0.01)
        rep = router.window.report()
        assert rep["compared"] == 1 and rep["top1_agreement"] == 0.0  # "a" against "a2"
        assert rep["live"]["requests"] == 2 and rep["candidate"]["requests"] == 1
        await router.aclose()

    asyncio.run(scenario())


# --- the router's edges the mutation run found untested (make mutation, docs/dev/testing.md) ----

def _sample(router, name, labels=None):
    return router.service_metrics.registry.get_sample_value(name, labels or {})


def _messages(caplog, prefix):
    return [r for r in caplog.records if r.getMessage().startswith(prefix)]


def test_the_router_reports_loads_swaps_roles_and_releases(tmp_path, monkeypatch, caplog):
    import logging
    import re

    import catcascade.serving.model_repository.loading as loading
    from catcascade.serving.api import cascade_pb2 as pb

    monkeypatch.setattr(loading, "_png", lambda size: b"warm-up")
    router, built = _router_on(tmp_path)
    caplog.set_level(logging.INFO)

    async def scenario():
        outcome = await router.reload()
        assert outcome.loaded == ["v1"] and outcome.changed and not outcome.rejected
        (loaded,) = _messages(caplog, "model version v1 loaded")
        assert re.fullmatch(r"model version v1 loaded, verified and warmed in \d+\.\d s \(cats:2, [^,]*\)",
                            loaded.getMessage())
        assert _sample(router, "catcascade_model_loads_total", {"version": "v1", "outcome": "loaded", "reason": ""}) == 1
        assert _sample(router, "catcascade_model_serving", {"version": "v1", "role": "live"}) == 1
        assert _sample(router, "catcascade_model_swaps_total") == 1
        (now,) = _messages(caplog, "models now")
        assert now.getMessage() == "models now: live v1 (reload; before: live None, candidate None)"
        assert (now.model_version, now.candidate) == ("v1", None)
        assert (await router.reload()).changed is False  # nothing changed on disk: nothing reloaded
        assert _sample(router, "catcascade_model_swaps_total") == 1

        await router.set_candidate("v2", "canary", 1.0)
        assert _sample(router, "catcascade_model_serving", {"version": "v2", "role": "canary"}) == 1
        assert _messages(caplog, "models now")[-1].getMessage() == (
            "models now: live v1, candidate v2 (canary, 100%) (candidate set to v2; before: live v1, candidate None)")
        assert _messages(caplog, "models now")[-1].candidate == "v2"
        info = router.model_info()
        assert (info.versions.model_version, info.versions.route, info.candidate.model_version) == ("v1", "live", "v2")
        assert info.candidate_mode == pb.TRAFFIC_MODE_CANARY and info.candidate_share == 1.0
        assert [(name, state) for name, state, _, _ in router.states()] == [("v1", "LIVE"), ("v2", "CANDIDATE")]
        answer = await router.classify(request_for(b"img"))
        assert (answer.versions.model_version, answer.versions.route, answer.labels.labels) == ("v2", "canary", ("a2",))
        assert _sample(router, "catcascade_model_requests_total", {"version": "v2", "route": "canary", "outcome": "ok"}) == 1
        assert _sample(router, "catcascade_model_latency_milliseconds_count", {"version": "v2", "route": "canary"}) == 1
        assert router.window.candidate.summary()["requests"] == 1 and router.window.live.summary()["requests"] == 0

        assert router.live.spinning and not router.candidate.spinning  # only the live build spins its threads
        await router.promote()
        assert router.live.name == "v2" and router.candidate is None and router.routing.previous == "v1"
        assert router.live.spinning and read_routing(router.models.routing_path).live == "v2"  # rebuilt; written
        assert _sample(router, "catcascade_model_serving", {"version": "v2", "role": "canary"}) == 0
        assert _sample(router, "catcascade_model_serving", {"version": "v1", "role": "live"}) == 0
        assert _sample(router, "catcascade_model_serving", {"version": "v2", "role": "live"}) == 1
        assert _messages(caplog, "models now")[-1].getMessage() == (
            "models now: live v2 (the candidate promoted; before: live v1, candidate v2)")
        for _ in range(200):
            if _messages(caplog, "model version v1 released"):
                break
            await asyncio.sleep(0.01)
        (released,) = _messages(caplog, "model version v1 released")
        assert released.model_version == "v1" and built["v1"][0].closed and not router.draining
        assert [(name, state) for name, state, _, _ in router.states()] == [("v1", "AVAILABLE"), ("v2", "LIVE")]

        with pytest.raises(ValueError, match="^v2 is already live$"):
            await router.promote("v2")
        with pytest.raises(ValueError, match=r"^no candidate to promote \(name a version, or set a candidate first\)$"):
            await router.promote()
        await router.rollback()
        assert router.live.name == "v1" and router.routing.previous is None
        assert _messages(caplog, "models now")[-1].getMessage() == (
            "models now: live v1 (rolled back; before: live v2, candidate None)")
        with pytest.raises(ValueError, match=r"^nothing to roll back to \(no previous version recorded; Promote"):
            await router.rollback()
        assert read_routing(router.models.routing_path).live == "v1"  # each change is written
        await router.set_candidate("v2", "shadow", 0.5)
        await router.set_candidate(None)
        assert router.candidate is None and _messages(caplog, "models now")[-1].getMessage() == (
            "models now: live v1 (candidate set to none; before: live v1, candidate v2)")
        await router.aclose()
        assert router.live is None and all(c.closed for cs in built.values() for c in cs)

    asyncio.run(scenario())


def test_a_rejected_version_is_reported_and_the_serving_one_stays(tmp_path, monkeypatch, caplog):
    import logging

    import catcascade.serving.model_repository.loading as loading
    from catcascade.serving.model_repository.loading import VersionRejected

    monkeypatch.setattr(loading, "_png", lambda size: b"warm-up")
    router, built = _router_on(tmp_path)
    repo = router.repository
    _cnn_only_bundle(repo / "v3")
    (repo / "v3" / "cnn.onnx").write_bytes(b"tampered")
    caplog.set_level(logging.INFO)

    async def scenario():
        await router.reload()
        with pytest.raises(VersionRejected) as refused:
            await router.set_candidate("v3", "shadow", 0.5)
        assert refused.value.version == "v3" and refused.value.reason == "checksum"
        assert router.candidate is None and read_routing(router.models.routing_path).candidate is None
        (logged,) = _messages(caplog, "model version v3 rejected")
        assert logged.getMessage() == f"model version v3 rejected (checksum): {refused.value.message}; v1 keeps serving"
        assert (logged.levelno, logged.model_version, logged.reason) == (logging.ERROR, "v3", "checksum")
        assert _sample(router, "catcascade_model_loads_total",
                       {"version": "v3", "outcome": "rejected", "reason": "checksum"}) == 1
        states = {name: (state, err) for name, state, _, err in router.states()}
        assert states["v3"] == ("REJECTED", refused.value.message) and states["v1"] == ("LIVE", "")
        assert states["v2"] == ("AVAILABLE", "")

        router.models.routing_path.write_text("live: v3\n")  # a file change naming it: not strict
        outcome = await router.reload(cause="repository changed")
        assert router.live.name == "v1" and not outcome.changed and [e.reason for e in outcome.rejected] == ["checksum"]
        router.models.routing_path.write_text("live: [v1\n")
        outcome = await router.reload(cause="repository changed")
        assert router.live.name == "v1" and [e.reason for e in outcome.rejected] == ["routing"]
        assert router.rejected[router.models.routing_file][1].reason == "routing"
        assert ("routing.yaml", "REJECTED") in [(name, state) for name, state, _, _ in router.states()]
        assert _sample(router, "catcascade_model_loads_total",
                       {"version": "routing.yaml", "outcome": "rejected", "reason": "routing"}) == 1
        router.models.routing_path.write_text("live: v2\n")
        await router.reload(cause="repository changed")
        assert router.live.name == "v2" and router.models.routing_file not in router.rejected
        assert "v3" in router.rejected  # still the same tampered files
        (repo / "v3" / "cnn.onnx").write_bytes(b"onnx bytes")  # fixed on disk
        await router.set_candidate("v3", "shadow", 0.5)
        assert router.candidate.name == "v3" and "v3" not in router.rejected
        await router.aclose()

    asyncio.run(scenario())


def test_a_router_that_cannot_start_says_why(tmp_path, monkeypatch, caplog):
    import logging

    import catcascade.serving.model_repository.loading as loading
    from catcascade.serving.config import ServeConfig
    from catcascade.serving.metrics import ServiceMetrics
    from catcascade.serving.model_repository.loading import VersionRejected
    from catcascade.serving.model_repository.router import ModelRouter

    monkeypatch.setattr(loading, "_png", lambda size: b"warm-up")
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = ServeConfig(models={"repository": str(empty)})
    router = ModelRouter(cfg.models, cfg, ServiceMetrics(), factory=None)
    with pytest.raises(VersionRejected, match=r"no bundles in the model repository .*empty \(expected "
                                              r"DIR/<version>/manifest.json\)") as e:
        asyncio.run(router.reload())
    assert e.value.reason == "missing"

    caplog.set_level(logging.INFO)
    (tmp_path / "b").mkdir()
    broken, _ = _router_on(tmp_path / "b")
    broken.models.routing_path.write_text("live: [v1\n")
    with pytest.raises(VersionRejected, match="not valid YAML"):
        asyncio.run(broken.reload())
    (logged,) = _messages(caplog, "model version routing.yaml rejected (routing)")
    message = broken.rejected["routing.yaml"][1].message
    assert logged.getMessage() == f"model version routing.yaml rejected (routing): {message}"  # nothing serves yet
    broken.models.routing_path.write_text("live: v9\n")
    with pytest.raises(VersionRejected) as missing:
        asyncio.run(broken.reload())
    assert (missing.value.version, missing.value.reason) == ("v9", "missing")


def test_errors_are_counted_by_type_and_only_the_versions_own_count_against_it(tmp_path, monkeypatch):
    import catcascade.serving.model_repository.loading as loading
    from catcascade.cnn_stage.preprocessing import InvalidImageError
    from catcascade.serving.pipeline import DeadlineExceededError

    monkeypatch.setattr(loading, "_png", lambda size: b"warm-up")
    router, built = _router_on(tmp_path)

    async def scenario():
        await router.reload()
        v1 = built["v1"][0]
        for error in (RuntimeError("broken"), InvalidImageError("not an image", "format"),
                      DeadlineExceededError("late"), asyncio.CancelledError()):
            async def fail(request, error=error):
                raise error

            v1.classify = fail
            with pytest.raises(type(error)):
                await router.classify(request_for(b"x"))
            assert router.live.inflight == 0
        for outcome in ("RuntimeError", "InvalidImageError", "DeadlineExceededError", "CancelledError"):
            assert _sample(router, "catcascade_model_requests_total",
                           {"version": "v1", "route": "live", "outcome": outcome}) == 1, outcome
        assert router.window.live.summary()["errors"] == 1  # the bad image, the late and the gone client say nothing
        await router.aclose()

    asyncio.run(scenario())


def test_shadow_copies_run_without_tenant_deadline_or_rationale_and_are_compared(tmp_path, monkeypatch):
    import dataclasses

    import catcascade.serving.model_repository.loading as loading

    monkeypatch.setattr(loading, "_png", lambda size: b"warm-up")
    router, built = _router_on(tmp_path)

    async def scenario():
        await router.reload()
        await router.set_candidate("v2", "shadow", 1.0)
        candidate = built["v2"][0]
        seen = []
        answer = candidate.classify

        async def remember(request):
            seen.append(request)
            return await answer(request)

        candidate.classify = remember
        live = await router.classify(dataclasses.replace(request_for(b"img", deadline=10.0**9, explain=True,
                                                                     tenant="alice"), on_cnn_done=lambda: None))
        assert live.versions.route == "live" and live.versions.model_version == "v1"
        for _ in range(200):
            if router.window.compared:
                break
            await asyncio.sleep(0.01)
        (copy,) = seen
        assert (copy.deadline, copy.tenant, copy.explain, copy.on_cnn_done, copy.image) == (None, None, False, None, b"img")
        assert _sample(router, "catcascade_shadow_comparisons_total",
                       {"live": "v1", "candidate": "v2", "top1": "disagree"}) == 1
        assert _sample(router, "catcascade_candidate_top1_agreement", {"live": "v1", "candidate": "v2"}) == 0.0
        assert _sample(router, "catcascade_model_requests_total",
                       {"version": "v2", "route": "shadow", "outcome": "ok"}) == 1

        async def broken(request):
            raise RuntimeError("candidate broke")

        candidate.classify = broken
        await router.classify(request_for(b"img2"))
        for _ in range(200):
            if _sample(router, "catcascade_model_requests_total",
                       {"version": "v2", "route": "shadow", "outcome": "RuntimeError"}):
                break
            await asyncio.sleep(0.01)
        assert _sample(router, "catcascade_model_requests_total",
                       {"version": "v2", "route": "shadow", "outcome": "RuntimeError"}) == 1
        assert router._shadow_inflight == 0 and router.candidate.inflight == 0
        assert router.window.candidate.summary()["errors"] == 1
        await router.aclose()

    asyncio.run(scenario())


def test_a_replaced_version_still_busy_after_the_drain_timeout_is_released_with_a_warning(tmp_path, monkeypatch,
                                                                                          caplog):
    import logging

    import catcascade.serving.model_repository.loading as loading

    monkeypatch.setattr(loading, "_png", lambda size: b"warm-up")
    router, built = _router_on(tmp_path, drain_timeout_s=0.05)
    caplog.set_level(logging.INFO)

    async def scenario():
        await router.reload()
        v1 = built["v1"][0]
        v1.gate = asyncio.Event()
        stuck = asyncio.create_task(router.classify(request_for(b"slow")))
        while v1.started < 2:
            await asyncio.sleep(0)
        await router.promote("v2")
        assert [(name, state) for name, state, _, _ in router.states()] == [("v1", "DRAINING"), ("v2", "LIVE")]
        for _ in range(200):
            if v1.closed:
                break
            await asyncio.sleep(0.01)
        (warning,) = _messages(caplog, "model version v1 still had")
        assert warning.getMessage() == "model version v1 still had 1 requests after 0 s; releasing it"
        assert warning.levelno == logging.WARNING and v1.closed and not router.draining
        v1.gate.set()
        await stuck
        await router.aclose()

    asyncio.run(scenario())


def test_the_services_cnn_and_vlm_gauges_follow_the_live_version(tmp_path, monkeypatch):
    import catcascade.serving.model_repository.loading as loading

    monkeypatch.setattr(loading, "_png", lambda size: b"warm-up")
    router, built = _router_on(tmp_path)

    async def scenario():
        await router.reload()
        await router.set_candidate("v2", "canary", 0.5)

        def load(cascade, depth, running, escalations):
            cascade.cnn.depth, cascade.cnn.running, cascade.inflight_escalations = depth, running, escalations

        load(built["v1"][0], 3, 1, 2)
        load(built["v2"][0], 9, 9, 9)  # the candidate's are not the service's
        assert (_sample(router, "catcascade_cnn_queue_depth"), _sample(router, "catcascade_cnn_batches_running"),
                _sample(router, "catcascade_inflight_escalations")) == (3, 1, 2)
        await router.promote()
        load(built["v2"][-1], 7, 2, 5)  # promoted: rebuilt as a live version
        assert (_sample(router, "catcascade_cnn_queue_depth"), _sample(router, "catcascade_cnn_batches_running"),
                _sample(router, "catcascade_inflight_escalations")) == (7, 2, 5)
        await router.aclose()
        assert (_sample(router, "catcascade_cnn_queue_depth"), _sample(router, "catcascade_cnn_batches_running"),
                _sample(router, "catcascade_inflight_escalations")) == (0, 0, 0)

    asyncio.run(scenario())


def test_the_split_is_the_documented_keyed_hash_so_every_replica_and_release_agrees():
    """docs/operations.md: a keyed blake2b of the image bytes against the share. Front doors of
    two releases side by side (a rolling upgrade) must route an image alike, so the function is
    pinned: 64-bit digest keyed by the seed's 8 little-endian bytes, read little-endian."""
    import hashlib

    for i in range(300):
        image = b"image-%d" % i
        for seed in (0, 7, 2**40 + 3):
            key = seed.to_bytes(8, "little")
            point = int.from_bytes(hashlib.blake2b(image, digest_size=8, key=key).digest(), "little")
            assert in_share(image, 0.3, seed) == (point < 0.3 * 2**64), (i, seed)
        assert in_share(image, 0.3) == in_share(image, 0.3, 0)  # the default seed is 0


def test_promote_and_rollback_name_their_versions_whatever_is_newest(tmp_path, monkeypatch):
    import catcascade.serving.model_repository.loading as loading

    monkeypatch.setattr(loading, "_png", lambda size: b"warm-up")
    router, built = _router_on(tmp_path)
    _cnn_only_bundle(router.repository / "v3", labels=("a3", "b3"))
    router.models.routing_path.write_text("live: v3\n")

    async def scenario():
        await router.reload()
        await router.set_candidate("v1", "canary", 0.5)
        await router.promote()  # the candidate, not the newest version
        assert router.live.name == "v1" and router.candidate is None and router.routing.previous == "v3"
        await router.set_candidate("v2", "shadow", 0.5)
        await router.rollback()  # back to v3, and the candidate set since goes too
        assert router.live.name == "v3" and router.candidate is None and router.routing.previous is None
        await router.aclose()

    asyncio.run(scenario())


def test_a_fractional_split_routes_by_the_seeded_hash_and_shadows_only_the_picked_images(tmp_path, monkeypatch):
    import catcascade.serving.model_repository.loading as loading

    monkeypatch.setattr(loading, "_png", lambda size: b"warm-up")
    router, built = _router_on(tmp_path, shadow_max_concurrency=64)  # no copy dropped here
    images = [b"image-%d" % i for i in range(60)]

    async def scenario():
        await router.reload()
        router.models.routing_path.write_text("live: v1\ncandidate: v2\nmode: canary\nshare: 0.5\nseed: 3\n")
        await router.reload(cause="repository changed")
        assert (router.window.live.version, router.window.candidate.version) == ("v1", "v2")
        candidate = built["v2"][0]
        before = candidate.started
        for image in images:
            route = router.route(request_for(image))
            picked = in_share(image, 0.5, 3)
            version = router.candidate if picked else router.live
            assert route.engine is version.pipeline and route.versions.route == ("canary" if picked else "live")
            assert route.versions.model_version == version.name
            await route.run(request_for(image))
        picked = sum(in_share(image, 0.5, 3) for image in images)
        assert 0 < picked < len(images) and candidate.started - before == picked  # no shadow copies in canary mode

        window = router.window
        router.models.routing_path.write_text("live: v1\ncandidate: v2\nmode: shadow\nshare: 0.5\nseed: 3\n")
        await router.reload(cause="repository changed")
        assert router.window is not window and router.candidate.pipeline is candidate  # the split changed: a new window
        before = candidate.started
        for image in images:
            await router.classify(request_for(image))
        for _ in range(200):
            if candidate.started - before == picked and router._shadow_inflight == 0:
                break
            await asyncio.sleep(0.01)
        assert candidate.started - before == picked and router.window.compared == picked
        assert _sample(router, "catcascade_model_serving", {"version": "v2", "role": "canary"}) == 0
        assert _sample(router, "catcascade_model_serving", {"version": "v2", "role": "shadow"}) == 1
        await router.aclose()

    asyncio.run(scenario())


def test_dropped_shadow_copies_are_counted_per_candidate(tmp_path, monkeypatch):
    import catcascade.serving.model_repository.loading as loading

    monkeypatch.setattr(loading, "_png", lambda size: b"warm-up")
    router, built = _router_on(tmp_path, shadow_max_concurrency=2)

    async def scenario():
        await router.reload()
        await router.set_candidate("v2", "shadow", 1.0)
        built["v2"][0].gate = asyncio.Event()
        for i in range(5):
            await router.classify(request_for(b"x%d" % i))
        assert router._shadow_inflight == 2 and router.window.shadow_dropped == 3
        assert _sample(router, "catcascade_shadow_dropped_total", {"candidate": "v2"}) == 3
        built["v2"][0].gate.set()
        for _ in range(200):
            if router._shadow_inflight == 0:
                break
            await asyncio.sleep(0.01)
        await router.aclose()

    asyncio.run(scenario())
