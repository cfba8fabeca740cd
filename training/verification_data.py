"""Verification examples for the VLM: an image, the CNN's candidate list, the right letter.

Candidates are the true breed plus hard negatives: the CNN's own confusions (its top-k on the
image, computed with the bundle's ONNX model), topped up with random other breeds, shuffled
per example to avoid position bias; sometimes the true breed is left out and the answer is
"None of these". Examples are written as JSONL chat conversations; the widely used LLaVA
conversation format (``{"image", "conversations": [{"from": "human"}, {"from": "gpt"}]}``) is
read as well.
"""
from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from catcascade.errors import CatcascadeError
from catcascade.vlm_stage.prompts import Prompt, build_multiple_choice

log = logging.getLogger(__name__)
IMAGE_PLACEHOLDER = "<image>"
_OPTION_LINE = re.compile(r"^\s*([A-T])[.)]\s", re.MULTILINE)


class VerificationDataError(CatcascadeError, ValueError):
    """A JSONL line that is not a usable verification conversation; says which and why."""


@dataclass(frozen=True)
class VerificationExample:
    image_path: str
    label: str
    candidates: tuple[str, ...]
    answer: str
    """The letter of the right option (the "none" letter when the label is not a candidate)."""

    def prompt(self, include_none: bool = True) -> Prompt:
        return build_multiple_choice(self.candidates, include_none)

    def to_conversation(self) -> "Conversation":
        return Conversation(self.image_path, self.prompt(), self.answer, self.label, self.candidates)


@dataclass(frozen=True)
class Conversation:
    """One single-turn training/evaluation conversation: user (text, image, text) -> answer.

    ``prompt.choices`` holds the option letters found in the question (empty for free-form
    answers, which can be trained on but not scored)."""

    image_path: str
    prompt: Prompt
    answer: str
    label: str | None = None
    candidates: tuple[str, ...] = ()

    def messages(self) -> list[dict]:
        """User + assistant turns with a placeholder image part, as TRL and chat templates take them."""
        return self.prompt.messages({"type": "image"}) + [
            {"role": "assistant", "content": [{"type": "text", "text": self.answer}]}]


def make_example(image_path: str, label: str, all_labels: list[str], rng: random.Random, k: int = 3,
                 confusions: list[str] | None = None, p_none: float = 0.1) -> VerificationExample:
    """One shuffled multiple-choice example; ``confusions`` (e.g. the CNN's top-k) come first
    among the negatives, random other labels fill the rest."""
    if label not in all_labels:
        raise ValueError(f"label {label!r} is not one of the {len(all_labels)} labels")
    if not 1 <= k < len(all_labels) + 1:
        raise ValueError(f"k must be in 1..{len(all_labels)}, got {k}")
    others = list(dict.fromkeys(c for c in (confusions or []) if c != label))
    pool = [c for c in all_labels if c != label and c not in others]
    rng.shuffle(pool)
    negatives = (others + pool)[: k]
    include_true = rng.random() >= p_none
    cands = ([label] + negatives[: k - 1]) if include_true else negatives[:k]
    rng.shuffle(cands)
    letters = build_multiple_choice(cands).choices
    answer = letters[cands.index(label)] if include_true else letters[-1]
    return VerificationExample(image_path, label, tuple(cands), answer)


def cnn_top_k(onnx_path: str | Path, preprocess_config, labels: list[str], image_paths: list[str | Path],
              k: int = 3, temperature: float = 1.0, batch_size: int = 32, progress: bool = True) -> list[tuple[str, ...]]:
    """The CNN's top-k labels per image (ONNX Runtime, the serving preprocessing): the
    confusions the VLM must learn to resolve."""
    import numpy as np
    from tqdm import tqdm

    from catcascade.cnn_stage.onnx_runtime import OnnxClassifier
    from catcascade.cnn_stage.preprocessing import decode_image, preprocess
    from catcascade.cnn_stage.topk import softmax, top_k

    clf = OnnxClassifier(onnx_path)
    out: list[tuple[str, ...]] = []
    paths = [Path(p) for p in image_paths]
    for i in tqdm(range(0, len(paths), batch_size), desc="CNN top-k", disable=not progress, unit="batch"):
        batch = np.stack([preprocess(decode_image(p.read_bytes()), preprocess_config) for p in paths[i:i + batch_size]])
        probs = softmax(clf.run(batch), temperature)
        out += [top_k(row, labels, k).labels for row in probs]
    return out


def bundle_top_k(bundle_dir: str | Path, image_paths: list[str | Path], k: int = 3, progress: bool = True):
    """``cnn_top_k`` with the model, preprocessing, labels and temperature of a bundle."""
    from catcascade.ensemble.bundle import load_bundle

    b = load_bundle(bundle_dir)
    return cnn_top_k(b.cnn_path, b.preprocess, b.labels, image_paths, k, b.manifest.cnn.temperature, progress=progress)


def examples_from_top_k(items: list[tuple[str, str]], labels: list[str], top_ks: list[tuple[str, ...]],
                        seed: int = 0, k: int = 3, p_none: float = 0.1) -> list[VerificationExample]:
    """``items`` are (image path, true label); the CNN's top-k of each supplies its hard negatives."""
    if len(items) != len(top_ks):
        raise ValueError(f"{len(items)} images but {len(top_ks)} top-k lists")
    rng = random.Random(seed)
    return [make_example(str(path), label, labels, rng, k, list(top), p_none)
            for (path, label), top in zip(items, top_ks)]


# ---- JSONL -----------------------------------------------------------------------------------

def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def write_jsonl(examples: list[VerificationExample], path: str | Path) -> Path:
    """One chat conversation per line; image paths relative to the file's folder when inside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for e in examples:
            record = {"image": _relative(e.image_path, path.parent), "label": e.label,
                      "candidates": list(e.candidates), "answer": e.answer,
                      "messages": e.to_conversation().messages()}
            f.write(json.dumps(record) + "\n")
    return path


def _text_of(content) -> tuple[str, str, bool]:
    """(text before the image, text after it, whether an image part was present)."""
    if isinstance(content, str):
        return _split_placeholder(content)
    before, after, seen = [], [], False
    for part in content:
        kind = part.get("type")
        if kind in ("image", "image_url"):
            seen = True
        elif kind == "text":
            (after if seen else before).append(part.get("text", ""))
    return "".join(before), "".join(after), seen


def _split_placeholder(text: str) -> tuple[str, str, bool]:
    if IMAGE_PLACEHOLDER not in text:
        return "", text, False
    if text.count(IMAGE_PLACEHOLDER) > 1:
        raise VerificationDataError(f"more than one {IMAGE_PLACEHOLDER} in one turn (one image per prompt)")
    before, after = text.split(IMAGE_PLACEHOLDER)
    return before.rstrip("\n"), after.lstrip("\n"), True


def _parse_record(record: dict, root: Path) -> Conversation:
    if not isinstance(record, dict) or "image" not in record:
        raise VerificationDataError("each line must be a JSON object with an \"image\" field")
    if "messages" in record:  # our chat format (also OpenAI-style role/content)
        turns = [(m.get("role"), m.get("content")) for m in record["messages"]]
        user_roles, bot_roles = {"user"}, {"assistant"}
    elif "conversations" in record:  # LLaVA format
        turns = [(m.get("from"), m.get("value")) for m in record["conversations"]]
        user_roles, bot_roles = {"human", "user"}, {"gpt", "assistant"}
    else:
        raise VerificationDataError("expected a \"messages\" list (chat format) or a \"conversations\" list (LLaVA format)")
    if len(turns) < 2 or turns[0][0] not in user_roles or turns[1][0] not in bot_roles:
        raise VerificationDataError(f"expected a user turn then an assistant turn, got roles {[r for r, _ in turns[:3]]}")
    if len(turns) > 2:
        log.warning("only the first question/answer pair of a %d-turn conversation is used", len(turns))
    before, after, _ = _text_of(turns[0][1])
    answer_before, answer_after, _ = _text_of(turns[1][1])
    answer = (answer_before + answer_after).strip()
    if not answer:
        raise VerificationDataError("the assistant turn is empty")
    choices = tuple(_OPTION_LINE.findall(before + "\n" + after))
    image = Path(str(record["image"]))
    image = image if image.is_absolute() else root / image
    if not image.is_file():
        raise VerificationDataError(f"image not found: {image}")
    return Conversation(str(image), Prompt(before, after, choices), answer, record.get("label"),
                        tuple(record.get("candidates") or ()))


def read_jsonl(path: str | Path, image_root: str | Path | None = None) -> list[Conversation]:
    """Reads verification conversations (this project's chat format or LLaVA's); relative image
    paths are resolved against ``image_root`` (default: the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification data not found: {path}")
    root = Path(image_root) if image_root else path.parent
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(_parse_record(json.loads(line), root))
            except json.JSONDecodeError as e:
                raise VerificationDataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except VerificationDataError as e:
                raise VerificationDataError(f"{path}:{n}: {e}") from None
    if not out:
        raise VerificationDataError(f"{path} holds no conversations")
    return out
