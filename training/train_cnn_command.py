"""`catcascade train-cnn`: dataset -> split -> progressive fine-tuning -> calibrated ONNX bundle.

    catcascade train-cnn --data DIR [--format imagefolder|oxford|csv] --out BUNDLE_DIR ...

The bundle folder gets ``manifest.json``, ``cnn.onnx`` (+ ``cnn.int8.onnx`` with ``--int8``),
``train_config.yaml`` (the resolved settings; ``--config`` reads it back to repeat a run),
``split.json`` (the exact split), ``metrics.jsonl`` (one row per epoch), ``training.png``, and
``train/checkpoints/`` (safetensors + JSON, for ``--resume``; delete it before shipping).
Works the same under ``accelerate launch`` (only the main process writes the bundle).
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from catcascade.cnn_stage.quantization import QuantizationConfig
from catcascade.training.datasets import DatasetSpec
from catcascade.training.train_cnn import CnnTrainConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.yaml"


@dataclass
class TrainCnnRun:
    """One `train-cnn` run: data, training, export and where the bundle goes."""

    data: DatasetSpec
    out: Path
    train: CnnTrainConfig = field(default_factory=CnnTrainConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    split_file: Path | None = None
    """A split.json from an earlier run; default: a fresh seeded stratified 80/10/10 split."""
    int8: bool = False
    int8_calibration_images: int = 256
    """Training images used to calibrate INT8 activation ranges."""
    resume: bool = False
    name: str = "catcascade-cnn"

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.int8_calibration_images < 1:
            raise ValueError("int8_calibration_images must be >= 1")

    def to_dict(self) -> dict:
        d = {"data": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.data).items()},
             "train": asdict(self.train), "quantization": self.quantization.to_dict(),
             "output": {"out": str(self.out), "split_file": str(self.split_file) if self.split_file else None,
                        "int8": self.int8, "int8_calibration_images": self.int8_calibration_images,
                        "name": self.name}}
        d["train"]["phase_epochs"] = list(self.train.phase_epochs)
        d["train"]["crop_scale"] = list(self.train.crop_scale)
        return d


def run_train_cnn(run: TrainCnnRun) -> Path:
    """Trains and writes the bundle to ``run.out``; returns that folder."""
    import yaml
    from accelerate import PartialState

    from catcascade.ensemble.bundle import Bundle, BundleManifest, library_versions
    from catcascade.training.cnn_bundle import calibrate_and_export
    from catcascade.training.datasets import resolve_split
    from catcascade.training.train_cnn import train_cnn
    from catcascade.training.training_plots import plot_training

    t0 = time.perf_counter()
    out = run.out
    import torch

    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    out.mkdir(parents=True, exist_ok=True)
    split_file = run.split_file
    if split_file is None and run.resume and (out / "split.json").is_file():
        split_file = out / "split.json"  # a resumed run keeps its split
    split = resolve_split(run.data, split_file, save_to=None if split_file else out / "split.json",
                          seed=run.train.seed, progress=run.train.progress and main)
    if main:
        (out / CONFIG_FILE).write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
        print(f"data: {len(split.labels)} classes, {len(split.train)} train / {len(split.val)} val / "
              f"{len(split.test)} test images, {len(split.skipped)} unreadable skipped", flush=True)
    metrics = out / "metrics.jsonl"
    if main and not run.resume and metrics.exists():
        metrics.unlink()
    result = train_cnn(run.train, split.train, split.val, split.labels, metrics_path=metrics,
                       checkpoint_dir=out / "train" / "checkpoints", resume=run.resume)
    if not main:
        return out

    import numpy as np

    rng = np.random.default_rng(run.train.seed)
    calib = [split.train[i] for i in rng.permutation(len(split.train))[: run.int8_calibration_images]] \
        if run.int8 else None
    heldout_name = "test" if split.test else "val"
    export = calibrate_and_export(result, out, run.train.model, run.train.image_size, int8_calibration=calib,
                                  eval_samples=split.test or split.val, quantization=run.quantization)
    report = export.report
    manifest = BundleManifest(
        name=run.name, version=time.strftime("%Y%m%d-%H%M%S"), labels=split.labels,
        preprocess=export.preprocess.to_dict(), cnn=export.spec,
        provenance={"versions": library_versions(), "train_config": run.to_dict(),
                    "split": {"train": len(split.train), "val": len(split.val), "test": len(split.test),
                              "skipped_unreadable": len(split.skipped)},
                    "val_balanced_accuracy": result.best_val_balanced_accuracy, "best_epoch": result.best_epoch,
                    "epochs_run": len(result.history), "stopped_early": result.stopped_early,
                    "heldout_split": heldout_name, **report,
                    "build_seconds": round(time.perf_counter() - t0, 1)})
    Bundle(out, manifest).save()
    try:
        plot_training(result.history, result.val_logits, result.val_labels, report["temperature"],
                      out / "training.png")
    except Exception as e:  # a plot must never fail a finished training run
        log.warning("could not draw training.png: %s", e)
    _print_summary(out, result, report, heldout_name)
    return out


def _print_summary(out: Path, result, report: dict, heldout: str) -> None:
    lines = [f"bundle: {out}",
             f"best val balanced accuracy {result.best_val_balanced_accuracy:.3f} (epoch {result.best_epoch}, "
             f"{len(result.history)} epochs{', stopped early' if result.stopped_early else ''})",
             f"temperature {report['temperature']:.3f}; ECE (15 bins, val) {report['ece_before']:.4f} -> "
             f"{report['ece_after']:.4f}; ONNX max |dp| {report['onnx_max_prob_diff']:.1e}"]
    if "heldout_fp32" in report:
        h = report["heldout_fp32"]
        lines.append(f"{heldout} ({h['images']} images, ONNX fp32): top-1 {h['top1']:.3f}, "
                     f"balanced accuracy {h['balanced_accuracy']:.3f}")
    if "int8" in report and "top1_agreement_vs_fp32" in report["int8"]:
        q = report["int8"]
        lines.append(f"INT8: top-1 agreement with fp32 {q['top1_agreement_vs_fp32']:.3f}, {heldout} top-1 "
                     f"{q['heldout']['top1']:.3f}, balanced accuracy {q['heldout']['balanced_accuracy']:.3f}")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------- command line

def _pretrained(value: str) -> dict:
    if value == "none":
        return {"pretrained": False, "checkpoint": None}
    if value == "timm":
        return {"pretrained": True, "checkpoint": None}
    path = Path(value)
    if path.suffix != ".safetensors":
        raise ValueError(f"--pretrained takes none, timm or a .safetensors file (no pickle), got {value!r}")
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained checkpoint not found: {path}")
    return {"pretrained": False, "checkpoint": str(path)}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,2, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,1.0, got {text!r}") from None


# CLI flag -> CnnTrainConfig field (argparse default None means "keep the config's value").
_TRAIN_FLAGS = {
    "model": ("--model", str, "timm ConvNeXt name (convnext_atto ... convnext_base, convnextv2_*)"),
    "image_size": ("--image-size", int, "training and serving resolution"),
    "phase_epochs": ("--phase-epochs", _ints, "epochs per unfreezing phase, e.g. 1,2,2,3: head, +stage 3, ..."),
    "batch_size": ("--batch-size", int, "per-process batch size"),
    "lr": ("--lr", float, "peak learning rate of the head"),
    "layer_decay": ("--layer-decay", float, "lr multiplier per block below the head"),
    "weight_decay": ("--weight-decay", float, "AdamW weight decay (not on norms and biases)"),
    "warmup_steps": ("--warmup-steps", int, "linear warm-up steps at the start of each phase"),
    "grad_clip": ("--grad-clip", float, "max gradient norm"),
    "label_smoothing": ("--label-smoothing", float, "label smoothing (also used by mixup)"),
    "imbalance": ("--imbalance", str, "none | class_weights | focal | balanced_sampler"),
    "focal_gamma": ("--focal-gamma", float, "focusing parameter of --imbalance focal"),
    "drop_path_rate": ("--drop-path", float, "stochastic depth rate"),
    "crop_scale": ("--crop-scale", _floats, "RandomResizedCrop area range, e.g. 0.35,1.0"),
    "randaugment": ("--randaugment", str, "timm RandAugment string, e.g. rand-m9-mstd0.5-inc1"),
    "mixup": ("--mixup", float, "mixup alpha (0 = off)"),
    "cutmix": ("--cutmix", float, "cutmix alpha (0 = off)"),
    "mix_prob": ("--mix-prob", float, "probability of mixing a batch"),
    "precision": ("--precision", str, "auto (bf16 on GPUs with bf16, else fp16; fp32 on CPU) | bf16 | fp16 | fp32"),
    "patience": ("--patience", int, "early stopping: epochs without a better val balanced accuracy"),
    "seed": ("--seed", int, "seed of the split and of training"),
    "num_workers": ("--workers", int, "DataLoader worker processes"),
    "threads": ("--threads", int, "torch CPU threads"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-cnn", help="fine-tune a timm ConvNeXt (progressive unfreezing) and write a calibrated ONNX bundle",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", type=Path, help="dataset root folder")
    d.add_argument("--format", choices=["imagefolder", "oxford", "csv"], help="dataset layout (default imagefolder)")
    d.add_argument("--csv", type=Path, dest="csv_file", help="csv: manifest with path,label columns "
                                                              "(default DATA/labels.csv)")
    d.add_argument("--cats-only", action="store_true", default=None, help="oxford: the 12 cat breeds only")
    d.add_argument("--official-split", action="store_true", default=None,
                   help="oxford: test = test.txt, train/val from trainval.txt")
    d.add_argument("--split-file", type=Path, help="reuse a split.json (default: new seeded 80/10/10 split)")
    t = p.add_argument_group("training")
    t.add_argument("--pretrained", default=None, help="none | timm (hub weights by --model name) | FILE.safetensors")
    for name, (flag, typ, help_) in _TRAIN_FLAGS.items():
        t.add_argument(flag, dest=name, type=typ, help=help_)
    t.add_argument("--freeze-norm", action="store_const", const=False, dest="train_norm",
                   help="keep the backbone's normalisation layers frozen (BatchNorm in eval mode)")
    t.add_argument("--no-unfreeze-all-last", action="store_const", const=False, dest="unfreeze_all_last",
                   help="the last phase unfreezes only its own stage instead of everything")
    t.add_argument("--resume", action="store_true", help="continue from OUT/train/checkpoints")
    t.add_argument("--no-progress", action="store_const", const=False, dest="progress", help="no progress bars")
    q = p.add_argument_group("export")
    q.add_argument("--int8", action="store_true", default=None, help="also write a static INT8 model")
    q.add_argument("--calibration-images", type=int, dest="int8_calibration_images",
                   help="training images used for INT8 calibration (default 256)")
    q.add_argument("--quant-format", choices=["QDQ", "QOperator"], help="INT8 graph format (default QDQ)")
    q.add_argument("--calibration-method", choices=["MinMax", "Entropy", "Percentile"],
                   help="how INT8 activation ranges are set from the calibration images (default MinMax)")
    q.add_argument("--reduce-range", action="store_true", default=None, help="7-bit weights (CPUs without VNNI)")
    q.add_argument("--quant-op-types", type=lambda t: tuple(t.split(",")), dest="op_types",
                   help="only quantize these ONNX op types, e.g. Conv,Gemm (default: all)")
    q.add_argument("--int8-float-depthwise", action="store_true", default=None, dest="exclude_depthwise",
                   help="keep depthwise convolutions in float")
    p.add_argument("--out", type=Path, help="bundle folder to write")
    p.add_argument("--name", help="bundle name in the manifest")
    p.add_argument("--config", type=Path, help=f"a {CONFIG_FILE} to start from (flags override it)")
    p.set_defaults(func=_command)


def _section(cls, base: dict, args, names) -> dict:
    known = {f.name for f in fields(cls)}
    merged = {k: v for k, v in base.items() if k in known}
    merged.update({k: getattr(args, k) for k in names if k in known and getattr(args, k, None) is not None})
    return merged


def run_from_args(args) -> TrainCnnRun:
    """argparse namespace (+ optional YAML config) -> a validated `TrainCnnRun`."""
    import yaml

    base: dict = {}
    if args.config is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"--config file not found: {args.config}")
        base = yaml.safe_load(args.config.read_text()) or {}
    data = _section(DatasetSpec, base.get("data", {}), args,
                    ["format", "csv_file", "cats_only", "official_split"])
    if args.data is not None:
        data["root"] = args.data
    if "root" not in data:
        raise ValueError("--data is required (or a --config with a data.root)")
    data["root"] = Path(data["root"])
    if data.get("csv_file"):
        data["csv_file"] = Path(data["csv_file"])
    train = _section(CnnTrainConfig, base.get("train", {}), args,
                     list(_TRAIN_FLAGS) + ["train_norm", "unfreeze_all_last", "progress"])
    if args.pretrained is not None:
        train.update(_pretrained(args.pretrained))
    quant = _section(QuantizationConfig, base.get("quantization", {}), args,
                     ["quant_format", "calibration_method", "reduce_range", "op_types", "exclude_depthwise"])
    output = dict(base.get("output", {}))
    for k in ("out", "split_file", "int8", "int8_calibration_images", "name"):
        if getattr(args, k, None) is not None:
            output[k] = getattr(args, k)
    if not output.get("out"):
        raise ValueError("--out is required (the bundle folder to write)")
    return TrainCnnRun(data=DatasetSpec(**data), train=CnnTrainConfig(**train),
                       quantization=QuantizationConfig(**quant), resume=args.resume,
                       out=Path(output["out"]),
                       split_file=Path(output["split_file"]) if output.get("split_file") else None,
                       int8=bool(output.get("int8", False)),
                       int8_calibration_images=int(output.get("int8_calibration_images", 256)),
                       name=output.get("name") or "catcascade-cnn")


def _command(args) -> int:
    from catcascade.errors import CommandError

    try:
        run = run_from_args(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise CommandError(str(e)) from None
    logging.getLogger("training").setLevel(logging.INFO)
    try:
        run_train_cnn(run)
    except (ValueError, OSError) as e:  # bad data, missing files, hub unreachable
        raise CommandError(str(e)) from None
    return 0
