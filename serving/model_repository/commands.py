"""``catcascade models ...``: the model repository's admin commands, over the ModelAdmin service."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from catcascade.errors import CommandError


def _routing_line(r) -> str:
    from catcascade.serving.api import cascade_pb2 as pb

    line = f"live {r.live}"
    if r.candidate:
        mode = pb.TrafficMode.Name(r.mode).removeprefix("TRAFFIC_MODE_").lower()
        line += f", candidate {r.candidate} ({mode} {r.share:.0%})"
    if r.previous:
        line += f", previous {r.previous}"
    return line


def _print_list(models) -> None:
    print(_routing_line(models.routing))
    for v in models.versions:
        detail = f"{v.versions.bundle} {v.versions.cnn}" if v.versions.bundle else ""
        if v.adapter:
            detail += f" adapter {v.adapter}"
        print(f"  {v.version:<16} {v.state:<10} {detail}{'  ' + v.error if v.error else ''}")


def _print_report(rep) -> None:
    print(_routing_line(rep.routing) + f"; window {rep.window_s:.0f} s")
    print(f"  {'':<10} {'version':<16} {'requests':>9} {'errors':>7} {'escalated':>10} {'p50 ms':>8} {'p95 ms':>8}")
    for side, t in (("live", rep.live), ("candidate", rep.candidate)):
        if t.version:
            print(f"  {side:<10} {t.version:<16} {t.requests:>9} {t.errors:>7} {t.escalation_rate:>10.1%} "
                  f"{t.latency_p50_ms:>8.1f} {t.latency_p95_ms:>8.1f}")
    if rep.compared:
        print(f"  top-1 agreement {rep.top1_agreement:.1%} over {rep.compared} shadowed requests "
              f"({rep.shadow_dropped} shadow copies dropped)")


def _stage(args) -> int:
    from catcascade.ensemble.bundle import BundleError, load_bundle
    from catcascade.serving.model_repository.staging import stage_version

    try:
        path = stage_version(args.bundle, args.repository, args.version, vlm_from=args.vlm_from,
                             adapter=args.adapter, cascade=args.cascade)
    except BundleError as e:
        raise CommandError(f"cannot stage {args.bundle} as {args.version}: {e}") from None
    files = load_bundle(path, verify=False).manifest.files
    print(f"staged {path}: {len(files)} files copied in, each one's sha256 in its manifest (verified); "
          f"make it a candidate with `catcascade models candidate {args.version}`")
    return 0


def _models(args) -> int:
    if args.action == "stage":
        return _stage(args)
    import grpc
    from google.protobuf.json_format import MessageToDict

    from catcascade.client.model_admin import ModelAdminClient

    token = args.token or os.environ.get("CATCASCADE_ADMIN_TOKEN")
    with ModelAdminClient(args.admin, token, tls_ca=args.tls_ca) as client:
        try:
            if args.action == "list":
                out = client.list()
            elif args.action == "reload":
                out = client.reload()
            elif args.action == "candidate":
                if not args.version and not args.clear:
                    raise CommandError("name a version, or --clear to drop the candidate")
                out = client.set_candidate(None if args.clear else args.version, args.mode, args.share)
            elif args.action == "promote":
                out = client.promote(args.version)
            elif args.action == "rollback":
                out = client.rollback()
            else:
                out = client.report()
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise CommandError(f"cannot reach the ModelAdmin service at {args.admin}: {e.details()}") from None
            raise CommandError(f"{args.action}: {e.code().name}: {e.details()}") from None
    if args.json:
        print(json.dumps(MessageToDict(out, preserving_proto_field_name=True)))
    elif args.action == "report":
        _print_report(out)
    elif args.action == "reload":
        _print_list(out.models)
        for r in out.rejected:
            print(f"rejected {r.version} ({r.reason}): {r.message}", file=sys.stderr)
        return 1 if out.rejected else 0
    else:
        _print_list(out)
    return 0


def register(sub) -> None:
    """Adds ``catcascade models`` and its actions."""
    m = sub.add_parser("models", help="stage versions into a model repository, and administer one served with "
                       "`serve --models` (stage, list, reload, candidate, promote, rollback, report)")
    m.add_argument("--admin", default="127.0.0.1:50052", help="host:port of the ModelAdmin service")
    m.add_argument("--token", help="admin token (default: $CATCASCADE_ADMIN_TOKEN)")
    m.add_argument("--tls-ca", help="CA certificate: connect with TLS")
    m.add_argument("--json", action="store_true", help="the reply as JSON")
    actions = m.add_subparsers(dest="action", required=True, help="what to do")
    actions.add_parser("list", help="versions, their states and the routing")
    actions.add_parser("reload", help="re-read the repository and routing file now (exit 1 if a version was rejected)")
    c = actions.add_parser("candidate", help="set the candidate (shadow or canary) or --clear it")
    c.add_argument("version", nargs="?", help="the version (folder name) to make the candidate")
    c.add_argument("--mode", choices=["shadow", "canary"], default="shadow",
                   help="shadow: runs on a copy of --share of the requests; canary: answers --share of them")
    c.add_argument("--share", type=float, default=0.1, help="share of requests, 0-1")
    c.add_argument("--clear", action="store_true", help="no candidate")
    p = actions.add_parser("promote", help="make the candidate (or VERSION) live")
    p.add_argument("version", nargs="?", help="the version to make live (default: the candidate)")
    actions.add_parser("rollback", help="make the previous live version live again")
    actions.add_parser("report", help="live against candidate: agreement, escalation rates, latency")
    st = actions.add_parser("stage", help="copy a bundle into the repository as VERSION: every file copied in (no "
                            "links, no path outside it) and its sha256 listed in the manifest, verified, renamed into "
                            "place atomically (no server needed)")
    st.add_argument("bundle", type=Path, help="the new bundle (e.g. train-cnn --out)")
    st.add_argument("--repository", type=Path, required=True, help="the model repository folder")
    st.add_argument("--version", required=True, help="the new version's folder name")
    st.add_argument("--vlm-from", type=Path, help="take the VLM section (base model, adapter) from this bundle")
    st.add_argument("--adapter", type=Path, help="a PEFT adapter folder (train-vlm --out) to serve instead")
    st.add_argument("--cascade", type=Path, help="cascade settings (fit-cascade --out) for the manifest")
    m.set_defaults(func=_models)
