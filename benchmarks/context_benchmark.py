#!/usr/bin/env python
"""Does a larger field of view help the unseen organ? (issue 31 §3 b)

The DG benchmark's default row (`dsbn`, organ -> scanner) trained on the same slides tiled at 256 px
instead of 128 px, both at 1 um/px: each patch shows 4x the tissue (256 um a side: four to five
lung alveoli across instead of two). Same compute per step: 1 patch per domain per micro-batch and
no accumulation (3 patches of 256 px a step, the pixels of the 12 patches of 128 px the DG rows see).
Same learning rate as the DG run of that seed (DSBN's choice on training-domain validation).

    .venv/bin/python benchmarks/context_benchmark.py --jobs 2     # train and score, resumable
    .venv/bin/python benchmarks/context_benchmark.py --tables     # the table

Both models are scored on the test and validation slides tiled at 256 px (`stores/*-256`), so they
are compared on the same pixels: the 128 px model (the DG benchmark's own checkpoints, kept as
runs/optics-dsbn-s<seed>-lr<lr>, which reproduced the DG table) is fully convolutional and sees the
same 256 px patches. Its DG-table numbers (128 px patches) are shown beside. Results:
bench_out/dg2/context.json; raw copy in benchmarks/results/context-results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dg_benchmark as dg  # noqa: E402

SIDE = 256
TILE = dg.tile_args(SIDE)
NAME = f"dsbn, {SIDE} px field of view"
RECORDED = dg.REPO / "benchmarks" / "results" / "dg2-results.json"


def prepare() -> None:
    """The DG benchmark's train, validation and test slides tiled at 256 px."""
    dg.prepare_data()
    for name in ("train", "val", "test"):
        stores = dg.OUT / "stores" / f"{name}-{SIDE}"
        if not (stores / "summary.json").exists():
            dg.histodg("tile", dg.OUT / f"{name}.csv", "-o", stores, *TILE)


def run_one(seed: int, lr: str, args) -> dict:
    row = next(r for r in dg.rows() if r.name == "dsbn")
    run_dir = dg.run_dir_of("context", NAME, seed, lr)
    train_args = [*row.model, *dg.COMMON, *row.args, "--batch-size", "1", "--accumulate", "1", "--seed", seed,
                  "--lr", lr, "--device", args.device, "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.time()
    dg.histodg("train", dg.OUT / "stores" / f"train-{SIDE}", "-o", run_dir, *train_args, env=env)
    seconds = time.time() - t0
    base = dg.run_dir_of("optics", "dsbn", seed, lr)  # the DG table's 128 px checkpoint, retrained and reproduced
    out = {"seed": seed, "lr": lr, "seconds": seconds, "env": dg.environment(f"train-{SIDE}", args.threads),
           "command": "histodg train " + " ".join(map(str, [f"bench_out/dg2/stores/train-{SIDE}", "-o",
                                                            os.path.relpath(run_dir, dg.REPO), *train_args]))}
    for label, run in (("wide", run_dir), ("base", base)):
        out[label] = {split: dg.score_stores(run, dg.OUT / "stores" / f"{split}-{SIDE}", args.device)
                      for split in ("val", "test")}
    return out


def table(results: dict, recorded: dict) -> str:
    seeds = sorted(int(s) for s in results)
    doms = [*dg.UNSEEN, "seen (val)"]

    def value(r, label, dom):
        return np.mean([r[label]["val"][d] for d in dg.SEEN]) if dom == "seen (val)" else r[label]["test"][dom]

    lines = [f"| model (scored on {SIDE} px patches) | seeds | " + " | ".join(doms) + " |", "|---|---|" + "---|" * len(doms)]
    for label, what in (("base", "dsbn, 128 px (the DG table's checkpoints)"), ("wide", NAME)):
        vals = [np.mean([value(results[str(s)], label, d) for s in seeds]) for d in doms]
        lines.append(f"| {what} | {len(seeds)} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    cells = []
    for d in doms:
        diffs = np.array([value(results[str(s)], "wide", d) - value(results[str(s)], "base", d) for s in seeds])
        lo, hi = dg.bootstrap_ci(diffs) if len(diffs) > 1 else (float("nan"), float("nan"))
        cells.append(f"{diffs.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")
    lines.append(f"| Δ {SIDE} − 128 (paired) | {len(seeds)} | " + " | ".join(cells) + " |")
    sel = dg.selected(recorded).get("dsbn", {})
    lines.append("| dsbn, 128 px on 128 px patches (the DG table) | " + str(len(seeds)) + " | "
                 + " | ".join(f"{np.mean([sel[s]['test'][d] for s in seeds]):.3f}" if d in dg.UNSEEN
                              else f"{np.mean([np.mean([sel[s]['val'][x] for x in dg.SEEN]) for s in seeds]):.3f}"
                              for d in doms) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(dg.SEEDS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tables", action="store_true", help="print the table of what has run, run nothing")
    args = ap.parse_args()
    out = dg.OUT / "context.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    recorded = json.loads(RECORDED.read_text())
    if not args.tables:
        prepare()
        plan = dg.Plan(recorded)
        todo = [(s, plan.chosen_lr("dsbn", s)) for s in args.seeds if str(s) not in results]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_one, s, lr, args): s for s, lr in todo}
            for fut in futures:
                res = fut.result()
                results[str(res["seed"])] = res
                out.write_text(json.dumps(results, indent=1))
                print(f"seed {res['seed']}: lung {res['base']['test']['lung']:.3f} -> {res['wide']['test']['lung']:.3f} "
                      f"({res['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(table(results, recorded))


if __name__ == "__main__":
    main()
