"""The Python client for the CatClassifier gRPC service. It runs in the caller's process, not the
server's: it speaks the protocol (serving/api's stubs) and nothing else of serving/.

    from catcascade.client import CatcascadeClient, RetryPolicy

    with CatcascadeClient("127.0.0.1:50051", timeout_s=10, token="s3cret") as client:
        r = client.classify("cat.jpg", mode="auto", priority="batch")
        r.top.label, r.top.probability      # the final (blended) ranking's best
        r.escalated, r.escalation_reason    # EscalationReason.LOW_CONFIDENCE, ...
        r.cached, r.timings.total_ms, r.raw # r.raw is the ClassifyResponse protobuf
        results = client.classify_many(paths, concurrency=8, progress=True)

`AsyncCatcascadeClient` is the asyncio twin. Both take a per-call deadline that covers every
retry, retry UNAVAILABLE and RESOURCE_EXHAUSTED with jittered exponential backoff
(`RetryPolicy`), speak TLS and mutual TLS (``tls_ca``, ``tls_cert``, ``tls_key``), send a
bearer ``token``, and with ``propagate_trace=True`` carry the caller's OpenTelemetry trace
context to the server. Failed calls raise `CatcascadeRpcError`, a ``grpc.RpcError``.
"""
from catcascade.client.async_client import AsyncCatcascadeClient
from catcascade.client.request import classify_request
from catcascade.client.results import (ClassifyResult, EscalationMode, EscalationReason, LabelScore, ModelInfo,
                                       ModelVersions, Priority, Rationale, Timings, TrafficMode, VlmVerdict)
from catcascade.client.retry import CatcascadeRpcError, RetryPolicy
from catcascade.client.sync_client import CatcascadeClient
from catcascade.client.table import results_table

__all__ = ["AsyncCatcascadeClient", "CatcascadeClient", "CatcascadeRpcError", "ClassifyResult", "EscalationMode",
           "EscalationReason", "LabelScore", "ModelInfo", "ModelVersions", "Priority", "Rationale", "RetryPolicy",
           "Timings", "TrafficMode", "VlmVerdict", "classify_request", "results_table"]
