"""The serving layer's commands: serve and serve-vlm (``classify`` is the client's, ``demo`` and
``build-demo`` the top layer's: catcascade/demo.py)."""
from __future__ import annotations

import logging
from pathlib import Path

from catcascade.errors import CommandError

DEFAULT_BUNDLE = Path("artifacts/demo-bundle")


def serve_config_from_args(args):
    """ServeConfig from --config YAML (if any) with the command-line flags layered on top."""
    import yaml

    from catcascade.serving.config import ServeConfig

    data = (yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else {}
    if getattr(args, "models", None) is not None or getattr(args, "admin_port", None) is not None:
        models = dict(data.get("models") or {})
        if args.models is not None:
            models["repository"] = str(args.models)
        if args.admin_port is not None:
            models["admin_port"] = args.admin_port
        data["models"] = models
    if not data.get("models"):
        data.setdefault("bundle", str(DEFAULT_BUNDLE))
    for key, value in (("bundle", args.bundle), ("host", args.host), ("port", args.port),
                       ("http_port", args.http_port), ("cnn_precision", args.precision)):
        if value is not None:
            data[key] = str(value) if isinstance(value, Path) else value
    if getattr(args, "engine", None):
        data["engine"] = args.engine
    if getattr(args, "ray_address", None):
        data["ray"] = dict(data.get("ray") or {}, address=args.ray_address)
    vlm = dict(data.get("vlm") or {})
    for key, value in (("urls", args.vlm_url), ("model", args.vlm_model), ("backend", args.vlm_backend)):
        if value:
            vlm[key] = value
    data["vlm"] = vlm
    if getattr(args, "auth_tokens_env", None):
        data["auth"] = dict(data.get("auth") or {}, bearer_tokens_env=args.auth_tokens_env)
    tls_flags = {"cert_file": getattr(args, "tls_cert", None), "key_file": getattr(args, "tls_key", None),
                 "client_ca_file": getattr(args, "tls_client_ca", None)}
    if any(tls_flags.values()):
        tls = dict(data.get("tls") or {}, **{k: str(v) for k, v in tls_flags.items() if v})
        if not (tls.get("cert_file") and tls.get("key_file")):
            raise CommandError("TLS needs both --tls-cert and --tls-key (or tls.cert_file and tls.key_file in --config)")
        data["tls"] = tls
    return ServeConfig.model_validate(data)


def _serve(args) -> int:
    import asyncio

    from pydantic import ValidationError

    from catcascade.ensemble.bundle import BundleError
    from catcascade.serving.app import serve_forever
    from catcascade.serving.engines.cnn_engine import EngineUnavailableError
    from catcascade.serving.log_format import configure_logging
    from catcascade.serving.model_repository.loading import VersionRejected

    try:
        cfg = serve_config_from_args(args)
        configure_logging(cfg.log_format, logging.DEBUG if args.verbose else logging.INFO)
        asyncio.run(serve_forever(cfg))
    except ValidationError as e:
        raise CommandError(f"invalid configuration:\n{e}") from None
    except (BundleError, VersionRejected, OSError, ValueError, EngineUnavailableError) as e:
        raise CommandError(str(e)) from None
    return 0


def _serve_vlm(args) -> int:
    import signal
    import time

    from catcascade.ensemble.bundle import load_bundle
    from catcascade.vlm_stage.vllm_server import VllmServer, VllmServerConfig

    try:
        cfg = VllmServerConfig.for_bundle(load_bundle(args.bundle), host=args.host, port=args.port, dtype=args.dtype,
                                          runtime_lora=not args.no_runtime_lora,
                                          gpu_memory_utilization=args.gpu_memory_utilization,
                                          extra_args=list(args.vllm_args))
    except ValueError as e:
        raise CommandError(str(e)) from None
    server = VllmServer(cfg, log_path=args.log)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with server:
        print(f"vLLM serving {cfg.served_model_name} (adapters: {list(cfg.lora_modules) or 'none'}) at {server.url}",
              flush=True)
        try:
            while server.process and server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


def register(sub) -> None:
    """Adds this layer's subcommands to the ``catcascade`` parser."""
    s = sub.add_parser("serve", help="run the gRPC server")
    s.add_argument("--config", type=Path, help="YAML ServeConfig (flags override it; without it, every field has "
                   "its default: docs/reference/configuration.md)")
    s.add_argument("--bundle", type=Path, help=f"bundle folder to serve (default without --config or --models: "
                   f"{DEFAULT_BUNDLE})")
    s.add_argument("--models", type=Path, help="a model repository (DIR/<version>/ bundles, DIR/routing.yaml) "
                   "instead of --bundle: reloads, canary, shadow (docs/operations.md)")
    s.add_argument("--admin-port", type=int, help="port of the ModelAdmin service (with --models; admin tokens "
                   "from $CATCASCADE_ADMIN_TOKENS or models.admin_tokens in --config)")
    s.add_argument("--host", help="address the gRPC server binds (config default 127.0.0.1; 0.0.0.0: every "
                   "interface)")
    s.add_argument("--port", type=int, help="gRPC port (config default 50051)")
    s.add_argument("--http-port", type=int, help="also serve the Open Inference Protocol's REST API (KServe v2 "
                   "HTTP/JSON) on this port (config default: off)")
    s.add_argument("--precision", choices=["fp32", "int8"], help="CNN model file to serve: cnn.onnx or the bundle's "
                   "cnn.int8.onnx (config default fp32)")
    s.add_argument("--vlm-url", action="append", help="vLLM base URL (repeatable); none = CNN only")
    s.add_argument("--vlm-model", help="vLLM model name (default: the bundle's adapter)")
    s.add_argument("--vlm-backend", choices=["vllm", "transformers", "none"],
                   help="default: vllm with --vlm-url, else none; transformers runs the bundle's VLM in-process")
    s.add_argument("--engine", choices=["local", "ray"], help="where the CNN stage runs (default local); ray: "
                   "Ray Serve deployments on a cluster, see docs/scale-out.md")
    s.add_argument("--ray-address", help="the Ray cluster's GCS address host:port (engine ray; default: a local Ray)")
    s.add_argument("--auth-tokens-env", metavar="NAME", help="require a bearer token on every call: the accepted "
                   "tokens are read, comma-separated, from environment variable NAME (e.g. CATCASCADE_TOKENS); "
                   "sets auth.bearer_tokens_env")
    s.add_argument("--tls-cert", type=Path, help="server certificate (PEM): serve gRPC over TLS (with --tls-key)")
    s.add_argument("--tls-key", type=Path, help="server private key (PEM), with --tls-cert")
    s.add_argument("--tls-client-ca", type=Path, help="CA certificate (PEM): clients must present a certificate it "
                   "signed (mutual TLS)")
    s.set_defaults(func=_serve)

    v = sub.add_parser("serve-vlm", help="run vLLM's OpenAI server for a bundle's VLM and adapter")
    v.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle whose base VLM and adapter to serve")
    v.add_argument("--host", default="127.0.0.1", help="address vLLM binds")
    v.add_argument("--port", type=int, default=8000, help="vLLM's HTTP port")
    v.add_argument("--log", type=Path, default=Path("artifacts/logs/vllm.log"), help="vLLM's output goes here")
    v.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: float32 on a CPU, vLLM's choice on CUDA; bfloat16 is much faster on CPUs with "
                        "AVX-512 BF16/AMX (scores then differ from the float32 in-process backend by ~1e-2)")
    v.add_argument("--no-runtime-lora", action="store_true",
                   help="refuse runtime LoRA loading (then a model repository cannot bring new adapters)")
    v.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory vLLM may take, 0-1 (CUDA only)")
    v.add_argument("vllm_args", nargs="*", metavar="-- VLLM_ARG",
                   help="after --: passed to vLLM's server as they are, e.g. -- --tensor-parallel-size 2 "
                        "--max-num-seqs 64")
    v.set_defaults(func=_serve_vlm)
