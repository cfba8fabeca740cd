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
