#!/usr/bin/env python
"""Prediction throughput: `predict_slide` against the pure model forward on the same windows.

    .venv/bin/python benchmarks/predict_throughput.py                          # 20000 and 40000 px, 96 windows each
    .venv/bin/python benchmarks/predict_throughput.py --max-windows 0          # every tissue window (long on a CPU)
    .venv/bin/python benchmarks/predict_throughput.py --device cuda --batch-size 32 --max-windows 0

Slides come from ../shared/tools/make_large_slide.py (built into bench_out/ when missing). A fixed,
untrained model (default Unet-resnet18, encoder weights none, seed 0) predicts at `--mpp` with
`--tile-size` windows and 50% overlap. Each measurement runs in a fresh process, so peak RSS is
its own:

- predict: the whole `predict_slide` job (thumbnail, tissue mask, planning, reading windows in
  `--workers` threads, the model, Gaussian stitching into prob.zarr, then mask.ome.tiff,
  tumor.geojson, overlay.png and done.json) - everything, so it is the conservative side;
- forward: the same model on the same number of windows with the same batch size, from
  normalised float tensors already in memory (on the device), nothing else: the floor.

On a CPU the full slides take hours with a 512 px model, so by default only the first
`--max-windows` tissue windows in visiting order are predicted (the outputs still cover the whole
slide: the writers run at full size). slides/hour is extrapolated from windows/s and the slide's
tissue windows. Prints a markdown table (paste into BENCHMARKS.md) and writes JSON next to the
slides.
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


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(args):
    import torch

    from histodg.inference import PredictOptions, Predictor, ReadOptions, WriteOptions
    from histodg.model.build import build_model
    from histodg.model.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(args.arch, args.encoder, "none", 1)
    mc = ModelConfig(arch=args.arch, encoder=args.encoder, mpp=args.mpp, tile_size=args.tile_size)
    # one pass per window, as the recorded numbers were made (predict defaults to --tta flip since
    # 2026-12-07: 4x the model time, the same pipeline around it)
    opts = PredictOptions(batch_size=args.batch_size, device=args.device, read=ReadOptions(workers=args.workers),
                          write=WriteOptions(overwrite=True),
                          window_fraction=args.fraction, tta="none")
    return Predictor(model, mc, opts)


def plan(args) -> dict:
    from histodg.inference import plan_prediction
    from histodg.slides.opening import open_slide

    pred = build(args)
    with open_slide(args.slide) as s:
        p = plan_prediction(s, pred)
        return {"tissue_windows": len(p.windows), "grid_windows": p.total_windows, "out_shape": list(p.out_shape)}


def run_predict(args) -> dict:
    import numcodecs  # noqa: F401 - imports are paid once per batch of slides: keep them off the clock
    import tiffslide  # noqa: F401
    import zarr  # noqa: F401

    from histodg.inference import predict_slide
    from histodg.slides.inputs import SlideJob

    pred = build(args)
    rss_ready = rss_now_mb()
    out = Path(args.scratch)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = predict_slide(pred, SlideJob(Path(args.slide), "bench"), out)
    dt = time.perf_counter() - t0
    assert res.status == "done", res.error
    done = json.loads((out / "bench" / "done.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": dt, "windows": res.windows, "timings": res.timings, "rss_ready_mb": rss_ready,
            "stitching": done["stitching"], "device": str(pred.device)}


def run_forward(args) -> dict:
    import torch

    pred = build(args)
    n, b, t = args.windows, args.batch_size, args.tile_size
    sizes = [min(b, n - i) for i in range(0, n, b)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (b, t, t, 3), dtype=torch.uint8, generator=gen)
    batch = pred.normalizer(x.to(pred.device).permute(0, 3, 1, 2))
    if not pred.placement.channels_last:
        batch = batch.contiguous()
    inputs = {k: batch[:k] for k in set(sizes)}
    from histodg.device import autocast

    amp = autocast(pred.placement)

    def sync():
        if pred.cuda:
            torch.cuda.synchronize()

    with torch.inference_mode(), amp:
        pred.model(inputs[sizes[0]])  # warm-up, as the Predictor's own check forward is for predict
        sync()
        t0 = time.perf_counter()
        for k in sizes:
            pred.model(inputs[k])
        sync()
        dt = time.perf_counter() - t0
    return {"seconds": dt, "windows": n}


RUNNERS = {"plan": plan, "predict": run_predict, "forward": run_forward}


def child(args) -> None:
    res = RUNNERS[args.child](args)
    res["maxrss_mb"] = maxrss_mb()
    print(json.dumps(res))


def measure(kind: str, slide: Path, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--slide", str(slide), "--mpp", str(args.mpp),
           "--tile-size", str(args.tile_size), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--arch", args.arch, "--encoder", args.encoder, "--device", args.device,
           "--scratch", str(args.out / f"scratch_{kind}")]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return run_child(cmd, kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 40000])
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--arch", default="unet")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--max-windows", type=int, default=96, help="Tissue windows predicted per slide (0: all).")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out")
    ap.add_argument("--child", choices=list(RUNNERS))
    ap.add_argument("--slide")
    ap.add_argument("--scratch")
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--windows", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        slide = ensure_slide(size, args.out)
        p = measure("plan", slide, args)
        n_tissue = p["tissue_windows"]
        fraction = 1.0 if not args.max_windows or args.max_windows >= n_tissue else args.max_windows / n_tissue
        pr = measure("predict", slide, args, fraction=repr(fraction))
        fw = measure("forward", slide, args, windows=pr["windows"])
        n = pr["windows"]
        row = {
            "size": size, "out_shape": p["out_shape"], "tissue_windows": n_tissue, "windows": n, "fraction": fraction,
            "predict_s": pr["seconds"], "forward_s": fw["seconds"], "ratio": pr["seconds"] / fw["seconds"],
            "windows_per_s": n / pr["seconds"], "forward_windows_per_s": n / fw["seconds"],
            "slides_per_hour": 3600 / (pr["seconds"] * n_tissue / n),
            "peak_rss_mb": pr["maxrss_mb"], "rss_model_ready_mb": pr["rss_ready_mb"], "forward_peak_rss_mb": fw["maxrss_mb"],
            "timings": pr["timings"], "stitching": pr["stitching"], "device": pr["device"],
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    (args.out / "predict_throughput.json").write_text(json.dumps(rows, indent=2))
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, device "
          f"{rows[0]['device']}; {args.arch}-{args.encoder} (untrained), {args.tile_size} px at {args.mpp} um/px, 50% overlap, "
          f"--batch-size {args.batch_size}, --workers {args.workers}\n")
    print("| slide px | tissue windows | windows run | predict s | forward s | predict / forward | windows/s | "
          "slides/hour (extrapolated) | peak RSS MB (model ready) | reading s (threads) | waiting for reads s | writing s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["timings"]
        print(f"| {r['size']} | {r['tissue_windows']} | {r['windows']} | {r['predict_s']:.1f} | {r['forward_s']:.1f} | "
              f"{r['ratio']:.3f}x | {r['windows_per_s']:.2f} | {r['slides_per_hour']:.2f} | {r['peak_rss_mb']:.0f} "
              f"({r['rss_model_ready_mb']:.0f}) | {t.get('reading', 0):.1f} | {t.get('waiting_for_reads', 0):.2f} | "
              f"{t.get('writing', 0):.1f} |")
    if len(rows) >= 2:
        print(f"\nPeak RSS {rows[-1]['size']} px / {rows[0]['size']} px: {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f}x")


if __name__ == "__main__":
    main()
