"""`catcascade demo` and `build-demo`: the whole cascade on this machine, from nothing, in a few
minutes. The demo assembles every layer (training builds the bundle, serving serves it, the
client asks), so it lives at the top, beside the command line.

Builds the embedded default bundle when missing, starts the real vLLM server with the LoRA
adapter, starts the gRPC server, classifies a handful of images through a real gRPC client,
prints a table and shuts everything down.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

from catcascade.serving.commands import DEFAULT_BUNDLE


def demo_images(bundle_dir: Path, n_synthetic: int = 6, n_real: int = 4, seed: int = 0,
                data: Path | None = None) -> list[Path]:
    """Held-out synthetic images from the bundle's split, plus a few real photos from ``data``
    (an ImageFolder, ``<breed>/<image>``) when one is given."""
    images: list[Path] = []
    split = bundle_dir / "data" / "split.json"
    if split.is_file():
        from catcascade.training.datasets import load_split

        test = [s.path for s in load_split(split, bundle_dir / "data").test]
        images += random.Random(seed).sample(test, min(n_synthetic, len(test)))
    if data is not None:
        real = sorted(p for p in Path(data).glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        images += random.Random(seed).sample(real, min(n_real, len(real)))
    return images


def run_demo(bundle_dir: Path, use_vlm: bool = True, images: list[Path] | None = None, mode: str = "auto",
             data: Path | None = None) -> int:
    from rich.console import Console

    from catcascade.ensemble.bundle import load_bundle
    from catcascade.client import CatcascadeClient, results_table
    from catcascade.serving.config import ServeConfig, VlmEndpointConfig
    from catcascade.serving.service_thread import ServiceThread

    console = Console(width=200)
    t0 = time.perf_counter()
    if not (bundle_dir / "manifest.json").is_file():
        from catcascade.training.demo_bundle import build_demo_bundle

        console.print(f"[bold]No bundle at {bundle_dir}: building the embedded default[/bold]")
        build_demo_bundle(bundle_dir)
    bundle = load_bundle(bundle_dir)
    images = images or demo_images(bundle_dir, data=data)
    if not images:
        console.print("[red]no images to classify[/red]")
        return 2
    vllm = None
    if use_vlm and bundle.manifest.vlm is not None:
        from catcascade.vlm_stage.vllm_server import VllmServer, VllmServerConfig

        console.print("[bold]Starting the vLLM server[/bold] (about a minute on a CPU)...")
        vllm = VllmServer(VllmServerConfig.for_bundle(bundle),
                          log_path=bundle_dir.parent / "logs" / "vllm-demo.log").start()
        console.print(f"vLLM ready at {vllm.url}")
    try:
        cfg = ServeConfig(bundle=bundle_dir, port=0, vlm=VlmEndpointConfig(urls=[vllm.url] if vllm else []))
        with ServiceThread(cfg) as server, CatcascadeClient(server.target) as client:
            client.classify(images[0], mode="never")  # warm the CNN path
            rows = [(f"{p.parent.name}/{p.name}", client.classify(p, mode=mode)) for p in images]
    finally:
        if vllm:
            vllm.stop()
    console.print(results_table(rows, title=f"catcascade demo: {bundle.version_string} ({len(rows)} images, mode {mode})"))
    escalated = sum(r.escalated for _, r in rows)
    console.print(f"{escalated}/{len(rows)} escalated to the VLM; finished in {time.perf_counter() - t0:.0f} s")
    return 0


def _demo(args) -> int:
    images = [Path(p) for p in args.images] if args.images else None
    return run_demo(Path(args.bundle), use_vlm=not args.no_vlm, images=images, mode=args.mode,
                    data=Path(args.data) if args.data else None)


def _build_demo(args) -> int:
    from catcascade.training.demo_bundle import build_demo_bundle

    build_demo_bundle(Path(args.out))
    return 0


def register(sub) -> None:
    d = sub.add_parser("demo", help="build the default bundle if needed, serve it with vLLM, classify a few images")
    d.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle to serve; built here when missing")
    d.add_argument("--no-vlm", action="store_true", help="skip the vLLM server (CNN only)")
    d.add_argument("--mode", choices=["auto", "never", "always"], default="auto",
                   help="escalation to the VLM: auto, never or always")
    d.add_argument("--data", type=Path, help="a labelled image folder (<breed>/<image>): a few of its photos are "
                   "classified too (e.g. from `catcascade data oxford-pets DIR`)")
    d.add_argument("images", nargs="*", help="images to classify (default: a few held-out synthetic images, plus "
                   "real photos from --data)")
    d.set_defaults(func=_demo)

    b = sub.add_parser("build-demo", help="build the embedded default bundle")
    b.add_argument("--out", default=str(DEFAULT_BUNDLE), help="folder for the bundle")
    b.set_defaults(func=_build_demo)
