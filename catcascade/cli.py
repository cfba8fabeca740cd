"""The ``catcascade`` command line. Each layer owns its subcommands (a module with
``register(subparsers)``, which adds parsers with ``set_defaults(func=...)``; func(args) returns
an exit code or raises ``catcascade.errors.CommandError``); this module only assembles them."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from catcascade.errors import CommandError

# Imported when the parser is built, so `catcascade --help` stays fast (heavy imports live
# inside the handlers); add one line per feature module.
COMMAND_REGISTRARS: list[str] = [
    "catcascade.serving.commands",
    "catcascade.serving.engines.ray_local_cluster",
    "catcascade.serving.model_repository.commands",
    "catcascade.training.train_cnn_command",
    "catcascade.training.train_vlm_command",
    "catcascade.training.score_command",
    "catcascade.ensemble.cli_commands",
    "benchmarks.latency",
    "benchmarks.accuracy",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="catcascade", description="Two-stage cat breed classification (CNN + VLM) over gRPC.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_REGISTRARS:
        importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # bitsandbytes (imported by peft) warns at import on CPU-only machines about optional kernels.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except CommandError as e:
        print(f"catcascade: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
