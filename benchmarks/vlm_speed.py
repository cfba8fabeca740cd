"""VLM verification speed: scoring mode (a) vs (b), and vLLM vs the in-process backend.

On the same images and CNN top-3 candidates (the bundle's ONNX CNN):
* mode (a) one multiple-choice request per image vs mode (b) one yes/no request per candidate:
  requests and prompt tokens per image (vLLM's ``usage`` field), p50/p95 latency per image;
* vLLM (its own server, started here) vs the in-process transformers backend, mode (a), at
  concurrency 1 and 8: images/s, p50/p95, and the ratios.

    python -m benchmarks.vlm_speed --bundle artifacts/demo-bundle --images 32

Targets: mode (a) is one request per image at <= half of mode (b)'s latency; vLLM at
concurrency 8 gives >= 3x the in-process backend's throughput. Writes JSON, Markdown and a PNG.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/demo-bundle"),
                        help="bundle with a vlm section (built with the demo recipe if missing)")
    parser.add_argument("--images", type=int, default=32, help="images per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--warmup", type=int, default=4, help="untimed images per configuration")
    parser.add_argument("--out", type=Path, default=Path("artifacts/benchmarks"))
    parser.add_argument("--skip-inprocess", action="store_true", help="measure vLLM only")
    parser.add_argument("--block-size", type=int, help="vLLM KV block size (CPU default 128: prompts shorter "
                                                        "than a block never hit the prefix cache)")
    parser.add_argument("--no-grammar-rows", action="store_true",
                        help="skip the extra concurrency-1 rows with the structured-output grammar constraint")
    parser.add_argument("--vlm-size", choices=["bundle", "small", "medium"], default="bundle",
                        help="bundle: the bundle's VLM and adapter; small / medium: a ~40M / ~200M-parameter "
                             "random LLaVA (base model only), to see how the comparison moves with compute per token")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="the same dtype for both backends (auto: float32 on a CPU)")


def _percentiles(values: list[float]) -> dict:
    import numpy as np

    a = np.asarray(values, dtype=float)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95))}


async def _run(verifier, items, concurrency: int, warmup: int, after_warmup=None) -> dict:
    """Scores every (image, candidates) pair with at most ``concurrency`` in flight;
    ``after_warmup`` (e.g. a prefix-cache reset) runs between warm-up and timing."""
    import asyncio

    for img, cands in items[:warmup]:
        await verifier.verify(img, cands)
    if after_warmup is not None:
        after_warmup()
    sem = asyncio.Semaphore(concurrency)
    results = []

    async def one(img, cands):
        async with sem:
            t0 = time.perf_counter()
            s = await verifier.verify(img, cands)
            results.append(((time.perf_counter() - t0) * 1000.0, s.requests, s.prompt_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(img, c) for img, c in items))
    wall = time.perf_counter() - t0
    lat = [r[0] for r in results]
    return {"images": len(items), "concurrency": concurrency, "images_per_s": len(items) / wall,
            "requests_per_image": sum(r[1] for r in results) / len(results),
            "prompt_tokens_per_image": sum(r[2] for r in results) / len(results), **_percentiles(lat)}


def _load_items(bundle_dir: Path, n: int):
    from PIL import Image

    from catcascade.ensemble.bundle import load_bundle
    from catcascade.training.verification_data import bundle_top_k

    bundle = load_bundle(bundle_dir)
    split = bundle_dir / "data" / "split.json"
    if split.is_file():
        from catcascade.training.datasets import load_split

        held_out = load_split(split, bundle_dir / "data")
        paths = [s.path for s in (*held_out.test, *held_out.val)]
    else:
        paths = sorted(p for p in (bundle_dir / "data").rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        raise SystemExit(f"no images under {bundle_dir / 'data'}")
    paths = (paths * (n // len(paths) + 1))[:n]
    tops = bundle_top_k(bundle_dir, paths, k=bundle.manifest.cascade.top_k)
    return bundle, [(Image.open(p).convert("RGB"), tuple(t)) for p, t in zip(paths, tops)]


def _markdown(rows: list[dict], ratios: dict) -> str:
    head = ("| backend | mode | constraint | concurrency | requests/img | prompt tokens/img | prefix cache hits "
            "| p50 ms | p95 ms | img/s |")
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        hits = f"{r['prefix_cache_hit_rate']:.0%}" if "prefix_cache_hit_rate" in r else "n/a"
        lines.append(f"| {r['backend']} | {r['mode']} | {r['constraint']} | {r['concurrency']} | {r['requests_per_image']:.1f} | "
                     f"{r['prompt_tokens_per_image']:.0f} | {hits} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                     f"{r['images_per_s']:.1f} |")
    lines += ["", "| ratio | value | target |", "| --- | --- | --- |"]
    targets = {"mode_a_p50_over_mode_b_p50": "<= 0.5", "vllm_c8_over_inprocess_c8_throughput": ">= 3",
               "mode_a_requests_per_image": "== 1"}
    lines += [f"| {k} | {v:.2f} | {targets.get(k, '')} |" for k, v in ratios.items()]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [f"{r['backend']}\n{r['mode']}\n{r['constraint']}\nc={r['concurrency']}" for r in rows]
    ax1.bar(names, [r["images_per_s"] for r in rows], color="tab:blue")
    ax1.set_ylabel("images / s")
    ax1.set_title("throughput")
    x = range(len(rows))
    ax2.bar([i - 0.2 for i in x], [r["p50_ms"] for r in rows], 0.4, label="p50")
    ax2.bar([i + 0.2 for i in x], [r["p95_ms"] for r in rows], 0.4, label="p95")
    ax2.set_xticks(list(x), names)
    ax2.set_ylabel("ms per image")
    ax2.set_title("latency per image")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict:
    import asyncio
    import os

    import httpx

    from catcascade.vlm_stage.transformers_backend import TransformersBackendConfig, TransformersVerifier
    from catcascade.vlm_stage.vllm_client import VlmClientConfig, VllmVerifier, prefix_cache_counters
    from catcascade.vlm_stage.vllm_server import VllmServer, VllmServerConfig

    if not (args.bundle / "manifest.json").is_file():
        from catcascade.training.demo_bundle import build_demo_bundle

        print(f"building the demo bundle at {args.bundle}")
        build_demo_bundle(args.bundle)
    bundle, items = _load_items(args.bundle, args.images)
    spec = bundle.manifest.vlm
    if spec is None:
        raise SystemExit(f"bundle {args.bundle} has no vlm section")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.vlm_size == "bundle":
        base, adapter = bundle.vlm_base_path(), (str(bundle.vlm_adapter_path()) if spec.adapter_dir else None)
    else:
        from catcascade.vlm_stage.tiny_model import SIZES, build_tiny_llava

        base, adapter = args.out / f"vlm-{args.vlm_size}", None
        if not (base / "config.json").is_file():
            build_tiny_llava(base, bundle.labels, size=SIZES[args.vlm_size])
        base = str(base)
    model = spec.adapter_name if adapter else spec.served_model_name
    rows: list[dict] = []

    server_cfg = VllmServerConfig(model=base, served_model_name=spec.served_model_name,
                                  lora_modules={spec.adapter_name: adapter} if adapter else {},
                                  max_model_len=spec.max_model_len, dtype=args.dtype,
                                  extra_args=["--block-size", str(args.block_size)] if args.block_size else [])
    print(f"starting vLLM for {base} (+{model})")
    # Dev mode exposes POST /reset_prefix_cache: each configuration starts from a cold cache
    # even though all of them score the same images (os.environ is copied by VllmServer).
    os.environ.setdefault("VLLM_SERVER_DEV_MODE", "1")
    with VllmServer(server_cfg, log_path=args.out / "vlm_speed_vllm.log") as server:
        def reset_cache():
            httpx.post(f"{server.url}/reset_prefix_cache", timeout=30).raise_for_status()

        runs = [("yes_no", [1], "allowed_tokens"), ("multiple_choice", args.concurrency, "allowed_tokens")]
        if not args.no_grammar_rows:
            runs += [("yes_no", [1], "grammar"), ("multiple_choice", [1], "grammar")]

        async def measure_vllm():
            for mode, levels, constraint in runs:
                v = VllmVerifier(VlmClientConfig(urls=[server.url], model=model, scoring_mode=mode, timeout_s=60,
                                                 constraint=constraint))
                try:
                    for c in levels:
                        holder = {}
                        r = await _run(v, items, c, args.warmup,
                                       lambda: (reset_cache(), holder.update(prefix_cache_counters(server.url))))
                        before = holder
                        after = prefix_cache_counters(server.url)
                        queries = after["queries"] - before["queries"]
                        r["prefix_cache_hit_rate"] = (after["hits"] - before["hits"]) / queries if queries else 0.0
                        rows.append({"backend": "vllm", "mode": mode, "constraint": constraint, **r})
                        print(f"vllm {mode} ({constraint}) c={c}: {r['images_per_s']:.1f} img/s, "
                              f"p50 {r['p50_ms']:.1f} ms")
                finally:
                    await v.aclose()

        asyncio.run(measure_vllm())
    if not args.skip_inprocess:  # measured after vLLM has stopped, so the two never share the CPU
        local = TransformersVerifier(TransformersBackendConfig(model=base, adapter=adapter, name=model,
                                                               dtype=args.dtype))

        async def measure_local():
            for c in args.concurrency:
                r = await _run(local, items, c, args.warmup)
                rows.append({"backend": "transformers", "mode": "multiple_choice", "constraint": "logits mask", **r})
                print(f"transformers multiple_choice c={c}: {r['images_per_s']:.1f} img/s, p50 {r['p50_ms']:.1f} ms")

        asyncio.run(measure_local())

    def find(backend, mode, c, constraint="allowed_tokens"):
        return next((r for r in rows if (r["backend"], r["mode"], r["concurrency"]) == (backend, mode, c)
                     and r["constraint"] in (constraint, "logits mask")), None)

    ratios = {}
    a1, b1 = find("vllm", "multiple_choice", 1), find("vllm", "yes_no", 1)
    if a1 and b1:
        ratios["mode_a_requests_per_image"] = a1["requests_per_image"]
        ratios["mode_a_p50_over_mode_b_p50"] = a1["p50_ms"] / b1["p50_ms"]
        ratios["mode_b_prompt_tokens_over_mode_a"] = b1["prompt_tokens_per_image"] / a1["prompt_tokens_per_image"]
    a1g, b1g = find("vllm", "multiple_choice", 1, "grammar"), find("vllm", "yes_no", 1, "grammar")
    if a1 and a1g:
        ratios["mode_a_p50_allowed_tokens_over_grammar"] = a1["p50_ms"] / a1g["p50_ms"]
    if a1g and b1g:
        ratios["mode_a_p50_over_mode_b_p50_with_grammar"] = a1g["p50_ms"] / b1g["p50_ms"]
    top = max(args.concurrency)
    v_top, t_top, t_one = find("vllm", "multiple_choice", top), find("transformers", "multiple_choice", top), \
        find("transformers", "multiple_choice", 1)
    if v_top and t_top:
        ratios[f"vllm_c{top}_over_inprocess_c{top}_throughput"] = v_top["images_per_s"] / t_top["images_per_s"]
    if v_top and t_one:
        ratios[f"vllm_c{top}_over_inprocess_c1_throughput"] = v_top["images_per_s"] / t_one["images_per_s"]
    result = {"bundle": str(args.bundle), "vlm": base, "adapter": adapter, "model": model, "dtype": args.dtype,
              "images": len(items),
              "rows": rows, "ratios": ratios}
    stem = args.out / ("vlm_speed" + ("" if args.vlm_size == "bundle" else f"_{args.vlm_size}")
                       + (f"_block{args.block_size}" if args.block_size else "")
                       + ("" if args.dtype == "auto" else f"_{args.dtype}"))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = _markdown(rows, ratios)
    stem.with_suffix(".md").write_text(md)
    _plot(rows, stem.with_suffix(".png"))
    print(md)
    print(f"wrote {stem}.json, .md and .png")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(p)
    main(p.parse_args())
