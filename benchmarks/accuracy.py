"""Offline accuracy benchmark: what each escalation budget buys, from score files.

    catcascade bench-accuracy --data DIR [--vlm-url URL]   # scores the dataset first
    catcascade bench-accuracy --scores a.npz [b.npz ...]    # or re-uses score files

Compares CNN only, the cascade at escalation budgets (default 0, 5, 10, 20, 30, 50, 100%), the
cascade with conformal candidate sets and the VLM always, on balanced accuracy, top-1/top-3,
macro-F1, ECE, Brier, AURC, recall on minority classes and VLM calls per 1,000 images, each with
a bootstrap 95% interval and a paired difference from CNN-only; and the deferral rules (top1,
margin, entropy, learned) against each other on the same folds. Thresholds, blender, learned
rule and candidate sets are cross-fitted (ensemble/offline_eval.py). Writes results.json,
report.md and PNG plots under --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_OUT = Path("artifacts/bench-accuracy")
DEFAULT_BUNDLE = Path("artifacts/demo-bundle")
PLOTS = ("reliability.png", "balanced_accuracy_vs_rate.png", "confusion.png", "deferral_rules.png",
         "candidate_sets.png")
RULE_STYLE = {"top1": ("tab:blue", "-"), "margin": ("tab:orange", "--"), "entropy": ("tab:green", "-."),
              "learned": ("tab:red", "-")}


def _budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) / 100.0 for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets are comma-separated percentages, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be percentages in 0..100, got {text!r}")
    return values


def _rules(text: str) -> tuple[str, ...]:
    from catcascade.ensemble.deferral_comparison import RULES

    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in RULES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown deferral rule(s) {bad}; choose from {', '.join(RULES)}")
    return values


def _alpha(text: str) -> float | None:
    if text.lower() in ("none", "off", "0"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha is a number in (0, 1) or 'none', got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"alpha must be in (0, 1), got {text!r}")
    return value


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
    parser.add_argument("--deferral", "--metric", dest="metric", choices=["top1", "margin", "entropy", "learned"],
                        default="top1", help="deferral rule of the main table's cascade rows (--metric: old name)")
    parser.add_argument("--rules", type=_rules, default=_rules("top1,margin,entropy,learned"),
                        help="deferral rules compared on the same folds (comma-separated)")
    parser.add_argument("--blender", choices=["log_linear", "stacking"], default="log_linear",
                        help="how CNN and VLM scores are combined")
    parser.add_argument("--objective", choices=["rate", "balanced_accuracy"], default="rate",
                        help="fit thresholds to the budget's rate, or to the best balanced accuracy within it")
    parser.add_argument("--minority-boost", type=float, default=1.0,
                        help="minority classes escalate this many times as often (per-class thresholds)")
    parser.add_argument("--conformal-alpha", type=_alpha, default=0.1,
                        help="conformal candidate sets covering the truth with 1 - alpha ('none': off)")
    parser.add_argument("--conformal-method", choices=["aps", "raps"], default="raps", help="conformal score")
    parser.add_argument("--conformal-max-size", type=int, default=5, help="cap on a candidate set's size")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the 95%% intervals (0: off)")
    parser.add_argument("--folds", type=int, default=2, help="cross-fitting folds")
    parser.add_argument("--refit-temperature", action="store_true", help="refit the CNN temperature per fold")
    parser.add_argument("--seed", type=int, default=0, help="random seed (folds, bootstrap)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def _cell(system, metric: str, pct: bool = False) -> str:
    """The value with its bootstrap interval, e.g. ``82.4 [81.2, 83.6]``."""
    v = getattr(system.summary, metric)
    lo_hi = system.ci.get(metric)
    if v is None or not lo_hi:
        return _fmt(v, pct)
    return f"{_fmt(v, pct)} [{_fmt(lo_hi[0], pct)}, {_fmt(lo_hi[1], pct)}]"


def _delta(system, n_boot: int, metric: str = "balanced_accuracy") -> str:
    """Paired bootstrap difference from CNN-only in points, its interval and p-value."""
    d = system.vs_cnn.get(metric)
    if not d:
        return "-"
    mark = " *" if d["significant"] else ""
    p = f"p<{1 / n_boot:.3f}" if d["p_value"] == 0 else f"p={d['p_value']:.3f}"
    return f"{100 * d['observed']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] {p}{mark}"


def markdown_table(result) -> str:
    head = ("| system | escalated % | VLM calls / 1k | balanced acc % | Δ bal. acc. vs CNN (points) | top-1 % | top-3 % "
            "| macro-F1 | ECE | Brier | AURC | minority recall % |")
    rows = [head, "|" + " --- |" * 12]
    for s in result.systems:
        rows.append(f"| {s.name} | {100 * s.escalation_rate:.1f} | {s.vlm_calls_per_1000:.0f} | "
                    f"{_cell(s, 'balanced_accuracy', True)} | {_delta(s, result.bootstrap)} | {_cell(s, 'top1', True)} | "
                    f"{_cell(s, 'top3', True)} | {_cell(s, 'macro_f1')} | {_cell(s, 'ece')} | {_cell(s, 'brier')} | "
                    f"{_cell(s, 'aurc')} | {_cell(s, 'minority_recall', True)} |")
    return "\n".join(rows)


def _pct_ci(v, ci=None) -> str:
    if v is None:
        return "not reached"
    text = f"{100 * v:.1f}"
    if ci and all(x == x for x in ci):  # NaN-free
        text += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return text


def deferral_table(result, show=(0.1, 0.2, 0.3)) -> str:
    """Rules compared on the same folds: area under the curve, balanced accuracy at a few budgets,
    the budget needed for 90% of the VLM-always gain, and learned minus each rule."""
    d = result.deferral
    if not d or not d.get("rules"):
        return ""
    budgets = d["budgets"]
    cols = [b for b in show if any(abs(b - g) < 1e-9 for g in budgets)]
    head = ("| rule | area under bal. acc. vs rate % | " + " | ".join(f"bal. acc. @{100 * b:g}% %" for b in cols)
            + " | escalation % for 90% of the VLM-always gain | learned − rule @20% (points) |")
    rows = [head, "|" + " --- |" * (4 + len(cols))]
    for rule, e in d["rules"].items():
        cells = []
        for b in cols:
            j = min(range(len(budgets)), key=lambda i: abs(budgets[i] - b))
            ci = e.get("balanced_accuracy_ci", [None] * len(budgets))[j]
            cells.append(_pct_ci(e["balanced_accuracy"][j], ci))
        paired = (d.get("learned_vs") or {}).get(rule, {}).get("20%")
        vs = (f"{100 * paired['observed']:+.1f} [{100 * paired['low']:+.1f}, {100 * paired['high']:+.1f}]"
              f"{' *' if paired['significant'] else ''}" if paired else "-")
        rows.append(f"| {rule} | {_pct_ci(e['auc'], e.get('auc_ci'))} | " + " | ".join(cells)
                    + f" | {_pct_ci(e['rate_for_90pct_gain'], e.get('rate_for_90pct_gain_ci'))} | {vs} |")
    gain = d.get("vlm_always_gain")
    rows += ["", f"CNN-only balanced accuracy {100 * d['cnn_balanced_accuracy']:.1f}%; every image escalated through "
                 f"the same blender {100 * d['vlm_always_balanced_accuracy']:.1f}% (gain {100 * gain:+.1f} points)."]
    return "\n".join(rows)


def conformal_table(result) -> str:
    c = result.conformal
    if not c:
        return ""
    rows = [f"Target coverage {100 * c['target_coverage']:.0f}% ({c['method'].upper()}, alpha {c['alpha']}, "
            f"at most {c['max_size']} breeds; calibrated on the fitting folds, measured on the held-out ones).", "",
            "| candidates | coverage of the true breed % | mean set size | set sizes (count) |",
            "| --- | --- | --- | --- |"]
    for name, e in c["sets"].items():
        sizes = ", ".join(f"{k}: {v}" for k, v in e["size_counts"].items())
        size = f"{e['mean_size']:.2f}" + (f" [{e['mean_size_ci'][0]:.2f}, {e['mean_size_ci'][1]:.2f}]"
                                          if e.get("mean_size_ci") else "")
        rows.append(f"| {name} | {_pct_ci(e['coverage'], e.get('coverage_ci'))} | {size} | {sizes} |")
    return "\n".join(rows)


def _focus_system(result):
    """The cascade shown beside CNN-only in the plots: the 30% budget if run, else the largest."""
    cascades = [s for s in result.systems if s.name.startswith("cascade@")]
    if not cascades:
        return None
    exact = [s for s in cascades if abs(s.budget - 0.3) < 1e-9]
    return exact[0] if exact else max(cascades, key=lambda s: s.budget)


def _reliability_bands(probs, y, n_bins: int, n_boot: int, seed: int):
    """Per-bin bootstrap 95% interval of the accuracy (NaN where a bin is empty)."""
    import numpy as np

    from catcascade.ensemble.bootstrap import Resampler

    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    bins = np.clip(np.digitize(conf, np.linspace(0, 1, n_bins + 1)[1:-1], right=True), 0, n_bins - 1)
    onehot = np.eye(n_bins)[bins]

    def stat(w):
        count = w @ onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w @ (onehot * correct[:, None])) / count

    s = Resampler(len(y), n_boot, seed).samples(stat)
    return np.nanquantile(s, 0.025, axis=0), np.nanquantile(s, 0.975, axis=0)


def render_plots(result, out: Path) -> list[Path]:
    """The report's PNGs (matplotlib, Agg), with bootstrap bands where the result has them."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from catcascade.ensemble.metrics import confusion, reliability_bins

    out.mkdir(parents=True, exist_ok=True)
    cnn, focus = result.system("cnn-only"), _focus_system(result)
    shown = [s for s in (cnn, focus) if s is not None]
    paths = []

    def save(fig, name):
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for s, marker in zip(shown, "os"):
        b = reliability_bins(s.probs, result.labels, n_bins=10)
        ok = b["count"] > 0
        line, = ax.plot(b["confidence"][ok], b["accuracy"][ok], marker=marker,
                        label=f"{s.name} (ECE {s.summary.ece:.3f})")
        if result.bootstrap:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # all-NaN bins
                lo, hi = _reliability_bands(s.probs, result.labels, 10, min(result.bootstrap, 500), 0)
            ax.fill_between(b["confidence"][ok], lo[ok], hi[ok], color=line.get_color(), alpha=0.15, lw=0)
    ax.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title="Reliability diagram" + (" (bands: bootstrap 95%)" if result.bootstrap else ""))
    ax.legend(loc="upper left", fontsize=8)
    save(fig, PLOTS[0])

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for prefix, marker, label in (("cascade@", "o-", "cascade (fixed top-k)"),
                                  ("conformal@", "s--", "cascade, conformal candidate sets")):
        rows = [s for s in result.systems if s.name.startswith(prefix)]
        if not rows:
            continue
        x = [100 * s.escalation_rate for s in rows]
        yv = [100 * s.summary.balanced_accuracy for s in rows]
        line, = ax.plot(x, yv, marker, label=f"{label}, {result.deferral.get('metric_in_table', '')} rule".rstrip(", "))
        if all(s.ci.get("balanced_accuracy") for s in rows):
            lo = [100 * s.ci["balanced_accuracy"][0] for s in rows]
            hi = [100 * s.ci["balanced_accuracy"][1] for s in rows]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    base = 100 * cnn.summary.balanced_accuracy
    ax.axhline(base, color="grey", ls="--", label="CNN only")
    if cnn.ci.get("balanced_accuracy"):
        ax.axhspan(100 * cnn.ci["balanced_accuracy"][0], 100 * cnn.ci["balanced_accuracy"][1], color="grey", alpha=0.1)
    for s in result.systems:
        if s.name == "vlm-always":
            ax.axhline(100 * s.summary.balanced_accuracy, color="tab:red", ls=":", label="VLM always (its own choice)")
    ax.set(xlabel="escalation rate (% of images sent to the VLM)", ylabel="balanced accuracy (%)",
           title="Balanced accuracy vs escalation rate" + (" (bands: bootstrap 95%)" if result.bootstrap else ""),
           xlim=(-2, 102))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, PLOTS[1])

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
    save(fig, PLOTS[2])

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    d = result.deferral
    if d and d.get("rules"):
        for rule, e in d["rules"].items():
            color, ls = RULE_STYLE.get(rule, (None, "-"))
            x = 100 * np.asarray(e["rates"])
            yv = 100 * np.asarray(e["balanced_accuracy"])
            ax.plot(x, yv, ls, color=color, lw=2 if rule == "learned" else 1.3,
                    label=f"{rule} (area {100 * e['auc']:.1f})")
            if e.get("balanced_accuracy_ci"):
                ci = 100 * np.asarray(e["balanced_accuracy_ci"], dtype=float)
                ax.fill_between(x, ci[:, 0], ci[:, 1], color=color, alpha=0.12, lw=0)
        ax.axhline(100 * d["cnn_balanced_accuracy"], color="grey", ls="--", lw=1, label="CNN only")
        target = d["cnn_balanced_accuracy"] + 0.9 * d["vlm_always_gain"]
        if d["vlm_always_gain"] > 0:
            ax.axhline(100 * target, color="k", ls=":", lw=1, label="90% of the VLM-always gain")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no VLM scores in the score file:\nno deferral rule to compare", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(xlabel="escalation rate (% of images sent to the VLM)", ylabel="balanced accuracy (%)",
           title="Deferral rules on the same folds" + (" (bands: bootstrap 95%)" if result.bootstrap else ""),
           xlim=(-2, 102))
    ax.grid(alpha=0.3)
    save(fig, PLOTS[3])

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    cf = result.conformal
    if cf:
        names = list(cf["sets"])
        cov = [100 * cf["sets"][k]["coverage"] for k in names]
        err = None
        if all(cf["sets"][k].get("coverage_ci") for k in names):
            err = np.array([[100 * (cf["sets"][k]["coverage"] - cf["sets"][k]["coverage_ci"][0]),
                             100 * (cf["sets"][k]["coverage_ci"][1] - cf["sets"][k]["coverage"])] for k in names]).T
        axes[0].bar(range(len(names)), cov, yerr=err, color=["tab:red", "tab:orange", "tab:blue"][: len(names)],
                    capsize=4)
        axes[0].axhline(100 * cf["target_coverage"], color="k", ls="--", lw=1, label="target 1 - alpha")
        axes[0].set_xticks(range(len(names)))
        axes[0].set_xticklabels([f"{k}\nmean size {cf['sets'][k]['mean_size']:.2f}" for k in names], fontsize=8)
        axes[0].set(ylabel="coverage of the true breed (%)", ylim=(0, 105), title="Coverage (held-out folds)")
        axes[0].legend(fontsize=8, loc="lower right")
        first = cf["sets"][names[0]]["size_counts"]
        sizes = sorted(int(k) for k in first)
        axes[1].bar(sizes, [first[k] for k in sizes], color="tab:red")
        axes[1].axvline(cf["scored_k"], color="tab:blue", ls="--", label=f"fixed top-{cf['scored_k']}")
        axes[1].set(xlabel="candidate set size (breeds the VLM is asked about)", ylabel="images",
                    title=f"Set sizes ({names[0]})")
        axes[1].legend(fontsize=8)
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "conformal candidate sets off", ha="center", va="center", transform=ax.transAxes)
    save(fig, PLOTS[4])
    return paths


def render_report(result, out: Path, context: dict | None = None) -> Path:
    """Writes report.md, results.json and the plots into ``out``; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    plots = render_plots(result, out)
    context = context or {}
    (out / "results.json").write_text(json.dumps({**result.to_dict(), "context": context}, indent=1, default=str))
    boot = (f"Intervals: bootstrap 95% over {result.bootstrap} resamples of the images (percentile); the Δ column is "
            "a paired bootstrap against CNN-only on the same resamples (* = its interval excludes 0). They hold the "
            "fitted thresholds and blender fixed." if result.bootstrap else "No bootstrap intervals (--bootstrap 0).")
    lines = [
        "# Offline accuracy benchmark", "",
        f"{len(result.labels)} labelled images, {len(result.label_names)} classes. Thresholds, blender, learned "
        f"deferral rule and candidate sets are cross-fitted: each image is answered by what was fitted on the other "
        f"folds.", "",
        *(f"- {k}: {v}" for k, v in context.items()), "",
        markdown_table(result), "",
        "Escalated % is the measured rate on held-out folds; minority recall is the mean recall of classes "
        "below median support. VLM always = the VLM's own choice among the CNN's top-k. " + boot, "",
    ]
    rules = deferral_table(result)
    if rules:
        lines += ["## Deferral rules compared (same folds, same blender, rate objective)", "", rules, ""]
    sets = conformal_table(result)
    if sets:
        lines += ["## Conformal candidate sets", "", sets, ""]
    lines += [*(f"> {n}" for n in result.notes), "", *(f"![{p.stem}]({p.name})" for p in plots), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(args: argparse.Namespace) -> int:
    from catcascade.ensemble.offline_eval import OfflineEvalConfig, evaluate_offline
    from catcascade.ensemble.score_files import ScoreSet

    out: Path = args.out
    t0 = time.perf_counter()
    if args.data is not None:
        from catcascade.training.score_runner import ScoreRunConfig, score_image_folder

        vllm = None
        if getattr(args, "start_vlm", False):
            from catcascade.ensemble.bundle import load_bundle
            from catcascade.vlm_stage.vllm_server import VllmServer, VllmServerConfig

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
                            refit_temperature=args.refit_temperature, seed=args.seed, rules=tuple(args.rules),
                            conformal_alpha=args.conformal_alpha, conformal_method=args.conformal_method,
                            conformal_max_size=args.conformal_max_size, bootstrap=args.bootstrap)
    result = evaluate_offline(scores, cfg)
    context = {"score files": ", ".join(sources), "bundle": scores.meta.get("bundle_version", scores.meta.get("bundle")),
               "VLM model": scores.meta.get("vlm_model"), "images with VLM scores": int(scores.has_vlm.sum()),
               "blender": cfg.blender, "deferral rule (table)": cfg.metric, "threshold objective": cfg.objective,
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
    d = result.deferral
    if d and d.get("rules"):
        rules = Table(title="deferral rules on the same folds")
        for col in ("rule", "area %", "bal acc @20% %", "esc % for 90% gain"):
            rules.add_column(col, justify="right" if col != "rule" else "left")
        j = min(range(len(d["budgets"])), key=lambda i: abs(d["budgets"][i] - 0.2))
        for rule, e in d["rules"].items():
            rules.add_row(rule, _fmt(e["auc"], True), _fmt(e["balanced_accuracy"][j], True),
                          _fmt(e["rate_for_90pct_gain"], True))
        console.print(rules)
    if result.conformal:
        for name, e in result.conformal["sets"].items():
            console.print(f"{name}: coverage {100 * e['coverage']:.1f}%, mean size {e['mean_size']:.2f}")
    for n in result.notes:
        console.print(f"note: {n}")
    print(f"report: {report}")
    return 0


def register(subparsers) -> None:
    from catcascade.ensemble.cli_commands import user_errors

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
