"""Model lifecycle against the real servers: a model repository served over real gRPC, with
the session's real vLLM taking LoRA adapters at run time. Versions are built from the demo
bundle: v2 renames the labels and brings a new adapter, v1t only changes the temperature."""
from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from catcascade.ensemble.bundle import load_bundle, sha256_file
from catcascade.serving.config import ServeConfig
from catcascade.client.model_admin import ModelAdminClient
from tests.conftest import GrpcServerThread, jpeg_bytes

pytestmark = pytest.mark.integration

CLIENT_TOKEN, ADMIN_TOKEN = "client-secret", "admin-secret"


def make_version(repo: Path, name: str, source: Path, *, label_suffix: str = "", temperature_scale: float = 1.0,
                 adapter_scale: float | None = None, extra_label: bool = False, onnx_bytes: bytes | None = None,
                 flip_onnx_byte: bool = False, adapter_garbage: bool = False) -> Path:
    """A copy of ``source`` as ``repo/name`` with the asked-for changes, re-hashed through the
    manifest code; written under a hidden name and renamed, as docs/operations.md says."""
    tmp = repo / f".{name}.tmp"
    tmp.mkdir()
    shutil.copy(source / "manifest.json", tmp)
    shutil.copy(source / "cnn.onnx", tmp)
    (tmp / "vlm").mkdir()
    (tmp / "vlm" / "base").symlink_to((source / "vlm" / "base").resolve())
    shutil.copytree(source / "vlm" / "adapter", tmp / "vlm" / "adapter")
    bundle = load_bundle(tmp)
    m = bundle.manifest
    m.labels = [label + label_suffix for label in m.labels] + (["Chartreux"] if extra_label else [])
    m.cnn.temperature *= temperature_scale
    if onnx_bytes is not None:
        bundle.cnn_path.write_bytes(onnx_bytes)
    m.cnn.sha256 = sha256_file(bundle.cnn_path)
    if flip_onnx_byte:  # after hashing: the file no longer matches its manifest
        data = bytearray(bundle.cnn_path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bundle.cnn_path.write_bytes(bytes(data))
    weights = tmp / "vlm" / "adapter" / "adapter_model.safetensors"
    if adapter_scale is not None:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(weights)
        save_file({k: (v * adapter_scale if "lora_B" in k else v) for k, v in tensors.items()}, weights)
    if adapter_garbage:
        weights.write_bytes(b"not a safetensors file")
    bundle.save()
    tmp.rename(repo / name)
    return repo / name


@pytest.fixture(scope="module")
def repo(demo_bundle, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("models")
    make_version(repo, "v1", demo_bundle)
    make_version(repo, "v2", demo_bundle, label_suffix="_v2", adapter_scale=3.0)
    make_version(repo, "v1t", demo_bundle, temperature_scale=2.0)
    (repo / "routing.yaml").write_text("live: v1\n")
    return repo


@pytest.fixture(scope="module")
def served(repo, vllm_server):
    cfg = ServeConfig(port=0, vlm={"urls": [vllm_server.url]}, auth={"bearer_tokens": [CLIENT_TOKEN]},
                      models={"repository": str(repo), "admin_port": 0, "admin_tokens": [ADMIN_TOKEN],
                              "poll_interval_s": 0.2, "drain_timeout_s": 20})
    server = GrpcServerThread(cfg).start()
    yield server
    server.stop()


@pytest.fixture
def admin(served):
    with ModelAdminClient(f"127.0.0.1:{served.servicer.front_door.router.admin_port}", ADMIN_TOKEN) as a:
        # every test starts from v1 live and no candidate
        routing = a.list().routing
        if routing.candidate:
            a.set_candidate(None)
        if routing.live != "v1":
            a.promote("v1")
        # versions retired by that are closed in the background (their adapters unloaded from
        # vLLM): a test that lists vLLM's adapters must not see one of them still there
        router = served.servicer.front_door.router
        _wait_for(lambda: not served.on_loop(lambda: len(router.draining)), "retired versions to be released")
        yield a


@pytest.fixture
def client(served):
    from catcascade.client import CatcascadeClient

    with CatcascadeClient(served.target, timeout_s=60, token=CLIENT_TOKEN) as c:
        yield c


def _vllm_models(url: str) -> dict[str, str]:
    return {m["id"]: m.get("root") for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}


def _wait_for(predicate, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _sample(served, name: str, labels: dict) -> float:
    return served.servicer.metrics.registry.get_sample_value(name, labels) or 0.0


def test_swap_under_load_loses_no_request_and_switches_at_one_point(served, admin, vllm_server):
    images = [jpeg_bytes(size=(48, 48), seed=i) for i in range(64)]
    v1_labels = set(served.servicer.front_door.router.labels)
    records, errors, lock, stop = [], [], threading.Lock(), threading.Event()
    from catcascade.client import CatcascadeClient

    def worker(w: int):
        with CatcascadeClient(served.target, timeout_s=60, token=CLIENT_TOKEN) as c:
            i = 0
            while not stop.is_set():
                mode = "always" if i % 4 == 0 else "auto"
                sent = time.monotonic()
                try:
                    r = c.classify(images[(w * 17 + i) % len(images)], mode=mode)
                except grpc.RpcError as e:
                    with lock:
                        errors.append(f"{e.code().name}: {e.details()}")
                else:
                    with lock:
                        records.append((sent, r))
                i += 1

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(worker, w) for w in range(4)]
        _wait_for(lambda: len(records) >= 40, "40 answers from v1")
        swap_started = time.monotonic()
        admin.promote("v2")  # loads, verifies and warms v2 (and its new adapter), then swaps
        swap_done = time.monotonic()
        n = len(records)
        _wait_for(lambda: len(records) >= n + 40, "40 answers after the swap")
        stop.set()
        for f in futures:
            f.result()

    assert not errors, errors[:5]
    versions = {r.versions.model_version for _, r in records}
    assert versions == {"v1", "v2"}
    for sent, r in records:
        if r.versions.model_version == "v1":
            assert {s.label for s in r.labels} <= v1_labels
            assert sent < swap_done, "an answer from the old version after the swap"
        else:
            assert all(s.label.endswith("_v2") for s in r.labels)
            assert sent > swap_started, "the new version answered before the swap began"
        assert r.versions.route == "live"
    assert all(r.versions.model_version == "v2" for sent, r in records if sent > swap_done)
    # escalations went to each version's own adapter
    adapters = {r.versions.model_version: r.vlm.model for _, r in records if r.escalated}
    assert set(adapters) == {"v1", "v2"} and adapters["v1"] != adapters["v2"]
    assert all(name.startswith("cats-") for name in adapters.values())
    # the old version was released once drained, and its adapter unloaded from vLLM
    _wait_for(lambda: adapters["v1"] not in _vllm_models(vllm_server.url), "v1's adapter to be unloaded")
    assert vllm_server.process.poll() is None


def test_a_new_lora_adapter_is_served_by_name_without_restarting_vllm(served, admin, client, repo, vllm_server):
    pid = vllm_server.process.pid
    before = _vllm_models(vllm_server.url)
    admin.set_candidate("v2", "canary", 1.0)  # every request to v2
    after = _vllm_models(vllm_server.url)
    new = set(after) - set(before)
    assert len(new) == 1
    name = new.pop()
    assert name.startswith("cats-") and Path(after[name]) == (repo / "v2" / "vlm" / "adapter").resolve()
    assert {v.version: v.adapter for v in admin.list().versions}["v2"] == name
    r = client.classify(jpeg_bytes(seed=5), mode="always")
    assert r.versions.model_version == "v2" and r.versions.route == "canary"
    assert r.escalated and r.vlm.model == name and r.versions.vlm.endswith("+" + name)
    assert vllm_server.process.pid == pid and vllm_server.process.poll() is None
    admin.set_candidate(None)  # no version needs it any more
    _wait_for(lambda: name not in _vllm_models(vllm_server.url), "the adapter to be unloaded")


CORRUPT = {
    "checksum": {"flip_onnx_byte": True},
    "onnx": {"onnx_bytes": b"this is not an ONNX model"},
    "labels": {"extra_label": True},
    "adapter": {"adapter_garbage": True},
}


@pytest.mark.parametrize("reason", list(CORRUPT))
def test_a_corrupt_candidate_is_refused_and_the_live_version_keeps_answering(served, admin, client, repo, demo_bundle,
                                                                              reason):
    name = f"bad-{reason}"
    make_version(repo, name, demo_bundle, **CORRUPT[reason])
    live_before = client.classify(jpeg_bytes(seed=1), mode="never")
    with pytest.raises(grpc.RpcError) as err:
        admin.set_candidate(name, "canary", 0.5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"version '{name}' rejected ({reason})" in err.value.details()
    assert _sample(served, "catcascade_model_loads_total", {"version": name, "outcome": "rejected",
                                                            "reason": reason}) == 1
    states = {v.version: v for v in admin.list().versions}
    assert states[name].state == "REJECTED" and states[name].error
    assert states["v1"].state == "LIVE" and admin.list().routing.candidate == ""
    after = client.classify(jpeg_bytes(seed=1), mode="never")
    assert after.versions.model_version == "v1"
    assert [s.probability for s in after.labels] == [s.probability for s in live_before.labels]


def test_a_corrupt_version_named_in_the_routing_file_is_refused_on_the_file_change(served, admin, client, repo,
                                                                                   demo_bundle):
    make_version(repo, "bad-file", demo_bundle, flip_onnx_byte=True)
    (repo / "routing.yaml").write_text("live: bad-file\n")  # what an operator's edit would do
    try:
        _wait_for(lambda: _sample(served, "catcascade_model_loads_total",
                                  {"version": "bad-file", "outcome": "rejected", "reason": "checksum"}),
                  "the watcher to reject bad-file")
        r = client.classify(jpeg_bytes(seed=2), mode="never")
        assert r.versions.model_version == "v1"
        assert client.model_info().versions.model_version == "v1"
    finally:
        (repo / "routing.yaml").write_text("live: v1\n")


def test_canary_takes_its_share_of_a_thousand_requests(served, admin, client):
    admin.set_candidate("v2", "canary", 0.2)
    info = client.model_info()
    assert info.versions.model_version == "v1" and info.candidate.model_version == "v2"
    assert info.candidate_share == pytest.approx(0.2)
    images = [jpeg_bytes(size=(16, 16), seed=10_000 + i) for i in range(1000)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda img: client.classify(img, mode="never"), images))
    canary = [r for r in responses if r.versions.route == "canary"]
    assert all(r.versions.model_version == "v2" and r.labels[0].label.endswith("_v2") for r in canary)
    assert all(r.versions.model_version == "v1" for r in responses if r.versions.route == "live")
    assert 160 <= len(canary) <= 240, len(canary)  # 20% of 1,000 within 4 points
    assert _sample(served, "catcascade_model_requests_total",
                   {"version": "v2", "route": "canary", "outcome": "ok"}) >= len(canary)
    report = admin.report()
    assert report.candidate.requests == len(canary) and report.live.requests == 1000 - len(canary)
    assert report.compared == 0  # a canary request runs on one version only


def test_shadow_answers_never_reach_clients_and_agreement_is_reported(served, admin, client):
    images = [jpeg_bytes(size=(40, 40), seed=500 + i) for i in range(24)]
    baseline = [client.classify(img, mode="auto") for img in images]
    admin.set_candidate("v1t", "shadow", 1.0)
    router = served.servicer.front_door.router
    shadowed = []
    for img in images:
        # At most shadow_max_concurrency copies run; beyond, copies are dropped (unit-tested in
        # test_model_repository.py). The candidate escalates more than live, so on a busy
        # machine its copies fall behind: wait for a free slot, so every copy is compared.
        _wait_for(lambda: router._shadow_inflight < router.models.shadow_max_concurrency, "a free shadow slot")
        shadowed.append(client.classify(img, mode="auto"))
    for before, after in zip(baseline, shadowed):
        assert after.versions.model_version == "v1" and after.versions.route == "live"
        assert [s.label for s in after.cnn_top_k] == [s.label for s in before.cnn_top_k]
        assert [s.probability for s in after.cnn_top_k] == pytest.approx([s.probability for s in before.cnn_top_k],
                                                                         abs=1e-5)
    report = _wait_for(lambda: (rep := admin.report()).compared == len(images) and rep, "24 shadow comparisons")
    assert report.routing.candidate == "v1t" and report.candidate.version == "v1t"
    assert report.live.requests == len(images) and report.candidate.requests == len(images)
    # a higher temperature never moves the argmax, and only lowers confidence
    assert report.top1_agreement == pytest.approx(1.0)
    live_escalated = np.mean([r.escalated for r in shadowed])
    assert report.live.escalation_rate == pytest.approx(live_escalated)
    assert report.candidate.escalation_rate >= report.live.escalation_rate
    assert report.candidate.latency_p50_ms > 0 and report.shadow_dropped == 0
    assert _sample(served, "catcascade_shadow_comparisons_total",
                   {"live": "v1", "candidate": "v1t", "top1": "agree"}) >= len(images)


def test_admin_service_takes_admin_tokens_only(served, admin, client):
    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc

    target = f"127.0.0.1:{served.servicer.front_door.router.admin_port}"
    for token in (CLIENT_TOKEN, None):
        with ModelAdminClient(target, token) as wrong:
            with pytest.raises(grpc.RpcError) as err:
                wrong.list()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(served.target) as channel:  # and the admin token is no client token
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.CatClassifierStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10,
                                                            metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        admin.promote("no-such-version")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no bundle at" in err.value.details()
    assert admin.promote("v1t").routing.previous == "v1"
    assert client.classify(jpeg_bytes(seed=3), mode="never").versions.model_version == "v1t"
    rolled = admin.rollback()
    assert rolled.routing.live == "v1" and not rolled.routing.previous
    assert client.classify(jpeg_bytes(seed=3), mode="never").versions.model_version == "v1"
    with pytest.raises(grpc.RpcError) as err:
        admin.rollback()  # one step back only
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "nothing to roll back" in err.value.details()


def test_serve_models_command_reloads_on_sighup_and_the_models_command_promotes(demo_bundle, tmp_path, capsys,
                                                                               monkeypatch):
    """The real `catcascade serve --models` process (CNN only): a routing-file edit taken on
    SIGHUP (polling off), then `catcascade models` over the admin service."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from catcascade.cli import main
    from catcascade.client import CatcascadeClient
    from catcascade.vlm_stage.vllm_server import free_port

    repo = tmp_path / "models"
    repo.mkdir()
    make_version(repo, "v1", demo_bundle)
    make_version(repo, "v1t", demo_bundle, temperature_scale=2.0)
    (repo / "routing.yaml").write_text("live: v1\n")
    config = tmp_path / "service.yaml"
    config.write_text("models: {poll_interval_s: 0}\n")
    admin_port = free_port()
    monkeypatch.setenv("CATCASCADE_ADMIN_TOKENS", ADMIN_TOKEN)  # the server's
    monkeypatch.setenv("CATCASCADE_ADMIN_TOKEN", ADMIN_TOKEN)  # the `catcascade models` client's
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "catcascade", "serve", "--config", str(config), "--models", str(repo),
                             "--port", "0", "--admin-port", str(admin_port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"catcascade serving on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
                break
        else:
            pytest.fail("serve exited early:\n" + "".join(lines[-30:]))
        threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True).start()
        with CatcascadeClient(f"127.0.0.1:{port}", timeout_s=30) as c:
            assert c.classify(jpeg_bytes(seed=1), mode="never").versions.model_version == "v1"
            (repo / "routing.yaml").write_text("live: v1t\n")
            proc.send_signal(signal.SIGHUP)
            _wait_for(lambda: c.model_info().versions.model_version == "v1t", "the SIGHUP reload")
            assert c.classify(jpeg_bytes(seed=1), mode="never").versions.model_version == "v1t"
            capsys.readouterr()
            assert main(["models", "--admin", f"127.0.0.1:{admin_port}", "promote", "v1"]) == 0
            assert "live v1, previous v1t" in capsys.readouterr().out
            assert main(["models", "--admin", f"127.0.0.1:{admin_port}", "list"]) == 0
            listing = capsys.readouterr().out
            assert re.search(r"v1\s+LIVE", listing) and re.search(r"v1t\s+(DRAINING|AVAILABLE)", listing)
            assert main(["models", "--admin", f"127.0.0.1:{admin_port}", "candidate", "nope"]) == 2
            assert "FAILED_PRECONDITION" in capsys.readouterr().err
            assert c.classify(jpeg_bytes(seed=1), mode="never").versions.model_version == "v1"
            assert "live: v1\n" in (repo / "routing.yaml").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines[-30:])
