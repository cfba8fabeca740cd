"""Fine-tunes a timm ConvNeXt with progressive unfreezing and writes an ONNX model bundle.

Phases: phase 0 trains the head, each next phase unfreezes one more stage from the top,
with layer-wise decayed learning rates (AdamW, warm-up + cosine per phase, gradient
clipping, label smoothing). The checkpoint with the best validation balanced accuracy wins;
temperature scaling is fitted on the validation logits and stored in the bundle.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class CnnTrainConfig:
    model: str = "convnext_atto"
    pretrained: bool = False
    checkpoint: str | None = None
    image_size: int = 96
    phase_epochs: tuple[int, ...] = (1, 2, 2)
    """Epochs per unfreezing phase: phase 0 = head only, phase k = head + top k stages."""
    unfreeze_all_last: bool = True
    """The last phase trains every block, whatever its index."""
    batch_size: int = 32
    lr: float = 3e-3
    layer_decay: float = 0.7
    weight_decay: float = 0.05
    warmup_steps: int = 10
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    imbalance: str = "none"
    """none | class_weights | balanced_sampler"""
    train_norm: bool = True
    patience: int = 3
    seed: int = 0
    num_workers: int = 0
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.phase_epochs or any(e < 0 for e in self.phase_epochs):
            raise ValueError(f"phase_epochs must be non-negative epoch counts, got {self.phase_epochs}")
        if self.imbalance not in ("none", "class_weights", "balanced_sampler"):
            raise ValueError(f"imbalance must be none, class_weights or balanced_sampler, got {self.imbalance!r}")


@dataclass
class TrainResult:
    model: object
    labels: list[str]
    val_logits: np.ndarray
    val_labels: np.ndarray
    best_val_balanced_accuracy: float
    history: list[dict] = field(default_factory=list)


def _loaders(cfg: CnnTrainConfig, train, val, labels, preprocess_cfg):
    import torch
    from timm.data import create_transform

    from cnn_stage.preprocessing import preprocess
    from training.image_folder import ImageDataset, collate_skip_none

    train_tf = create_transform(input_size=cfg.image_size, is_training=True, scale=(0.5, 1.0), hflip=0.5,
                                mean=preprocess_cfg.mean, std=preprocess_cfg.std,
                                interpolation=preprocess_cfg.interpolation)
    eval_tf = lambda img: torch.from_numpy(preprocess(img, preprocess_cfg))  # noqa: E731 - the serving path
    train_ds = ImageDataset(train, train_tf)
    val_ds = ImageDataset(val, eval_tf, draft_size=preprocess_cfg.scale_size)
    sampler = None
    if cfg.imbalance == "balanced_sampler":
        counts = np.bincount([s.label for s in train], minlength=len(labels)).astype(np.float64)
        weights = [1.0 / counts[s.label] for s in train]
        sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=len(train), replacement=True)
    g = torch.Generator().manual_seed(cfg.seed)
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                                           num_workers=cfg.num_workers, collate_fn=collate_skip_none, generator=g,
                                           drop_last=len(train_ds) > cfg.batch_size)
    val_dl = torch.utils.data.DataLoader(val_ds, batch_size=cfg.batch_size * 2, num_workers=cfg.num_workers,
                                         collate_fn=collate_skip_none)
    return train_dl, val_dl, train_ds, val_ds


def evaluate(model, loader) -> tuple[np.ndarray, np.ndarray]:
    import torch

    model.eval()
    outs, ys = [], []
    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            x, y = batch
            outs.append(model(x).float().numpy())
            ys.append(y.numpy())
    return np.concatenate(outs), np.concatenate(ys)


def train_cnn(cfg: CnnTrainConfig, train, val, labels: list[str], metrics_path: Path | None = None) -> TrainResult:
    """Trains on ``train`` samples, selects on ``val``; returns the best model and its val logits."""
    import torch
    from sklearn.metrics import balanced_accuracy_score
    from tqdm import tqdm

    from cnn_stage.model import create_convnext
    from cnn_stage.preprocessing import PreprocessConfig
    from training.schedules import warmup_cosine
    from training.unfreezing import apply_phase, layer_decay_groups

    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = create_convnext(cfg.model, len(labels), cfg.pretrained, cfg.checkpoint).to(device)
    pp = PreprocessConfig.from_timm(model, cfg.image_size)
    train_dl, val_dl, train_ds, val_ds = _loaders(cfg, train, val, labels, pp)

    class_weights = None
    if cfg.imbalance == "class_weights":
        counts = np.bincount([s.label for s in train], minlength=len(labels)).astype(np.float64)
        class_weights = torch.tensor(len(train) / (len(labels) * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)
    optimizer = torch.optim.AdamW(layer_decay_groups(model, cfg.lr, cfg.layer_decay, cfg.weight_decay))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    best = (-1.0, None)
    history, stale = [], 0
    metrics_file = open(metrics_path, "a") if metrics_path else None
    epoch_global = 0
    n_phases = len(cfg.phase_epochs)
    for phase, epochs in enumerate(cfg.phase_epochs):
        effective = len(("head", "s3", "s2", "s1", "s0", "stem")) if (cfg.unfreeze_all_last and phase == n_phases - 1 and phase > 0) else phase
        trainable = apply_phase(model, effective, cfg.train_norm)
        total = max(1, epochs * len(train_dl))
        step = 0
        for _ in range(epochs):
            model.train()
            t0, seen, loss_sum = time.perf_counter(), 0, 0.0
            bar = tqdm(train_dl, desc=f"phase {phase} epoch {epoch_global}", disable=not cfg.progress, leave=False)
            for batch in bar:
                if batch is None:
                    continue
                x, y = (t.to(device) for t in batch)
                mult = warmup_cosine(step, total, min(cfg.warmup_steps, total // 2 + 1))
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * mult
                with amp:
                    loss = loss_fn(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
                optimizer.step()
                step += 1
                seen += len(y)
                loss_sum += float(loss.detach()) * len(y)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            logits, ys = evaluate(model, val_dl)
            bacc = float(balanced_accuracy_score(ys, logits.argmax(1)))
            row = {"epoch": epoch_global, "phase": phase, "trainable_params": len(trainable),
                   "train_loss": loss_sum / max(seen, 1), "val_balanced_accuracy": bacc,
                   "val_top1": float((logits.argmax(1) == ys).mean()), "images_per_s": seen / (time.perf_counter() - t0),
                   "skipped_images": len(train_ds.skipped) + len(val_ds.skipped)}
            history.append(row)
            log.info("epoch %d phase %d: loss %.3f val bacc %.3f", epoch_global, phase, row["train_loss"], bacc)
            if metrics_file:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if bacc > best[0]:
                best = (bacc, {k: v.detach().clone() for k, v in model.state_dict().items()}, logits, ys)
                stale = 0
            else:
                stale += 1
            epoch_global += 1
            if stale >= cfg.patience:
                break
        if stale >= cfg.patience:
            log.info("early stop after %d epochs without improvement", stale)
            break
    if metrics_file:
        metrics_file.close()
    model.load_state_dict(best[1])
    model = model.cpu().eval()
    return TrainResult(model, labels, best[2], best[3], best[0], history)


def config_dict(cfg: CnnTrainConfig) -> dict:
    return asdict(cfg)
