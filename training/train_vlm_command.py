"""`catcascade vlm-data` and `catcascade train-vlm`: verification data from a labelled image
folder and the bundle's CNN, then a LoRA adapter that `catcascade serve-vlm` / vLLM serves."""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from catcascade.training.train_vlm import DEFAULT_BASE_MODEL, TARGET_PARTS, VlmTrainConfig


def _cli_error(message: str):
    from catcascade.errors import CommandError

    return CommandError(message)


def _vlm_data(args) -> int:
    from catcascade.ensemble.bundle import BundleError
    from catcascade.training.image_folder import scan_image_folder, stratified_split
    from catcascade.training.verification_data import bundle_top_k, examples_from_top_k, write_jsonl

    try:
        samples, labels = scan_image_folder(args.images)
    except (FileNotFoundError, ValueError) as e:
        raise _cli_error(str(e)) from None
    if not 0.0 <= args.eval_fraction < 1.0:
        raise _cli_error(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    try:
        top = bundle_top_k(args.bundle, [s.path for s in samples], k=args.k)
    except BundleError as e:
        raise _cli_error(str(e)) from None
    top_of = {s.path: t for s, t in zip(samples, top)}
    train, held_out, _ = stratified_split(samples, (1.0 - args.eval_fraction, args.eval_fraction, 0.0), seed=args.seed)
    out = Path(args.out)
    written = {}
    for name, part, seed in (("train", train, args.seed), ("eval", held_out, args.seed + 1)):
        if not part:
            continue
        items = [(str(s.path), labels[s.label]) for s in part]
        examples = examples_from_top_k(items, labels, [top_of[s.path] for s in part], seed, args.k, args.p_none)
        written[name] = str(write_jsonl(examples, out / f"{name}.jsonl"))
    hit = sum(labels[s.label] in top_of[s.path] for s in samples) / max(1, len(samples))
    print(json.dumps({"files": written, "images": len(samples), "labels": len(labels),
                      f"cnn_top{args.k}_recall": round(hit, 4)}, indent=1))
    return 0


def _train_vlm(args) -> int:
    from catcascade.training.train_vlm import VlmTrainConfig, train_lora
    from catcascade.training.verification_data import VerificationDataError, read_jsonl

    try:
        cfg = VlmTrainConfig(base_model=args.base_model, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                             target=tuple(args.target or ("attention",)), target_modules=args.target_modules,
                             answer_only_loss=not args.full_sequence_loss, epochs=args.epochs,
                             max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                             max_length=args.max_length, gradient_checkpointing=args.gradient_checkpointing,
                             qlora=args.qlora, bf16=args.bf16, seed=args.seed)
    except ValueError as e:
        raise _cli_error(str(e)) from None
    try:
        train = read_jsonl(args.data)
        if args.eval_data:
            held_out = read_jsonl(args.eval_data)
        else:
            random.Random(args.seed).shuffle(train)
            n = int(round(len(train) * args.eval_fraction))
            held_out, train = train[:n], train[n:]
    except (FileNotFoundError, VerificationDataError) as e:
        raise _cli_error(str(e)) from None
    if args.qlora:
        import torch

        if not torch.cuda.is_available():
            raise _cli_error("--qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); drop --qlora to train in "
                             "full precision on this machine")
    if args.attach and not (args.attach / "manifest.json").is_file():
        raise _cli_error(f"--attach: no bundle manifest in {args.attach}")
    local = Path(args.base_model)
    if not local.exists() and (local.is_absolute() or args.base_model.startswith(".")):
        raise _cli_error(f"base model folder not found: {args.base_model}")
    try:
        summary = train_lora(cfg, train, args.out, work_dir=Path(args.out).parent / (Path(args.out).name + "-work"),
                             eval_examples=held_out or None)
    except OSError as e:  # e.g. a hub id that cannot be downloaded here
        raise _cli_error(f"cannot load {args.base_model}: {e}") from None
    if args.attach:
        _attach(args.attach, args.out, args.base_model, summary)
    before = (summary.get("accuracy_before") or {}).get("accuracy")
    after = (summary.get("accuracy_after") or {}).get("accuracy")
    losses = summary["losses"]
    print(json.dumps({"adapter": str(args.out), "steps": summary["steps"], "examples": summary["examples"],
                      "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                      "held_out": (summary.get("accuracy_after") or {}).get("n", 0),
                      "accuracy_before": before, "accuracy_after": after}, indent=1))
    print(f"serve it: catcascade serve-vlm (bundle) or python -m vllm.entrypoints.openai.api_server "
          f"--model {args.base_model} --enable-lora --max-lora-rank {args.rank} --lora-modules cats={args.out}")
    return 0


def _attach(bundle_dir: Path, adapter: Path, base_model: str, summary: dict) -> None:
    """Copies the adapter into BUNDLE/vlm/adapter and points the manifest's vlm section at it
    and at the base model (a hub id, or a local folder by absolute path)."""
    import shutil

    from catcascade.ensemble.bundle import BundleError, VlmSpec, load_bundle

    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as e:
        raise _cli_error(str(e)) from None
    dest = bundle.root / "vlm" / "adapter"
    if dest.resolve() != Path(adapter).resolve():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(adapter, dest)
    local = Path(base_model)
    base = str(local.resolve()) if local.exists() else base_model
    old = bundle.manifest.vlm
    bundle.manifest.vlm = VlmSpec(base_model=base, adapter_dir="vlm/adapter", adapter_name="cats",
                                  served_model_name=old.served_model_name if old else "catcascade-vlm",
                                  scoring_mode=old.scoring_mode if old else "multiple_choice",
                                  max_model_len=max(1024, old.max_model_len if old else 0))
    bundle.manifest.provenance["vlm_train"] = summary
    if bundle.manifest.files is not None:  # a staged bundle lists every file's sha256: the adapter's changed
        bundle.record_files()
    bundle.save()
    print(f"attached to {bundle.root}: vlm base {base}, adapter vlm/adapter (served as 'cats')")


def register(subparsers) -> None:
    d = subparsers.add_parser("vlm-data", help="write VLM verification conversations (JSONL) from a labelled image "
                                               "folder, with the bundle CNN's confusions as hard negatives")
    d.add_argument("--images", type=Path, required=True, help="ImageFolder root: <label>/<image>")
    d.add_argument("--bundle", type=Path, default=Path("artifacts/demo-bundle"), help="bundle whose CNN gives the top-k")
    d.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and eval.jsonl")
    d.add_argument("--k", type=int, default=3, help="candidates per question (plus 'None of these')")
    d.add_argument("--p-none", type=float, default=0.1, help="share of questions whose answer is 'None of these'")
    d.add_argument("--eval-fraction", type=float, default=0.2, help="held-out share (stratified per class)")
    d.add_argument("--seed", type=int, default=0, help="random seed (split, candidate order)")
    d.set_defaults(func=_vlm_data)

    t = subparsers.add_parser("train-vlm", help="LoRA-tune a VLM on verification conversations (TRL + PEFT)")
    t.add_argument("--data", type=Path, required=True, help="JSONL: chat format (vlm-data) or LLaVA conversations")
    t.add_argument("--eval-data", type=Path, help="held-out JSONL (default: hold out --eval-fraction of --data)")
    t.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of --data without --eval-data")
    t.add_argument("--out", type=Path, required=True, help="adapter folder (PEFT), served by vLLM with --lora-modules")
    t.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="hub id or local folder of an instruct VLM")
    defaults = VlmTrainConfig()  # one set of defaults: the config's
    t.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank")
    t.add_argument("--alpha", type=int, default=defaults.alpha, help="LoRA alpha (scaling = alpha / rank)")
    t.add_argument("--dropout", type=float, default=defaults.dropout, help="LoRA dropout")
    t.add_argument("--target", action="append", choices=sorted(TARGET_PARTS),
                   help="parts to adapt (repeatable; default attention). vision: vLLM drops vision-tower LoRA")
    t.add_argument("--target-modules", help="PEFT target_modules regex (overrides --target)")
    t.add_argument("--full-sequence-loss", action="store_true", help="loss on every token, not only the answer")
    t.add_argument("--epochs", type=float, default=defaults.epochs, help="passes over the training data")
    t.add_argument("--max-steps", type=int, default=defaults.max_steps, help="optimizer steps at most; -1: --epochs")
    t.add_argument("--batch-size", type=int, default=defaults.batch_size, help="examples per step")
    t.add_argument("--lr", type=float, default=defaults.lr, help="learning rate")
    t.add_argument("--max-length", type=int, default=defaults.max_length, help="token limit per example")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory, slower")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    t.add_argument("--qlora", action="store_true", help="4-bit NF4 base (bitsandbytes; CUDA only)")
    t.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    t.add_argument("--attach", type=Path, metavar="BUNDLE",
                   help="then copy the adapter into BUNDLE/vlm/adapter and set the manifest's VLM (base + adapter)")
    t.set_defaults(func=_train_vlm)
