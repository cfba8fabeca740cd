"""The Ray engine on a real two-node Ray cluster on loopback (ray.cluster_utils.Cluster), no mock
of Ray: answers equal the local engine's (NEVER, and ALWAYS with the real vLLM), batches form,
the CNN deployment autoscales 1 -> 2 -> 1, a replica killed under load, a second front door
attaching, an unreachable cluster at start-up; and, on a CNN-only application of its own, the
configured decode limits and a 5 MB image on replicas that decode, and priority order. One cluster for the whole module; it is shut
down through Ray's own shutdown and no Ray process may outlive it."""
from __future__ import annotations

import contextlib
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback (serving.engines.ray_engine)

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from catcascade.serving.config import ServeConfig
from catcascade.serving.service_thread import ServiceThread

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
APP = "cascade-test"
# Aggressive autoscaling so growth and shrinkage take seconds, not minutes.
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
               "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 2}


def _ray_processes() -> list[str]:
    import psutil

    me = psutil.Process()
    out = []
    for p in me.children(recursive=True):
        try:
            if "ray" in " ".join(p.cmdline()):
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    return out


@contextlib.contextmanager
def joined_cluster(**cluster_args):
    """A Ray cluster on loopback (``local_cluster``) that this process joins as a driver; on exit,
    Serve and Ray are shut down and no Ray process may be left behind."""
    pytest.importorskip("ray")
    import ray
    from ray import serve

    from catcascade.serving.engines.ray_local_cluster import local_cluster

    with local_cluster(**cluster_args) as cluster:
        ray.init(address=cluster.address, namespace="catcascade", log_to_driver=False)
        try:
            yield cluster
        finally:
            serve.shutdown()
            ray.shutdown()
    deadline = time.monotonic() + 30
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(), f"Ray processes left behind: {_ray_processes()}"


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes on loopback (2 logical CPUs each); this process joins as a driver."""
    with joined_cluster(nodes=2, cpus_per_node=2) as cluster:
        yield cluster.address


def _config(bundle, address, app=APP, vlm_url=None, limits=None, **ray_overrides) -> ServeConfig:
    ray_cfg = {"address": address, "app_name": app, "cnn": {"num_cpus": 0.5, "autoscaling": AUTOSCALING},
               "vlm": {"num_cpus": 0.25}}
    ray_cfg.update(ray_overrides)
    return ServeConfig(bundle=bundle, port=0, engine="ray", ray=ray_cfg, limits=limits or {},
                       vlm={"urls": [vlm_url]} if vlm_url else {})


@pytest.fixture(scope="module")
def ray_front_door(ray_cluster, demo_bundle, vllm_server):
    """`catcascade serve --engine ray`'s service (in a thread): the demo bundle, CNN and VLM
    deployments on the cluster."""
    server = ServiceThread(_config(demo_bundle, ray_cluster, vlm_url=vllm_server.url)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local_front_door(demo_bundle, vllm_server):
    server = ServiceThread(ServeConfig(bundle=demo_bundle, port=0, vlm={"urls": [vllm_server.url]})).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Real cat photos when the shared sample is there, else JPEGs of random pixels."""
    from tests.conftest import SAMPLE_DATA, jpeg_bytes

    if SAMPLE_DATA.is_dir():
        return [p.read_bytes() for p in sorted(SAMPLE_DATA.glob("*/*.jpg"))[::25][:8]]
    return [jpeg_bytes(size=(160 + 16 * i, 120), seed=i) for i in range(8)]


def _client(server, timeout_s=60):
    from catcascade.client import CatcascadeClient

    return CatcascadeClient(server.target, timeout_s=timeout_s)


def _cnn_replicas(app=APP) -> dict:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {str(k).rsplit(".", 1)[-1]: v for k, v in status.deployments["CnnStage"].replica_states.items()}


def _wait_for(predicate, timeout_s: float, what: str, period_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.mark.parametrize("mode", ["never", "always"])
def test_answers_equal_the_local_engine(ray_front_door, local_front_door, photos, mode):
    with _client(ray_front_door) as ray_client, _client(local_front_door) as local_client:
        for image in photos[:4]:
            r, loc = ray_client.classify(image, mode=mode), local_client.classify(image, mode=mode)
            assert [s.label for s in r.labels] == [s.label for s in loc.labels]
            for a, b in zip(r.labels, loc.labels):
                assert a.probability == pytest.approx(b.probability, abs=1e-5)
            for a, b in zip(r.cnn_top_k, loc.cnn_top_k):
                assert a.probability == pytest.approx(b.probability, abs=1e-5)
            assert r.escalated == loc.escalated == (mode == "always")
            if mode == "always":
                assert [c.label for c in r.vlm.candidates] == [c.label for c in loc.vlm.candidates]
                for a, b in zip(r.vlm.candidates, loc.vlm.candidates):
                    assert a.probability == pytest.approx(b.probability, abs=1e-5)
            assert r.timings.cnn_ms > 0 and r.timings.decode_ms > 0


def test_bad_image_is_invalid_argument(ray_front_door):
    with _client(ray_front_door) as c, pytest.raises(grpc.RpcError) as e:
        c.classify(b"not an image at all", mode="never")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_batches_form_under_concurrent_load(ray_front_door, photos):
    with _client(ray_front_door) as c, ThreadPoolExecutor(16) as pool:
        sizes = list(pool.map(lambda i: c.classify(photos[i % len(photos)], mode="never").timings.cnn_batch_size,
                              range(96)))
    assert all(s >= 1 for s in sizes)
    assert max(sizes) > 1, f"no batch larger than 1 formed: {sorted(set(sizes))}"


def test_second_front_door_attaches(ray_front_door, ray_cluster, demo_bundle, vllm_server, photos):
    """A second front door (this one sending JPEG bytes for the replicas to decode) attaches to
    the running application instead of redeploying it, and answers alike."""
    from ray import serve

    deployed_at = serve.status().applications[APP].last_deployed_time_s
    with ServiceThread(_config(demo_bundle, ray_cluster, vlm_url=vllm_server.url, decode="replica")) as second:
        with _client(second) as c2, _client(ray_front_door) as c1:
            for image in photos[:3]:
                a, b = c1.classify(image, mode="never"), c2.classify(image, mode="never")
                assert [s.label for s in a.labels] == [s.label for s in b.labels]
                for x, y in zip(a.labels, b.labels):
                    assert x.probability == pytest.approx(y.probability, abs=1e-5)
                assert b.timings.decode_ms > 0 and b.timings.cnn_ms > 0  # decoded and run on a replica
    assert serve.status().applications[APP].last_deployed_time_s == deployed_at  # attached, not redeployed
    assert serve.status().applications[APP].status == "RUNNING"


def test_cnn_deployment_scales_out_and_back(ray_front_door, photos):
    """Sustained load grows CnnStage from 1 to 2 replicas; idle, it shrinks back to 1."""
    _wait_for(lambda: _cnn_replicas().get("RUNNING") == 1 and len(_cnn_replicas()) == 1, 120, "one CNN replica")
    stop = threading.Event()
    done = []

    def load():
        with _client(ray_front_door) as c:
            while not stop.is_set():
                c.classify(photos[len(done) % len(photos)], mode="never")
                done.append(1)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: _cnn_replicas().get("RUNNING", 0) >= 2, 150, "a second CNN replica under load")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert len(done) > 0
    _wait_for(lambda: _cnn_replicas() == {"RUNNING": 1}, 150, "the CNN deployment to shrink back to 1 replica")


def test_replica_killed_under_load(ray_cluster, demo_bundle, photos):
    """A CNN replica killed during a bounded load run: every request is answered or fails with
    UNAVAILABLE before its deadline, and the deployment heals itself."""
    import ray

    app, deadline_s = "cascade-kill-test", 20.0
    cfg = _config(demo_bundle, ray_cluster, app=app, request_retries=2, decode="replica",
                  cnn={"num_cpus": 0.5, "num_replicas": 2})
    with ServiceThread(cfg) as server:
        _wait_for(lambda: _cnn_replicas(app).get("RUNNING") == 2, 120, "two CNN replicas")
        outcomes, elapsed = [], []

        def one(i):
            t0 = time.monotonic()
            try:
                c.classify(photos[i % len(photos)], mode="never")
                outcomes.append("OK")
            except grpc.RpcError as e:
                outcomes.append(e.code().name)
            elapsed.append(time.monotonic() - t0)

        with _client(server, timeout_s=deadline_s) as c, ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(40)]
            _wait_for(lambda: len(outcomes) >= 8, 60, "load to start")
            victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                          if f"{app}#CnnStage" in a["name"])
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            futures += [pool.submit(one, i) for i in range(40, 120)]
            for f in futures:
                f.result()
        counts = {code: outcomes.count(code) for code in set(outcomes)}
        print(f"replica killed under load: {counts}, slowest {max(elapsed):.2f} s")  # shown with -s / -rP
        assert len(outcomes) == 120
        assert set(counts) <= {"OK", "UNAVAILABLE"}, counts
        assert counts.get("OK", 0) >= 60, counts  # the surviving replica kept answering
        assert max(elapsed) < deadline_s + 1.0, f"a request outlived its deadline: {max(elapsed):.1f} s"
        _wait_for(lambda: _cnn_replicas(app) == {"RUNNING": 2}, 150, "the killed replica to be replaced")
        with _client(server) as c:
            assert all(len(c.classify(p, mode="never").labels) == 3 for p in photos)
    from ray import serve

    serve.delete(app)


def test_unreachable_ray_address_fails_fast(demo_bundle, tmp_path):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "catcascade", "serve", "--bundle", str(demo_bundle), "--port", "0",
                           "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert took < 60, f"took {took:.0f} s"


CNN_APP = "cascade-cnn-only"
# Decode limits away from their defaults (which take a 3:1 image and 60 scans), and room for a
# burst of batch requests waiting to be decoded.
LIMITS = {"max_aspect_ratio": 2.5, "max_jpeg_scans": 50, "max_decode_queue": 256}


@pytest.fixture(scope="module")
def replica_decoding_front_door(ray_cluster, demo_bundle):
    """A CNN-only front door whose replicas decode (``ray.decode: replica``) under LIMITS, on an
    application of its own with one replica (so ordering tests see one queue)."""
    from ray import serve

    cfg = _config(demo_bundle, ray_cluster, app=CNN_APP, limits=LIMITS, decode="replica",
                  cnn={"num_cpus": 0.5, "num_replicas": 1})
    with ServiceThread(cfg) as server:
        yield server
    serve.delete(CNN_APP)


@pytest.fixture(scope="module")
def front_decoding_front_door(replica_decoding_front_door, ray_cluster, demo_bundle):
    """A second front door on the same replicas that decodes itself and keeps 2 CNN calls in flight."""
    cfg = _config(demo_bundle, ray_cluster, app=CNN_APP, limits=LIMITS, decode="front_door", max_calls_in_flight=2,
                  cnn={"num_cpus": 0.5, "num_replicas": 1})
    with ServiceThread(cfg) as server:
        yield server


def test_replicas_apply_the_configured_decode_limits(replica_decoding_front_door, photos):
    from benchmarks.hostile_images import jpeg_many_scans
    from tests.conftest import jpeg_bytes

    with _client(replica_decoding_front_door) as c:
        for data, reason in ((jpeg_bytes(size=(300, 100)), "aspect ratio of 3:1"),
                             (jpeg_many_scans(64, 60), "more than 50 scans")):
            with pytest.raises(grpc.RpcError) as e:
                c.classify(data, mode="never")
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in e.value.details()
        assert len(c.classify(photos[0], mode="never").labels) == 3


def test_a_5mb_image_is_classified_on_the_replicas(replica_decoding_front_door, front_decoding_front_door):
    """Over Serve's default 4 MiB gRPC message: answered, and as the front door's own decode answers it."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(5).integers(0, 256, (1300, 1400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    data = buf.getvalue()
    assert 5_000_000 < len(data) < 20 << 20
    with _client(replica_decoding_front_door) as on_replica, _client(front_decoding_front_door) as here:
        a = on_replica.classify(data, mode="never")
        b = here.classify(data, mode="never")
    assert a.timings.decode_ms > 0 and a.timings.cnn_ms > 0
    assert [s.label for s in a.labels] == [s.label for s in b.labels]
    for x, y in zip(a.labels, b.labels):
        assert x.probability == pytest.approx(y.probability, abs=1e-5)


def test_interactive_requests_overtake_a_batch_burst(front_decoding_front_door, photos):
    """Interactive requests sent while a burst of batch ones waits for the replicas are answered
    before most of those (the front door orders its 2 calls in flight; Ray's queues are FIFO)."""
    import asyncio

    from catcascade.client.async_client import AsyncCatcascadeClient

    server = front_decoding_front_door
    registry = server.servicer.metrics.registry

    def depth() -> float:
        return server.on_loop(lambda: registry.get_sample_value("catcascade_cnn_queue_depth")) or 0.0

    async def run():
        done: list[str] = []
        async with AsyncCatcascadeClient(server.target, timeout_s=120) as c:
            async def one(kind: str, i: int):
                await c.classify(photos[i % len(photos)], mode="never", priority=kind)
                done.append(kind)

            batch = [asyncio.create_task(one("batch", i)) for i in range(64)]
            deadline = time.monotonic() + 60
            while await asyncio.to_thread(depth) < 24:
                assert time.monotonic() < deadline, f"the burst never queued up (depth {depth()})"
                await asyncio.sleep(0.005)
            waiting = 64 - len(done)
            interactive = [asyncio.create_task(one("interactive", i)) for i in range(4)]
            await asyncio.gather(*interactive)
            overtaken_by = done.count("batch") - (64 - waiting)
            await asyncio.gather(*batch)
        return waiting, overtaken_by

    waiting, overtaken_by = asyncio.run(run())
    print(f"{waiting} batch requests outstanding; {overtaken_by} of them answered before the last interactive one")
    assert waiting >= 24
    assert overtaken_by < waiting / 2, (waiting, overtaken_by)
