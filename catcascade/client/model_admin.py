"""A blocking client for the ModelAdmin service (the ``catcascade models`` commands, tests)."""
from __future__ import annotations

from pathlib import Path

import grpc

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.api import cascade_pb2_grpc as pb_grpc

TRAFFIC_MODES = {"canary": pb.TRAFFIC_MODE_CANARY, "shadow": pb.TRAFFIC_MODE_SHADOW}


class ModelAdminClient:
    """``token`` is an admin token, sent as ``authorization: Bearer <token>``."""

    def __init__(self, target: str, token: str | None, timeout_s: float = 300.0, tls_ca: str | Path | None = None):
        self.timeout_s = timeout_s
        if tls_ca:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))
        else:
            self.channel = grpc.insecure_channel(target)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.stub = pb_grpc.ModelAdminStub(self.channel)

    def _call(self, method, request):
        return method(request, timeout=self.timeout_s, metadata=self.metadata)

    def list(self) -> pb.ModelList:
        return self._call(self.stub.ListModels, pb.ListModelsRequest())

    def reload(self) -> pb.ReloadReport:
        return self._call(self.stub.ReloadModels, pb.ReloadModelsRequest())

    def set_candidate(self, version: str | None, mode: str = "shadow", share: float = 0.1) -> pb.ModelList:
        return self._call(self.stub.SetCandidate, pb.SetCandidateRequest(
            version=version or "", mode=TRAFFIC_MODES[mode] if version else pb.TRAFFIC_MODE_UNSPECIFIED, share=share))

    def promote(self, version: str | None = None) -> pb.ModelList:
        return self._call(self.stub.Promote, pb.PromoteRequest(version=version or ""))

    def rollback(self) -> pb.ModelList:
        return self._call(self.stub.Rollback, pb.RollbackRequest())

    def report(self) -> pb.AgreementReport:
        return self._call(self.stub.GetAgreementReport, pb.AgreementReportRequest())

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "ModelAdminClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
