#!/usr/bin/env python
"""Many small stores against few large ones (issue 30 §3): the same patches as 2,000 stores of 16
(COSAS-style: one store per small image) and as 10 stores of 3,200.

    .venv/bin/python benchmarks/many_stores.py                 # build both sets (once), measure both
    .venv/bin/python benchmarks/many_stores.py --stores 500    # a quicker, smaller version

Both sets hold the same 128 px patches (taken in turn from the DG benchmark's training stores,
bench_out/dg2/stores/train, or `--source`), spread over 4 organs in the same order. Measured in one
run, each in a fresh process:
- open: `training.data.load_stores` on the set (find, open and check every store: what `train` and
  `evaluate` do before anything runs);
- train: `histodg train`'s loop (`Trainer`: ERM, Unet-ResNet18 without weights, 4 patches per
  organ a step, 1 loader process), from the call to the end of `--steps` steps, and its
  images/s after the first 10 steps;
- evaluate: `histodg evaluate CHECKPOINT STORES` (`evaluation.stores.evaluate_stores`, `--tta
  none`) with a fixed untrained checkpoint: every patch run, scored per store.
Target: the many-store set within 1.1x of the few-store set on each. Results:
bench_out/many_stores/result.json (copy into benchmarks/results/many-stores.json).
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench_out" / "many_stores"
ORGANS = ("colon", "stomach", "pancreas", "lung")


def source_patches(source: Path, count: int):
    """`count` (image, mask) pairs of 128 px, taken in turn from the source stores."""
    from histodg.store import find_stores, open_store

    stores = [open_store(p) for p in find_stores([source])]
    images = np.concatenate([np.asarray(s.images[:]) for s in stores])
    masks = np.concatenate([np.asarray(s.masks[:]) for s in stores])
    idx = np.arange(count) % len(images)
    return images[idx], masks[idx]


def build(root: Path, n_stores: int, per_store: int, images, masks) -> Path:
    from histodg.store.schema import StoreAttrs
    from histodg.store.writer import StoreWriter

    if (root / "done").exists():
        return root
    for i in range(n_stores):
        organ = ORGANS[i % len(ORGANS)]
        attrs = StoreAttrs(tile_size=128, mpp=1.0, organ=organ, labels={"0": "background", "1": "tumor"})
        w = StoreWriter(root / f"{organ}-{i:05d}.zarr", attrs, per_store, True).create()
        for j in range(per_store):
            k = i * per_store + j
            w.append(w.encode(images[k], masks[k]), (j * 128, 0), 1.0, plan_done=j + 1)
        w.finish()
    (root / "done").write_text("")
    return root


def child(kind: str, stores: Path, steps: int, checkpoint: Path) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t0 = time.perf_counter()
    if kind == "open":
        from histodg.training.data import load_stores

        n = len(load_stores([stores]))
        return {"seconds": time.perf_counter() - t0, "stores": n}
    if kind == "train":
        from histodg.training.config import TrainConfig
        from histodg.training.trainer import Callbacks, Trainer

        stamps: list = []
        cfg = TrainConfig(stores=(str(stores),), out_dir=str(stores.parent / f"run-{stores.name}"), arch="unet",
                          encoder="resnet18", encoder_weights="none", method="erm", domains="organ", steps=steps,
                          batch_size=4, workers=1, val_fraction=0.0, device="cpu", seed=0)
        Trainer(cfg, overwrite=True, callbacks=Callbacks(on_step=lambda info: stamps.append(
            (time.perf_counter(), info["images"])))).run()
        warm = 10
        dt = stamps[-1][0] - stamps[warm - 1][0]
        imgs = sum(n for _, n in stamps[warm:])
        return {"seconds": time.perf_counter() - t0, "images_per_s": imgs / dt,
                "first_step_s": stamps[0][0] - t0}
    from histodg.evaluation.stores import evaluate_stores
    from histodg.inference import PredictOptions, Predictor

    pred = Predictor.from_checkpoint(checkpoint, PredictOptions(device="cpu", tta="none", batch_size=16))
    ev = evaluate_stores(pred, [stores])
    return {"seconds": time.perf_counter() - t0, "images": len(ev.images), "errors": len(ev.errors)}


def measure(kind: str, stores: Path, steps: int, checkpoint: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--child-stores", str(stores), "--steps", str(steps),
           "--checkpoint", str(checkpoint)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if r.returncode:
        raise SystemExit(f"{kind} on {stores.name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stores", type=int, default=2000, help="stores in the many-store set (16 patches each)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--source", type=Path, default=REPO / "bench_out" / "dg2" / "stores" / "train")
    ap.add_argument("--kinds", default="open,train,evaluate", help="what to measure (comma-separated)")
    ap.add_argument("--tag", default="", help="a name for this run in result.json (e.g. before, after)")
    ap.add_argument("--child"), ap.add_argument("--child-stores", type=Path), ap.add_argument("--checkpoint", type=Path)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.child_stores, a.steps, a.checkpoint)))
        return
    per_many, n_few = 16, 10
    total = a.stores * per_many
    images, masks = source_patches(a.source, total)
    many = build(OUT / f"many-{a.stores}", a.stores, per_many, images, masks)
    few = build(OUT / f"few-{a.stores}", n_few, total // n_few, images, masks)
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import tiny_checkpoint

    ck = tiny_checkpoint(OUT / "ck.pt", mpp=1.0, tile=128)
    result = {"stores_many": a.stores, "patches": total, "steps": a.steps, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version()}
    kinds = a.kinds.split(",")
    for kind in kinds:
        for name, path in (("few", few), ("many", many)):
            result[f"{kind}_{name}"] = r = measure(kind, path, a.steps, ck)
            print(kind, name, json.dumps(r), flush=True)
        result[f"{kind}_ratio"] = result[f"{kind}_many"]["seconds"] / result[f"{kind}_few"]["seconds"]
    if "train" in kinds:
        result["train_rate_ratio"] = result["train_few"]["images_per_s"] / result["train_many"]["images_per_s"]
    path = OUT / "result.json"
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs = runs if "runs" in runs else {"runs": {}}
    runs["runs"][a.tag or result["date"]] = result
    path.write_text(json.dumps(runs, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k.endswith("ratio")}, indent=2))


if __name__ == "__main__":
    main()
