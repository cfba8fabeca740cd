"""A multi-node Ray cluster on one machine, on loopback: for tests, benchmarks and trying the Ray
engine without a real cluster (``catcascade ray-local-cluster``). Each node is a separate
raylet with its own resources, so replicas spread over nodes as they would on a cluster.

``local_cluster`` yields a ``LocalCluster``: its ``address`` is the GCS address to join, and
``remove_worker`` takes a worker node away (its raylet and every worker process on it), as a
node lost from a real cluster would be; the head node (the GCS, Serve's controller, drivers
that joined) stays.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from catcascade.errors import CommandError
from catcascade.serving.engines.ray_engine import prefer_loopback

if TYPE_CHECKING:
    from ray.cluster_utils import Cluster


@dataclass
class LocalCluster:
    """A running loopback cluster (ray.cluster_utils.Cluster underneath)."""

    cluster: "Cluster"

    @property
    def address(self) -> str:
        """The GCS address host:port: ``ray.init(address=...)``, ``--ray-address``."""
        return self.cluster.address

    @property
    def head_node_id(self) -> str:
        return self.cluster.head_node.node_id

    @property
    def worker_node_ids(self) -> list[str]:
        """Ray node ids (hex) of the worker nodes still up, oldest first."""
        return [node.node_id for node in self.cluster.worker_nodes]

    def remove_worker(self, node_id: str | None = None, graceful: bool = False) -> str:
        """Takes a worker node away: the one with ``node_id``, else the newest. Not graceful
        (the default), its raylet and every process the raylet started (replicas, agents) are
        SIGKILLed at once, like a machine that died; graceful, Ray stops the node's processes
        (SIGTERM first), and workers exit once they see their raylet gone. Returns its node id."""
        nodes = list(self.cluster.worker_nodes)
        node = next((n for n in nodes if n.node_id == node_id), None) if node_id else (nodes[-1] if nodes else None)
        if node is None:
            raise ValueError(f"no worker node {node_id or ''} to remove (workers: {self.worker_node_ids})")
        if not graceful:
            _kill_raylet_and_workers(node)
        self.cluster.remove_node(node, allow_graceful=graceful)  # the rest of the node, and the bookkeeping
        return node.node_id


def _kill_raylet_and_workers(node) -> None:
    """SIGKILLs a node's raylet and all its descendants together (a raylet killed alone leaves
    its workers serving direct calls until they notice, about a second later)."""
    import psutil
    from ray._private import ray_constants

    for info in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []):
        try:
            raylet = psutil.Process(info.process.pid)
            doomed = [raylet, *raylet.children(recursive=True)]
        except psutil.Error:
            continue
        for process in doomed:
            with contextlib.suppress(psutil.Error):
                process.kill()


@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: float = 2, object_store_mb: int = 150) -> Iterator[LocalCluster]:
    """A ``nodes``-node cluster (the head and ``nodes - 1`` workers); shuts every node down after."""
    prefer_loopback("127.0.0.1:0")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
        "num_cpus": cpus_per_node, "include_dashboard": False, "object_store_memory": object_store_mb << 20})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node, object_store_memory=object_store_mb << 20)
        cluster.wait_for_nodes()
        yield LocalCluster(cluster)
    finally:
        cluster.shutdown()


def _run(args) -> int:
    import signal

    if args.nodes < 1:
        raise CommandError("--nodes must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # stop nodes on TERM too
    with local_cluster(args.nodes, args.num_cpus) as cluster:
        address = cluster.address
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
