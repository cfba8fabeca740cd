"""The Ray hop alone: an echo deployment on a two-node loopback cluster, called the way the Ray
engine calls CnnStage, with payloads of the sizes it sends (JPEG bytes, a uint8 crop, a float32
tensor). Compares Serve's default object-ref path with its gRPC transport, and user code on a
separate thread with user code on the replica's own loop (docs/scale-out.md).

    python -m benchmarks.ray_hop [--calls 150] [--seconds 2]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import time

import numpy as np


def _echo_deployment(own_loop: bool):
    from ray import serve

    env = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0" if own_loop else "1"}

    @serve.deployment(num_replicas=1, max_ongoing_requests=64,
                      ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": env}})
    class Echo:
        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
        async def run(self, xs):
            return [np.zeros(37, np.float32) for _ in xs]

    return Echo


async def _measure(call, payload, calls: int, seconds: float) -> tuple[float, float]:
    for _ in range(20):
        await call(payload)
    lat = []
    for _ in range(calls):
        t = time.perf_counter()
        await call(payload)
        lat.append((time.perf_counter() - t) * 1000.0)
    n = 0

    async def worker():
        nonlocal n
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            await call(payload)
            n += 1

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(16)))
    return float(np.percentile(lat, 50)), n / (time.perf_counter() - t)


def main(args) -> int:
    from catcascade.serving.engines.ray_local_cluster import local_cluster

    payloads = {"30 KB bytes": os.urandom(30_000), "150 KB uint8": np.zeros((3, 224, 224), np.uint8),
                "600 KB float32": np.zeros((3, 224, 224), np.float32)}
    rows = []
    with local_cluster(nodes=2, cpus_per_node=2) as cluster:
        import ray
        from ray import serve

        ray.init(address=cluster.address, log_to_driver=False)
        serve.start(proxy_location="Disabled")
        try:
            for own_loop in (False, True):
                serve.run(_echo_deployment(own_loop).bind(), name=f"echo-{int(own_loop)}", route_prefix=None,
                          logging_config={"enable_access_log": False, "log_level": "WARNING"})
                handle = serve.get_app_handle(f"echo-{int(own_loop)}")
                for transport, h in (("object refs", handle), ("gRPC", handle.options(_by_reference=False))):
                    if own_loop and transport == "object refs":
                        continue
                    for name, payload in payloads.items():
                        p50, rate = asyncio.run(_measure(lambda x: h.run.remote(x), payload, args.calls, args.seconds))
                        rows.append((transport, "replica loop" if own_loop else "separate thread", name, p50, rate))
                        print(f"{rows[-1][0]:12s} {rows[-1][1]:16s} {name:15s} p50 {p50:6.2f} ms  "
                              f"c=16 {rate:6.0f} calls/s", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"\nload average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=150, help="sequential calls for the p50")
    parser.add_argument("--seconds", type=float, default=2.0, help="window at 16 calls in flight")
    raise SystemExit(main(parser.parse_args()))
