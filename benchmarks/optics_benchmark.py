#!/usr/bin/env python
"""What the DG benchmark's rows do on an unseen scanner that differs in optics and resolution, not
in stain (issue 31 §1): `scanner-f` (`histodg synth --extra-scanner scanner-f`: scanner-a's stain
and white, blur 0.7 um growing to 1.5 um at each camera field's corners, astigmatism 0.3, a 15%
calibration error, stitching seams, JPEG 70).

    .venv/bin/python benchmarks/optics_benchmark.py --row erm --row dsbn --jobs 2   # train and score
    .venv/bin/python benchmarks/optics_benchmark.py --tables                        # the table
    .venv/bin/python benchmarks/optics_benchmark.py --oracle --jobs 2               # scanner-f's oracle

The oracle is ERM trained on scanner-f itself (the 4 seed-0 cases, `stores/oracle-scanner-f`), as the DG
benchmark trains its oracles (200 steps, batch 6, lr 1e-3, seeds 0-2): how far the optics scanner is from
what a model trained on it reaches.

Each run is the DG benchmark's run of that row and seed at the learning rate its grid chose on
training-domain validation (read from benchmarks/results/dg2-results.json: nothing here looks
at scanner-f to choose), trained again on the DG benchmark's stores, then scored on the DG test
set (its recorded numbers, reproduced: printed) and on 6 seed-1 cases of scanner-f tiled alike
(`stores/test-optics`). Results: bench_out/dg2/optics.json; the raw file is kept in
benchmarks/results/optics-results.json. Once `stores/test-optics` exists, the DG benchmark scores
scanner-f in every run it makes (its record's `optics`); `--tables` shows those runs too, with
nothing retrained.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dg_benchmark as dg  # noqa: E402

OPTICS = "scanner-f"
RECORDED = dg.REPO / "benchmarks" / "results" / "dg2-results.json"
TILE = dg.tile_args()


def prepare() -> Path:
    """The DG benchmark's stores, and the scanner-f test stores from an optics synth set (seed 1)."""
    dg.prepare_data()
    stores = dg.OUT / "stores" / "test-optics"
    if not (stores / "summary.json").exists():
        synth = dg.OUT / "synth1-optics"
        if not (synth / "manifest.csv").exists():
            dg.histodg("synth", synth, "--seed", 1, "--cases", 6, "--extra-scanner", OPTICS, "--overwrite")
        subset = dg._subset(synth / "manifest.csv", dg.OUT / "test-optics.csv", lambda r: r["scanner"] == OPTICS)
        dg.histodg("tile", subset, "-o", stores, *TILE)
    return stores


def oracle_row() -> dg.Row:
    """ERM trained on scanner-f's own seed-0 cases, with the DG benchmark's oracle settings."""
    base = next(r for r in dg.rows() if r.name == "erm trained on scanner-d")  # a scanner oracle
    return dataclasses.replace(base, name=f"erm trained on {OPTICS}", stores=f"oracle-{OPTICS}")


def prepare_oracle() -> None:
    """The oracle's training stores: scanner-f's cases of a seed-0 optics synth set."""
    stores = dg.OUT / "stores" / f"oracle-{OPTICS}"
    if (stores / "summary.json").exists():
        return
    synth = dg.OUT / "synth0-optics"
    if not (synth / "manifest.csv").exists():
        dg.histodg("synth", synth, "--seed", 0, "--cases", 4, "--extra-scanner", OPTICS, "--overwrite")
    subset = dg._subset(synth / "manifest.csv", dg.OUT / f"oracle-{OPTICS}.csv", lambda r: r["scanner"] == OPTICS)
    dg.histodg("tile", subset, "-o", stores, *TILE)


def chosen(recorded: dict, row: dg.Row, seed: int) -> str:
    """The learning rate the DG benchmark ran `row` at for `seed`: its grid's choice on
    training-domain validation, or its parent's (a row without a grid of its own)."""
    return dg.Plan(recorded).chosen_lr(row.name if row.grid else row.parent, seed)


def run_one(row: dg.Row, seed: int, lr: str, recorded: dict, args) -> dict:
    run_dir = dg.run_dir_of("optics", row.name, seed, lr)
    train_args = [*row.model, *dg.COMMON, *row.args, "--seed", seed, "--lr", lr, "--device", args.device, "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.time()
    dg.histodg("train", dg.OUT / "stores" / row.stores, "-o", run_dir, *train_args, env=env)
    seconds = time.time() - t0
    test = dg.score_stores(run_dir, dg.OUT / "stores" / "test", args.device)
    optics = dg.score_stores(run_dir, dg.OUT / "stores" / "test-optics", args.device)[OPTICS]
    before = recorded.get(dg.Plan.key(row, seed, lr), {}).get("test")  # an oracle: no DG record
    return {"name": row.name, "seed": seed, "lr": lr, "optics": optics, "test": test, "recorded_test": before,
            "reproduced": test == before if before else None, "seconds": seconds, "env": dg.environment(row.stores, args.threads)}


def from_dg(dg_results: dict) -> dict:
    """The DG benchmark's own runs that scored scanner-f as they ran (dg_benchmark.py does when
    stores/test-optics exists), as this benchmark's records: the selected run of each seed."""
    out = {}
    for name, by_seed in dg.selected(dg_results).items():
        for seed, r in by_seed.items():
            if "optics" in r:
                out[f"{name}|{seed}|{r['lr']}"] = {"name": name, "seed": seed, "lr": r["lr"], "optics": r["optics"][OPTICS],
                                                   "test": r["test"], "reproduced": None, "seconds": r["seconds"]}
    return out


def score_dg_runs(names: list[str], device: str) -> int:
    """Score scanner-f with the DG benchmark's own selected runs of `names` that ran before its
    stores existed (their checkpoints kept in runs/), into results.json's records; returns how many."""
    path = dg.OUT / "results.json"
    results = json.loads(path.read_text())
    n = 0
    for name in names:
        table = next(r.table for r in dg.rows() if r.name == name)
        for seed, r in dg.selected(results).get(name, {}).items():
            if "optics" not in r:
                run_dir = dg.run_dir_of(table, name, seed, r["lr"])
                r["optics"] = dg.score_stores(run_dir, dg.OUT / "stores" / "test-optics", device)
                n += 1
    path.write_text(json.dumps(results, indent=1))
    return n


def table(results: dict, base: str = "erm") -> str:
    rows: dict[str, dict[int, dict]] = {}
    for r in results.values():
        rows.setdefault(r["name"], {})[r["seed"]] = r
    lines = [f"| row | seeds | {OPTICS} (optics) | Δ vs {base} [95% CI] | scanner-d (stain) | lung | reproduced |",
             "|---|---|---|---|---|---|---|"]
    for name, by_seed in rows.items():
        seeds = sorted(by_seed)
        f = np.array([by_seed[s]["optics"] for s in seeds])
        d = np.array([by_seed[s]["test"]["scanner-d"] for s in seeds])
        lung = np.array([by_seed[s]["test"]["lung"] for s in seeds])
        delta = "-"
        if name != base and base in rows:
            paired = [s for s in seeds if s in rows[base]]
            diffs = np.array([by_seed[s]["optics"] - rows[base][s]["optics"] for s in paired])
            if len(diffs) > 1:
                lo, hi = dg.bootstrap_ci(diffs)
                delta = f"{diffs.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"
        se = f.std(ddof=1) / np.sqrt(len(f)) if len(f) > 1 else float("nan")
        if name == oracle_row().name:
            same = "(oracle: no DG run)"
        elif any(by_seed[s]["reproduced"] is None for s in seeds):
            same = "the DG run"  # scored by the DG benchmark's own run: nothing to reproduce
        else:
            same = f"{sum(by_seed[s]['reproduced'] for s in seeds)}/{len(seeds)}"
        lines.append(f"| {name} | {len(seeds)} | {f.mean():.3f} ± {se:.3f} | {delta} | {d.mean():.3f} | {lung.mean():.3f} "
                     f"| {same} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", action="append", default=[], help="a DG benchmark row (repeatable); default erm and dsbn")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(dg.SEEDS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tables", action="store_true", help="the table: these runs and the DG benchmark's runs that "
                                                              "scored scanner-f as they ran")
    ap.add_argument("--versus", default="erm", metavar="ROW", help="the row Δ is paired against (default erm)")
    ap.add_argument("--oracle", action="store_true", help=f"train and score {OPTICS}'s oracle (ERM on its own "
                                                           "seed-0 cases; seeds 0-2)")
    ap.add_argument("--score-dg", action="append", default=[], metavar="ROW",
                    help="score scanner-f with the DG benchmark's kept runs of ROW (made before its stores existed)")
    args = ap.parse_args()
    if args.score_dg:
        prepare()
        print(f"scored {score_dg_runs(args.score_dg, args.device)} runs", file=sys.stderr)
        return
    out = dg.OUT / "optics.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.tables:
        dg_path = dg.OUT / "results.json"
        print(table({**(from_dg(json.loads(dg_path.read_text())) if dg_path.exists() else {}), **results},
                    args.versus))
        return
    recorded = json.loads(RECORDED.read_text())
    prepare()
    by_name = {r.name: r for r in dg.rows()}
    if args.oracle:
        prepare_oracle()
        todo = [(oracle_row(), seed, "1e-3") for seed in args.seeds if seed in oracle_row().seeds]
    else:
        todo = [(by_name[name], seed, chosen(recorded, by_name[name], seed)) for seed in args.seeds
                for name in (args.row or ["erm", "dsbn"])]
    todo = [t for t in todo if f"{t[0].name}|{t[1]}|{t[2]}" not in results]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, row, seed, lr, recorded, args): (row, seed, lr) for row, seed, lr in todo}
        for fut in futures:
            row, seed, lr = futures[fut]
            res = fut.result()
            results[f"{row.name}|{seed}|{lr}"] = res
            out.write_text(json.dumps(results, indent=1))
            print(f"{row.name} seed {seed} lr {lr}: {OPTICS} {res['optics']:.3f}  reproduced {res['reproduced']}  "
                  f"({res['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
