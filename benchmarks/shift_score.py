#!/usr/bin/env python
"""Does the domain-shift score (`model.shift`) tell slides of unseen domains from slides of seen ones,
and does it follow the Dice lost on them?

    .venv/bin/python benchmarks/shift_score.py                       # after benchmarks/dg_benchmark.py --tier 1
    .venv/bin/python benchmarks/shift_score.py --dg-dir /other/bench_out/dg2 --rows erm "erm + strong augmentation"

Models: the DG benchmark's runs (`dg_benchmark.py`, tier 1: FPN-EfficientNet-Lite0 from ImageNet,
--pretrain organ --finetune scanner), the learning rate training-domain validation chose, every
seed. Their checkpoints were made before the score existed, so the training domains' description
is made here by the same code training now runs at its end (`training.shift_reference` over the
training stores of the run's stages).

Slides: every store is one slide (1 um/px, 128 px patches, >= 50% tissue):
- seen domains: the training-domain validation slides (case 4 of each seen domain, seed 0) and an
  independently generated set (seed 1, 6 cases of each of the six seen domains), 42 slides;
- unseen: lung, scanner-d and scanner-x7 (seed 1, 6 cases each), 18 slides.
Each slide's score is computed from all its patches, as `predict` does from its windows.

Reported per model: AUROC of the score for unseen against seen slides, the share of each that
`predict` would warn about (score > 1), and Spearman's rho between the score and the slide's Dice
(over all 60 slides, and over the unseen ones).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import dg_benchmark as dg  # noqa: E402


def seen_test_stores(dg_dir: Path) -> Path:
    """Seed-1 slides of the six seen domains, tiled as the benchmark tiles (made once)."""
    out = dg_dir / "stores" / "seen-test"
    m1 = dg_dir / "synth1" / "manifest.csv"
    listing = dg._subset(m1, dg_dir / "seen-test.csv",
                         lambda r: (r["organ"] if r["task"] == "organ" else r["scanner"]) in dg.SEEN)
    dg.histodg("tile", listing, "-o", out, "--mpp", "1.0", "--tile-size", "128", "--min-tissue", "0.5")  # reused when made
    return out


def slide_stats(model, normalizer, path: Path) -> tuple[object, float, str]:
    """(moments of the slide's patches, its Dice, its domain)."""
    import torch

    from histodg.evaluation.metrics import batch_counts, dice_from
    from histodg.model.shift import FeatureMeter
    from histodg.store import open_store

    s = open_store(path)
    meter, tot = FeatureMeter(model), np.zeros(3)
    with torch.inference_mode():
        for i in range(0, len(s), 32):
            x = torch.from_numpy(np.asarray(s.images[i:i + 32])).permute(0, 3, 1, 2)
            y = torch.from_numpy(np.asarray(s.masks[i:i + 32]))
            pred = model(normalizer(x))[:, 0] > 0
            tot += np.array([a.sum() for a in batch_counts(pred, y)])
    meter.remove()
    domain = s.attrs.organ if s.attrs.organ != "unknown" else s.attrs.scanner
    return meter.take(), float(dice_from(*tot)), domain


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of an unseen slide > score of a seen one), ties counted half."""
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def score_run(run_dir: Path, dg_dir: Path, seen_dirs: list[Path], unseen_dir: Path) -> dict:
    import torch

    from histodg.model.checkpoint import load_checkpoint, model_from_checkpoint
    from histodg.model.normalize import Normalizer
    from histodg.model.shift import slide_shift
    from histodg.store import find_stores
    from histodg.training.data import load_stores
    from histodg.training.shift_reference import shift_reference
    from histodg.training.splits import plan_stages

    model, config = model_from_checkpoint(load_checkpoint(run_dir / "last.pt"))
    model.eval()
    norm = Normalizer(config.normalization.mean, config.normalization.std, "cpu", stain=config.normalization.stain)
    stages = plan_stages(load_stores([str(dg_dir / "stores" / "train")]), ["organ", "scanner"], (), 0.0, 0)
    ref = shift_reference(model, norm, stages, torch.device("cpu"))
    slides = []
    for kind, dirs in (("seen", seen_dirs), ("unseen", [unseen_dir])):
        for path in find_stores(dirs):
            m, dice, domain = slide_stats(model, norm, path)
            sh = slide_shift(ref, m, 0)
            slides.append({"store": path.name, "kind": kind, "domain": domain, "dice": dice, "score": sh["score"],
                           "warn": sh["warn"], "nearest": sh["nearest"]})
    return {"slides": slides, "calibration": ref["calibration"]}


def summarise(runs: dict) -> str:
    from scipy.stats import spearmanr

    lines = ["| model | seed | AUROC unseen vs seen | warned: seen | warned: unseen | Spearman rho (score, Dice): all | unseen |",
             "|---|---|---|---|---|---|---|"]
    for key, r in runs.items():
        sl = r["slides"]
        s = np.array([x["score"] for x in sl])
        unseen = np.array([x["kind"] == "unseen" for x in sl])
        dice = np.array([x["dice"] for x in sl])
        warn = np.array([x["warn"] for x in sl])
        rho_all = spearmanr(s, dice).statistic
        rho_un = spearmanr(s[unseen], dice[unseen]).statistic
        name, seed = key.rsplit("|", 1)
        lines.append(f"| {name} | {seed} | {auroc(s[unseen], s[~unseen]):.3f} | {warn[~unseen].sum()}/{(~unseen).sum()} | "
                     f"{warn[unseen].sum()}/{unseen.sum()} | {rho_all:+.2f} | {rho_un:+.2f} |")
    per_domain = {}
    for r in runs.values():
        for x in r["slides"]:
            per_domain.setdefault((x["kind"], x["domain"]), []).append(x["score"])
    lines += ["", "| slides | domain | median score | max |", "|---|---|---|---|"]
    for (kind, dom), v in sorted(per_domain.items()):
        lines.append(f"| {kind} | {dom} | {np.median(v):.2f} | {np.max(v):.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dg-dir", type=Path, default=dg.OUT, help="the DG benchmark's output folder")
    ap.add_argument("--rows", nargs="+", default=["erm"], help="DG benchmark rows whose runs to score")
    ap.add_argument("--tables", action="store_true", help="the tables from shift.json, run nothing")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    out_path = args.dg_dir / "shift.json"
    runs = json.loads(out_path.read_text()) if out_path.exists() else {}
    if not args.tables:
        results = json.loads((args.dg_dir / "results.json").read_text())
        seen_dirs = [args.dg_dir / "stores" / "val", seen_test_stores(args.dg_dir)]
        sel = dg.selected(results)
        for row in args.rows:
            for seed, r in sorted(sel.get(row, {}).items()):
                key = f"{row}|{seed}"
                if key in runs:
                    continue
                run_dir = args.dg_dir / "runs" / dg.run_dir_of(r["table"], r["name"], seed, r["lr"]).name
                runs[key] = score_run(run_dir, args.dg_dir, seen_dirs, args.dg_dir / "stores" / "test")
                out_path.write_text(json.dumps(runs, indent=1))
                print(f"{key}: done", file=sys.stderr, flush=True)
    print(summarise(runs))


if __name__ == "__main__":
    main()
