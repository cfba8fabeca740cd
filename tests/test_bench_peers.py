"""benchmarks/peers.py's arithmetic: the ratios, their spread across windows and the targets'
verdicts come from the windows given, never from fixed numbers."""
from __future__ import annotations

import base64
import json
import struct

from benchmarks import peers

CC, TRITON = "catcascade (perf_analyzer)", "Triton/PyTriton (perf_analyzer)"
CCPY, RAY = "catcascade (Python generator)", "Ray Serve (Python generator)"


def _cell(throughput, p50):
    return {"throughput": throughput, "p50": p50, "p99": 2 * p50, "client_cpu_ms": 0.5, "errors": 0}


def _results(triton_c16=(50.0, 60.0, 70.0)):
    windows = []
    for t16 in triton_c16:
        windows.append({CC: {"1": _cell(50, 10.0), "16": _cell(60, 200.0)},
                        TRITON: {"1": _cell(40, 12.0), "16": _cell(t16, 180.0)},
                        CCPY: {"1": _cell(48, 11.0), "16": _cell(58, 210.0)},
                        RAY: {"1": _cell(30, 20.0), "16": _cell(29, 400.0)}})
    return {"windows": windows, "concurrency": [1, 16], "cpus": 2, "window_s": 3.0, "load_before": 1.0,
            "load_after": 2.0, "ceiling": {"throughput": 80.0, "c1_p50_ms": 9.0, "decode_p50_ms": 2.0}}


def test_ratios_are_per_window_pairs_with_their_range():
    rows = peers.summarize(_results())
    triton16 = next(r for r in rows if r["server"] == TRITON and r["concurrency"] == 16)
    assert triton16["ratio"] == (1.0, 50 / 60, 70 / 60) and triton16["throughput"] == 60.0
    ray1 = next(r for r in rows if r["server"] == RAY and r["concurrency"] == 1)
    assert ray1["ratio"][0] == 30 / 48 and ray1["p50_ratio"][0] == 20 / 11
    assert "ratio" not in next(r for r in rows if r["server"] == CC and r["concurrency"] == 16)


def test_targets_state_the_arithmetic_and_the_verdict():
    lines = peers.targets(_results(), peers.summarize(_results()))
    text = "\n".join(lines)
    assert "Triton/PyTriton (perf_analyzer) / catcascade = 1.00" in text and "missed" not in lines[0]
    assert "60.0/s = 75% of the in-process decode+ORT ceiling 80.0/s (target 85%): missed" in text
    assert "10.00 ms - in-process decode+ORT p50 9.00 ms = +1.00 ms added (target at most +1.5 ms): met" in text
    faster_peer = "\n".join(peers.targets(_results((90.0,) * 3), peers.summarize(_results((90.0,) * 3))))
    assert "= 1.50 (windows 1.50-1.50); catcascade at least matches it: missed" in faster_peer
    assert "| Ray Serve (Python generator) | 16 | 29.0 |" in peers.report(_results())


def test_perf_analyzer_data_is_base64_of_tritons_length_prefixed_bytes(tmp_path):
    photos = [b"\xff\xd8jpeg-one", b"\xff\xd8two"]
    steps = json.loads(peers.perf_analyzer_data(photos, tmp_path / "d.json").read_text())["data"]
    for photo, step in zip(photos, steps):
        assert base64.b64decode(step["image"]["b64"]) == struct.pack("<I", len(photo)) + photo
        assert step["image"]["shape"] == [1]


def test_a_variant_is_compared_with_the_default_and_named_beside_triton():
    results = _results()
    variant = "catcascade one-cnn-thread (perf_analyzer)"
    for w in results["windows"]:
        w[variant] = {"1": _cell(70, 8.0), "16": _cell(66, 190.0)}
    results["baselines"] = {**peers.BASELINE, variant: CC}
    row = next(r for r in peers.summarize(results) if r["server"] == variant and r["concurrency"] == 1)
    assert row["ratio"][0] == 70 / 50 and row["p50_ratio"][0] == 8.0 / 10.0
    lines = peers.targets(results, peers.summarize(results))
    assert lines[-1] == (f"- Another design, {variant}: p50 at c=1 8.0 ms (Triton 12.0 ms, default 10.0 ms); "
                         "c=16 66.0/s (Triton 60.0/s, default 60.0/s).")
