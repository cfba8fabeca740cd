"""Builds the embedded default bundle: everything `make demo` and the tests need, offline.

1. a synthetic labelled image set (training/synthetic_data.py),
2. a convnext_atto fine-tuned on it with progressive unfreezing, temperature-calibrated,
   exported to ONNX,
3. a tiny LLaVA built from a config, and a LoRA adapter trained with TRL on verification
   examples of the same images.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class DemoBundleConfig:
    image_size: int = 64
    per_class: int = 30
    phase_epochs: tuple[int, ...] = (1, 2)
    vlm_train_steps: int = 12
    vlm_batch_size: int = 8
    vlm_lr: float = 2e-3
    vlm_eval_examples: int = 24
    threshold: float = 0.6
    blend_weight: float = 0.5
    seed: int = 0


def build_demo_bundle(out_dir: str | Path, cfg: DemoBundleConfig = DemoBundleConfig(), progress: bool = True) -> Path:
    """Writes a complete bundle to ``out_dir`` (CNN + tiny VLM + adapter) and returns it."""
    from catcascade.ensemble.bundle import Bundle, BundleManifest, VlmSpec, library_versions
    from catcascade.ensemble.config import BlendConfig, CascadeConfig, EscalationConfig
    from catcascade.ensemble.temperature import TemperatureScaler
    from catcascade.training.cnn_bundle import calibrate_and_export
    from catcascade.training.datasets import DatasetSplit, save_split
    from catcascade.training.image_folder import scan_image_folder, stratified_split
    from catcascade.training.synthetic_data import DEMO_LABELS, write_synthetic_dataset
    from catcascade.training.train_cnn import CnnTrainConfig, train_cnn
    from catcascade.training.train_vlm import VlmTrainConfig, train_lora
    from catcascade.training.verification_data import cnn_top_k, examples_from_top_k
    from catcascade.vlm_stage.tiny_model import build_tiny_llava

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say = print if progress else log.info
    say(f"[1/4] writing {cfg.per_class * len(DEMO_LABELS)} synthetic images")
    data_dir = write_synthetic_dataset(out / "data", DEMO_LABELS, cfg.per_class, size=96, seed=cfg.seed, progress=progress)
    samples, labels = scan_image_folder(data_dir)
    train, val, test = stratified_split(samples, seed=cfg.seed)
    save_split(DatasetSplit(labels, train, val, test), data_dir / "split.json", data_dir, seed=cfg.seed)

    say("[2/4] fine-tuning convnext_atto (progressive unfreezing)")
    train_cfg = CnnTrainConfig(model="convnext_atto", image_size=cfg.image_size, phase_epochs=cfg.phase_epochs,
                               seed=cfg.seed, progress=progress, patience=10)
    result = train_cnn(train_cfg, train, val, labels, metrics_path=out / "cnn_metrics.jsonl")
    cnn = calibrate_and_export(result, out, "convnext_atto", cfg.image_size)
    pp, cal = cnn.preprocess, cnn.report
    scaler = TemperatureScaler(cal["temperature"])

    say("[3/4] building the tiny VLM and training its LoRA adapter")
    build_tiny_llava(out / "vlm" / "base", labels, seed=cfg.seed)
    # Hard negatives are the exported CNN's own confusions (its top-3 on each image). Only as
    # many training images as the steps consume (a random, all-class sample) plus a held-out
    # slice of val for the before/after accuracy.
    rng = random.Random(cfg.seed)
    vlm_train = rng.sample(train, min(len(train), cfg.vlm_train_steps * cfg.vlm_batch_size))
    vlm_eval = rng.sample(val, min(len(val), cfg.vlm_eval_examples))
    vlm_part = vlm_train + vlm_eval
    top3 = cnn_top_k(out / "cnn.onnx", pp, labels, [s.path for s in vlm_part], k=3,
                     temperature=scaler.temperature_, progress=False)
    examples = examples_from_top_k([(str(s.path), labels[s.label]) for s in vlm_part], labels, top3, seed=cfg.seed)
    vlm_summary = train_lora(VlmTrainConfig(base_model=str(out / "vlm" / "base"), max_steps=cfg.vlm_train_steps,
                                            batch_size=cfg.vlm_batch_size, lr=cfg.vlm_lr, seed=cfg.seed,
                                            rank=8, alpha=16, dropout=0.0),  # the tiny demo VLM's adapter
                             examples[: len(vlm_train)], out / "vlm" / "adapter", work_dir=out / "vlm" / "sft-work",
                             eval_examples=examples[len(vlm_train):], progress=progress)

    say("[4/4] writing the manifest")
    manifest = BundleManifest(
        name="catcascade-demo", version=time.strftime("%Y%m%d-%H%M%S"), labels=labels, preprocess=pp.to_dict(),
        cnn=cnn.spec,
        cascade=CascadeConfig(escalation=EscalationConfig(threshold=cfg.threshold),
                              blend=BlendConfig(weight=cfg.blend_weight)),
        vlm=VlmSpec(base_model="vlm/base", adapter_dir="vlm/adapter", adapter_name="cats"),
        provenance={
            "versions": library_versions(), "demo_config": asdict(cfg), "cnn_train_config": asdict(train_cfg),
            "val_balanced_accuracy": result.best_val_balanced_accuracy, "ece_before": cal["ece_before"],
            "ece_after": cal["ece_after"], "onnx_max_prob_diff": cal["onnx_max_prob_diff"], "vlm_train": vlm_summary,
            "build_seconds": round(time.perf_counter() - t0, 1),
        },
    )
    Bundle(out, manifest).save()
    say(f"bundle ready in {time.perf_counter() - t0:.0f} s: {out} (val balanced accuracy "
        f"{result.best_val_balanced_accuracy:.3f}, T={cal['temperature']:.2f}, ECE {cal['ece_before']:.3f} -> "
        f"{cal['ece_after']:.3f})")
    return out
