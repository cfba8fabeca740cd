"""A small gRPC client for CatClassifier (used by the CLI, the demo and the benchmarks)."""
from __future__ import annotations

from pathlib import Path

import grpc

from serving.api import cascade_pb2 as pb
from serving.api import cascade_pb2_grpc as pb_grpc

MODES = {"auto": pb.ESCALATION_MODE_AUTO, "never": pb.ESCALATION_MODE_NEVER, "always": pb.ESCALATION_MODE_ALWAYS}


class CatcascadeClient:
    """Blocking client. ``tls_ca`` switches to TLS (``tls_cert``/``tls_key`` add a client
    certificate for mutual TLS); ``token`` is sent as ``authorization: Bearer <token>``."""

    def __init__(self, target: str, timeout_s: float | None = 30.0, token: str | None = None,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 server_name: str | None = None):
        self.target = target
        self.timeout_s = timeout_s
        options = [("grpc.max_send_message_length", 32 * 1024 * 1024)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls_ca:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes(),
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None)
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.stub = pb_grpc.CatClassifierStub(self.channel)

    def classify(self, image: bytes | str | Path, top_k: int = 0, mode: str = "auto",
                 request_id: str = "", explain: bool = False) -> pb.ClassifyResponse:
        """``explain`` asks the VLM for a short rationale (ClassifyResponse.rationale)."""
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
        req = pb.ClassifyRequest(image=data, top_k=top_k, escalation=MODES[mode], request_id=request_id,
                                 explain=explain)
        return self.stub.Classify(req, timeout=self.timeout_s, metadata=self.metadata)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "CatcascadeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def results_table(rows: list[tuple[str, pb.ClassifyResponse]], title: str = "catcascade"):
    """A rich Table: image, ranked labels, escalation, per-stage milliseconds."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("image", "top-3 (probability)", "escalated (reason)", "decode", "cnn queue", "cnn", "vlm", "total ms"):
        t.add_column(col, justify="left" if col[0] in "ite" else "right", no_wrap=col[0] in "ite")
    for name, r in rows:
        top = ", ".join(f"{s.label} {s.probability:.2f}" for s in r.labels)
        reason = pb.EscalationReason.Name(r.escalation_reason).removeprefix("ESCALATION_REASON_").lower()
        esc = ("yes" if r.escalated else "no") + f" ({reason})"
        tm = r.timings
        t.add_row(name, top, esc, f"{tm.decode_ms:.1f}", f"{tm.cnn_queue_ms:.1f}", f"{tm.cnn_ms:.1f}",
                  f"{tm.vlm_ms:.1f}", f"{tm.total_ms:.1f}")
    return t
