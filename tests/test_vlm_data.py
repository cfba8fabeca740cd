"""Verification data: hard negatives from the CNN, shuffled options, JSONL in both formats."""
from __future__ import annotations

import collections
import json
import random

import pytest
from PIL import Image

from catcascade.training.verification_data import (Conversation, VerificationDataError, examples_from_top_k, make_example,
                                        read_jsonl, write_jsonl)
from catcascade.vlm_stage.prompts import NONE_OPTION

LABELS = ["Abyssinian", "Bengal", "Birman", "Bombay", "Persian", "Siamese"]


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, label in enumerate(LABELS):
        (tmp_path / "img" / label).mkdir(parents=True)
        p = tmp_path / "img" / label / f"{i}.jpg"
        Image.new("RGB", (32, 32), (40 * i, 20, 200)).save(p)
        paths.append((str(p), label))
    return paths


def test_hard_negatives_come_from_the_cnn_confusions():
    rng = random.Random(0)
    for _ in range(50):
        e = make_example("x.jpg", "Persian", LABELS, rng, k=3, confusions=["Persian", "Birman", "Bombay"], p_none=0.0)
        assert set(e.candidates) == {"Persian", "Birman", "Bombay"}
        assert e.candidates[ord(e.answer) - ord("A")] == "Persian"


def test_candidate_order_is_shuffled_per_example():
    rng = random.Random(1)
    answers = collections.Counter(make_example("x.jpg", "Persian", LABELS, rng, p_none=0.0).answer for _ in range(300))
    assert set(answers) == {"A", "B", "C"} and min(answers.values()) > 60  # no position bias


def test_none_of_these_when_the_label_is_left_out():
    rng = random.Random(2)
    examples = [make_example("x.jpg", "Persian", LABELS, rng, p_none=1.0) for _ in range(20)]
    assert all("Persian" not in e.candidates and e.answer == "D" for e in examples)
    assert f"D. {NONE_OPTION}" in examples[0].prompt().after_image


def test_make_example_rejects_unknown_label():
    with pytest.raises(ValueError, match="not one of"):
        make_example("x.jpg", "Dog", LABELS, random.Random(0))


def test_chat_jsonl_round_trip(images, tmp_path):
    tops = [tuple(LABELS[(i + j) % len(LABELS)] for j in range(3)) for i in range(len(images))]
    examples = examples_from_top_k(images, LABELS, tops, seed=0, p_none=0.0)
    path = write_jsonl(examples, tmp_path / "train.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    assert first["image"].startswith("img/")  # relative to the file's folder
    user, assistant = first["messages"]
    assert [c["type"] for c in user["content"]] == ["text", "image", "text"]
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": examples[0].answer}]}
    convs = read_jsonl(path)
    assert [c.answer for c in convs] == [e.answer for e in examples]
    assert convs[0].prompt == examples[0].prompt() and convs[0].prompt.choices == ("A", "B", "C", "D")
    assert convs[0].image_path == images[0][0] and convs[0].candidates == examples[0].candidates


def test_llava_conversation_format_is_accepted(images, tmp_path):
    path = tmp_path / "llava.jsonl"
    rec = {"id": "1", "image": "img/Persian/4.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhich breed?\nA. Persian\nB. Siamese\nC. None of these\nAnswer with the letter."},
        {"from": "gpt", "value": "A"}]}
    path.write_text(json.dumps(rec) + "\n\n")
    (conv,) = read_jsonl(path)
    assert isinstance(conv, Conversation) and conv.answer == "A" and conv.prompt.choices == ("A", "B", "C")
    assert conv.prompt.before_image == "" and conv.prompt.after_image.startswith("Which breed?")
    assert [c["type"] for c in conv.messages()[0]["content"]] == ["text", "image", "text"]


@pytest.mark.parametrize("record,message", [
    ({"image": "img/Persian/4.jpg"}, "expected a \"messages\" list"),
    ({"image": "img/Persian/4.jpg", "conversations": [{"from": "gpt", "value": "A"}]}, "user turn then an assistant"),
    ({"image": "img/missing.jpg", "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "A"}]},
     "image not found"),
    ({"image": "img/Persian/4.jpg", "conversations": [{"from": "human", "value": "<image><image>"},
                                                      {"from": "gpt", "value": "A"}]}, "more than one <image>"),
    ({"image": "img/Persian/4.jpg", "conversations": [{"from": "human", "value": "<image>?"},
                                                      {"from": "gpt", "value": " "}]}, "assistant turn is empty"),
])
def test_bad_lines_are_refused_with_the_line_number(images, tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"image": "img/Persian/4.jpg", "conversations": [
        {"from": "human", "value": "<image>\nA. x\nB. y"}, {"from": "gpt", "value": "B"}]}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(VerificationDataError, match=f"bad.jsonl:2: .*{message}"):
        read_jsonl(path)


def test_invalid_json_and_empty_files(tmp_path):
    (tmp_path / "a.jsonl").write_text("{not json\n")
    with pytest.raises(VerificationDataError, match="a.jsonl:1: not valid JSON"):
        read_jsonl(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text("\n")
    with pytest.raises(VerificationDataError, match="no conversations"):
        read_jsonl(tmp_path / "b.jsonl")


@pytest.mark.integration
def test_cnn_top_k_from_the_bundle_supplies_the_negatives(demo_bundle):
    """The bundle's ONNX CNN ranks its own training images: the true label is almost always in
    its top-3, and the other two are what the VLM sees as hard negatives."""
    from catcascade.ensemble.bundle import load_bundle
    from catcascade.training.image_folder import scan_image_folder
    from catcascade.training.verification_data import bundle_top_k

    samples, labels = scan_image_folder(demo_bundle / "data")
    assert labels == load_bundle(demo_bundle).labels
    part = samples[::10]
    tops = bundle_top_k(demo_bundle, [s.path for s in part], k=3, progress=False)
    assert all(len(t) == 3 and len(set(t)) == 3 for t in tops)
    recall = sum(labels[s.label] in t for s, t in zip(part, tops)) / len(part)
    assert recall > 0.6, recall
    items = [(str(s.path), labels[s.label]) for s in part]
    for e, t in zip(examples_from_top_k(items, labels, tops, p_none=0.0), tops):
        negatives = [c for c in t if c != e.label][:2]
        assert set(negatives) <= set(e.candidates)
