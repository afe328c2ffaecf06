"""What the slide benchmarks share: the large test slides and peak-RSS reading."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout; HISTODG_SHARED points elsewhere (a GPU machine gets a copy: gpu_check.sh)
MAKE_SLIDE = Path(os.environ.get("HISTODG_SHARED") or REPO.parent / "shared") / "tools" / "make_large_slide.py"


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ensure_slide(size: int, out: Path, seed: int = 0) -> Path:
    """bench_out/slide_<size>[_s<seed>].tiff from ../shared/tools/make_large_slide.py, built when missing."""
    path = out / (f"slide_{size}.tiff" if seed == 0 else f"slide_{size}_s{seed}.tiff")
    if not path.exists():
        print(f"building {path} ...", file=sys.stderr)
        subprocess.run([sys.executable, str(MAKE_SLIDE), str(path), "--size", str(size), "--seed", str(seed)], check=True)
    with open(path, "rb") as f:  # warm the page cache so every contender reads from memory
        while f.read(1 << 24):
            pass
    return path


def run_child(cmd: list[str], kind: str, repeat: int = 1) -> dict:
    """Run a measurement in a fresh process; its last stdout line is its JSON result. With
    `repeat` > 1 it runs that many times and keeps the fastest run (on a shared VM, steal time
    only ever adds), recording every run's seconds."""
    import json

    runs = []
    for _ in range(repeat):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{kind} failed:\n{r.stderr}")
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda x: x.get("seconds", 0))
    if repeat > 1:
        best["all_seconds"] = [x.get("seconds") for x in runs]
    return best


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
