#!/usr/bin/env python
"""Memory over a batch: peak RSS of each of 20 slides in one `tile` and one `predict` process.

    .venv/bin/python benchmarks/batch_memory.py                        # 20 slides of 10000 px
    .venv/bin/python benchmarks/batch_memory.py --slides 20 --size 10000 --tile-size 512 --batch-size 8

A peer's memory that climbs from slide to slide gets an unattended batch killed at slide 150;
this shows whether histodg's does. Slides: ../shared/tools/make_large_slide.py with seeds
0..N-1. One fresh process per command runs the batch as the CLI does (`run_jobs` over
`tile_slide` / `predict_slide`); before each slide the kernel's peak-RSS mark is reset
(`/proc/self/clear_refs` 5), after it the peak (VmHWM) and what stays resident (VmRSS) are read.
predict uses a fixed, untrained Unet-resnet18 (weights none) and predicts only the first
`--fraction` of each slide's tissue windows (a CPU would take hours per slide); its
probability map, mask, GeoJSON and overlay are still written for the whole slide, which is
what grows with the slide. The model and its batch are measured by `--model-only`: peak RSS of
the forward pass alone for each tile size and batch size (what a GPU would hold as activations;
the CUDA context and cuDNN workspace come on top and are not measured on this machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_slide, maxrss_mb, run_child  # noqa: E402


def status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measured(run_one):
    """run_one, with each slide's peak and resident memory recorded."""
    curve = []

    def wrapped(job, progress):
        reset_peak()
        t0 = time.perf_counter()
        result = run_one(job, progress)
        assert result.status == "done", result.error
        curve.append({"slide": job.name, "peak_mb": status_mb("VmHWM"), "rss_after_mb": status_mb("VmRSS"),
                      "seconds": time.perf_counter() - t0})
        return result

    return wrapped, curve


def tile_batch(slides: list[Path], out: Path, args) -> list[dict]:
    from histodg.batch import run_jobs
    from histodg.slides.inputs import SlideJob
    from histodg.tiling import ReadOptions, TileOptions, TileSettings, tile_slide

    opts = TileOptions(TileSettings(tile_size=args.tile_size, mpp=args.mpp), ReadOptions(workers=args.workers))
    run_one, curve = measured(lambda job, progress: tile_slide(job, out, opts, progress))
    run_jobs([SlideJob(p, p.stem) for p in slides], run_one)
    return curve


def predict_batch(slides: list[Path], out: Path, args) -> list[dict]:
    from predict_throughput import build

    from histodg.batch import run_jobs
    from histodg.inference import predict_slide
    from histodg.slides.inputs import SlideJob

    args.arch, args.encoder, args.device = "Unet", "resnet18", "cpu"
    pred = build(args)
    run_one, curve = measured(lambda job, progress: predict_slide(pred, job, out, progress))
    run_jobs([SlideJob(p, p.stem) for p in slides], run_one)
    return curve


def model_only(args) -> list[dict]:
    """Peak RSS of the model's forward alone, per tile size and batch size (fresh processes)."""
    rows = []
    for tile in (256, 512):
        for batch in (4, 8, 16):
            cmd = [sys.executable, __file__, "--child", "forward", "--tile-size", str(tile), "--batch-size", str(batch)]
            rows.append({"tile": tile, "batch": batch, **run_child(cmd, "forward")})
    return rows


def forward(args) -> dict:
    import torch

    from histodg.model.build import build_model

    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", "none", 1).eval()
    idle = status_mb("VmRSS")
    with torch.inference_mode():
        model(torch.rand(args.batch_size, 3, args.tile_size, args.tile_size))
    return {"model_loaded_mb": idle, "peak_mb": status_mb("VmHWM")}


def child(args) -> None:
    if args.child == "forward":
        print(json.dumps(forward(args)))
        return
    out = Path(args.scratch)
    shutil.rmtree(out, ignore_errors=True)
    slides = [Path(p) for p in args.child_slides]
    curve = (tile_batch if args.child == "tile" else predict_batch)(slides, out, args)
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"curve": curve, "maxrss_mb": maxrss_mb()}))


def summary(name: str, curve: list[dict]) -> str:
    peaks = [c["peak_mb"] for c in curve]
    after = [c["rss_after_mb"] for c in curve]
    return (f"| {name} | {len(curve)} | {peaks[0]:.0f} | {peaks[-1]:.0f} | {max(peaks):.0f} | "
            f"{peaks[-1] - peaks[0]:+.0f} | {after[0]:.0f} -> {after[-1]:.0f} | "
            f"{' '.join(f'{p:.0f}' for p in peaks)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=20)
    ap.add_argument("--size", type=int, default=10000)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--fraction", type=float, default=0.01, help="part of each slide's windows predict runs")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out")
    ap.add_argument("--child", choices=["tile", "predict", "forward"])
    ap.add_argument("--child-slides", nargs="+")
    ap.add_argument("--scratch")
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.out.mkdir(parents=True, exist_ok=True)
    slides = [ensure_slide(args.size, args.out / "memory", seed) for seed in range(args.slides)]
    res = {}
    for kind in ("tile", "predict"):
        cmd = [sys.executable, __file__, "--child", kind, "--mpp", str(args.mpp), "--tile-size", str(args.tile_size),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--fraction", str(args.fraction),
               "--scratch", str(args.out / f"scratch_memory_{kind}"), "--child-slides", *map(str, slides)]
        res[kind] = run_child(cmd, kind)
    res["forward"] = model_only(args)
    (args.out / "batch_memory.json").write_text(json.dumps(res, indent=2))
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.slides} slides of {args.size} px, {args.tile_size} px at {args.mpp} um/px, batch {args.batch_size}\n")
    print("| command | slides | peak MB slide 1 | peak MB last slide | max | last - first | RSS after slide: first -> last "
          "| peak MB per slide |")
    print("|---|---|---|---|---|---|---|---|")
    print(summary("histodg tile", res["tile"]["curve"]))
    print(summary(f"histodg predict (Unet-resnet18, batch {args.batch_size})", res["predict"]["curve"]))
    print("\n| tile px | batch | model loaded MB | peak MB with one forward |\n|---|---|---|---|")
    for r in res["forward"]:
        print(f"| {r['tile']} | {r['batch']} | {r['model_loaded_mb']:.0f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
