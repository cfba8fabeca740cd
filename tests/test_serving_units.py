"""Unit tests of serving parts: circuit breaker, config validation, auth interceptor shapes."""
from __future__ import annotations

import pytest

from catcascade.serving.circuit_breaker import BreakerConfig, BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_breaker_opens_after_threshold_and_probes_after_cooldown():
    clock, changes = FakeClock(), []
    b = CircuitBreaker(BreakerConfig(failure_threshold=2, cooldown_s=5), clock, on_change=changes.append)
    assert b.allow()
    b.record_failure()
    assert b.state == BreakerState.CLOSED and b.allow()
    b.record_failure()
    assert b.state == BreakerState.OPEN and not b.allow()
    clock.t = 5.0
    assert b.state == BreakerState.HALF_OPEN
    assert b.allow() and not b.allow()  # one probe at a time
    b.record_failure()  # the probe failed: open again for a full cooldown
    assert b.state == BreakerState.OPEN
    clock.t = 10.0
    assert b.allow()
    b.record_success()
    assert b.state == BreakerState.CLOSED and b.allow()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.OPEN, BreakerState.HALF_OPEN,
                       BreakerState.CLOSED]


def test_breaker_probe_released_without_verdict():
    clock = FakeClock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=1, cooldown_s=1), clock)
    b.record_failure()
    clock.t = 1.0
    assert b.allow()
    b.record_no_verdict()
    assert b.allow()


def test_serve_config_validation_messages(tmp_path):
    from pydantic import ValidationError

    from catcascade.serving.config import ServeConfig

    with pytest.raises(ValidationError, match="http"):
        ServeConfig(bundle=tmp_path, vlm={"urls": ["localhost:8000"]})
    with pytest.raises(ValidationError, match="file not found"):
        ServeConfig(bundle=tmp_path, tls={"cert_file": tmp_path / "nope.pem", "key_file": tmp_path / "nope.key"})
    with pytest.raises(ValidationError, match="extra"):
        ServeConfig(bundle=tmp_path, prot=1)
    path = tmp_path / "service.yaml"
    path.write_text("bundle: /b\nport: 0\nlimits: {max_concurrent_escalations: 2}\nauth: {bearer_tokens: [s3cret]}\n")
    cfg = ServeConfig.from_yaml(path)
    assert cfg.limits.max_concurrent_escalations == 2 and cfg.auth.tokens() == ["s3cret"]


def test_tokens_from_environment(monkeypatch, tmp_path):
    from catcascade.serving.config import ServeConfig

    monkeypatch.setenv("CATS_TOKENS", "a,b")
    assert ServeConfig(bundle=tmp_path, auth={"bearer_tokens_env": "CATS_TOKENS"}).auth.tokens() == ["a", "b"]


def test_decode_fuzz_with_atheris(tmp_path):
    """Coverage-guided fuzzing of the decode path for a bounded number of inputs: anything
    but InvalidImageError escaping decode_image is a crash atheris reports."""
    import subprocess
    import sys

    from tests.conftest import import_or_missing

    import_or_missing("atheris", "requirements/dev.txt")
    script = tmp_path / "fuzz_decode.py"
    script.write_text(
        "import sys, atheris\n"
        "with atheris.instrument_imports():\n"
        "    from cnn_stage.preprocessing import decode_image, InvalidImageError, DecodeLimits\n"
        "LIMITS = DecodeLimits(max_pixels=4_000_000, max_side=4000)\n"
        "def one(data):\n"
        "    try:\n"
        "        decode_image(data, LIMITS, draft_size=64)\n"
        "    except InvalidImageError:\n"
        "        pass\n"
        "atheris.Setup(sys.argv, one)\n"
        "atheris.Fuzz()\n")
    seeds = tmp_path / "corpus"
    seeds.mkdir()
    from tests.conftest import jpeg_bytes

    for i, fmt in enumerate(("JPEG", "PNG", "WEBP")):
        (seeds / f"seed{i}").write_bytes(jpeg_bytes((24, 16), seed=i, fmt=fmt))
    proc = subprocess.run([sys.executable, str(script), "-runs=3000", "-max_len=4096", "-rss_limit_mb=2048",
                           str(seeds)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 3000 runs" in proc.stderr


def test_vlm_warm_up_is_retried_until_the_vlm_answers():
    """A VLM that is still loading when the server starts gets warmed up once it is up."""
    import asyncio

    from catcascade.serving.engine_builder import keep_warming_up

    class LoadingVlm:  # stands in for the VLM the unit calls
        calls = 0

        async def warm_up(self, candidates):
            self.calls += 1
            if self.calls < 3:
                raise ConnectionError("not up yet")

    vlm = LoadingVlm()
    asyncio.run(asyncio.wait_for(keep_warming_up(vlm, ("a", "b", "c"), period_s=0.01), 5))
    assert vlm.calls == 3


def test_json_logs_carry_request_ids(capsys):
    import json
    import logging

    from catcascade.serving.log_format import configure_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("json")
        logging.getLogger("catcascade.serving.server").info("classified", extra={"request_id": "r-42", "total_ms": 3.5})
        line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    record = json.loads(line)
    assert record["request_id"] == "r-42" and record["message"] == "classified" and record["level"] == "INFO"


def test_example_service_config_is_valid():
    from pathlib import Path

    from catcascade.serving.config import ServeConfig

    cfg = ServeConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "service.example.yaml")
    assert cfg.vlm.backend == "none" and cfg.metrics_port is None and cfg.log_format == "text"  # the defaults
