"""A multi-node Ray cluster on one machine, on loopback: for tests, benchmarks and trying the Ray
engine without a real cluster (``catcascade ray-local-cluster``). Each node is a separate
raylet with its own resources, so replicas spread over nodes as they would on a cluster."""
from __future__ import annotations

import contextlib
import time

from catcascade.errors import CommandError
from catcascade.serving.engines.ray_engine import prefer_loopback


@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: float = 2, object_store_mb: int = 150):
    """Yields the GCS address of a ``nodes``-node cluster; shuts every node down after."""
    prefer_loopback("127.0.0.1:0")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
        "num_cpus": cpus_per_node, "include_dashboard": False, "object_store_memory": object_store_mb << 20})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node, object_store_memory=object_store_mb << 20)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


def _run(args) -> int:
    import signal

    if args.nodes < 1:
        raise CommandError("--nodes must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # stop nodes on TERM too
    with local_cluster(args.nodes, args.num_cpus) as address:
        print(f"Ray cluster with {args.nodes} nodes on loopback at {address}", flush=True)
        print(f"  catcascade serve --engine ray --ray-address {address} ...   (Ctrl-C stops the cluster)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def register(sub) -> None:
    p = sub.add_parser("ray-local-cluster", help="a multi-node Ray cluster on this machine (loopback) for the "
                                                 "ray engine; runs until Ctrl-C")
    p.add_argument("--nodes", type=int, default=2, help="Ray nodes to start on loopback")
    p.add_argument("--num-cpus", type=float, default=2, help="logical CPUs per node")
    p.set_defaults(func=_run)
