"""Settings of the Ray engine (``engine: ray`` in a ServeConfig): where the cluster is, the
application the front doors share, and each stage's replicas, resources and autoscaling."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def grpc_message_limit(max_message_bytes: int) -> int:
    """The largest message Serve's replica-to-replica gRPC must take: a request the front door
    accepted (``limits.max_message_bytes``) plus room for the call's own framing."""
    return max_message_bytes + max_message_bytes // 8 + (1 << 20)


GRPC_LIMIT_ENV = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
"""Ray Serve reads it once, when ray.serve is first imported in a process (4 MiB unset)."""


class AutoscalingSettings(BaseModel):
    """Ray Serve's ``autoscaling_config``: replicas follow the requests each one has in flight."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests in flight per replica to aim for")
    upscale_delay_s: float = Field(10.0, ge=0, description="load must stay high this long before a replica is added")
    downscale_delay_s: float = Field(120.0, ge=0, description="load must stay low this long before one is removed")
    metrics_interval_s: float = Field(2.0, gt=0, description="how often replicas and handles report their load")
    look_back_period_s: float = Field(10.0, gt=0, description="window the load is averaged over")

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self

    def to_ray(self) -> dict:
        return self.model_dump()


class CnnDeploymentSettings(BaseModel):
    """The CNN stage: one ONNX Runtime session per replica, batched with @serve.batch using the
    ServeConfig's ``batching`` limits (``instances`` = batches at once per replica)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(None, ge=1, description="a fixed count; None = autoscaling")
    autoscaling: AutoscalingSettings = AutoscalingSettings()
    num_cpus: float = Field(1.0, ge=0, description="logical CPUs Ray reserves per replica (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; a fraction shares one GPU between replicas "
                            "(the replica then runs ONNX Runtime's CUDA provider)")
    max_ongoing_requests: int = Field(64, ge=1, description="requests one replica holds at once (queued in its "
                                      "batcher or running); at least batching.max_batch_size x instances")
    max_queued_requests: int = Field(256, ge=-1, description="requests a front door queues for busy replicas "
                                     "before refusing with RESOURCE_EXHAUSTED; -1 = unbounded")
    threads: int | None = Field(None, ge=1, description="ONNX Runtime threads per batch; default as the local engine")


class VlmDeploymentSettings(BaseModel):
    """The VLM verifier: the vLLM client and its server pool in a deployment of its own."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(64, ge=1, description="verifications in flight per replica")


class RayEngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="the cluster's GCS address host:port (`ray start --head` prints "
                                "it) or 'auto'; None starts a single-node Ray inside this process")
    namespace: str = "catcascade"
    app_name: str = Field("catcascade", description="the Serve application every front door shares: the first "
                          "deploys it, later ones attach")
    decode: Literal["front_door", "replica"] = Field(
        "front_door", description="where JPEG decode and preprocessing run: on the front door (it sends the float "
                                  "tensor; measured steadier here) or on the CNN replica (it gets the encoded bytes: "
                                  "a tenth of the traffic, decode scales with CNN replicas)")
    connect_timeout_s: float = Field(10.0, gt=0, description="give up on an unreachable cluster after this long")
    deploy_timeout_s: float = Field(180.0, gt=0)
    request_retries: int = Field(1, ge=0, le=5, description="a CNN call whose replica died is retried this often "
                                 "(inference is idempotent); the client's deadline bounds it regardless")
    max_calls_in_flight: int = Field(32, ge=1, description="CNN calls one front door keeps on the replicas at "
                                     "once; further callers wait on the front door, interactive before batch "
                                     "(Ray Serve's queues are first come, first served), and are never sent if "
                                     "their deadline passes meanwhile. Enough to keep every replica's batches "
                                     "full (max_batch_size x instances per replica) and no more: calls beyond "
                                     "that queue on the replicas in arrival order, out of priority's reach")
    cnn: CnnDeploymentSettings = CnnDeploymentSettings()
    vlm: VlmDeploymentSettings = VlmDeploymentSettings()
