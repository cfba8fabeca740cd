"""Offline accuracy benchmark: what each escalation budget buys, from score files.

    catcascade bench-accuracy --data DIR [--vlm-url URL]   # scores the dataset first
    catcascade bench-accuracy --scores a.npz [b.npz ...]    # or re-uses score files

Compares CNN only, the cascade at escalation budgets (default 0, 5, 10, 20, 30, 50, 100%) and
the VLM always, on balanced accuracy, top-1/top-3, macro-F1, ECE, Brier, AURC, recall on
minority classes and VLM calls per 1,000 images. Thresholds and blender are cross-fitted
(ensemble/offline_eval.py). Writes results.json, report.md and PNG plots under --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_OUT = Path("artifacts/bench-accuracy")
DEFAULT_BUNDLE = Path("artifacts/demo-bundle")
PLOTS = ("reliability.png", "balanced_accuracy_vs_rate.png", "confusion.png")


def _budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) / 100.0 for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets are comma-separated percentages, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be percentages in 0..100, got {text!r}")
    return values


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="labelled ImageFolder dataset (<label>/<image>); scored first")
    src.add_argument("--scores", type=Path, nargs="+", help="score files written by `catcascade score`")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle used to score --data")
    parser.add_argument("--vlm-url", action="append", default=[], help="vLLM base URL for scoring --data (repeatable)")
    parser.add_argument("--start-vlm", action="store_true",
                        help="start a vLLM server for the bundle's VLM and adapter for the scoring, then stop it")
    parser.add_argument("--vlm-model", help="vLLM model name (default: the bundle's adapter)")
    parser.add_argument("--limit", type=int, help="score at most this many images of --data")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the report, plots and JSON")
    parser.add_argument("--budgets", type=_budgets, default=_budgets("0,5,10,20,30,50,100"),
                        help="escalation budgets in percent, comma-separated")
    parser.add_argument("--metric", choices=["top1", "margin", "entropy"], default="top1", help="confidence score")
    parser.add_argument("--blender", choices=["log_linear", "stacking"], default="log_linear")
    parser.add_argument("--objective", choices=["rate", "balanced_accuracy"], default="rate",
                        help="fit thresholds to the budget's rate, or to the best balanced accuracy within it")
    parser.add_argument("--minority-boost", type=float, default=1.0,
                        help="minority classes escalate this many times as often (per-class thresholds)")
    parser.add_argument("--folds", type=int, default=2, help="cross-fitting folds")
    parser.add_argument("--refit-temperature", action="store_true", help="refit the CNN temperature per fold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def markdown_table(result) -> str:
    head = ("| system | escalated % | VLM calls / 1k | balanced acc % | top-1 % | top-3 % | macro-F1 | ECE | Brier "
            "| AURC | minority recall % |")
    rows = [head, "|" + " --- |" * 11]
    for s in result.systems:
        m = s.summary
        rows.append(f"| {s.name} | {100 * s.escalation_rate:.1f} | {s.vlm_calls_per_1000:.0f} | "
                    f"{_fmt(m.balanced_accuracy, True)} | {_fmt(m.top1, True)} | {_fmt(m.top3, True)} | "
                    f"{_fmt(m.macro_f1)} | {_fmt(m.ece)} | {_fmt(m.brier)} | {_fmt(m.aurc)} | "
                    f"{_fmt(m.minority_recall, True)} |")
    return "\n".join(rows)


def _focus_system(result):
    """The cascade shown beside CNN-only in the plots: the 30% budget if run, else the largest."""
    cascades = [s for s in result.systems if s.name.startswith("cascade@")]
    if not cascades:
        return None
    exact = [s for s in cascades if abs(s.budget - 0.3) < 1e-9]
    return exact[0] if exact else max(cascades, key=lambda s: s.budget)


def render_plots(result, out: Path) -> list[Path]:
    """reliability.png, balanced_accuracy_vs_rate.png, confusion.png (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ensemble.metrics import confusion, reliability_bins

    out.mkdir(parents=True, exist_ok=True)
    cnn, focus = result.system("cnn-only"), _focus_system(result)
    shown = [s for s in (cnn, focus) if s is not None]
    paths = []

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for s, marker in zip(shown, "os"):
        b = reliability_bins(s.probs, result.labels, n_bins=10)
        ok = b["count"] > 0
        ax.plot(b["confidence"][ok], b["accuracy"][ok], marker=marker, label=f"{s.name} (ECE {s.summary.ece:.3f})")
    ax.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title="Reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    paths.append(out / PLOTS[0])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    cascades = [s for s in result.systems if s.name.startswith("cascade@")]
    if cascades:
        ax.plot([100 * s.escalation_rate for s in cascades], [100 * s.summary.balanced_accuracy for s in cascades],
                "o-", label="cascade (measured rate)")
    ax.axhline(100 * cnn.summary.balanced_accuracy, color="grey", ls="--", label="CNN only")
    for s in result.systems:
        if s.name == "vlm-always":
            ax.axhline(100 * s.summary.balanced_accuracy, color="tab:red", ls=":", label="VLM always")
    ax.set(xlabel="escalation rate (% of images sent to the VLM)", ylabel="balanced accuracy (%)",
           title="Balanced accuracy vs escalation rate", xlim=(-2, 102))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / PLOTS[1])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    c = len(result.label_names)
    fig, axes = plt.subplots(1, len(shown), figsize=(5.2 * len(shown) + 0.5, 5), squeeze=False)
    for ax, s in zip(axes[0], shown):
        cm = confusion(s.probs, result.labels).astype(float)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set(title=f"{s.name} (row-normalised)", xlabel="predicted", ylabel="true",
               xticks=range(c), yticks=range(c))
        ax.set_xticklabels(result.label_names, rotation=90, fontsize=6)
        ax.set_yticklabels(result.label_names, fontsize=6)
    fig.tight_layout()
    paths.append(out / PLOTS[2])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def render_report(result, out: Path, context: dict | None = None) -> Path:
    """Writes report.md, results.json and the plots into ``out``; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    plots = render_plots(result, out)
    context = context or {}
    (out / "results.json").write_text(json.dumps({**result.to_dict(), "context": context}, indent=1, default=str))
    lines = [
        "# Offline accuracy benchmark", "",
        f"{len(result.labels)} labelled images, {len(result.label_names)} classes. Thresholds and blender are "
        f"cross-fitted: each image is answered by a policy and blender fitted on the other folds.", "",
        *(f"- {k}: {v}" for k, v in context.items()), "",
        markdown_table(result), "",
        "Escalated % is the measured rate on held-out folds; minority recall is the mean recall of classes "
        "below median support. VLM always = the VLM's own choice among the CNN's top-k.", "",
        *(f"> {n}" for n in result.notes), "",
        *(f"![{p.stem}]({p.name})" for p in plots), "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(args: argparse.Namespace) -> int:
    from ensemble.offline_eval import OfflineEvalConfig, evaluate_offline
    from ensemble.score_files import ScoreSet

    out: Path = args.out
    t0 = time.perf_counter()
    if args.data is not None:
        from training.score_runner import ScoreRunConfig, score_image_folder

        vllm = None
        if getattr(args, "start_vlm", False):
            from ensemble.bundle import load_bundle
            from vlm_stage.vllm_server import VllmServer, VllmServerConfig

            try:
                vcfg = VllmServerConfig.for_bundle(load_bundle(args.bundle))
            except ValueError as e:
                raise SystemExit(f"--start-vlm: {e}") from None
            print("starting vLLM for the bundle's VLM (about a minute on a CPU)", flush=True)
            vllm = VllmServer(vcfg, log_path=out / "vllm.log").start()
            args.vlm_url = [*args.vlm_url, vllm.url]
        run_cfg = ScoreRunConfig(vlm_urls=tuple(args.vlm_url), vlm_model=args.vlm_model, limit=args.limit,
                                 progress=not args.no_progress)
        try:
            scores = score_image_folder(args.bundle, args.data, run_cfg)
        finally:
            if vllm is not None:
                vllm.stop()
        saved = scores.save(out / "scores.npz")
        print(f"scored {len(scores)} images -> {saved}")
        sources = [str(saved)]
    else:
        scores = ScoreSet.concat([ScoreSet.load(p) for p in args.scores])
        sources = [str(p) for p in args.scores]
    cfg = OfflineEvalConfig(budgets=tuple(args.budgets), metric=args.metric, blender=args.blender,
                            objective=args.objective, minority_boost=args.minority_boost, folds=args.folds,
                            refit_temperature=args.refit_temperature, seed=args.seed)
    result = evaluate_offline(scores, cfg)
    context = {"score files": ", ".join(sources), "bundle": scores.meta.get("bundle_version", scores.meta.get("bundle")),
               "VLM model": scores.meta.get("vlm_model"), "images with VLM scores": int(scores.has_vlm.sum()),
               "blender": cfg.blender, "confidence metric": cfg.metric, "threshold objective": cfg.objective,
               "minority boost": cfg.minority_boost, "folds": cfg.folds,
               "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    report = render_report(result, out, context)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bench-accuracy: {len(scores)} images ({time.perf_counter() - t0:.1f} s)")
    for col in ("system", "esc %", "VLM/1k", "bal acc %", "top-1 %", "macro-F1", "ECE", "minority rec %"):
        table.add_column(col, justify="right" if col != "system" else "left")
    for s in result.systems:
        m = s.summary
        table.add_row(s.name, f"{100 * s.escalation_rate:.1f}", f"{s.vlm_calls_per_1000:.0f}",
                      _fmt(m.balanced_accuracy, True), _fmt(m.top1, True), _fmt(m.macro_f1), _fmt(m.ece),
                      _fmt(m.minority_recall, True))
    console = Console(width=140)
    console.print(table)
    for n in result.notes:
        console.print(f"note: {n}")
    print(f"report: {report}")
    return 0


def register(subparsers) -> None:
    from ensemble.cli_commands import user_errors

    def run(args) -> int:
        with user_errors():
            return main(args)

    b = subparsers.add_parser("bench-accuracy", help="offline balanced-accuracy benchmark: CNN only, the cascade at "
                                                     "escalation budgets, VLM always (Markdown report + PNG plots)")
    add_cli_args(b)
    b.set_defaults(func=run)


if __name__ == "__main__":
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(p)
    sys.exit(main(p.parse_args()))
