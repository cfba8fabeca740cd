"""Fine-tunes a timm ConvNeXt with progressive unfreezing.

Phases: phase 0 trains the head, each next phase unfreezes one more stage from the top
(`training.unfreezing`), with layer-wise decayed learning rates (AdamW, warm-up + cosine per
phase, gradient clipping, label smoothing). Class imbalance is handled by one of the
strategies of `training.imbalance`; augmentation is timm's (RandomResizedCrop, flip, optional
RandAugment, optional mixup/cutmix). The epoch with the best validation balanced accuracy
wins; early stopping watches the same number.

The loop runs through `accelerate.Accelerator`: one process on CPU or GPU as is, several GPUs
under ``accelerate launch`` without code changes (bf16 autocast on GPU). Checkpoints are
safetensors + JSON (`training.checkpoint`); a run resumes at the epoch after the last one saved.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from catcascade.training.imbalance import IMBALANCE_STRATEGIES

log = logging.getLogger(__name__)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def mixed_precision(precision: str, cuda: bool, bf16_supported: bool) -> str:
    """accelerate's ``mixed_precision`` for a requested precision on this device (pure: the
    caller probes the GPU). auto: bf16 autocast on GPUs with bf16 (Ampere and later), fp16
    with loss scaling on older ones (T4, V100), fp32 on a CPU, where autocast gains little."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return ("bf16" if bf16_supported else "fp16") if cuda else "no"
    if precision == "bf16" and cuda and not bf16_supported:
        raise ValueError("precision bf16: this GPU has no bf16 support; use fp16 (or auto)")
    if precision == "fp16" and not cuda:
        raise ValueError("precision fp16 needs a CUDA GPU (loss-scaled fp16 autocast); use bf16 or fp32 on a CPU")
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]


@dataclass
class CnnTrainConfig:
    """Everything that decides a CNN training run (written beside the bundle it produces)."""

    model: str = "convnext_atto"
    """Any timm ConvNeXt: convnext_atto ... convnext_base, convnextv2_*."""
    pretrained: bool = False
    """Ask timm for the hub weights of ``model`` (needs network access)."""
    checkpoint: str | None = None
    """A local .safetensors backbone checkpoint (the head is replaced)."""
    image_size: int = 96
    phase_epochs: tuple[int, ...] = (1, 2, 2)
    """Epochs per unfreezing phase: phase 0 = head only, phase k = head + top k stages."""
    unfreeze_all_last: bool = True
    """The last phase trains every block, whatever its index."""
    batch_size: int = 32
    lr: float = 3e-3
    """Peak learning rate of the head; block k below it gets lr * layer_decay**k."""
    layer_decay: float = 0.7
    weight_decay: float = 0.05
    warmup_steps: int = 10
    """Linear warm-up at the start of every phase (capped at half the phase)."""
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    imbalance: str = "none"
    """none | class_weights | focal | balanced_sampler"""
    focal_gamma: float = 2.0
    train_norm: bool = True
    """False: the backbone's normalisation layers stay frozen (BatchNorm also keeps eval mode)."""
    drop_path_rate: float = 0.0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """RandomResizedCrop area range."""
    randaugment: str | None = None
    """timm auto_augment string, e.g. ``rand-m9-mstd0.5-inc1``; None = off."""
    mixup: float = 0.0
    """mixup alpha; 0 = off."""
    cutmix: float = 0.0
    """cutmix alpha; 0 = off."""
    mix_prob: float = 1.0
    precision: str = "auto"
    """auto (bf16 autocast on a GPU that has bf16, else fp16 with loss scaling; fp32 on CPU) | bf16 | fp16 | fp32"""
    patience: int = 3
    """Stop after this many epochs without a better validation balanced accuracy."""
    seed: int = 0
    num_workers: int = 0
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.phase_epochs = tuple(int(e) for e in self.phase_epochs)
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        if not self.phase_epochs or any(e < 0 for e in self.phase_epochs) or sum(self.phase_epochs) == 0:
            raise ValueError(f"phase_epochs must be non-negative epoch counts with at least one epoch, "
                             f"got {self.phase_epochs}")
        if self.imbalance not in IMBALANCE_STRATEGIES:
            raise ValueError(f"imbalance must be one of {', '.join(IMBALANCE_STRATEGIES)}, got {self.imbalance!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.pretrained and self.checkpoint:
            raise ValueError("give pretrained (timm hub weights) or checkpoint (a local file), not both")
        checks = {
            "image_size": self.image_size >= 32, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
            "layer_decay": 0 < self.layer_decay <= 1, "weight_decay": self.weight_decay >= 0,
            "warmup_steps": self.warmup_steps >= 0, "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "grad_clip": self.grad_clip > 0, "label_smoothing": 0 <= self.label_smoothing < 1,
            "focal_gamma": self.focal_gamma >= 0, "drop_path_rate": 0 <= self.drop_path_rate < 1,
            "crop_scale": len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "mixup": self.mixup >= 0, "cutmix": self.cutmix >= 0, "mix_prob": 0 <= self.mix_prob <= 1,
            "patience": self.patience >= 1, "num_workers": self.num_workers >= 0,
        }
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid CNN training settings: {', '.join(bad)}")
        if self.randaugment is not None and not self.randaugment.startswith(("rand", "augmix", "original", "v0")):
            raise ValueError(f"randaugment must be a timm auto_augment string such as 'rand-m9-mstd0.5-inc1', "
                             f"got {self.randaugment!r}")


@dataclass
class TrainResult:
    model: object
    labels: list[str]
    val_logits: np.ndarray
    val_labels: np.ndarray
    best_val_balanced_accuracy: float
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False


def _collate_counting_skips(batch):
    """Stacks the readable samples and counts the unreadable ones (the dataset returns None)."""
    import torch

    good = [b for b in batch if b is not None]
    if not good:
        return None
    xs, ys = zip(*good)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long), len(batch) - len(good)


def _loaders(cfg: CnnTrainConfig, train, val, labels, preprocess_cfg):
    import torch
    from timm.data import create_transform

    from catcascade.cnn_stage.preprocessing import preprocess
    from catcascade.training.image_folder import ImageDataset
    from catcascade.training.imbalance import balanced_sampler

    train_tf = create_transform(input_size=cfg.image_size, is_training=True, scale=cfg.crop_scale, hflip=0.5,
                                auto_augment=cfg.randaugment, mean=preprocess_cfg.mean, std=preprocess_cfg.std,
                                interpolation=preprocess_cfg.interpolation)
    eval_tf = lambda img: torch.from_numpy(preprocess(img, preprocess_cfg))  # noqa: E731 - the serving path
    train_ds = ImageDataset(train, train_tf, draft_size=max(preprocess_cfg.scale_size * 2, 256))
    val_ds = ImageDataset(val, eval_tf, draft_size=preprocess_cfg.scale_size)
    sampler = balanced_sampler([s.label for s in train], len(labels)) if cfg.imbalance == "balanced_sampler" else None
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None,
                                           sampler=sampler, num_workers=cfg.num_workers,
                                           collate_fn=_collate_counting_skips, drop_last=len(train_ds) > cfg.batch_size)
    val_dl = torch.utils.data.DataLoader(val_ds, batch_size=cfg.batch_size * 2, num_workers=cfg.num_workers,
                                         collate_fn=_collate_counting_skips)
    return train_dl, val_dl


def evaluate(model, loader, accelerator=None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over a loader (gathered across processes under accelerate)."""
    import torch

    model.eval()
    outs, ys = [], []
    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            x, y = batch[0], batch[1]
            logits = model(x).float()
            if accelerator is not None:
                logits, y = accelerator.gather_for_metrics((logits, y))
            outs.append(logits.cpu().numpy())
            ys.append(y.cpu().numpy())
    if not outs:
        raise RuntimeError("no readable validation images: cannot select a checkpoint")
    return np.concatenate(outs), np.concatenate(ys)


def _mixup(cfg: CnnTrainConfig, num_classes: int):
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                 label_smoothing=cfg.label_smoothing, num_classes=num_classes)


def train_cnn(cfg: CnnTrainConfig, train, val, labels: list[str], metrics_path: Path | None = None,
              checkpoint_dir: Path | None = None, resume: bool = False) -> TrainResult:
    """Trains on ``train`` samples, selects on ``val``; returns the best model and its val logits.

    With ``checkpoint_dir`` every epoch is saved there (see `training.checkpoint`); with
    ``resume`` the run continues after the last saved epoch of that folder.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from sklearn.metrics import balanced_accuracy_score
    from tqdm import tqdm

    from catcascade.cnn_stage.model import create_convnext
    from catcascade.cnn_stage.preprocessing import PreprocessConfig
    from catcascade.training import checkpoint as ckpt
    from catcascade.training.imbalance import make_loss
    from catcascade.training.schedules import warmup_cosine
    from catcascade.training.unfreezing import apply_phase, epoch_plan, freeze_batchnorm_stats, layer_decay_groups

    if resume and checkpoint_dir is None:
        raise ValueError("resume needs checkpoint_dir")
    cuda = torch.cuda.is_available()
    precision = mixed_precision(cfg.precision, cuda, cuda and torch.cuda.is_bf16_supported())
    # Frozen stages produce no gradients; DDP must be told, since phases change what is frozen.
    # cpu=True without a GPU lets several CPU processes (torchrun) train together over gloo.
    accelerator = Accelerator(mixed_precision=precision, cpu=not cuda,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    main = accelerator.is_main_process
    if main:
        log.info("training %s on %d process(es), device %s, %s", cfg.model, accelerator.num_processes,
                 accelerator.device, "fp32" if precision == "no" else f"{precision} autocast")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    model = create_convnext(cfg.model, len(labels), cfg.pretrained, cfg.checkpoint, cfg.drop_path_rate)
    pp = PreprocessConfig.from_timm(model, cfg.image_size)
    train_dl, val_dl = _loaders(cfg, train, val, labels, pp)
    loss_fn = make_loss(cfg.imbalance, [s.label for s in train], len(labels),
                        0.0 if (cfg.mixup or cfg.cutmix) else cfg.label_smoothing, cfg.focal_gamma)
    mixup = _mixup(cfg, len(labels))
    optimizer = torch.optim.AdamW(layer_decay_groups(model, cfg.lr, cfg.layer_decay, cfg.weight_decay))

    plan = epoch_plan(cfg.phase_epochs, cfg.unfreeze_all_last)
    start_epoch, best_bacc, best_epoch, stale, history = 0, -1.0, -1, 0, []
    best_state = best_logits = best_labels = None
    if resume:
        model_state, opt_state, state = ckpt.load_checkpoint(checkpoint_dir)
        if state.get("labels") != list(labels) or state.get("model") != cfg.model:
            raise ValueError(f"checkpoint in {checkpoint_dir} was trained for model {state.get('model')!r} with "
                             f"{len(state.get('labels', []))} labels; this run is {cfg.model!r} with {len(labels)}")
        model.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state)
        start_epoch, best_bacc, best_epoch = state["epoch"] + 1, state["best_bacc"], state["best_epoch"]
        stale, history = state["stale"], state["history"]
        best_state, best_logits, best_labels = ckpt.load_best(checkpoint_dir)
        if main:
            log.info("resuming after epoch %d (best val balanced accuracy %.3f at epoch %d)",
                     state["epoch"], best_bacc, best_epoch)
        if state.get("stopped_early"):
            start_epoch = len(plan)

    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    loss_fn = loss_fn.to(accelerator.device)
    raw = accelerator.unwrap_model(model)
    metrics_file = open(metrics_path, "a") if (metrics_path and main) else None
    steps_per_epoch = max(1, len(train_dl))
    stopped_early = False
    try:
        for epoch in range(start_epoch, len(plan)):
            if stale >= cfg.patience:
                stopped_early = True
                break
            phase, depth = plan[epoch]
            first_of_phase = plan.index((phase, depth))
            phase_len = sum(1 for p in plan if p[0] == phase)
            total = phase_len * steps_per_epoch
            warmup = min(cfg.warmup_steps, total // 2)
            step = (epoch - first_of_phase) * steps_per_epoch
            set_seed(cfg.seed + epoch)
            trainable = apply_phase(raw, depth, cfg.train_norm)
            model.train()
            freeze_batchnorm_stats(raw)
            t0, seen, skipped, loss_sum = time.perf_counter(), 0, 0, 0.0
            bar = tqdm(train_dl, desc=f"epoch {epoch + 1}/{len(plan)} phase {phase}",
                       disable=not (cfg.progress and main), leave=False)
            for batch in bar:
                if batch is None:
                    continue
                x, y, n_skipped = batch
                skipped += n_skipped
                if mixup is not None:
                    if len(x) % 2:  # timm's batch mixup pairs images with the flipped batch
                        x, y = x[:-1], y[:-1]
                    if len(x) == 0:
                        continue
                    x, target = mixup(x, y)
                else:
                    target = y
                mult = warmup_cosine(step, total, warmup, cfg.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * mult
                loss = loss_fn(model(x), target)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
                optimizer.step()
                step += 1
                seen += len(y)
                loss_sum += float(loss.detach()) * len(y)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            logits, ys = evaluate(model, val_dl, accelerator)
            pred = logits.argmax(1)
            bacc = float(balanced_accuracy_score(ys, pred))
            row = {"epoch": epoch, "phase": phase, "unfreeze_depth": depth, "trainable_tensors": len(trainable),
                   "trainable_params": int(sum(p.numel() for p in raw.parameters() if p.requires_grad)),
                   "lr_head": cfg.lr * mult, "train_loss": loss_sum / max(seen, 1),
                   "val_balanced_accuracy": bacc, "val_top1": float((pred == ys).mean()),
                   "images_per_s": seen * accelerator.num_processes / (time.perf_counter() - t0),
                   "seconds": round(time.perf_counter() - t0, 2), "skipped_images": skipped,
                   "processes": accelerator.num_processes}
            history.append(row)
            improved = bacc > best_bacc
            if improved:
                best_bacc, best_epoch, stale = bacc, epoch, 0
                best_state = {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}
                best_logits, best_labels = logits, ys
            else:
                stale += 1
            if main:
                log.info("epoch %d phase %d: loss %.3f val bacc %.3f%s", epoch, phase, row["train_loss"], bacc,
                         " (best)" if improved else "")
                if metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                if checkpoint_dir is not None:
                    if improved:
                        ckpt.save_best(checkpoint_dir, best_state, best_logits, best_labels)
                    ckpt.save_checkpoint(checkpoint_dir, raw.state_dict(), optimizer.state_dict(), {
                        "epoch": epoch, "best_bacc": best_bacc, "best_epoch": best_epoch, "stale": stale,
                        "stopped_early": stale >= cfg.patience and epoch + 1 < len(plan),
                        "history": history, "labels": list(labels), "model": cfg.model, "config": asdict(cfg)})
            accelerator.wait_for_everyone()
        else:
            stopped_early = stale >= cfg.patience and len(history) < len(plan)
    finally:
        if metrics_file:
            metrics_file.close()
    if stopped_early and main:
        log.info("early stop: %d epochs without a better validation balanced accuracy", cfg.patience)
    if best_state is None:
        raise RuntimeError("no epoch was trained (resumed a finished run without a best checkpoint?)")
    model = accelerator.unwrap_model(model).cpu().eval()
    model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad = True
    return TrainResult(model, list(labels), best_logits, best_labels, best_bacc, history, best_epoch, stopped_early)


def config_dict(cfg: CnnTrainConfig) -> dict:
    return asdict(cfg)
