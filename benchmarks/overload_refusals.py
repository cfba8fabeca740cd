"""Overload refusals at 4x capacity against a CNN-only server, with and without gRPC's own
concurrency limit (``connections.max_concurrent_rpcs``), and the intake floor (600 calls at
once, every one refused): the table in docs/reliability.md.

    python -m benchmarks.overload_refusals --bundle artifacts/demo-bundle --rounds 2
"""
from __future__ import annotations

import argparse
import json

from benchmarks.reliability import burst_in_subprocess, overload_burst, percentile

NO_LIMIT = {"connections": {"max_concurrent_rpcs": None}}
SCENARIOS = [
    ("floor, refused by admission after the handler ran", {"admission": {"max_queue_wait_ms": 0.001}, **NO_LIMIT},
     lambda t: burst_in_subprocess(t, 600, None, "never")),
    ("floor, refused by gRPC's limit before any handler", {"connections": {"max_concurrent_rpcs": 1}},
     lambda t: burst_in_subprocess(t, 600, None, "never")),
    *[(f"at once, {name}", cfg, lambda t: overload_burst(t, 4.0, 1.0, "never", None))
      for name, cfg in (("no gRPC limit", NO_LIMIT), ("default", {}),
                        ("max_concurrent_rpcs 64", {"connections": {"max_concurrent_rpcs": 64}}))],
    *[(f"for 2 s, {name}", cfg, lambda t: overload_burst(t, 4.0, 1.0, "never", 2.0))
      for name, cfg in (("no gRPC limit", NO_LIMIT), ("default", {}),
                        ("max_concurrent_rpcs 64", {"connections": {"max_concurrent_rpcs": 64}}))],
]


def run(bundle: str, name: str, config: dict, scenario) -> dict:
    """One scenario against a fresh server: refusal and answer latencies, and the share of
    DEADLINE_EXCEEDED among the calls that were not refused."""
    from catcascade.serving.config import ServeConfig
    from catcascade.serving.service_thread import ServiceThread

    with ServiceThread(ServeConfig(bundle=bundle, port=0, **config)) as server:
        o = scenario(server.target)
    refused, ok = o.latencies_ms.get("RESOURCE_EXHAUSTED", []), o.latencies_ms.get("OK", [])
    not_refused = o.sent - o.codes.get("RESOURCE_EXHAUSTED", 0)
    return {"scenario": name, "sent": o.sent, "codes": dict(o.codes),
            "refusal_p50_ms": round(percentile(refused, 50), 1), "refusal_p99_ms": round(percentile(refused, 99), 1),
            "ok_p50_ms": round(percentile(ok, 50), 1),
            "deadline_exceeded_share": round(o.codes.get("DEADLINE_EXCEEDED", 0) / max(1, not_refused), 3),
            "notes": o.notes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--rounds", type=int, default=2, help="each scenario this many times, interleaved")
    args = parser.parse_args()
    for _ in range(args.rounds):
        for name, config, scenario in SCENARIOS:
            print(json.dumps(run(args.bundle, name, config, scenario)), flush=True)


if __name__ == "__main__":
    main()
