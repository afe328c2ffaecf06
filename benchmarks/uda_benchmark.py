#!/usr/bin/env python
"""What `histodg adapt` (unsupervised adaptation from unlabelled target slides) is worth, on the
DG benchmark's own ERM models.

    .venv/bin/python benchmarks/uda_benchmark.py --seeds 0 1 2      # after dg_benchmark.py --row erm
    .venv/bin/python benchmarks/uda_benchmark.py --tables           # the table of what has run
    .venv/bin/python benchmarks/uda_benchmark.py --row dsbn --variant both --variant neither
                                                                    # the default method's checkpoints

For each seed, the ERM checkpoint the DG protocol selected (training-domain validation chose its
learning rate) is adapted to one unseen domain: the source is the DG training stores (with
labels), the target that domain's unlabelled stores (the oracle's training slides, seed-0 cases:
never the test slides). Variants: both parts (`histodg adapt` defaults), the global part only
(`--hp local=false`), the local part only (`--hp global=false`), and neither (`global=false
local=false`: source fine-tuning plus the target BatchNorm statistics, the AdaBN baseline); on
lung also the self-training part alone (`global=false local=false self_train=true`) and all three. Each
adapted checkpoint is scored on the DG test slides of that domain, as the DG benchmark scores.
Paired by seed against the DG model; "gap closed" is (adapted - DG) / (oracle - DG) with the
oracle of the DG table (ERM trained on that domain with labels, seed 0). Results accumulate in
DG_OUT/uda.json (a rerun skips what is done).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dg_benchmark as dg  # noqa: E402

STEPS = 100
VARIANTS = {"both parts": [], "global only": ["--hp", "local=false"], "local only": ["--hp", "global=false"],
            "neither (AdaBN on the target)": ["--hp", "global=false", "--hp", "local=false"],
            # issue 31 §3: the self-training part (a mean teacher's pseudo-labels), alone and with the other two
            "self-training only": ["--hp", "global=false", "--hp", "local=false", "--hp", "self_train=true"],
            "all three parts": ["--hp", "self_train=true"]}
# self-training on scanner-d too: whether it could be adapt's default for a new scanner as well
TARGETS = {"scanner-d": [*list(VARIANTS)[:4], "self-training only"], "lung": ["both parts", "self-training only", "all three parts"]}


def key_of(row: str, seed: int, target: str, variant: str) -> str:
    """uda.json's key of one run (ERM's keep their first form)."""
    return f"{seed}|{target}|{variant}" if row == "erm" else f"{row}|{seed}|{target}|{variant}"


def out_dir(row: str, seed: int, target: str, variant: str) -> Path:
    """Where the adapted model of `row`'s seed for `target` with `variant` is written."""
    return dg.OUT / "uda" / f"{row}-s{seed}-{target}-{variant.split(' ')[0]}".replace(" ", "_").replace(":", "")


def run_one(row: str, seed: int, lr: str, target: str, variant: str, device: str) -> dict:
    src = dg.run_dir_of(next(r.table for r in dg.rows() if r.name == row), row, seed, lr)
    if not (src / "last.pt").is_file():
        raise SystemExit(f"{src}: no last.pt (the DG run's checkpoint is needed: dg_benchmark.py keeps only results.json)")
    out = out_dir(row, seed, target, variant)
    args = ["adapt", src / "last.pt", "--source", dg.OUT / "stores" / "train", "--target", dg.OUT / "stores" / f"oracle-{target}",
            "-o", out, "--steps", STEPS, "--seed", seed, "--device", device, "--overwrite", *VARIANTS[variant]]
    t0 = time.time()
    if not (out / "result.json").is_file():  # a finished adaptation whose scoring failed is scored, not made again
        dg.histodg(*args, env={**os.environ, "OMP_NUM_THREADS": "2"})
    test = dg.score_stores(out, dg.OUT / "stores" / "test", device, checkpoint="best.pt")
    result = json.loads((out / "result.json").read_text())
    return {"dice": test[target], "seconds": time.time() - t0, "bn_gap": result["target_bn_gap"],
            "env": dg.environment("train", int(os.environ.get("OMP_NUM_THREADS", "2"))),
            "command": "histodg " + " ".join(str(a).replace(str(dg.REPO) + "/", "") for a in args)}


def table(done: dict, dg_results: dict, oracle: dict, row: str = "erm") -> str:
    sel = dg.selected(dg_results).get(row, {})
    lines = [f"| target | variant | seeds | DG model ({row}) | adapted | Δ (paired, 95% CI) | oracle | gap closed |",
             "|---|---|---|---|---|---|---|---|"]
    for target, variants in TARGETS.items():
        for variant in variants:
            pairs = [(sel[s]["test"][target], done[key_of(row, s, target, variant)]["dice"]) for s in sorted(sel)
                     if key_of(row, s, target, variant) in done]
            if not pairs:
                continue
            a, b = np.array(pairs).T
            d = b - a
            ci = "[{:+.3f}, {:+.3f}]".format(*dg.bootstrap_ci(d)) if len(d) > 1 else ""
            o = oracle.get(target)
            closed = f"{d.mean() / (o - a.mean()):.0%}" if o is not None else ""
            lines.append(f"| {target} | {variant} | {len(d)} | {a.mean():.3f} | {b.mean():.3f} | {d.mean():+.3f} {ci} | "
                         f"{o if o is None else f'{o:.3f}'} | {closed} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dg-out", type=Path, default=dg.OUT)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--oracle", nargs=2, action="append", metavar=("DOMAIN", "DICE"), default=[],
                    help="the oracle's Dice on a domain, when results.json has no oracle run for it")
    ap.add_argument("--tables", action="store_true")
    ap.add_argument("--row", default="erm", help="the DG row whose checkpoints are adapted (its runs' last.pt "
                                                 "must be in DG_OUT/runs), e.g. dsbn")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME",
                    help="only these variants (by their first word: both, global, local, neither, self-training, all)")
    ap.add_argument("--target", action="append", default=[], help="only these targets (lung, scanner-d)")
    args = ap.parse_args()
    dg.OUT = args.dg_out
    results = json.loads((dg.OUT / "results.json").read_text())
    oracle = {d: float(v) for d, v in args.oracle}
    for t in TARGETS:
        r = results.get(f"oracle|erm trained on {t}|0|1e-3")
        if r:
            oracle[t] = r["test"][t]
    path = dg.OUT / "uda.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    sel = dg.selected(results).get(args.row, {})
    if not args.tables:
        for seed in args.seeds:
            if seed not in sel:
                print(f"seed {seed}: no selected {args.row} run yet (dg_benchmark.py --row {args.row})", file=sys.stderr)
                continue
            for target, variants in TARGETS.items():
                for variant in variants:
                    key = key_of(args.row, seed, target, variant)
                    if key in done or (args.variant and variant.split(" ")[0] not in args.variant) or (
                            args.target and target not in args.target):
                        continue
                    done[key] = run_one(args.row, seed, sel[seed]["lr"], target, variant, args.device)
                    path.write_text(json.dumps(done, indent=1))
                    print(f"{key}: {done[key]['dice']:.3f} (DG {sel[seed]['test'][target]:.3f}, "
                          f"{done[key]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(table(done, results, oracle, args.row))


if __name__ == "__main__":
    main()
