#!/usr/bin/env python
"""CPU runtimes for the default network (issue 30 §2, first measurement): model-only windows/s.

    .venv/bin/python benchmarks/cpu_runtimes.py                      # 256 px windows, batch 8, 2 threads
    .venv/bin/python benchmarks/cpu_runtimes.py --tile 512 --batch 4 --skip compile

The default model's network (FPN, ImageNet EfficientNet-Lite0, one class), its weights as they
come (no training needed to time it), on random uint8 windows, each contender in one process in
turn, the same inputs: eager float32 (what `predict` runs on a CPU today), eager channels_last,
eager under bf16 autocast, `torch.compile` (inductor; its compile time reported apart), and
onnxruntime on the file `histodg export` writes (normalisation and sigmoid inside it, so it does
slightly more). Each: `--warmup` batches, then the best of `--repeat` timed runs of `--batches`
batches. Outputs are compared with eager float32 (largest probability difference). Results:
bench_out/cpu_runtimes.json (copy into benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def timed(run, batches: int, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        run()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(batches):
            run()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", action="append", default=[], help="contenders to leave out (compile, bf16, onnxruntime)")
    a = ap.parse_args()
    import torch

    from histodg.model.build import build_model
    from histodg.model.checkpoint import save_checkpoint
    from histodg.model.config import ModelConfig
    from histodg.model.export import export_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = build_model("fpn", "tu-efficientnet_lite0", "imagenet", 1).eval()
    x8 = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (a.batch, 3, a.tile, a.tile), dtype=np.uint8))
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1) * 255
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1) * 255
    x = (x8.float() - mean) / std
    n = a.batch * a.batches
    out: dict = {"tile": a.tile, "batch": a.batch, "threads": a.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "capability": torch.backends.cpu.get_cpu_capability(), "runs": {}}
    with torch.inference_mode():
        ref = torch.sigmoid(net(x)).numpy()

    def record(name, run, result=None, extra=None):
        secs = timed(run, a.batches, a.warmup, a.repeat)
        got = result() if result else None
        out["runs"][name] = {"windows_per_s": n / secs, **(extra or {}),
                             **({"max_abs_diff": float(np.abs(got - ref).max())} if got is not None else {})}
        print(name, json.dumps(out["runs"][name]), flush=True)

    with torch.inference_mode():
        record("eager fp32", lambda: net(x), lambda: torch.sigmoid(net(x)).numpy())
        cl = net.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        record("eager channels_last", lambda: cl(xc), lambda: torch.sigmoid(cl(xc)).float().numpy())
        net = net.to(memory_format=torch.contiguous_format)
        if "bf16" not in a.skip:
            def bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return net(x)
            record("eager bf16 autocast", bf16, lambda: torch.sigmoid(bf16().float()).numpy())
    if "compile" not in a.skip:
        t = time.perf_counter()
        compiled = torch.compile(net)
        with torch.inference_mode():
            compiled(x)
        took = time.perf_counter() - t
        with torch.inference_mode():
            record("torch.compile", lambda: compiled(x), lambda: torch.sigmoid(compiled(x)).numpy(), {"compile_s": took})
    if "onnxruntime" not in a.skip:
        import onnxruntime

        with tempfile.TemporaryDirectory() as tmp:
            mc = ModelConfig(arch="fpn", encoder="tu-efficientnet_lite0", mpp=0.5, tile_size=a.tile)
            save_checkpoint(Path(tmp) / "ck.pt", {"model_state": net.state_dict(), "model_config": mc})
            export_model(Path(tmp) / "ck.pt", Path(tmp) / "m.onnx")
            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = a.threads
            opts.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(str(Path(tmp) / "m.onnx"), opts, providers=["CPUExecutionProvider"])
            feed = {"rgb": x8.numpy()}
            record("onnxruntime (exported file)", lambda: session.run(None, feed), lambda: session.run(None, feed)[0])
    base = out["runs"]["eager fp32"]["windows_per_s"]
    for r in out["runs"].values():
        r["vs_eager_fp32"] = r["windows_per_s"] / base
    path = REPO / "bench_out" / "cpu_runtimes.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: round(v["vs_eager_fp32"], 2) for k, v in out["runs"].items()}))


if __name__ == "__main__":
    main()
