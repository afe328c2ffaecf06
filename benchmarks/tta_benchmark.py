#!/usr/bin/env python
"""Test-time augmentation beyond flips (issue 31 §3 c): does averaging over scales, or over the
four flips `histodg predict --tta flip` uses, help the unseen organ and scanner?

    .venv/bin/python benchmarks/tta_benchmark.py --seeds 0 1 2 3 4     # the DG benchmark's DSBN checkpoints
    .venv/bin/python benchmarks/tta_benchmark.py --tables
    .venv/bin/python benchmarks/tta_benchmark.py --row "dsbn: union of both tasks" --flips-only
    .venv/bin/python benchmarks/tta_benchmark.py --adapted "self-training only" --flips-only

For each seed, the DG benchmark's selected run of `--row` (its `last.pt` must be in
bench_out/dg2/runs) scores the DG test slides of lung and scanner-d as the DG benchmark scores
(`dg_benchmark.score_stores`: a DSBN model's unknown domain through the shared BatchNorm with the
slide's own statistics), its probabilities averaged over: the patch as it is (`none`), the four
flips (`flip`, what `--tta flip` does), and each patch resized by the scale factors (bilinear, the
probabilities resized back) with and without the flips. The patches are 128 px at the model's 1
um/px, so a scale of 1.25 shows the model tissue 25% larger than it was trained on. Results:
bench_out/dg2/tta.json (raw copy in benchmarks/results/tta-results.json).

`--adapted VARIANT` scores instead the DSBN checkpoints adapted to lung by `uda_benchmark.py` (that
variant's `best.pt`, what it scores); `--flips-only` scores `none` and `flip` alone (4 passes, not 20).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dg_benchmark as dg  # noqa: E402

SCALES = {"none": [1.0], "scales 0.75, 1, 1.25": [0.75, 1.0, 1.25], "scales 1, 1.25": [1.0, 1.25],
          "scales 1, 1.5": [1.0, 1.5], "scales 0.75, 1": [0.75, 1.0]}
FLIPS = ((), (3,), (2,), (2, 3))  # NCHW: 3 = width, 2 = height
DOMAINS = ("lung", "scanner-d")


def score(run_dir: Path, checkpoint: str = "last.pt", scales: dict = SCALES) -> dict:
    """{variant: {domain: mean per-slide Dice}} for one checkpoint."""
    import torch
    import torch.nn.functional as F

    from histodg.evaluation.metrics import batch_counts, dice_from
    from histodg.model.checkpoint import load_checkpoint, model_from_checkpoint
    from histodg.model.normalize import Normalizer
    from histodg.store import find_stores, open_store

    model, config = model_from_checkpoint(load_checkpoint(run_dir / checkpoint))
    model.eval()
    norm = Normalizer(config.normalization.mean, config.normalization.std, torch.device("cpu"),
                      stain=config.normalization.stain)
    variants = [v + f for v in scales for f in ("", " + flips")]
    per: dict[str, dict[str, list]] = {v: {} for v in variants}
    for path in find_stores([dg.OUT / "stores" / "test"]):
        s = open_store(path)
        name = s.attrs.organ if s.attrs.organ != "unknown" else s.attrs.scanner
        if name not in DOMAINS:
            continue
        tots = {v: np.zeros(3) for v in variants}
        with dg._batchnorm_for(model, config, norm, s, "cpu"), torch.inference_mode():
            for i in range(0, len(s), 64):
                x = norm(torch.from_numpy(np.asarray(s.images[i:i + 64])).permute(0, 3, 1, 2).float())
                y = torch.from_numpy(np.asarray(s.masks[i:i + 64]))
                probs = {}
                for sc in sorted({v for vs in scales.values() for v in vs}):
                    for flip in FLIPS:
                        xi = x.flip(flip) if flip else x
                        if sc != 1.0:
                            xi = F.interpolate(xi, scale_factor=sc, mode="bilinear", align_corners=False)
                        p = torch.sigmoid(model(xi)[:, :1])
                        if sc != 1.0:
                            p = F.interpolate(p, size=x.shape[-2:], mode="bilinear", align_corners=False)
                        p = p[:, 0]  # (N, H, W): NCHW dims 2, 3 are 1, 2 here
                        probs[(sc, flip)] = p.flip([d - 1 for d in flip]) if flip else p
                for v, factors in scales.items():
                    for suffix, flips in (("", ((),)), (" + flips", FLIPS)):
                        pred = torch.stack([probs[(sc, f)] for sc in factors for f in flips]).mean(0) > 0.5
                        tots[v + suffix] += np.array([a.sum() for a in batch_counts(pred, y)])
        for v in variants:
            per[v].setdefault(name, []).append(dice_from(*tots[v]))
    return {v: {d: float(np.mean(x)) for d, x in r.items()} for v, r in per.items()}


def table(all_done: dict, label: str = "dsbn") -> str:
    done = {k.rsplit("|", 1)[-1]: v for k, v in all_done.items() if key_of(label, k.rsplit("|", 1)[-1]) == k}
    seeds = sorted(done, key=int)
    lines = ["| test-time augmentation | seeds | " + " | ".join(DOMAINS) + " | " + " | ".join(f"Δ {d} vs none" for d in DOMAINS) + " |",
             "|---|---|" + "---|" * (2 * len(DOMAINS))]
    for v in done[seeds[0]]:
        cells, deltas = [], []
        for d in DOMAINS:
            a = np.array([done[s][v][d] for s in seeds])
            base = np.array([done[s]["none"][d] for s in seeds])
            cells.append(f"{a.mean():.3f}")
            if v == "none":
                deltas.append("")
                continue
            lo, hi = dg.bootstrap_ci(a - base)
            deltas.append(f"{(a - base).mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append(f"| {v} | {len(seeds)} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    return "\n".join(lines)


def key_of(label: str, seed) -> str:
    """tta.json's key: the seed alone for the default's DG checkpoints (the first table), else label|seed."""
    return str(seed) if label == "dsbn" else f"{label}|{seed}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", default="dsbn", help="the DG row whose selected checkpoints are scored")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(dg.SEEDS))
    ap.add_argument("--adapted", metavar="VARIANT", help="score the DSBN checkpoints uda_benchmark.py adapted to lung "
                                                          "with VARIANT (e.g. 'self-training only') instead")
    ap.add_argument("--target", default="lung", help="with --adapted: the domain the checkpoints were adapted to "
                                                     "(lung, scanner-d)")
    ap.add_argument("--flips-only", action="store_true", help="only `none` and `flip`")
    ap.add_argument("--tables", action="store_true")
    args = ap.parse_args()
    label = f"adapted: {args.adapted}" if args.adapted else args.row
    if args.adapted and args.row != "dsbn":  # the DSBN row's adapted runs keep their first key
        label = f"{args.row}, {label}"
    if args.adapted and args.target != "lung":  # adapted to lung: the first key, without the target
        label = f"{label} to {args.target}"
    scales = {"none": [1.0]} if args.flips_only else SCALES
    import torch

    torch.set_num_threads(1)
    path = dg.OUT / "tta.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    if not args.tables:
        sel = dg.selected(json.loads((dg.OUT / "results.json").read_text()))[args.row]
        table_name = next(r.table for r in dg.rows() if r.name == args.row)
        for seed in args.seeds:
            if key_of(label, seed) in done:
                continue
            if args.adapted:
                import uda_benchmark as uda

                run, ckpt = uda.out_dir(args.row, seed, args.target, args.adapted), "best.pt"
            else:
                run, ckpt = dg.run_dir_of(table_name, args.row, seed, sel[seed]["lr"]), "last.pt"
            if not (run / ckpt).exists():
                print(f"seed {seed}: no {run / ckpt}, skipped", file=sys.stderr)
                continue
            done[key_of(label, seed)] = score(run, ckpt, scales)
            path.write_text(json.dumps(done, indent=1))
            print(f"seed {seed}: " + ", ".join(f"{v} lung {r['lung']:.3f}" for v, r in done[key_of(label, seed)].items()),
                  file=sys.stderr, flush=True)
    print(table(done, label))


if __name__ == "__main__":
    main()
