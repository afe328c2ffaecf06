#!/usr/bin/env python
"""What each domain-generalisation method is worth, on `histodg synth` data, on a CPU.

    .venv/bin/python benchmarks/dg_benchmark.py                 # everything (about 2-3 h on 2 cores)
    .venv/bin/python benchmarks/dg_benchmark.py --quick         # a smoke run: 1 seed, few steps
    .venv/bin/python benchmarks/dg_benchmark.py --only methods  # one table: methods | protocols | oracle | cost

Data: two independent synthetic data sets (seed 0 to train, seed 1 to test), 3 cases per domain,
tiled at 1.0 um/px in 128 px patches with at least 50% tissue. Training domains: colon, stomach,
pancreas (organ task) and scanner-a, -b, -c (scanner task); unseen: lung and scanner-d.

Model and schedule, shared by every method and fixed before any method was compared: FPN with a
ResNet-18 encoder, untrained (no download), 4 patches per domain per step, AdamW lr 1e-3, 5%
warm-up then cosine, BCE, flips/rot90/light colour jitter, 80 steps per stage; each method at its
default hyperparameters. (FPN with MiT-b0, the cross-task pretraining paper's model family, was
tried first: from scratch it stays at chance loss in this budget, ERM included, so it could not
tell methods apart; FPN-ResNet18 was the next candidate and the only other one tried.)

Tables:
- methods: every method with cross-task pretraining (`--pretrain organ --finetune scanner`);
  SDS ablations (shallow only, deep only, no big batch);
- protocols: ERM and SDS trained on the scanner task only (160 steps), on the union of both
  tasks (160 steps, 2 patches per domain so a step sees 12 patches as elsewhere), and with
  cross-task pretraining (80 + 80 steps);
- oracle: ERM trained (160 steps, 12 patches per step as elsewhere) on the unseen domain itself
  (seed-0 set), tested on the seed-1 set;
- cost: step time and peak memory of each method against ERM at the same batch (fresh process each).
Scores: Dice of the tumour per test slide (pixels pooled over the slide's patches), averaged
over the slides of a domain; "seen" is the mean over the six training domains. Three seeds
each, mean and standard deviation. Results accumulate in bench_out/dg/results.json (a rerun
skips finished runs) and the tables print as markdown.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import maxrss_mb  # noqa: E402

OUT = REPO / "bench_out" / "dg"
SEEN = ["colon", "stomach", "pancreas", "scanner-a", "scanner-b", "scanner-c"]
UNSEEN = ["lung", "scanner-d"]
MODEL = ["--arch", "fpn", "--encoder", "resnet18", "--encoder-weights", "none"]
COMMON = ["--batch-size", "4", "--lr", "1e-3", "--val-fraction", "0", "--workers", "1", "--val-max-patches", "64"]
STEPS = 80

METHODS = {
    "erm": [],
    "stain": ["--method", "stain"],
    "mixstyle": ["--method", "mixstyle"],
    "dsu": ["--method", "dsu"],
    "coral": ["--method", "coral"],
    "fishr": ["--method", "fishr"],
    "sds": ["--method", "sds"],
    "sds: shallow only": ["--method", "sds", "--hp", "deep=false"],
    "sds: deep only": ["--method", "sds", "--hp", "shallow=false"],
    "sds: no big batch": ["--method", "sds", "--hp", "big_batch=1"],
}


def histodg(*args, quiet=True) -> None:
    cmd = [str(REPO / ".venv" / "bin" / "histodg"), *map(str, args)]
    r = subprocess.run(cmd, capture_output=quiet, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:] if quiet else ''}")


def prepare_data() -> tuple[Path, Path]:
    for seed in (0, 1):
        synth, stores = OUT / f"synth{seed}", OUT / f"stores{seed}"
        if not (synth / "manifest.csv").exists():
            histodg("synth", synth, "--seed", seed, "--cases", 3)
        histodg("tile", synth / "manifest.csv", "-o", stores, "--mpp", 1.0, "--tile-size", 128, "--min-tissue", 0.5)
    return OUT / "stores0", OUT / "stores1"


def runs(quick: bool):
    """Every run, most important first (ERM and SDS, the oracle, the protocols, then the rest)."""
    seeds = [0] if quick else [0, 1, 2]
    held = ["--val-domain", "lung", "--val-domain", "scanner-d"]
    order = ["erm", "sds"]
    for name in order:
        for s in seeds:
            yield "methods", name, s, ["--pretrain", "organ", "--finetune", "scanner", *held, "--steps", STEPS, *METHODS[name]]
    for dom, axis in (("lung", "organ"), ("scanner-d", "scanner")):
        for s in seeds:
            others = [d for d in (SEEN + UNSEEN) if d != dom and (d in ("lung", "colon", "stomach", "pancreas")) == (axis == "organ")]
            excl = [a for d in others for a in ("--val-domain", d)]
            yield "oracle", f"erm trained on {dom}", s, ["--domains", axis, *excl, "--steps", 2 * STEPS,
                                                         "--batch-size", "12"]
    for s in seeds:  # the rest seed by seed, so a partial run has every row at least once
        for name, extra in (("erm", []), ("sds", ["--method", "sds"])):
            yield "protocols", f"{name}: scanner task only", s, ["--domains", "scanner", *held, "--steps", 2 * STEPS, *extra]
            yield "protocols", f"{name}: union of both tasks", s, ["--union", *held, "--steps", 2 * STEPS,
                                                                  "--batch-size", "2", *extra]
        for name, extra in METHODS.items():
            if name not in order:
                yield "methods", name, s, ["--pretrain", "organ", "--finetune", "scanner", *held, "--steps", STEPS, *extra]


def evaluate(run_dir: Path, test_stores: Path) -> dict:
    """Per-slide Dice on the test stores, averaged per domain."""
    import torch

    from histodg.evaluation.metrics import batch_counts, dice_from
    from histodg.model.checkpoint import load_checkpoint, model_from_checkpoint
    from histodg.model.normalize import Normalizer
    from histodg.store import find_stores, open_store

    model, config = model_from_checkpoint(load_checkpoint(run_dir / "last.pt"))
    model.eval()
    norm = Normalizer(config.normalization.mean, config.normalization.std, "cpu")
    per_domain: dict[str, list[float]] = {}
    with torch.inference_mode():
        for path in find_stores([test_stores]):
            s = open_store(path)
            domain = s.attrs.organ if s.attrs.organ != "unknown" else s.attrs.scanner
            tot = np.zeros(3)
            for i in range(0, len(s), 64):
                x = torch.from_numpy(np.asarray(s.images[i:i + 64])).permute(0, 3, 1, 2)
                y = torch.from_numpy(np.asarray(s.masks[i:i + 64]))
                pred = model(norm(x.float()))[:, 0] > 0
                tot += np.array([a.sum() for a in batch_counts(pred, y)])
            per_domain.setdefault(domain, []).append(dice_from(*tot))
    return {d: float(np.mean(v)) for d, v in per_domain.items()}


def run_all(args) -> dict:
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    train_stores, test_stores = prepare_data()
    todo = [r for r in runs(args.quick) if args.only in (None, r[0])]
    for i, (table, name, seed, extra) in enumerate(todo):
        key = f"{table}|{name}|{seed}"
        if key in results and not args.quick:
            continue
        run_dir = OUT / "runs" / f"{table}-{name.replace(' ', '_').replace(':', '').replace('>', '')}-s{seed}"
        steps = ["--steps", "6"] if args.quick else []
        args_ = [*MODEL, *COMMON, *extra, *steps, "--seed", seed, "--overwrite"]
        t0 = time.time()
        histodg("train", train_stores, "-o", run_dir, *args_)
        dice = evaluate(run_dir, test_stores)
        results[key] = {"table": table, "name": name, "seed": seed, "dice": dice, "seconds": time.time() - t0,
                        "command": "histodg train " + " ".join(map(str, [train_stores.relative_to(REPO), "-o", run_dir.relative_to(REPO), *args_]))}
        results_path.write_text(json.dumps(results, indent=2))
        print(f"[{i + 1}/{len(todo)}] {key}: seen {np.mean([dice[d] for d in SEEN]):.3f} lung {dice['lung']:.3f} "
              f"scanner-d {dice['scanner-d']:.3f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return results


# -- cost: step time and peak memory ------------------------------------------------------------
def cost_child(method: str, hp: list[str], steps: int) -> None:
    import torch

    from histodg.model.build import build_model
    from histodg.model.config import IMAGENET_MEAN, IMAGENET_STD
    from histodg.model.normalize import Normalizer
    from histodg.training.methods import METHODS as REG
    from histodg.training.methods import SegTask, parse_hparams

    torch.manual_seed(0)
    model = build_model("fpn", "resnet18", "none", 1)
    cls = REG[method]
    m = cls(model, 3, parse_hparams(cls, hp), task=SegTask(), normalizer=Normalizer(IMAGENET_MEAN, IMAGENET_STD, "cpu"))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 128, 128, generator=g), (torch.rand(8, 128, 128, generator=g) > 0.5).to(torch.uint8))
               for _ in range(3)]
    m.train()
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        loss, _ = m.loss(batches)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.end_of_step()
        times.append(time.perf_counter() - t)
    print(json.dumps({"step_s": float(np.median(times[2:])), "peak_rss_mb": maxrss_mb()}))


def cost_table(steps: int) -> list[dict]:
    rows = []
    variants = [("erm", []), ("stain", []), ("mixstyle", []), ("dsu", []), ("coral", []), ("fishr", []),
                ("sds", []), ("sds", ["big_batch=1"]), ("sds", ["big_batch=8"])]
    for method, hp in variants:
        r = subprocess.run([sys.executable, __file__, "--cost-child", method, "--steps", str(steps), *[f"--hp={h}" for h in hp]],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr)
        rows.append({"method": method + (f" ({', '.join(hp)})" if hp else ""), **json.loads(r.stdout.strip().splitlines()[-1])})
    return rows


# -- tables ---------------------------------------------------------------------------------------
def summarise(results: dict) -> str:
    lines = []
    tables = {}
    for r in results.values():
        tables.setdefault(r["table"], {}).setdefault(r["name"], []).append(r)
    if "methods" in tables:
        tables.setdefault("protocols", {})
        for k in ("erm", "sds"):
            src = tables["methods"].get(k)
            if src:
                tables["protocols"][f"{k}: organ -> scanner"] = src
    for table in ("methods", "protocols", "oracle"):
        if table not in tables:
            continue
        lines += [f"\n**{table}** (Dice, mean ± std over the seeds run)\n",
                  "| run | seeds | seen domains | lung (unseen organ) | scanner-d (unseen scanner) | unseen mean |",
                  "|---|---|---|---|---|---|"]
        for name, rs in tables[table].items():
            seen = [np.mean([r["dice"][d] for d in SEEN]) for r in rs]
            lung = [r["dice"]["lung"] for r in rs]
            scd = [r["dice"]["scanner-d"] for r in rs]
            unseen = [(a + b) / 2 for a, b in zip(lung, scd)]
            f = lambda v: f"{np.mean(v):.3f} ± {np.std(v):.3f}"  # noqa: E731
            lines.append(f"| {name} | {len(rs)} | {f(seen)} | {f(lung)} | {f(scd)} | {f(unseen)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["methods", "protocols", "oracle", "cost"])
    ap.add_argument("--cost-child")
    ap.add_argument("--hp", action="append", default=[])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    if args.cost_child:
        return cost_child(args.cost_child, args.hp, args.steps)
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    if args.only != "cost":
        print(summarise(run_all(args)))
    if args.only in (None, "cost"):
        rows = cost_table(args.steps)
        erm = rows[0]
        print("\n**cost** (FPN-ResNet18, 3 domains x 8 patches of 128 px per step, CPU, median of "
              f"{args.steps} steps)\n\n| method | step s | x ERM | peak RSS MB | x ERM |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['step_s']:.3f} | {r['step_s'] / erm['step_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['peak_rss_mb'] / erm['peak_rss_mb']:.2f} |")
        (OUT / "cost.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
