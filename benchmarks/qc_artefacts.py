#!/usr/bin/env python
"""Artefact QC (`slides.qc`) on the real slide: false flags on the clean slide, and how often pen,
blur and a fold drawn onto it are caught, at a few resolutions; plus flags on synthetic stores.

    .venv/bin/python benchmarks/qc_artefacts.py                                   # the real slide
    .venv/bin/python benchmarks/qc_artefacts.py --stores "demo_out/stores/*.zarr"  # + clean synthetic patches

The artefacts are `synth.artefacts.draw_artefacts` (as in tests/test_qc.py). A window counts as
"under" an artefact when the artefact covers at least half of it (a quarter for the pen
stroke, which is narrower than a window); "untouched" windows have none of it. The windows are
the ones `histodg tile` plans (min tissue 0.25), read from the drawn image at the target mpp.
"""
from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np

from histodg.slides.backends import MemorySlide
from histodg.slides.opening import open_slide
from histodg.slides.plan import plan_windows, resolve, resolve_target
from histodg.slides.qc import FLAGS, WindowQC, block_variances, counts, glass_pixels, ink, optical_density
from histodg.synth.artefacts import draw_artefacts

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ((0.5, 256), (0.5, 512), (1.0, 256))
MOSTLY = {"pen": 0.25, "blur": 0.5, "dark": 0.5}


def windows(slide, mpp: float, tile: int):
    target, scale = resolve_target(slide, mpp, None)
    res = resolve(slide, target, scale, tile, 0.02)
    plan = plan_windows(slide, res, tile, "pad", "otsu", 0.25)
    return plan, res


def flags_of(slide, plan, res) -> tuple[np.ndarray, float]:
    own, _ = windows(slide, res.target_mpp, res.tile)  # the references come from the slide being read
    qc = WindowQC.from_plan(slide, own)
    imgs = [res.read(slide, xy) for xy in plan.level0_xy]
    t = time.perf_counter()
    flags = np.array([qc(im) for im in imgs])
    return flags, (time.perf_counter() - t) / max(1, len(imgs)) * 1000


def coverage(plan, res, where: np.ndarray) -> np.ndarray:
    side = int(round(res.level0_size))
    padded = np.pad(where, ((0, side), (0, side)))
    return np.array([padded[y:y + side, x:x + side].mean() for x, y in plan.level0_xy])


def real_slide(path: Path) -> list[dict]:
    with open_slide(path) as s:
        rgb, mpp0 = s.read_region((0, 0), 0, s.dimensions), s.mpp
    art, where = draw_artefacts(rgb)
    clean, drawn = MemorySlide(rgb, mpp0), MemorySlide(art, mpp0)
    rows = []
    for mpp, tile in CONFIGS:
        plan, res = windows(clean, mpp, tile)
        f_clean, ms = flags_of(clean, plan, res)
        f_art, _ = flags_of(drawn, plan, res)
        row = {"mpp": mpp, "tile": tile, "windows": len(plan), "qc_ms_per_window": round(ms, 2),
               "clean_flags": counts(f_clean)}
        untouched = np.ones(len(plan), bool)
        for name, frac in MOSTLY.items():
            cov = coverage(plan, res, where[name])
            untouched &= cov == 0
            under = cov >= frac
            row[name] = {"under": int(under.sum()), "caught": int(np.count_nonzero(f_art[under] & FLAGS[name])),
                         "false_elsewhere": int(np.count_nonzero(f_art[cov == 0] & FLAGS[name])), "untouched": int((cov == 0).sum())}
        row["untouched_any_flag"] = f"{int(np.count_nonzero(f_art[untouched]))} of {int(untouched.sum())}"
        rows.append(row)
    return rows


def synthetic(pattern: str) -> list[dict]:
    from histodg.store import open_store

    rows = []
    for p in sorted(glob.glob(pattern)):
        st = open_store(Path(p))
        imgs = [st.images[i] for i in range(len(st))]
        # no slide here: the references are the store's median patch density and block sharpness
        ods = [optical_density(im, ~glass_pixels(im) & ~ink(im)) for im in imgs]
        focus = float(np.median(np.concatenate([block_variances(im) for im in imgs])))
        qc = WindowQC(float(np.median(ods)), focus)
        rows.append({"store": Path(p).name, "patches": len(imgs), "flags": counts([qc(im) for im in imgs])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=REPO.parent / "shared" / "data" / "cmu_small_region.svs")
    ap.add_argument("--stores", help="a glob of clean stores: every flag on them is a false one")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "qc_artefacts.json")
    args = ap.parse_args()
    result = {"real": real_slide(args.slide), "synthetic": synthetic(args.stores) if args.stores else []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("| mpp | tile | windows | clean slide: flags | pen caught | blur caught | fold caught | false flags where nothing was drawn | QC ms/window |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["real"]:
        clean = sum(r["clean_flags"].values())
        cells = [f"{r[k]['caught']}/{r[k]['under']}" for k in ("pen", "blur", "dark")]
        false = sum(r[k]["false_elsewhere"] for k in ("pen", "blur", "dark"))
        print(f"| {r['mpp']} | {r['tile']} | {r['windows']} | {clean} of {r['windows']} | {' | '.join(cells)} | "
              f"{false} (any flag on untouched windows: {r['untouched_any_flag']}) | {r['qc_ms_per_window']} |")
    for r in result["synthetic"]:
        print(f"synthetic {r['store']}: {r['patches']} patches, flags {r['flags']}")


if __name__ == "__main__":
    main()
