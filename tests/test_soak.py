"""The soak harness (benchmarks/soak.py, `make soak`) for two minutes against `catcascade
serve` in its own process, CNN only: every call of every kind ends with a status the API
promises, each kind is exercised, and the server's memory stays flat after the warm-up."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_two_minute_soak_of_mixed_traffic(demo_bundle):
    from benchmarks.soak import KINDS, report, soak

    record = soak(str(demo_bundle), minutes=2.0, workers=4, progress=lambda line: None)
    text = report(record, 2.0, warmup_s=30.0)
    assert not record.unpromised(), text
    assert all(sum(record.codes[kind].values()) >= 20 for kind in KINDS), text
    assert set(record.codes["malformed"]) == {"INVALID_ARGUMENT"}, text
    assert set(record.codes["bad_input"]) == {"INVALID_ARGUMENT"}, text
    assert "INVALID_ARGUMENT" in record.codes["stream"] and "OK" in record.codes["stream"], text
    assert record.rss_growth(warmup_s=30.0) < 0.10, text
