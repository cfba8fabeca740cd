"""LoRA fine-tuning of the tiny VLM on CPU with TRL + PEFT, and the `train-vlm` command."""
from __future__ import annotations

import json
import logging
import random
import re

import pytest

from catcascade.training.train_vlm import VlmTrainConfig, target_modules_regex, train_lora
from catcascade.training.verification_data import make_example

LABELS = ["Abyssinian", "Bengal", "Birman", "Bombay", "Persian", "Siamese"]


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Synthetic images whose class is their colour, as verification examples."""
    from catcascade.training.synthetic_data import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path_factory.mktemp("vlm-data") / "img", LABELS, 6, size=64, seed=0,
                                   progress=False)
    rng = random.Random(0)
    return [make_example(str(p), label, LABELS, rng) for label in LABELS for p in sorted((root / label).iterdir())]


def _report(stdout: str) -> dict:
    """The command's closing JSON summary (trainer logs may precede it on stdout)."""
    body = stdout[stdout.rindex('{\n "adapter"'):]
    return json.loads(body.split("\nserve it:")[0])


def _module_names(model_dir):
    from transformers import AutoModelForImageTextToText

    return [n for n, _ in AutoModelForImageTextToText.from_pretrained(model_dir).named_modules()]


def test_lora_training_on_cpu_lowers_the_loss_and_changes_the_scores(tiny_vlm, examples, tmp_path):
    from PIL import Image

    from catcascade.vlm_stage.transformers_backend import TransformersBackendConfig, TransformersVerifier

    cfg = VlmTrainConfig(base_model=str(tiny_vlm), rank=4, alpha=8, max_steps=8, batch_size=6, lr=5e-3)
    summary = train_lora(cfg, examples[:30], tmp_path / "adapter", eval_examples=examples[30:], progress=False)
    losses = summary["losses"]
    assert summary["steps"] == 8 and len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert summary["accuracy_before"]["n"] == summary["accuracy_after"]["n"] == 6
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and "language_model" in adapter_cfg["target_modules"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adapter" / "train_summary.json").read_text())["losses"] == losses

    img = Image.open(examples[0].image_path).convert("RGB")
    base = TransformersVerifier(TransformersBackendConfig(model=str(tiny_vlm)))
    tuned = TransformersVerifier(TransformersBackendConfig(model=str(tiny_vlm), adapter=str(tmp_path / "adapter")))
    before, after = base.score(img, examples[0].candidates), tuned.score(img, examples[0].candidates)
    assert max(abs(a - b) for a, b in zip(before.probabilities, after.probabilities)) > 1e-3

    def held_out_accuracy(verifier):
        """The served scoring, one image at a time: the most likely option against the answer."""
        right = 0
        for e in examples[30:]:
            with Image.open(e.image_path) as im:
                s = verifier.score(im.convert("RGB"), e.candidates)
            options = (*s.probabilities, s.none_probability)
            right += e.prompt().choices[options.index(max(options))] == e.answer
        return right / 6

    assert summary["accuracy_before"]["accuracy"] == held_out_accuracy(base)
    assert summary["accuracy_after"]["accuracy"] == held_out_accuracy(tuned)


def test_loss_covers_the_answer_tokens_only(tiny_vlm, examples):
    """Prompt/completion rows: labels are -100 everywhere but the answer letter and </s>; the
    letter is the very token the served scoring reads (train/serve consistency)."""
    from transformers import AutoProcessor
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from catcascade.training.train_vlm import _row
    from catcascade.vlm_stage.transformers_backend import option_token_ids

    processor = AutoProcessor.from_pretrained(tiny_vlm)
    convs = [e.to_conversation() for e in examples[:4]]
    batch = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)([_row(c, True) for c in convs])
    for labels, conv in zip(batch["labels"], convs):
        kept = labels[labels != -100].tolist()
        letter_id = option_token_ids(processor.tokenizer, conv.prompt.choices)[conv.prompt.choices.index(conv.answer)]
        assert kept == [letter_id, processor.tokenizer.eos_token_id]
    # The tiny model's chat template marks the answer with {% generation %}: TRL's
    # assistant_only_loss on whole conversations selects the same two tokens.
    marked = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)([_row(c, False) for c in convs])
    assert [lab[lab != -100].tolist() for lab in marked["labels"]] == [lab[lab != -100].tolist() for lab in batch["labels"]]
    full = DataCollatorForVisionLanguageModeling(processor)([_row(c, False) for c in convs])
    assert int((full["labels"] != -100).sum()) > 10 * int((batch["labels"] != -100).sum())


def test_target_parts_select_the_right_modules(tiny_vlm):
    names = _module_names(tiny_vlm)

    def hits(parts):
        rx = re.compile(target_modules_regex(parts))
        return [n for n in names if rx.fullmatch(n)]

    attention = hits(("attention",))
    assert attention and all("language_model" in n and n.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj"}
                             for n in attention)
    mlp = set(hits(("attention", "mlp"))) - set(attention)
    assert mlp and {n.rsplit(".", 1)[-1] for n in mlp} == {"gate_proj", "up_proj", "down_proj"}
    vision = hits(("vision",))
    assert vision and all("vision_tower" in n for n in vision)
    with pytest.raises(ValueError, match="subset of"):
        target_modules_regex(("attention", "everything"))


def test_vision_tower_lora_warns_that_vllm_drops_it(caplog):
    with caplog.at_level(logging.WARNING, logger="catcascade.training.train_vlm"):
        VlmTrainConfig(base_model="x", target=("attention", "vision"))
    assert "vLLM serves LoRA on the language model only" in caplog.text


@pytest.mark.parametrize("kwargs,message", [({"rank": 0}, "rank and alpha"), ({"dropout": 1.0}, "dropout"),
                                            ({"target": ("heads",)}, "subset of")])
def test_bad_training_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VlmTrainConfig(base_model="x", **kwargs)


def test_qlora_without_cuda_is_a_clear_error(tiny_vlm, tmp_path):
    import torch

    from catcascade.cli import main
    from catcascade.training.train_vlm import load_base_model

    if torch.cuda.is_available():
        pytest.skip("CUDA present: QLoRA is allowed here")
    with pytest.raises(RuntimeError, match="QLoRA needs a CUDA GPU"):
        load_base_model(VlmTrainConfig(base_model=str(tiny_vlm), qlora=True))
    data = tmp_path / "d.jsonl"
    data.write_text("")
    assert main(["train-vlm", "--data", str(data), "--out", str(tmp_path / "a"), "--qlora"]) == 2


def test_train_vlm_command_on_llava_format_data(tiny_vlm, examples, tmp_path, capsys):
    """`catcascade train-vlm` on LLaVA-style conversations: adapter folder out, held-out
    accuracy before and after, options passed through (MLP target, gradient checkpointing)."""
    from catcascade.cli import main

    lines = []
    for e in examples:
        p = e.prompt()
        lines.append(json.dumps({"image": e.image_path, "conversations": [
            {"from": "human", "value": f"{p.before_image}<image>\n{p.after_image}"}, {"from": "gpt", "value": e.answer}]}))
    (tmp_path / "llava.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "adapter"
    rc = main(["train-vlm", "--data", str(tmp_path / "llava.jsonl"), "--eval-fraction", "0.25", "--out", str(out),
               "--base-model", str(tiny_vlm), "--max-steps", "2", "--batch-size", "4", "--rank", "4", "--alpha", "8",
               "--target", "attention", "--target", "mlp", "--gradient-checkpointing", "--no-bf16"])
    assert rc == 0
    report = _report(capsys.readouterr().out)
    assert report["steps"] == 2 and report["held_out"] == 9 and report["examples"] == 27
    for accuracy in (report["accuracy_before"], report["accuracy_after"]):  # right answers out of 9
        assert 0 <= accuracy <= 1 and accuracy * 9 == pytest.approx(round(accuracy * 9), abs=1e-9)
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["gradient_checkpointing"] is True and "gate_proj" in cfg["target_modules"]
    assert "gate_proj" in json.loads((out / "adapter_config.json").read_text())["target_modules"]


def test_train_vlm_command_refuses_missing_inputs(tmp_path, capsys):
    from catcascade.cli import main

    assert main(["train-vlm", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "a")]) == 2
    assert "verification data not found" in capsys.readouterr().err
    assert main(["vlm-data", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "d")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err


@pytest.mark.integration
def test_vlm_data_then_train_vlm_from_the_bundle(demo_bundle, tmp_path, capsys):
    """The documented workflow: CNN confusions -> JSONL -> LoRA adapter with held-out accuracy."""
    from catcascade.cli import main

    assert main(["vlm-data", "--images", str(demo_bundle / "data"), "--bundle", str(demo_bundle),
                 "--out", str(tmp_path / "vd"), "--eval-fraction", "0.1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cnn_top3_recall"] > 0.6 and set(info["files"]) == {"train", "eval"}
    assert main(["train-vlm", "--data", str(tmp_path / "vd" / "train.jsonl"), "--eval-data",
                 str(tmp_path / "vd" / "eval.jsonl"), "--base-model", str(demo_bundle / "vlm" / "base"),
                 "--out", str(tmp_path / "adapter"), "--max-steps", "3", "--rank", "8", "--lr", "2e-3"]) == 0
    report = _report(capsys.readouterr().out)
    assert report["held_out"] == 36 and report["accuracy_after"] is not None
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
