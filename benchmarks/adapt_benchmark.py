#!/usr/bin/env python
"""What `--adapt bn` (AdaBN per slide) and `--adapt tent` (AdaBN, then entropy steps on the
BatchNorm weights) are worth, on the DG benchmark's own models.

    .venv/bin/python benchmarks/adapt_benchmark.py                 # after (part of) dg_benchmark.py
    .venv/bin/python benchmarks/adapt_benchmark.py --dg-out DIR    # a DG benchmark run elsewhere

For every run the DG protocol selected (training-domain validation chose its learning rate), the
same checkpoint (`last.pt`) is scored on the test stores (one store per slide) and on the
training-domain validation stores, with `histodg evaluate`'s scoring: without adaptation, and
with each store's BatchNorm statistics re-estimated from its own patches (`--adapt bn`), and with
Tent after that (`--adapt tent`). Paired by checkpoint: the difference to none per domain, mean over seeds with a bootstrap 95%
interval. Results accumulate in DG_OUT/adapt.json (a rerun skips what is done).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dg_benchmark as dg  # noqa: E402

ROWS = ("erm", "sds", "erm + strong augmentation", "sds + strong augmentation")


def score(run_dir: Path, stores: Path, adapt: str) -> dict:
    """Dice per store, averaged per domain, as the DG benchmark scores (probability >= 0.5)."""
    from histodg.evaluation.metrics import dice_from
    from histodg.evaluation.stores import score_store
    from histodg.inference import PredictOptions, Predictor
    from histodg.inference.rasters import threshold_u8
    from histodg.store import find_stores, open_store

    pred = Predictor.from_checkpoint(run_dir / "last.pt", PredictOptions(device="cpu", adapt=adapt, batch_size=64, tta="none"))
    per_domain: dict[str, list[float]] = {}
    for path in find_stores([stores]):
        s = open_store(path)
        domain = s.attrs.organ if s.attrs.organ != "unknown" else s.attrs.scanner
        per_domain.setdefault(domain, []).append(dice_from(*score_store(pred, s, threshold_u8(0.5))))
    return {d: float(np.mean(v)) for d, v in per_domain.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dg-out", type=Path, default=dg.OUT)
    ap.add_argument("--test-only", action="store_true", help="leave out the training-domain validation stores")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, metavar="ROW", help="the DG rows to adapt")
    ap.add_argument("--modes", nargs="+", default=["none", "bn", "tent"], choices=["none", "bn", "tent"])
    args = ap.parse_args()
    dg.OUT = args.dg_out
    results = json.loads((dg.OUT / "results.json").read_text())
    path = dg.OUT / "adapt.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    sel = dg.selected(results)
    for name in args.rows:
        for seed, run in sorted(sel.get(name, {}).items()):
            key = f"{name}|{seed}"
            todo = [a for a in args.modes if a not in done.get(key, {})]
            if not todo:
                continue
            run_dir = dg.run_dir_of("methods", name, seed, run["lr"])
            val = not args.test_only and (done.get(key, {}).get("none", {}).get("val") is not None or "none" in todo)
            row = {**done.get(key, {}), **{a: {"test": score(run_dir, dg.OUT / "stores" / "test", a),
                                               "val": score(run_dir, dg.OUT / "stores" / "val", a) if val else None}
                                           for a in todo}}
            done = {**(json.loads(path.read_text()) if path.exists() else {}), **done, key: row}  # and other processes' rows
            path.write_text(json.dumps(done, indent=1))
            print(f"{key}: " + "  ".join(f"{d} " + " / ".join(f"{a} {row[a]['test'][d]:.3f}" for a in row) for d in dg.UNSEEN),
                  file=sys.stderr, flush=True)
    for mode in ("bn", "tent"):
        print(f"\n--adapt {mode}\n" + table(done, mode))


def table(done: dict, mode: str = "bn") -> str:
    cols = [*dg.UNSEEN, "seen (val)"]
    lines = ["| model | seeds | " + " | ".join(f"{c}: none -> {mode}" for c in cols) + " | " + " | ".join(f"Δ {c}" for c in cols) + " |",
             "|---|---|" + "---|" * (2 * len(cols))]

    def value(r, c):
        if c == "seen (val)":
            return float(np.mean([r["val"][d] for d in dg.SEEN])) if r["val"] else float("nan")
        return r["test"][c]

    for name in ROWS:
        runs = [v for k, v in done.items() if k.split("|")[0] == name and mode in v]
        if not runs:
            continue
        cells, deltas = [], []
        for c in cols:
            pairs = [(value(r["none"], c), value(r[mode], c)) for r in runs]
            a, b = (np.array([p[k] for p in pairs if not (np.isnan(p[0]) or np.isnan(p[1]))]) for k in (0, 1))
            if not len(a):
                cells.append("not run")
                deltas.append("")
                continue
            cells.append(f"{a.mean():.3f} -> {b.mean():.3f}")
            if len(a) > 1:
                lo, hi = dg.bootstrap_ci(b - a)
                mark = " **+**" if lo > 0 else (" **−**" if hi < 0 else "")
                deltas.append(f"{(b - a).mean():+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}")
            else:
                deltas.append(f"{(b - a).mean():+.3f}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
