"""The `catcascade` command line: every subcommand registers, errors are messages with exit codes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from catcascade.cli import COMMAND_REGISTRARS, build_parser, main


def test_every_registered_subcommand_builds():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"serve", "classify", "demo", "build-demo", "serve-vlm"} <= set(commands)
    assert len(commands) >= 5 + len(COMMAND_REGISTRARS)


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "catcascade", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "classify" in out.stdout


def test_classify_missing_file_is_a_clear_error(capsys):
    assert main(["classify", "/no/such/cat.jpg"]) == 2
    assert "no such image file" in capsys.readouterr().err


def test_classify_unreachable_server_is_a_clear_error(tmp_path, capsys):
    from tests.conftest import jpeg_bytes
    from catcascade.vlm_stage.vllm_server import free_port

    img = tmp_path / "cat.jpg"
    img.write_bytes(jpeg_bytes())
    assert main(["classify", "--target", f"127.0.0.1:{free_port()}", "--timeout", "2", str(img)]) == 2
    assert "cannot reach a catcascade server" in capsys.readouterr().err


def test_serve_with_invalid_config_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "service.yaml"
    cfg.write_text("bundle: /nowhere\nlimits: {max_inflight_requests: 0}\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "invalid configuration" in capsys.readouterr().err
    assert main(["serve", "--bundle", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["classify"], ["nonsense"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_serve_flags_layer_over_the_yaml_config(tmp_path):
    from catcascade.cli import build_parser
    from catcascade.serving.commands import serve_config_from_args

    cfg = tmp_path / "service.yaml"
    cfg.write_text("bundle: /b\nport: 6000\nvlm: {urls: ['http://a:1'], timeout_s: 3}\nlimits: {max_inflight_requests: 7}\n")
    args = build_parser().parse_args(["serve", "--config", str(cfg), "--port", "7000",
                                      "--vlm-url", "http://b:2", "--precision", "int8"])
    c = serve_config_from_args(args)
    assert c.port == 7000 and c.vlm.urls == ["http://b:2"] and c.vlm.timeout_s == 3
    assert c.limits.max_inflight_requests == 7 and c.cnn_precision == "int8" and str(c.bundle) == "/b"
    plain = serve_config_from_args(build_parser().parse_args(["serve"]))
    assert plain.port == 50051 and plain.vlm.backend == "none"


def _every_parser(parser, path=()):
    """(command path, parser) for the root and every subcommand, nested ones included."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _every_parser(sub, (*path, name))


def test_every_flag_and_argument_of_every_command_has_help():
    import argparse

    missing = [f"{' '.join(path) or 'catcascade'} {a.option_strings[0] if a.option_strings else a.dest}"
               for path, p in _every_parser(build_parser()) for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert missing == []


def test_every_help_shows_the_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per flag: no wrapping inside a default
    parsers = list(_every_parser(build_parser()))
    assert len(parsers) > 20
    for path, p in parsers:
        text = p.format_help()  # also checks that every help string formats (a stray % would raise)
        for a in p._actions:
            if a.option_strings and a.default not in (None, False) and a.help and "==SUPPRESS==" not in str(a.default):
                shown = " ".join(map(str, a.default)) if isinstance(a.default, (list, tuple)) else str(a.default)
                assert "default" in a.help or f"(default: {shown})" in " ".join(text.split()), (path, a.dest)
    serve_vlm = dict(parsers)[("serve-vlm",)].format_help()
    assert "(default: 8000)" in serve_vlm and "(default: 0.9)" in " ".join(serve_vlm.split())


def test_version_flag_prints_the_package_version(capsys):
    import catcascade

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"catcascade {catcascade.__version__}"
    assert catcascade.__version__.count(".") == 2


def test_models_help_names_every_action_stage_included():
    commands = build_parser()._subparsers._group_actions[0]
    models_help = next(a.help for a in commands._choices_actions if a.dest == "models")
    actions = ("stage", "list", "reload", "candidate", "promote", "rollback", "report")
    assert all(a in models_help for a in actions), models_help
    assert {("models", a) for a in actions} <= set(dict(_every_parser(build_parser())))


def test_serve_auth_and_tls_flags_map_onto_the_config(tmp_path, monkeypatch):
    from catcascade.errors import CommandError
    from catcascade.serving.commands import serve_config_from_args

    for name in ("server.pem", "server.key", "ca.pem"):
        (tmp_path / name).write_text("x")
    monkeypatch.setenv("MY_TOKENS", " tok-a , tok-b ")
    args = build_parser().parse_args(["serve", "--auth-tokens-env", "MY_TOKENS", "--tls-cert", str(tmp_path / "server.pem"),
                                      "--tls-key", str(tmp_path / "server.key"),
                                      "--tls-client-ca", str(tmp_path / "ca.pem")])
    c = serve_config_from_args(args)
    assert c.auth.bearer_tokens_env == "MY_TOKENS"
    assert c.tls.cert_file.name == "server.pem" and c.tls.key_file.name == "server.key"
    assert c.tls.client_ca_file.name == "ca.pem"
    plain = serve_config_from_args(build_parser().parse_args(["serve"]))
    assert plain.tls is None and plain.auth.bearer_tokens_env is None
    with pytest.raises(CommandError, match="--tls-key"):
        serve_config_from_args(build_parser().parse_args(["serve", "--tls-cert", str(tmp_path / "server.pem")]))


def test_serve_vlm_passes_the_args_after_a_double_dash_to_vllm(tmp_path):
    from catcascade.vlm_stage.vllm_server import VllmServerConfig

    args = build_parser().parse_args(["serve-vlm", "--port", "8100", "--gpu-memory-utilization", "0.5", "--",
                                      "--tensor-parallel-size", "2", "--max-num-seqs", "64"])
    assert args.vllm_args == ["--tensor-parallel-size", "2", "--max-num-seqs", "64"]
    assert args.gpu_memory_utilization == 0.5
    assert build_parser().parse_args(["serve-vlm"]).gpu_memory_utilization == VllmServerConfig.gpu_memory_utilization
    cfg = VllmServerConfig(model="m", served_model_name="m", gpu_memory_utilization=args.gpu_memory_utilization,
                           extra_args=args.vllm_args)
    gpu = cfg.command(port=8100, cuda=True)
    assert gpu[-4:] == ["--tensor-parallel-size", "2", "--max-num-seqs", "64"]
    assert gpu[gpu.index("--gpu-memory-utilization") + 1] == "0.5"


def test_train_vlm_defaults_are_the_config_defaults():
    from catcascade.training.train_vlm import VlmTrainConfig

    args = build_parser().parse_args(["train-vlm", "--data", "d.jsonl", "--out", "a"])
    cfg = VlmTrainConfig()
    assert (args.rank, args.alpha, args.dropout, args.lr) == (cfg.rank, cfg.alpha, cfg.dropout, cfg.lr) == (16, 32, 0.05, 2e-4)
