#!/usr/bin/env python
"""One batch of slides, tiled by histodg in each storage mode and by hs2p, side by side.

    .venv/bin/python benchmarks/tile_batch.py                         # four 20000 px slides, 512 px at 0.5 um/px
    .venv/bin/python benchmarks/tile_batch.py --slides 4 --size 20000 --hs2p bench_out/hs2p-venv/bin/python

Slides: ../shared/tools/make_large_slide.py with seeds 0..N-1 (JPEG tiles of 512 px, 0.499
um/px). Every contender runs in a fresh process that imports its libraries first and then times
the whole batch (tissue detection, planning, reading, writing): histodg's `tile_slide` through
`run_jobs`, as `histodg tile` runs it, with `--compression auto` (the default), lz4, jpeg (all
with the default artefact QC, `--qc exclude`), and auto and lz4 with `--qc off` (QC's cost);
hs2p's `tile_slides(..., save_tiles=True)`, which writes every tile as a JPEG into one tar per
slide (its PIL encoder at quality 90, its default), with as many workers as histodg's threads.
The decode floor is decoding the source tiles histodg's windows need, once each.
Each contender runs `--repeat` times (default 3) and the fastest run counts: on a shared VM
steal time only ever adds.

hs2p is not a dependency of histodg: give `--hs2p` a Python that has it
(`python -m venv bench_out/hs2p-venv && bench_out/hs2p-venv/bin/pip install "hs2p[openslide]==6.1.0"`);
without it the hs2p column is left out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dir_mb, ensure_slide, maxrss_mb, run_child  # noqa: E402

MODES = ("jpeg", "auto", "lz4", "auto-qc-off", "lz4-qc-off")  # "-qc-off": without artefact QC (--qc off)


def run_histodg(slides: list[Path], out: Path, mpp: float, tile: int, workers: int, mode: str) -> dict:
    import numcodecs  # noqa: F401 - imports off the clock, as for hs2p
    import openslide  # noqa: F401
    import skimage.filters  # noqa: F401 - the tissue mask's (about 0.8 s with scipy's array-API layer)
    import skimage.morphology  # noqa: F401
    import zarr  # noqa: F401

    from histodg.batch import run_jobs
    from histodg.slides.inputs import SlideJob
    from histodg.tiling import ReadOptions, TileOptions, TileSettings, tile_slide

    compression, qc = (mode.removesuffix("-qc-off"), "off") if mode.endswith("-qc-off") else (mode, "exclude")
    opts = TileOptions(TileSettings(tile_size=tile, mpp=mpp), ReadOptions(workers=workers, qc=qc), compression=compression)
    jobs = [SlideJob(p, p.stem) for p in slides]
    t0 = time.perf_counter()
    results = run_jobs(jobs, lambda job, progress: tile_slide(job, out, opts, progress))
    dt = time.perf_counter() - t0
    assert all(r.status == "done" for r in results), [r.error for r in results]
    # tiles: windows examined (an excluded one was read and checked as much as a stored one)
    tiles = sum(r.patches + (r.qc or {}).get("excluded", 0) for r in results)
    return {"seconds": dt, "tiles": tiles, "store_mb": dir_mb(out),
            "qc_excluded": sum((r.qc or {}).get("excluded", 0) for r in results)}


def run_hs2p(slides: list[Path], out: Path, mpp: float, tile: int, workers: int) -> dict:
    from hs2p import SegmentationConfig, SlideSpec, TilingConfig, tile_slides

    specs = [SlideSpec(sample_id=p.stem, image_path=p) for p in slides]
    tiling = TilingConfig(backend="openslide", mask_backend="openslide", requested_spacing_um=mpp,
                          requested_tile_size_px=tile, tolerance=0.05, overlap=0.0)
    t0 = time.perf_counter()
    arts = tile_slides(specs, tiling=tiling, segmentation=SegmentationConfig(method="hsv", downsample=64),
                       output_dir=out, num_workers=workers, save_tiles=True)
    dt = time.perf_counter() - t0
    from importlib.metadata import version

    return {"seconds": dt, "tiles": sum(a.num_tiles for a in arts), "store_mb": dir_mb(out / "tiles"),
            "version": version("hs2p")}


def run_floor(slides: list[Path], out: Path, mpp: float, tile: int, workers: int) -> dict:
    from tile_throughput import run_floor as floor_of

    parts = [floor_of(p, mpp, tile, workers, out) for p in slides]
    return {"seconds": sum(p["seconds"] for p in parts), "tiles": sum(p["windows"] for p in parts)}


def child(args) -> None:
    slides = [Path(p) for p in args.child_slides]
    out = Path(args.scratch)
    shutil.rmtree(out, ignore_errors=True)
    if args.child == "hs2p":
        res = run_hs2p(slides, out, args.mpp, args.tile_size, args.workers)
    elif args.child == "floor":
        res = run_floor(slides, out, args.mpp, args.tile_size, args.workers)
    else:
        res = run_histodg(slides, out, args.mpp, args.tile_size, args.workers, args.child)
    shutil.rmtree(out, ignore_errors=True)
    res["maxrss_mb"] = maxrss_mb()
    print(json.dumps(res))


def measure(kind: str, slides: list[Path], args, python: str = sys.executable) -> dict:
    cmd = [python, __file__, "--child", kind, "--mpp", str(args.mpp), "--tile-size", str(args.tile_size),
           "--workers", str(args.workers), "--scratch", str(args.out / f"scratch_batch_{kind}"),
           "--child-slides", *map(str, slides)]
    return run_child(cmd, kind, args.repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--hs2p", help="a Python interpreter with hs2p installed")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each contender; the fastest counts")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out")
    ap.add_argument("--child", choices=[*MODES, "hs2p", "floor"])
    ap.add_argument("--child-slides", nargs="+")
    ap.add_argument("--scratch")
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.out.mkdir(parents=True, exist_ok=True)
    slides = [ensure_slide(args.size, args.out, seed) for seed in range(args.slides)]
    rows = {"floor": measure("floor", slides, args)}
    for mode in MODES:
        rows[mode] = measure(mode, slides, args)
    if args.hs2p:
        rows["hs2p"] = measure("hs2p", slides, args, python=args.hs2p)
    (args.out / "tile_batch.json").write_text(json.dumps(rows, indent=2))
    floor = rows["floor"]["seconds"]
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.slides} slides of {args.size} px, {args.tile_size} px at {args.mpp} um/px, {args.workers} workers\n")
    print("| contender | tiles | seconds | tiles/s | time vs decode floor | store MB | MB per 1000 tiles | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, r in rows.items():
        name = {"floor": "decode floor", "hs2p": f"hs2p {r.get('version', '')} (JPEG tiles in tar)"}.get(
            kind, f"histodg --compression {kind.removesuffix('-qc-off')}" + (" --qc off" if kind.endswith("-qc-off") else ""))
        store = f"{r['store_mb']:.0f}" if "store_mb" in r else ""
        per = f"{1000 * r['store_mb'] / r['tiles']:.0f}" if "store_mb" in r else ""
        print(f"| {name} | {r['tiles']} | {r['seconds']:.1f} | {r['tiles'] / r['seconds']:.0f} | "
              f"{r['seconds'] / floor:.2f}x | {store} | {per} | {r['maxrss_mb']:.0f} |")
    if "hs2p" in rows:
        tps = {k: r["tiles"] / r["seconds"] for k, r in rows.items()}
        print(f"\nhistodg default vs hs2p, tiles/s: {tps['auto'] / tps['hs2p']:.1f}x")


if __name__ == "__main__":
    main()
