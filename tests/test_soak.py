"""The soak harness (benchmarks/soak.py, `make soak`) for two minutes against `catcascade
serve` in its own process, CNN only: every call of every kind ends with a status the API
promises, each kind is exercised, version swaps through the real ModelAdmin service (canary,
shadow, promote, rollback) succeed while the traffic runs and both versions answer, and the
server's memory stays flat after the warm-up."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_two_minute_soak_of_mixed_traffic_with_version_swaps(demo_bundle):
    from benchmarks.soak import KINDS, SWAPS, VERSIONS, report, soak

    record = soak(str(demo_bundle), minutes=2.0, workers=4, progress=lambda line: None, swap_every_s=22.0)
    text = report(record, 2.0, warmup_s=30.0)
    assert not record.unpromised(), text
    assert all(sum(record.codes[kind].values()) >= 20 for kind in KINDS), text
    assert set(record.codes["malformed"]) == {"INVALID_ARGUMENT"}, text
    assert set(record.codes["bad_input"]) == {"INVALID_ARGUMENT"}, text
    assert "INVALID_ARGUMENT" in record.codes["stream"] and "OK" in record.codes["stream"], text
    # five swaps: a canary, a shadow candidate, its promotion, a rollback and a promotion by name
    assert record.codes["swap"]["OK"] >= len(SWAPS) and not record.swaps_failed(), text
    swaps = [what for _, what in record.events if what.startswith("swap")]
    assert all(what.endswith("(OK)") for what in swaps), text
    assert [what.split(": ")[1].split()[0] for what in swaps[:len(SWAPS)]][2:] == ["candidate", "rolled", "v2"], text
    assert set(record.answered_by) == set(VERSIONS), text  # the canary and the promotion took traffic
    # RSS rises while a second version is loaded and falls when it is released: the lowest of
    # each half minute, at the start and at the end
    assert record.rss_growth(warmup_s=30.0, window_s=30.0) < 0.10, text
