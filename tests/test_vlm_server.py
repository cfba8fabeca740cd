"""The flags `catcascade serve-vlm` gives vLLM (the server itself runs in the integration tests)."""
from __future__ import annotations

import json

import pytest

from catcascade.vlm_stage.vllm_server import VllmServerConfig


def _adapter(tmp_path, name: str, rank: int):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return str(d)


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_command_carries_prefix_caching_lora_length_and_one_image(tmp_path):
    cfg = VllmServerConfig(model="/m", served_model_name="base", lora_modules={"cats": _adapter(tmp_path, "a", 8)},
                           max_model_len=768, max_lora_rank=16)
    cmd = cfg.command(8123)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(cmd, "--model") == "/m" and _flag(cmd, "--served-model-name") == "base"
    assert "--enable-prefix-caching" in cmd and "--no-enable-prefix-caching" not in cmd
    assert json.loads(_flag(cmd, "--limit-mm-per-prompt")) == {"image": 1}
    assert _flag(cmd, "--max-model-len") == "768" and _flag(cmd, "--port") == "8123"
    assert "--enable-lora" in cmd and _flag(cmd, "--max-lora-rank") == "16"
    assert _flag(cmd, "--lora-modules") == f"cats={tmp_path / 'a'}"
    # top_logprobs after the allowed_token_ids mask, which the client's default constraint needs
    assert _flag(cmd, "--logprobs-mode") == "processed_logprobs"


def test_dtype_is_float32_on_a_cpu_unless_asked(monkeypatch):
    import catcascade.vlm_stage.vllm_server as vs

    monkeypatch.setattr(vs, "_has_cuda", lambda: False)
    assert _flag(VllmServerConfig(model="/m").command(1), "--dtype") == "float32"
    assert _flag(VllmServerConfig(model="/m", dtype="bfloat16").command(1), "--dtype") == "bfloat16"
    monkeypatch.setattr(vs, "_has_cuda", lambda: True)
    assert "--dtype" not in VllmServerConfig(model="/m").command(1)
    assert _flag(VllmServerConfig(model="/m", dtype="bfloat16").command(1), "--dtype") == "bfloat16"


def test_max_lora_rank_is_raised_to_fit_the_largest_adapter(tmp_path):
    cfg = VllmServerConfig(model="/m", lora_modules={"a": _adapter(tmp_path, "a", 8), "b": _adapter(tmp_path, "b", 24)})
    cmd = cfg.command(1)
    assert _flag(cmd, "--max-lora-rank") == "32" and _flag(cmd, "--max-loras") == "4"
    assert _flag(VllmServerConfig(model="/m", lora_modules=cfg.lora_modules, max_loras=1).command(1),
                 "--max-loras") == "2"  # never fewer than the adapters loaded at start
    assert cmd[cmd.index("--lora-modules") + 1:cmd.index("--lora-modules") + 3] == [
        f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]


def test_no_adapters_and_no_runtime_lora_no_lora_flags_and_prefix_caching_can_be_turned_off():
    cmd = VllmServerConfig(model="/m", prefix_caching=False, runtime_lora=False).command(1)
    assert "--enable-lora" not in cmd and "--no-enable-prefix-caching" in cmd


def test_runtime_lora_enables_lora_without_adapters_at_start():
    cmd = VllmServerConfig(model="/m").command(1)
    assert "--enable-lora" in cmd and "--lora-modules" not in cmd
    assert _flag(cmd, "--max-loras") == "4" and _flag(cmd, "--max-lora-rank") == "16"


@pytest.mark.parametrize("kwargs,message", [
    ({"max_lora_rank": 12}, "max_lora_rank must be one of"),
    ({"max_model_len": 8}, "max_model_len"),
    ({"dtype": "int4"}, "dtype must be"),
    ({"lora_modules": {"cats": "/nonexistent/adapter"}}, "no adapter_config.json"),
])
def test_bad_server_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VllmServerConfig(model="/m", **kwargs)
