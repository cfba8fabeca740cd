"""Shared fixtures: one demo bundle, one real vLLM server and one real gRPC server per session."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
from PIL import Image

from catcascade.serving.service_thread import ServiceThread as GrpcServerThread  # noqa: F401 - tests import it from here

REPO = Path(__file__).resolve().parents[1]
# $CATCASCADE_SAMPLE_DATA for checkouts that are not beside shared/ (git worktrees elsewhere)
SAMPLE_DATA = Path(os.environ.get("CATCASCADE_SAMPLE_DATA", REPO.parent / "shared" / "data" / "oxford-pet-cats-sample"))


def jpeg_bytes(size=(120, 90), color=(200, 120, 40), seed: int | None = None, fmt: str = "JPEG") -> bytes:
    if seed is None:
        img = Image.new("RGB", size, color)
    else:
        arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def missing(what: str) -> NoReturn:
    """Skips a test whose environment lacks ``what`` (shared data, a tool, a library), except
    under CI (the environment variable ``CI`` set), which is supposed to have everything: there
    a silent skip would hide a broken setup, so the test fails instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(what)


def import_or_missing(module: str, install_hint: str):
    """``pytest.importorskip`` that fails under CI (see ``missing``)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        missing(f"{module} is not installed ({install_hint})")


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A test that runs a command in-process (``main(["serve", ...])``) configures logging
    with a handler on that test's captured stderr; later tests would log into the closed stream
    ("--- Logging error ---"). Every test leaves the root logger as it found it."""
    import logging

    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        # plain stream handlers only: pytest's own (subclasses) come and go with each phase
        if handler not in before and type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def sample_data() -> Path:
    if not SAMPLE_DATA.is_dir():
        missing(f"real cat photos not found at {SAMPLE_DATA} (shared data folder absent)")
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory) -> Path:
    """The embedded default bundle, built once (about 20 s on 2 cores)."""
    from catcascade.training.demo_bundle import DemoBundleConfig, build_demo_bundle

    return build_demo_bundle(tmp_path_factory.mktemp("bundle") / "demo", DemoBundleConfig(), progress=False)


@pytest.fixture(scope="session")
def vllm_server(demo_bundle, tmp_path_factory):
    """The real vLLM OpenAI server serving the bundle's tiny VLM with its LoRA adapter."""
    from catcascade.ensemble.bundle import load_bundle
    from catcascade.vlm_stage.vllm_server import VllmServer, VllmServerConfig

    cfg = VllmServerConfig.for_bundle(load_bundle(demo_bundle))
    server = VllmServer(cfg, log_path=tmp_path_factory.mktemp("logs") / "vllm.log").start()
    _SESSION_VLLM.append(server)
    yield server
    _SESSION_VLLM.remove(server)
    server.stop()


_SESSION_VLLM: list = []


@pytest.fixture(scope="module")
def session_vllm_stopped():
    """For a module that needs a vLLM server of its own (another model family): the session's
    server, if it was started, is stopped meanwhile and started again on the same port after, so
    that no more than one vLLM server runs at a time (two of them starting and serving on two
    shared cores slowed a start-up past its timeout). Clients of the session's gRPC server see
    vLLM gone meanwhile; the ``client`` fixture waits for the breaker to close again."""
    running = [s for s in _SESSION_VLLM if s.process is not None]
    for server in running:
        server.stop()
    try:
        yield
    finally:
        for server in running:
            server.start()


@pytest.fixture(scope="session")
def grpc_server(demo_bundle, vllm_server):
    from catcascade.serving.config import ServeConfig

    server = GrpcServerThread(ServeConfig(bundle=demo_bundle, port=0, vlm={"urls": [vllm_server.url]})).start()
    yield server
    server.stop()


@pytest.fixture
def client(grpc_server):
    """A client of the session server, once its VLM breaker is closed (a test that stopped or
    froze vLLM may have opened it; its watchdog closes it again within seconds)."""
    import time

    from catcascade.serving.circuit_breaker import BreakerState
    from catcascade.client import CatcascadeClient

    breaker = grpc_server.servicer.front_door.router.live_engine().breaker
    deadline = time.monotonic() + 90
    while (breaker is not None and grpc_server.on_loop(lambda: breaker.state) != BreakerState.CLOSED
           and time.monotonic() < deadline):
        time.sleep(0.2)
    with CatcascadeClient(grpc_server.target, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """A tiny LLaVA (random weights) built from a config, for VLM unit tests (under a second)."""
    from catcascade.training.synthetic_data import DEMO_LABELS
    from catcascade.vlm_stage.tiny_model import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-vlm") / "base", DEMO_LABELS, seed=0)


class ServeProcess:
    """``catcascade serve`` in a process of its own, for tests whose figures the test process
    would distort (coverage tracing, pytest's heap, other in-process servers' threads). Yields
    itself with ``target``; ``metric(name, labels)`` reads its /metrics."""

    def __init__(self, config: dict, tmp_path: Path):
        import yaml

        from catcascade.vlm_stage.vllm_server import free_port

        self.metrics_port = free_port()
        self.config_path = tmp_path / "serve-process.yaml"
        self.config_path.write_text(yaml.safe_dump({**config, "port": 0, "metrics_port": self.metrics_port}))
        self.process = None
        self.target = ""
        self.lines: list[str] = []

    def __enter__(self) -> "ServeProcess":
        import re
        import subprocess
        import sys
        import threading

        self.process = subprocess.Popen([sys.executable, "-m", "catcascade", "serve", "--config", str(self.config_path)],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        cwd=Path(__file__).resolve().parents[1])
        for line in self.process.stdout:
            self.lines.append(line)
            if m := re.search(r"catcascade serving on (\S+):(\d+)", line):
                self.target = f"{m.group(1)}:{m.group(2)}"
                break
        else:
            self.process.wait(30)
            pytest.fail(f"serve exited with {self.process.returncode}:\n" + "".join(self.lines[-30:]))
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()
        return self

    def metric(self, name: str, labels: dict[str, str]) -> float:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except Exception:
            self.process.kill()
            self.process.wait(10)
