"""Server configuration: one pydantic model, from CLI flags or a YAML file, validated at start."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from catcascade.serving.batcher import BatchingConfig
from catcascade.serving.circuit_breaker import BreakerConfig
from catcascade.serving.engines.ray_config import RayEngineConfig
from catcascade.serving.model_repository.config import ModelsConfig
from catcascade.serving.observability.drift import DriftConfig
from catcascade.serving.observability.tracing import TracingConfig
from catcascade.serving.traffic.admission import AdmissionConfig
from catcascade.serving.traffic.response_cache import ResponseCacheConfig
from catcascade.serving.traffic.tenant_budgets import TenantBudgetsConfig


class VlmEndpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(default_factory=list, description="vLLM OpenAI-compatible base URLs")
    backend: Literal["vllm", "transformers", "none"] | None = Field(
        None, description="vllm (needs urls); transformers = the bundle's VLM in-process (no vLLM server); "
                          "none = CNN only. Default: vllm when urls are given, else none")
    model: str | None = Field(None, description="vLLM model name; default: the bundle's adapter name")
    scoring_mode: Literal["multiple_choice", "yes_no"] | None = None
    constraint: Literal["allowed_tokens", "grammar"] = Field(
        "allowed_tokens", description="allowed_tokens: a token mask, needs vLLM started with --logprobs-mode "
                                      "processed_logprobs (catcascade serve-vlm does); grammar: structured outputs, "
                                      "for servers started without it (slower)")
    timeout_s: float = Field(10.0, gt=0, description="HTTP timeout of one attempt")
    max_retries: int = Field(2, ge=0, le=10)
    call_budget_s: float = Field(5.0, gt=0, description="the server's own bound on one escalation's VLM call, "
                                 "retries included: past it the call counts as a VLM failure for the breaker, "
                                 "whatever the client's deadline (a hung VLM is caught even under long deadlines)")
    rationale_max_tokens: int = Field(48, ge=1, le=512, description="token cap of a rationale (ClassifyRequest."
                                      "explain): a sentence or two; also bounds what one costs")
    image_side: int = Field(448, ge=32, le=4096, description="longest side of the copy of an image kept for the "
                            "VLM (bounds the memory a request holds while it waits, and the image tokens)")

    @field_validator("urls")
    @classmethod
    def _http(cls, urls: list[str]) -> list[str]:
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"VLM URL must start with http:// or https://, got {u!r}")
        return urls

    @model_validator(mode="after")
    def _backend(self) -> "VlmEndpointConfig":
        if self.backend is None:
            self.backend = "vllm" if self.urls else "none"
        if self.backend == "vllm" and not self.urls:
            raise ValueError("backend 'vllm' needs at least one URL in vlm.urls")
        return self


class LimitsConfig(BaseModel):
    """Bounds that keep a burst or a hostile client from taking the server down."""

    model_config = ConfigDict(extra="forbid")

    max_message_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="largest accepted request")
    max_pixels: int = Field(40_000_000, ge=1, description="decoded width*height limit (decompression bombs)")
    max_side: int = Field(12_000, ge=16)
    max_aspect_ratio: float = Field(20.0, ge=1, description="longest side / shortest side; beyond, INVALID_ARGUMENT "
                                    "(the centre crop would keep a sliver)")
    max_decode_mb: float = Field(128.0, ge=1, description="memory a decode may take, estimated from the header "
                                 "before any pixel is decoded (Pillow's copies, a progressive JPEG's coefficients)")
    max_jpeg_scans: int = Field(100, ge=1, description="scans in one JPEG (progressive ones have about 10)")
    max_jpeg_scan_blocks: int = Field(40_000_000, ge=1, description="8x8 blocks a JPEG's scans visit in total "
                                      "(bounds the work of many-scan files)")
    max_segments: int = Field(20_000, ge=16, description="JPEG marker segments or PNG chunks in one image")
    max_decode_queue: int = Field(64, ge=1, description="images waiting for a decode thread; beyond, "
                                  "RESOURCE_EXHAUSTED")
    max_decode_work: float = Field(48.0, gt=0, description="decode work waiting for a thread, predicted from each "
                                   "image's pixels, bytes and JPEG scans in units of about a megapixel's decode (tens "
                                   "of ms); beyond, RESOURCE_EXHAUSTED (an image is admitted when none waits)")
    max_inflight_requests: int = Field(512, ge=1, description="beyond this, RESOURCE_EXHAUSTED")
    max_concurrent_escalations: int = Field(32, ge=0, description="VLM calls in flight; beyond, escalations wait "
                                            "(escalation_queue_size) or are shed")
    max_concurrent_rationales: int = Field(8, ge=0, description="rationale calls (explain) in flight, apart from "
                                           "the escalations' slots so they never take them; beyond, no rationale")
    escalation_queue_size: int = Field(0, ge=0, description="escalations that may wait for a VLM slot, interactive "
                                       "before batch; 0 = shed at once")
    vlm_min_budget_ms: float = Field(50.0, ge=0, description="skip the VLM when less deadline than this remains")
    reply_margin_ms: float = Field(100.0, ge=0, description="deadline kept after the VLM to send the answer; more on "
                                   "a loaded machine, where sending it can take longer")

    def decode_limits(self):
        """The cnn_stage DecodeLimits these settings mean: the one place they are assembled, so
        the local engine, Ray replicas and every repository version refuse the same images."""
        from catcascade.cnn_stage.preprocessing import DecodeLimits

        return DecodeLimits(max_bytes=self.max_message_bytes, max_pixels=self.max_pixels, max_side=self.max_side,
                            max_aspect_ratio=self.max_aspect_ratio, max_decode_mb=self.max_decode_mb,
                            max_jpeg_scans=self.max_jpeg_scans, max_jpeg_scan_blocks=self.max_jpeg_scan_blocks,
                            max_segments=self.max_segments)


class ConnectionsConfig(BaseModel):
    """HTTP/2 hygiene: dead peers found by keepalive pings, idle and old connections closed, and
    connections and streams bounded, so that held-open connections cannot exhaust descriptors."""

    model_config = ConfigDict(extra="forbid")

    keepalive_time_s: float = Field(60.0, gt=0, description="ping a connection after this long without traffic")
    keepalive_timeout_s: float = Field(20.0, gt=0, description="close it when the ping is not answered within this")
    max_connection_idle_s: float = Field(300.0, gt=0, description="close a connection with no call for this long")
    max_connection_age_s: float = Field(3600.0, gt=0, description="ask clients to reconnect after this long (spreads "
                                        "them over replicas added since)")
    max_connection_age_grace_s: float = Field(60.0, ge=0, description="calls in flight on an aged connection get "
                                              "this long to finish before it is closed")
    max_connections: int = Field(1000, ge=1, description="open connections; beyond, new ones are refused")
    max_streams_per_connection: int | None = Field(None, ge=1, description="concurrent calls on one connection; "
                                                   "beyond, UNAVAILABLE (gRPC's clients do not queue them); null = no "
                                                   "bound but max_concurrent_rpcs")
    max_concurrent_rpcs: int | None = Field(512, ge=1, description="calls in progress, all connections together; "
                                            "beyond, RESOURCE_EXHAUSTED before the request is parsed (the cheapest "
                                            "refusal there is); null = no bound")

    def grpc_options(self) -> list[tuple[str, int]]:
        """The grpc server channel arguments these settings mean."""
        ms = lambda s: int(s * 1000)  # noqa: E731
        return [("grpc.keepalive_time_ms", ms(self.keepalive_time_s)),
                ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
                ("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)),
                ("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
                ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s)),
                ("grpc.max_allowed_incoming_connections", self.max_connections),
                *([("grpc.max_concurrent_streams", self.max_streams_per_connection)]
                  if self.max_streams_per_connection else [])]


class MemoryConfig(BaseModel):
    """glibc malloc settings applied at start, so memory a large decode used goes back to the
    OS instead of staying resident (cnn_stage.native_memory; no-ops off glibc)."""

    model_config = ConfigDict(extra="forbid")

    malloc_arena_max: int | None = Field(2, ge=1, description="malloc arenas (glibc default 8 x cores); null = "
                                         "glibc's default")
    malloc_mmap_threshold_kb: int | None = Field(1024, ge=64, description="allocations from this size are mapped "
                                                 "and unmapped on free; fixing it stops glibc raising it after "
                                                 "large frees; null = glibc's dynamic threshold")
    trim_after_decode_ms: float | None = Field(100.0, ge=0, description="malloc_trim after a decode that took "
                                               "longer (large images); null = never")


class TlsConfig(BaseModel):
    """Server TLS; with client_ca_file, clients must present a certificate signed by it (mTLS)."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @field_validator("cert_file", "key_file", "client_ca_file")
    @classmethod
    def _exists(cls, p: Path | None) -> Path | None:
        if p is not None and not Path(p).is_file():
            raise ValueError(f"file not found: {p}")
        return p


def _check_token(token: str, source: str) -> str:
    if not token.isprintable() or any(c.isspace() for c in token) or not token.isascii():
        raise ValueError(f"a bearer token from {source} contains whitespace, control or non-ASCII characters "
                         "(tokens are sent as gRPC metadata: printable ASCII, no spaces)")
    return token


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bearer_tokens: list[str] = Field(default_factory=list, description="accepted tokens; empty = no auth")
    bearer_tokens_env: str | None = Field(None, description="or: an environment variable holding comma-separated "
                                          "tokens (spaces around each are trimmed)")
    tenants: dict[str, str] = Field(default_factory=dict, description="tenant name -> its bearer token (accepted "
                                    "like bearer_tokens); names the tenant for tenant_budgets and metrics")

    @field_validator("bearer_tokens")
    @classmethod
    def _tokens_clean(cls, tokens: list[str]) -> list[str]:
        return [_check_token(t, "auth.bearer_tokens") for t in tokens]

    @field_validator("tenants")
    @classmethod
    def _distinct_tokens(cls, tenants: dict[str, str]) -> dict[str, str]:
        if any(not t.strip() for t in tenants.values()):
            raise ValueError("tenant tokens must not be empty")
        if len(set(tenants.values())) != len(tenants):
            raise ValueError("two tenants share a token: each tenant needs its own")
        return {name: _check_token(t, f"auth.tenants[{name!r}]") for name, t in tenants.items()}

    def tokens(self) -> list[str]:
        """The configured tokens plus the environment's, read now: ``"a, b"`` gives a and b."""
        import os

        extra = os.environ.get(self.bearer_tokens_env, "") if self.bearer_tokens_env else ""
        from_env = [_check_token(t.strip(), f"${self.bearer_tokens_env}") for t in extra.split(",") if t.strip()]
        return self.bearer_tokens + from_env + list(self.tenants.values())


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: Path | None = Field(None, description="the bundle to serve; or models.repository")
    models: ModelsConfig | None = Field(None, description="a model repository (DIR/<version>/ bundles) instead of "
                                        "one bundle: reloads, canary, shadow (docs/operations.md)")
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    http_port: int | None = Field(None, ge=0, le=65535, description="the Open Inference Protocol's REST API (KServe "
                                  "v2 over HTTP/JSON) on this port, beside its gRPC service on `port`; with `tls`, "
                                  "over HTTPS; None = off")
    cnn_threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads per batch; default: "
                                    "cores / batching.instances, or on a CPU with several instances, all cores "
                                    "for a lone batch and one thread per batch when batches overlap")
    cnn_precision: Literal["fp32", "int8"] = Field("fp32", description="int8 serves the bundle's cnn.int8.onnx")
    cnn_spinning: bool = Field(True, description="let ONNX Runtime's threads spin between batches: lower latency "
                               "when idle, less CPU left for decoding under load")
    compute_nice: int = Field(0, ge=0, le=19, description="run the decode and CNN threads this far below the event "
                              "loop (Linux nice increment), so that under overload the loop that takes requests in, "
                              "refuses the excess and sends answers comes first. Best where the server has its cores "
                              "(a container); on a machine shared with other busy processes the compute threads also "
                              "yield to those. 0 = off")
    batching: BatchingConfig = BatchingConfig()
    vlm: VlmEndpointConfig = VlmEndpointConfig()
    limits: LimitsConfig = LimitsConfig()
    connections: ConnectionsConfig = ConnectionsConfig()
    breaker: BreakerConfig = BreakerConfig()
    admission: AdmissionConfig = AdmissionConfig()
    memory: MemoryConfig = MemoryConfig()
    tls: TlsConfig | None = None
    auth: AuthConfig = AuthConfig()
    cache: ResponseCacheConfig = ResponseCacheConfig()
    tracing: TracingConfig = TracingConfig()
    tenant_budgets: TenantBudgetsConfig = TenantBudgetsConfig()
    drift: DriftConfig = DriftConfig()
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port; None = off")
    metrics_host: str = Field("127.0.0.1", description="address /metrics binds to, apart from the gRPC host: "
                              "loopback by default (a local agent or sidecar scrapes it)")
    metrics_tls: TlsConfig | None = Field(None, description="HTTPS for /metrics; client_ca_file requires client "
                                          "certificates (mutual TLS)")
    metrics_auth: AuthConfig = Field(default_factory=AuthConfig, description="bearer tokens /metrics requires "
                                     "(Prometheus scrape_config authorization); empty = none")
    log_format: Literal["text", "json"] = "text"
    grace_s: float = Field(5.0, ge=0, description="drain time for in-flight requests on shutdown")
    engine: Literal["local", "ray"] = Field("local", description="where the CNN stage runs: in this process, or "
                                            "as Ray Serve deployments (with the VLM client) on a Ray cluster")
    ray: RayEngineConfig = RayEngineConfig()

    @model_validator(mode="after")
    def _bundle_or_models(self) -> "ServeConfig":
        if self.bundle is None and self.models is None:
            raise ValueError("nothing to serve: give bundle (one bundle) or models.repository (a model repository)")
        if self.bundle is not None and self.models is not None:
            raise ValueError("give bundle (one bundle) or models.repository (a model repository), not both")
        if self.engine == "ray" and self.bundle is None:
            raise ValueError("engine ray serves one bundle (set bundle); a model repository runs on the local engine")
        return self

    @model_validator(mode="after")
    def _budgeted_tenants_exist(self) -> "ServeConfig":
        from catcascade.serving.traffic.tenant_budgets import ANONYMOUS

        unknown = sorted(set(self.tenant_budgets.tenants) - set(self.auth.tenants) - {ANONYMOUS})
        if unknown:
            raise ValueError(f"tenant_budgets names tenants that auth.tenants does not define: {unknown}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "ServeConfig":
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
