#!/usr/bin/env python
"""What JPEG 2000 costs the DG benchmark's models, against JPEG on the same tissue (issue 31 §1).

`scanner-j` is scanner-a (a training scanner) with JPEG 2000 tiles at 33 dB PSNR in place of its JPEG
q90. The six seed-1 cases of scanner-j are rendered once and written twice: as scanner-j writes them
(JPEG 2000) and as scanner-a would (JPEG q90), so the two test sets differ in the codec alone. Each
kept checkpoint of the rows named (the optics benchmark's retrained DG runs, which reproduced the DG
table; and the DG benchmark's own runs for rows it kept) scores both, as the DG benchmark scores.

    .venv/bin/python benchmarks/codec_benchmark.py                         # the default rows
    .venv/bin/python benchmarks/codec_benchmark.py --row "dsbn: union of both tasks"

Results: bench_out/dg2/codec.json; raw copy in benchmarks/results/codec-results.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dg_benchmark as dg  # noqa: E402

SCANNER = "scanner-j"
CODECS = ("jpeg2000", "jpeg")
TILE = dg.tile_args()
ROWS = ["erm", "dsbn", "erm + strong augmentation", "dsbn + strong augmentation", "erm + stain normalisation",
        "dsbn: union of both tasks"]


def make_twins(cases: int = 6, seed: int = 1) -> dict[str, Path]:
    """scanner-j's cases written with JPEG 2000, and the same pixels written with JPEG q90: a manifest each."""
    from histodg.synth import dataset, profiles

    j = profiles.SCANNERS[SCANNER]
    manifests = {}
    for codec in CODECS:
        out = dg.OUT / f"synth1-{SCANNER}-{codec}"
        manifest = out / "manifest.csv"
        manifests[codec] = manifest
        if manifest.exists():
            continue
        profiles.SCANNERS[SCANNER] = j if codec == "jpeg2000" else replace(j, jpeg2000_psnr=0.0)
        try:
            domain = dataset.Domain("scanner", "colon", SCANNER, "heldout")
            rows = [dataset.make_case(dataset.CaseJob(str(out), domain, i, seed, dataset.DEFAULT_SIZE_UM, ("wsi",)))
                    for i in range(1, cases + 1)]
        finally:
            profiles.SCANNERS[SCANNER] = j
        with open(manifest, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dataset.MANIFEST_COLUMNS))
            w.writeheader()
            w.writerows({**r, "path": str(out / r["path"]), "annotation": str(out / r["annotation"])} for r in rows)
    return manifests


def prepare() -> dict[str, Path]:
    stores = {}
    for codec, manifest in make_twins().items():
        stores[codec] = dg.OUT / "stores" / f"test-{SCANNER}-{codec}"
        if not (stores[codec] / "summary.json").exists():
            dg.histodg("tile", manifest, "-o", stores[codec], *TILE)
    return stores


def run_dir(name: str, seed: int, lr: str) -> Path:
    """The kept checkpoint of `name` and `seed`: the optics benchmark's retrained run, else the DG run."""
    optics = dg.run_dir_of("optics", name, seed, lr)
    if (optics / "last.pt").exists():
        return optics
    table = next(r.table for r in dg.rows() if r.name == name)
    return dg.run_dir_of(table, name, seed, lr)


def table(results: dict) -> str:
    lines = [f"| row | seeds | {SCANNER} as JPEG q90 | {SCANNER} as JPEG 2000 (33 dB) | Δ JPEG 2000 − JPEG [95% CI] |",
             "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["name"] for r in results.values()):
        recs = [r for r in results.values() if r["name"] == name]
        a = np.array([r["jpeg"] for r in recs])
        b = np.array([r["jpeg2000"] for r in recs])
        lo, hi = dg.bootstrap_ci(b - a) if len(recs) > 1 else (float("nan"), float("nan"))
        lines.append(f"| {name} | {len(recs)} | {a.mean():.3f} | {b.mean():.3f} | {(b - a).mean():+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", action="append", default=[], help="a DG benchmark row (repeatable); default: " + ", ".join(ROWS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tables", action="store_true")
    args = ap.parse_args()
    out = dg.OUT / "codec.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    if not args.tables:
        stores = prepare()
        recorded = json.loads((dg.OUT / "results.json").read_text())
        for name in args.row or ROWS:
            for seed, rec in sorted(dg.selected(recorded).get(name, {}).items()):
                key = f"{name}|{seed}"
                if key in results:
                    continue
                run = run_dir(name, seed, rec["lr"])
                scores = {codec: dg.score_stores(run, stores[codec], args.device)[SCANNER] for codec in CODECS}
                results[key] = {"name": name, "seed": seed, "lr": rec["lr"], "run": run.name, **scores}
                out.write_text(json.dumps(results, indent=1))
                print(f"{name} seed {seed}: jpeg {scores['jpeg']:.3f}  jpeg2000 {scores['jpeg2000']:.3f}",
                      file=sys.stderr, flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
