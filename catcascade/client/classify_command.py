"""``catcascade classify``: image files through a running server, with the Python client."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from catcascade.errors import CommandError


def _classify(args) -> int:
    import grpc

    from catcascade.client import CatcascadeClient, RetryPolicy, results_table

    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CommandError(f"no such image file(s): {', '.join(missing)}")
    if args.concurrency < 1 or args.attempts < 1:
        raise CommandError("--concurrency and --attempts must be at least 1")
    token = args.token or os.environ.get("CATCASCADE_TOKEN")
    try:
        client = CatcascadeClient(args.target, timeout_s=args.timeout, token=token, tls_ca=args.tls_ca,
                                  tls_cert=args.tls_cert, tls_key=args.tls_key,
                                  retry=RetryPolicy(max_attempts=args.attempts))
    except (ValueError, OSError) as e:  # TLS files missing or mismatched
        raise CommandError(str(e)) from None
    with client:
        answers = client.classify_many(paths, concurrency=args.concurrency, top_k=args.top_k, mode=args.mode,
                                       priority=args.priority, explain=args.explain, model_version=args.model_version,
                                       progress=len(paths) > 1 and sys.stderr.isatty())
    rows, failed = [], 0
    for p, r in zip(paths, answers):
        if isinstance(r, grpc.RpcError):
            if r.code() == grpc.StatusCode.UNAVAILABLE:
                raise CommandError(f"cannot reach a catcascade server at {args.target}: {r.details()}")
            if r.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise CommandError(f"{args.target} refused the credentials: {r.details()}")
            print(f"{p}: {r.code().name}: {r.details()}", file=sys.stderr)
            failed += 1
        elif isinstance(r, OSError):
            print(f"{p}: {r}", file=sys.stderr)
            failed += 1
        else:
            rows.append((str(p), r))
    if args.json:
        from google.protobuf.json_format import MessageToDict

        for name, r in rows:
            print(json.dumps({"image": name, **MessageToDict(r.raw, preserving_proto_field_name=True)}))
    elif rows:
        from rich.console import Console

        console = Console(width=200)
        console.print(results_table(rows))
        for name, r in rows:
            if r.rationale is not None:
                why = r.rationale
                console.print(f"{name}: " + (f"why {why.label}: {why.text}" if why.text else why.error), markup=False)
    return 1 if failed else 0


def register(sub) -> None:
    c = sub.add_parser("classify", help="classify image files through a running server")
    c.add_argument("images", nargs="+", help="image files (JPEG, PNG or WebP)")
    c.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    c.add_argument("--top-k", type=int, default=0, help="ranked labels per image; 0: the server's default (3)")
    c.add_argument("--mode", choices=["auto", "never", "always"], default="auto",
                   help="escalation to the VLM: auto (when the CNN is unsure), never (CNN only), always")
    c.add_argument("--priority", choices=["interactive", "batch"], default="interactive",
                   help="batch requests wait behind interactive ones in the server's queues")
    c.add_argument("--model-version", default="", help="pin a served version of the server's model repository "
                   "(the live one or the candidate); empty: the server routes")
    c.add_argument("--timeout", type=float, default=30.0, help="per-image deadline in seconds, retries included")
    c.add_argument("--attempts", type=int, default=4, help="calls per image at most (retries on UNAVAILABLE and "
                   "RESOURCE_EXHAUSTED, with jittered exponential backoff)")
    c.add_argument("--concurrency", type=int, default=4, help="images in flight at once")
    c.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    c.add_argument("--explain", action="store_true", help="ask the VLM for a short rationale of the breed it favours")
    c.add_argument("--token", help="bearer token (default: $CATCASCADE_TOKEN)")
    c.add_argument("--tls-ca", help="CA certificate: connect with TLS")
    c.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    c.add_argument("--tls-key", help="client private key (mutual TLS)")
    c.set_defaults(func=_classify)
