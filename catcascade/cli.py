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
    "catcascade.client.classify_command",
    "catcascade.demo",
    "catcascade.serving.engines.ray_local_cluster",
    "catcascade.serving.model_repository.commands",
    "catcascade.training.train_cnn_command",
    "catcascade.training.train_vlm_command",
    "catcascade.training.score_command",
    "catcascade.training.oxford_pets_download",
    "catcascade.ensemble.cli_commands",
]
# The benchmarks live in the source tree, not in the installed package: their commands are
# there in a checkout and absent from a wheel install.
SOURCE_TREE_REGISTRARS: list[str] = ["benchmarks.latency", "benchmarks.accuracy"]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every flag's help that has a default and does not state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default in (None, argparse.SUPPRESS) or "default" in text
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            if isinstance(action.default, (list, tuple)):
                return text + " (default: " + " ".join(str(v) for v in action.default).replace("%", "%%") + ")"
            return text + " (default: %(default)s)"
        return text


class CommandParser(argparse.ArgumentParser):
    """Every parser and subparser of the command line shows its defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from catcascade import __version__

    p = CommandParser(prog="catcascade", description="Two-stage cat breed classification (CNN + VLM) over gRPC.")
    p.add_argument("--version", action="version", version=f"catcascade {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=CommandParser, metavar="COMMAND",
                           help="one of these; `catcascade COMMAND --help` lists its flags")
    for module in COMMAND_REGISTRARS:
        importlib.import_module(module).register(sub)
    for module in SOURCE_TREE_REGISTRARS:
        try:
            registrar = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module.split(".")[0]:
                raise
            continue
        registrar.register(sub)
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
