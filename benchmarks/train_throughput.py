#!/usr/bin/env python
"""Training throughput: the full loop reading from stores vs the same model on in-memory tensors.

    .venv/bin/python benchmarks/train_throughput.py                        # CPU: FPN-MiT-b0, 128 px, ERM
    .venv/bin/python benchmarks/train_throughput.py --arch fpn --encoder tu-efficientnet_lite0 --method dsbn \
        --tile-size 512 --device cuda --batch-size 8 --amp on --channels-last on   # the default model on a GPU

Both measurements run in one invocation, each in a fresh process (so peak RSS is its own), with
the same model, method (`--method`, ERM by default: the MiT encoder has no BatchNorm for DSBN),
batch (`--batch-size` patches from each of 3 domains per step), AMP and channels_last settings
(`--amp`, `--channels-last`: auto is on for CUDA):
- loop: `histodg.training.trainer.Trainer` on real patch stores (zarr reads in `--workers` DataLoader
  processes, flips/rot90, colour jitter, normalisation, the method's step), images/s over the
  steps after the warm-up (from the loop's own per-step callback);
- memory: the same step (colour jitter, normalisation, the method's loss and its step hooks,
  backward, AdamW) on uint8 tensors already on the device.
Target: the loop reaches at least 90% of the in-memory rate. Stores are built from
`histodg synth` data when missing (bench_out/train_tp/).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import maxrss_mb  # noqa: E402

OUT = REPO / "bench_out" / "train_tp"


def stores(tile: int, compression: str = "lz4") -> Path:
    synth, out = OUT / "synth", OUT / (f"stores_{tile}" + ("" if compression == "lz4" else f"_{compression}"))
    exe = [sys.executable, "-m", "histodg"]  # this interpreter's histodg, wherever it is installed
    if not (synth / "manifest.csv").exists():
        subprocess.run([*exe, "synth", synth, "--cases", "2"], check=True, capture_output=True)
    mpp = 1.0 if tile <= 128 else 0.5
    subprocess.run([*exe, "tile", synth / "manifest.csv", "-o", out, "--mpp", str(mpp), "--tile-size", str(tile),
                    "--min-tissue", "0.5", "--compression", compression], check=True, capture_output=True)
    return out


def child_loop(a) -> dict:
    import torch

    from histodg.training.config import TrainConfig
    from histodg.training.trainer import Callbacks, Trainer

    torch.set_num_threads(a.threads) if a.threads else None
    stamps = []
    cfg = TrainConfig(stores=(a.stores,), out_dir=str(OUT / "run"), arch=a.arch, encoder=a.encoder, encoder_weights="none",
                      domains="scanner", steps=a.steps, steps_per_epoch=a.steps, batch_size=a.batch_size,
                      workers=a.workers, val_fraction=0, device=a.device, val_max_patches=1, method=a.method,
                      amp=a.amp, channels_last=a.channels_last)
    Trainer(cfg, overwrite=True, callbacks=Callbacks(on_step=lambda info: stamps.append((time.perf_counter(), info["images"])))).run()
    warm = a.warmup
    dt = stamps[-1][0] - stamps[warm - 1][0]
    imgs = sum(n for _, n in stamps[warm:])
    out = {"images_per_s": imgs / dt, "steps": len(stamps) - warm}
    if torch.cuda.is_available() and a.device != "cpu":
        out["gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30  # the whole loop: validation included
    return out


def child_memory(a) -> dict:
    import torch

    from histodg.device import autocast, place_model, resolve_device, resolve_placement
    from histodg.model.build import build_model
    from histodg.model.config import IMAGENET_MEAN, IMAGENET_STD
    from histodg.model.normalize import Normalizer
    from histodg.training.augment import color_jitter
    from histodg.training.methods import METHODS, SegTask

    torch.set_num_threads(a.threads) if a.threads else None
    dev = resolve_device(a.device, "benchmark", lambda where, why: SystemExit(f"{where}: {why}"))
    placement = resolve_placement(dev, a.amp, a.channels_last)
    on_gpu = dev.type == "cuda"
    model = build_model(a.arch, a.encoder, "none", 1)
    norm = Normalizer(IMAGENET_MEAN, IMAGENET_STD, dev, channels_last=placement.channels_last)
    method = METHODS[a.method](model, 3, task=SegTask(), normalizer=norm)  # DSBN converts the model here
    model = place_model(model, placement)
    method = method.to(dev)
    opt = torch.optim.AdamW(method.parameters(), lr=3e-4)
    n, s = 3 * a.batch_size, a.tile_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8).to(dev)
    masks = (torch.rand(n, s, s, generator=g) > 0.5).to(torch.uint8).to(dev)
    jg = torch.Generator()
    method.train()
    stamps = []
    for step in range(a.steps):
        jg.manual_seed(step)
        x = norm(color_jitter(images.float(), jg, 0.1))
        batches = [(x[i * a.batch_size:(i + 1) * a.batch_size], masks[i * a.batch_size:(i + 1) * a.batch_size]) for i in range(3)]
        with autocast(placement):
            method.begin_step([batches])
            loss, _ = method.loss(batches)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.end_of_step()
        if on_gpu:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    dt = stamps[-1] - stamps[a.warmup - 1]
    out = {"images_per_s": n * (len(stamps) - a.warmup) / dt}
    if on_gpu:
        out["gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="fpn")
    ap.add_argument("--encoder", default="mit_b0")
    ap.add_argument("--tile-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="patches per domain per step (3 domains)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--method", default="erm", help="the training method (dsbn needs a BatchNorm encoder)")
    ap.add_argument("--amp", default="auto", choices=["auto", "on", "off"], help="bf16 autocast (auto: on for CUDA)")
    ap.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--compression", default="lz4", choices=["lz4", "none", "jpeg"], help="how the stores are tiled")
    ap.add_argument("--child", choices=["loop", "memory"])
    ap.add_argument("--stores")
    a = ap.parse_args()
    if a.child:
        res = child_loop(a) if a.child == "loop" else child_memory(a)
        res["peak_rss_mb"] = maxrss_mb()
        print(json.dumps(res))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    st = stores(a.tile_size, a.compression)
    res = {}
    for kind in ("memory", "loop"):
        cmd = [sys.executable, __file__, "--child", kind, "--stores", str(st)] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("child", "stores")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        res[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    ratio = res["loop"]["images_per_s"] / res["memory"]["images_per_s"]
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{a.arch}-{a.encoder}, {a.method}, amp {a.amp}, channels_last {a.channels_last}, {a.tile_size} px, 3 domains x {a.batch_size} patches per step, {a.workers} data worker(s), "
          f"{a.compression} stores\n")
    print("| loop images/s | in-memory images/s | loop / in-memory | loop peak RSS MB | in-memory peak RSS MB |")
    print("|---|---|---|---|---|")
    print(f"| {res['loop']['images_per_s']:.1f} | {res['memory']['images_per_s']:.1f} | {ratio:.1%} | "
          f"{res['loop']['peak_rss_mb']:.0f} | {res['memory']['peak_rss_mb']:.0f} |")
    for kind in ("loop", "memory"):
        if "gpu_peak_mem_gb" in res[kind]:
            print(f"\nGPU peak memory ({kind}): {res[kind]['gpu_peak_mem_gb']:.2f} GiB")
    (OUT / "result.json").write_text(json.dumps({"args": vars(a), **res, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
