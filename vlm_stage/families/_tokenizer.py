"""A byte-level BPE tokenizer trained in a second on the prompt vocabulary, for tiny models."""
from __future__ import annotations


def prompt_corpus(labels: list[str], user: str, assistant: str, end: str) -> list[str]:
    """The verification prompts and answers rendered with a family's turn markers, so the
    options ("A", "yes") become tokens of their own after the assistant marker."""
    from catcascade.vlm_stage.prompts import build_multiple_choice, build_yes_no

    texts = []
    for i in range(0, len(labels), 3):
        p = build_multiple_choice(labels[i:i + 3])
        texts.append(f"{user}{p.before_image}\n{p.after_image}{assistant}A{end}\nB C D")
    texts += [f"{build_yes_no(label).after_image}{assistant}yes{end}\nno{end}" for label in labels]
    return texts * 20


def train_bpe(corpus: list[str], special_tokens: list[str], vocab_size: int = 800):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=special_tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok
