"""Builds the embedded default bundle: everything `make demo` and the tests need, offline.

1. a synthetic labelled image set (training/synthetic_data.py),
2. a convnext_atto fine-tuned on it with progressive unfreezing, temperature-calibrated,
   exported to ONNX,
3. a tiny LLaVA built from a config, and a LoRA adapter trained with TRL on verification
   examples of the same images.
"""
from __future__ import annotations

import json
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
    threshold: float = 0.6
    blend_weight: float = 0.5
    seed: int = 0


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "timm", "onnx", "onnxruntime", "transformers", "peft", "trl"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def build_demo_bundle(out_dir: str | Path, cfg: DemoBundleConfig = DemoBundleConfig(), progress: bool = True) -> Path:
    """Writes a complete bundle to ``out_dir`` (CNN + tiny VLM + adapter) and returns it."""
    from cnn_stage.bundle import Bundle, BundleManifest, CnnSpec, VlmSpec, sha256_file
    from cnn_stage.onnx_export import export_onnx
    from cnn_stage.preprocessing import PreprocessConfig
    from ensemble.config import BlendConfig, CascadeConfig, EscalationConfig
    from ensemble.metrics import expected_calibration_error
    from ensemble.temperature import TemperatureScaler
    from training.image_folder import scan_image_folder, stratified_split
    from training.synthetic_data import DEMO_LABELS, write_synthetic_dataset
    from training.train_cnn import CnnTrainConfig, train_cnn
    from training.train_vlm import VlmTrainConfig, train_lora
    from training.verification_data import make_example
    from vlm_stage.tiny_model import build_tiny_llava

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say = print if progress else log.info
    say(f"[1/4] writing {cfg.per_class * len(DEMO_LABELS)} synthetic images")
    data_dir = write_synthetic_dataset(out / "data", DEMO_LABELS, cfg.per_class, size=96, seed=cfg.seed, progress=progress)
    samples, labels = scan_image_folder(data_dir)
    train, val, test = stratified_split(samples, seed=cfg.seed)
    (out / "data" / "split.json").write_text(json.dumps(
        {name: [str(s.path.relative_to(data_dir)) for s in part] for name, part in
         (("train", train), ("val", val), ("test", test))}, indent=1))

    say("[2/4] fine-tuning convnext_atto (progressive unfreezing)")
    train_cfg = CnnTrainConfig(model="convnext_atto", image_size=cfg.image_size, phase_epochs=cfg.phase_epochs,
                               seed=cfg.seed, progress=progress, patience=10)
    result = train_cnn(train_cfg, train, val, labels, metrics_path=out / "cnn_metrics.jsonl")
    scaler = TemperatureScaler().fit(result.val_logits, result.val_labels)
    ece_before = expected_calibration_error(TemperatureScaler(1.0).predict_proba(result.val_logits), result.val_labels)
    ece_after = expected_calibration_error(scaler.predict_proba(result.val_logits), result.val_labels)
    pp = PreprocessConfig.from_timm(result.model, cfg.image_size)
    parity = export_onnx(result.model, out / "cnn.onnx", cfg.image_size)

    say("[3/4] building the tiny VLM and training its LoRA adapter")
    build_tiny_llava(out / "vlm" / "base", labels, seed=cfg.seed)
    rng = random.Random(cfg.seed)
    examples = [make_example(str(s.path), labels[s.label], labels, rng) for s in train]
    vlm_summary = train_lora(VlmTrainConfig(base_model=str(out / "vlm" / "base"), max_steps=cfg.vlm_train_steps,
                                            seed=cfg.seed), examples, out / "vlm" / "adapter",
                             work_dir=out / "vlm" / "sft-work")

    say("[4/4] writing the manifest")
    manifest = BundleManifest(
        name="catcascade-demo", version=time.strftime("%Y%m%d-%H%M%S"), labels=labels, preprocess=pp.to_dict(),
        cnn=CnnSpec(architecture="convnext_atto", sha256=sha256_file(out / "cnn.onnx"), temperature=scaler.temperature_),
        cascade=CascadeConfig(escalation=EscalationConfig(threshold=cfg.threshold),
                              blend=BlendConfig(weight=cfg.blend_weight)),
        vlm=VlmSpec(base_model="vlm/base", adapter_dir="vlm/adapter", adapter_name="cats"),
        provenance={
            "versions": _versions(), "demo_config": asdict(cfg), "cnn_train_config": asdict(train_cfg),
            "val_balanced_accuracy": result.best_val_balanced_accuracy, "ece_before": ece_before,
            "ece_after": ece_after, "onnx_max_prob_diff": parity, "vlm_train": vlm_summary,
            "build_seconds": round(time.perf_counter() - t0, 1),
        },
    )
    Bundle(out, manifest).save()
    say(f"bundle ready in {time.perf_counter() - t0:.0f} s: {out} (val balanced accuracy "
        f"{result.best_val_balanced_accuracy:.3f}, T={scaler.temperature_:.2f}, ECE {ece_before:.3f} -> {ece_after:.3f})")
    return out
