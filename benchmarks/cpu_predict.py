#!/usr/bin/env python
"""`predict` on a CPU by runtime (issue 30 §2): whole-job windows/s against the network alone.

    .venv/bin/python benchmarks/cpu_predict.py                       # 20000 px slide, the first 600 tissue windows
    .venv/bin/python benchmarks/cpu_predict.py --windows 2000 --tta flip

The model is the default's shape: FPN with EfficientNet-Lite0 (weights as built: timing does not
depend on them), `--method dsbn` with three domain slots and a domain-shift reference, 256 px
windows at 0.5 um/px, batch 8, 50% overlap. The slide (../shared/tools/make_large_slide.py, in
bench_out/) is of an unknown scanner, so each job also pays what a DSBN model's unseen slide pays:
the shared slot's statistics estimated on 64 windows and the shift meter's unadapted pass. Each
measurement runs in a process of its own, one after the other:

- predict --runtime torch: the whole `predict_slide` job (reading in threads, the model,
  stitching, every output, done.json), what predict ran on a CPU before `--runtime`;
- predict --runtime auto: the same, where auto picks onnx (the slide has over 500 windows); the
  export is inside the job's time and also reported alone;
- forward torch / forward onnx: the network alone on the same number of windows, normalised inputs
  in memory: each runtime's model-only floor.

Results: bench_out/cpu_predict.json (copy into benchmarks/results/), a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_slide, maxrss_mb, run_child  # noqa: E402

TILE, MPP, BATCH = 256, 0.5, 8


def checkpoint(out: Path) -> Path:
    """A DSBN checkpoint of the default network with a shift reference (fitted on random windows)."""
    import numpy as np
    import torch

    from histodg.model.build import build_model
    from histodg.model.checkpoint import save_checkpoint
    from histodg.model.config import ModelConfig
    from histodg.model.domain_bn import convert, domain, sync_shared
    from histodg.model.normalize import Normalizer
    from histodg.model.shift import FeatureMeter, fit_reference

    path = out / "cpu_predict_dsbn.pt"
    torch.manual_seed(0)
    model = build_model("fpn", "tu-efficientnet_lite0", "none", 1)
    convert(model, 3)
    sync_shared(model)
    model.eval()
    config = ModelConfig(arch="fpn", encoder="tu-efficientnet_lite0", mpp=MPP, tile_size=TILE, method="dsbn",
                         domain_bn=["s1", "s2", "s3"])
    norm = Normalizer(config.normalization.mean, config.normalization.std, "cpu")
    rng, per = np.random.default_rng(0), {}
    for k, name in enumerate(config.domain_bn):
        meter = FeatureMeter(model)
        with torch.inference_mode(), domain(model, k):
            model(norm(torch.from_numpy(rng.integers(100, 230, (4, 3, TILE, TILE), dtype=np.uint8))))
        meter.remove()
        per[name] = {f"{name}-a": meter.take()}
    config = replace(config, shift=fit_reference(per))
    save_checkpoint(path, {"model_state": model.state_dict(), "model_config": config})
    return path


def run_predict(args) -> dict:
    import numcodecs  # noqa: F401 - imports are paid once per batch of slides: keep them off the clock
    import tiffslide  # noqa: F401
    import zarr  # noqa: F401

    from histodg.inference import PredictOptions, Predictor, ReadOptions, WriteOptions, predict_slide
    from histodg.slides.inputs import SlideJob

    opts = PredictOptions(batch_size=BATCH, device="cpu", runtime=args.runtime, tta=args.tta,
                          read=ReadOptions(workers=args.workers), write=WriteOptions(overwrite=True),
                          window_fraction=args.fraction)
    pred = Predictor.from_checkpoint(args.checkpoint, opts)
    out = Path(args.scratch)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = predict_slide(pred, SlideJob(Path(args.slide), "bench", scanner="unseen"), out)
    dt = time.perf_counter() - t0
    assert res.status == "done", res.error
    done = json.loads((out / "bench" / "done.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": dt, "windows": res.windows, "timings": res.timings, "runtime": done["settings"]["runtime"],
            "adaptation": done["adaptation"], "shift_raw": (done["shift"] or {}).get("raw")}


def run_forward(args) -> dict:
    import torch

    from histodg.inference import PredictOptions, Predictor

    pred = Predictor.from_checkpoint(args.checkpoint, PredictOptions(batch_size=BATCH, device="cpu", runtime="torch"))
    n = args.windows * (4 if args.tta == "flip" else 1)  # forwards, as predict runs them
    sizes = [min(BATCH, n - i) for i in range(0, n, BATCH)]
    x = torch.randint(0, 256, (BATCH, TILE, TILE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = pred.normalizer(x.permute(0, 3, 1, 2)).contiguous()
    export_s = None
    if args.runtime == "onnx":
        from histodg.inference.onnx_net import OnnxNetwork

        t0 = time.perf_counter()
        net = OnnxNetwork(pred.model, TILE, pred.meter)
        export_s = time.perf_counter() - t0
    else:
        net = pred.model
    with torch.inference_mode():
        net(batch)  # warm-up (onnx: builds its session)
        t0 = time.perf_counter()
        for k in sizes:
            net(batch[:k])
        dt = time.perf_counter() - t0
    return {"seconds": dt, "windows": args.windows, "export_s": export_s}


RUNNERS = {"predict": run_predict, "forward": run_forward}
RUNS = ("predict torch", "predict auto", "forward torch", "forward onnx")


def measure(kind: str, args, runtime: str, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--runtime", runtime, "--checkpoint", str(args.checkpoint),
           "--slide", str(args.slide), "--tta", args.tta, "--workers", str(args.workers),
           "--scratch", str(args.out / f"scratch_{kind}")]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    return run_child(cmd, f"{kind} {runtime}")


def environment() -> dict:
    import onnxruntime
    import torch

    return {"machine": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--windows", type=int, default=600, help="Tissue windows predicted (the first, in visiting order; 0: all).")
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="Which runs (default: all four).")
    ap.add_argument("--name", default="cpu_predict", help="bench_out/NAME.json")
    ap.add_argument("--tta", choices=("none", "flip"), default="none")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", type=Path, default=REPO / "bench_out")
    ap.add_argument("--child", choices=list(RUNNERS))
    ap.add_argument("--runtime", default="torch")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--slide")
    ap.add_argument("--scratch")
    ap.add_argument("--fraction", type=float, default=1.0)
    args = ap.parse_args()
    if args.child:
        res = RUNNERS[args.child](args)
        res["maxrss_mb"] = maxrss_mb()
        print(json.dumps(res))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    args.slide = ensure_slide(args.size, args.out)
    args.checkpoint = checkpoint(args.out)
    from histodg.inference import PredictOptions, Predictor, plan_prediction
    from histodg.slides.opening import open_slide

    with open_slide(args.slide) as s:
        tissue = len(plan_prediction(s, Predictor.from_checkpoint(args.checkpoint, PredictOptions(device="cpu", runtime="torch"))))
    fraction = min(1.0, args.windows / tissue) if args.windows else 1.0
    runs: dict[str, dict] = {}
    for name in (r for r in RUNS if r in args.runs):
        kind, runtime = name.split()
        ran = next((r["windows"] for k, r in runs.items() if k.startswith("predict")), round(fraction * tissue))
        extra = {"fraction": repr(fraction)} if kind == "predict" else {"windows": ran}
        runs[name] = measure(kind, args, runtime, **extra)
        print(json.dumps({name: runs[name]}), file=sys.stderr)
    rate = {k: r["windows"] / r["seconds"] for k, r in runs.items()}

    def ratio(a, b):
        return rate[a] / rate[b] if a in rate and b in rate else None

    result = {"environment": environment(), "slide_px": args.size, "tissue_windows": tissue, "tta": args.tta,
              "model": f"fpn-tu-efficientnet_lite0 dsbn, {TILE} px at {MPP} um/px, batch {BATCH}", "runs": runs,
              "windows_per_s": rate, "predict_auto_over_torch": ratio("predict auto", "predict torch"),
              "forward_onnx_over_predict_auto": ratio("forward onnx", "predict auto"),
              "forward_onnx_over_forward_torch": ratio("forward onnx", "forward torch")}
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    print(f"\n{result['model']}; slide {args.size} px, {tissue} tissue windows, first {next(iter(runs.values()))['windows']} "
          f"run; --tta {args.tta}; {result['environment']}\n")
    print("| run | runtime used | seconds | windows/s |\n|---|---|---|---|")
    for k, r in runs.items():
        print(f"| {k} | {r.get('runtime', k.split()[1])} | {r['seconds']:.1f} | {rate[k]:.2f} |")
    for key in ("predict_auto_over_torch", "forward_onnx_over_predict_auto", "forward_onnx_over_forward_torch"):
        if result[key] is not None:
            print(f"{key}: {result[key]:.2f}x")


if __name__ == "__main__":
    main()
