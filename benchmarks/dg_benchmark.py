#!/usr/bin/env python
"""What each domain-generalisation method is worth on unseen organs and scanners, measured so
that the numbers can be trusted (DomainBed's protocol, Gulrajani and Lopez-Paz 2021).

    .venv/bin/python benchmarks/dg_benchmark.py --jobs 2            # every run, two at a time (resumable)
    .venv/bin/python benchmarks/dg_benchmark.py --tier 1 --jobs 2    # the first tier only
    .venv/bin/python benchmarks/dg_benchmark.py --row 'erm + stain normalisation'   # one row
    .venv/bin/python benchmarks/dg_benchmark.py --row erm --seeds 0 1 2   # one row, three seeds
    .venv/bin/python benchmarks/dg_benchmark.py --tables             # the tables from what has run
    .venv/bin/python benchmarks/dg_benchmark.py --device cuda --out bench_out/dg2-cuda   # on a GPU, its own table

Data (made here from `histodg synth`, tiled at 1 um/px in 128 px patches, >= 50% tissue):
- training: seed 0, 4 cases per domain; cases 1-3 of colon, stomach, pancreas (organ task) and
  scanner-a, -b, -c (scanner task) train, case 4 of each is the training-domain validation;
- test: an independently seeded set (seed 1), 6 cases of each unseen domain: lung (organ),
  scanner-d (scanner) and scanner-x7, a scanner whose whole acquisition the generator draws at
  random (`histodg synth --extra-scanner 7`);
- oracles: trained on the unseen domain itself (its 4 seed-0 cases), tested on the same test set.

Model and schedule, shared by every run: FPN with the ImageNet EfficientNet-Lite0 encoder
(`tu-efficientnet_lite0`, offline), 2 patches per domain per micro-batch, 2 micro-batches per
step (`--accumulate 2`: 12 patches per step, and SDS pools its statistics over the step),
AdamW with 5% warm-up and cosine decay, BCE, 100 + 100 steps for `--pretrain organ --finetune
scanner` (200 for one-stage protocols). The plateau of ERM's seen-domain Dice at that length is
shown by a curve run (`curve.png`).

Protocol:
- model selection on training-domain validation only: every method, ERM included, gets the same
  grid, the learning rate in {3e-4, 1e-3}; for each seed the setting with the best mean
  validation Dice over the six training domains is kept (printed), the unseen domains never
  look at it. SDS ablations, protocol variants and the stain-normalisation rows (Macenko,
  `--stain-norm macenko`) take their parent's chosen rate per seed;
- paired seeds: seed s gives every method the same initialisation and data order; 5 seeds;
- scores: Dice per test slide (pixels pooled over its patches), mean over a domain's slides;
  per row: mean +- standard error over seeds, and the paired difference to ERM (same seed) with
  a bootstrap 95% interval over seeds.

Results accumulate in bench_out/dg2/results.json (a rerun skips finished runs); the tables go
to stdout and bench_out/dg2/tables.md.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench_out" / "dg2"
EXTRA = 7  # the extra unseen scanner: scanner-x7
SEEN = ["colon", "stomach", "pancreas", "scanner-a", "scanner-b", "scanner-c"]
UNSEEN = ["lung", "scanner-d", f"scanner-x{EXTRA}"]
MODEL = ["--arch", "fpn", "--encoder", "tu-efficientnet_lite0", "--encoder-weights", "imagenet"]
SCRATCH = ["--arch", "fpn", "--encoder", "tu-efficientnet_lite0", "--encoder-weights", "none"]
# the method and augmentation every run starts from (a row's own --method/--augment come later and win), so
# that the ERM rows stay ERM now that the default method is dsbn
COMMON = ["--batch-size", "2", "--accumulate", "2", "--val-fraction", "0", "--workers", "1", "--method", "erm",
          "--augment", "light"]
STEPS = 100
LRS = ("3e-4", "1e-3")
SEEDS = (0, 1, 2, 3, 4)
CROSS = ["--pretrain", "organ", "--finetune", "scanner", "--steps", str(STEPS)]
# SDS at its defaults, which the pilot below chose on training-domain validation (written out so
# that the runs stay the same whatever the defaults become)
SDS_HP = ["--hp", "feat_align=0.5", "--hp", "grad_align=0.02"]


@dataclass(frozen=True)
class Row:
    """One row of a table: how its runs are trained."""

    table: str
    name: str
    args: tuple[str, ...]
    tier: int
    grid: bool = True  # False: take `parent`'s chosen learning rate per seed
    parent: str | None = None
    model: tuple[str, ...] = tuple(MODEL)
    seeds: tuple[int, ...] = SEEDS
    stores: str = "train"


def rows() -> list[Row]:
    sds = ("--method", "sds", *SDS_HP)
    r = [
        Row("methods", "erm", (*CROSS,), 1),
        Row("methods", "sds", (*CROSS, *sds), 1),
        Row("methods", "erm + strong augmentation", (*CROSS, "--augment", "strong"), 1),
        Row("methods", "sds + strong augmentation", (*CROSS, *sds, "--augment", "strong"), 1),
    ]
    for dom, axis in (("lung", "organ"), ("scanner-d", "scanner"), (f"scanner-x{EXTRA}", "scanner")):
        r.append(Row("oracle", f"erm trained on {dom}", ("--domains", axis, "--steps", str(2 * STEPS), "--batch-size", "6"),
                     1, grid=False, parent=None, seeds=(0, 1, 2), stores=f"oracle-{dom}"))
    for name in ("stain", "mixstyle", "dsu", "coral", "fishr"):
        r.append(Row("methods", name, (*CROSS, "--method", name), 2))
    # domain-specific BatchNorm: ERM's loss, one BatchNorm per training domain; seen domains are scored
    # through their own BatchNorm, unseen ones through the shared one re-estimated per slide. Tier 1 and
    # its own learning-rate grid since it became the default method (until 2026-12-04 it took ERM's rate)
    r.append(Row("methods", "dsbn", (*CROSS, "--method", "dsbn"), 1))
    # the default method with the strong acquisition augmentation: which --augment the default should have
    r.append(Row("methods", "dsbn + strong augmentation", (*CROSS, "--method", "dsbn", "--augment", "strong"), 1))
    # stain normalisation (Macenko, reference fitted on the training stores) against and with augmentation;
    # a preprocessing variant of its parent, so it takes the parent's chosen learning rate per seed
    for name, parent, extra in (("erm + stain normalisation", "erm", ()),
                                ("erm + stain normalisation + strong augmentation", "erm + strong augmentation",
                                 ("--augment", "strong"))):
        r.append(Row("methods", name, (*CROSS, "--stain-norm", "macenko", *extra), 2, grid=False, parent=parent))
    for name, hp in (("sds: shallow only", "deep=false"), ("sds: deep only", "shallow=false"), ("sds: no pooling", "pool=false")):
        r.append(Row("ablations", name, (*CROSS, *sds, "--hp", hp), 3, grid=False, parent="sds"))
    for base, extra in (("erm", ()), ("sds", sds)):
        r.append(Row("protocols", f"{base}: scanner task only", ("--domains", "scanner", "--steps", str(2 * STEPS), *extra), 3,
                     grid=False, parent=base))
        r.append(Row("protocols", f"{base}: union of both tasks", ("--union", "--steps", str(2 * STEPS), "--batch-size", "1",
                                                                    *extra), 3, grid=False, parent=base))
        r.append(Row("from scratch", f"{base} from scratch", (*CROSS, *extra, "--lr", "1e-3"), 3, grid=False, model=tuple(SCRATCH)))
    # issue 31: DSBN's protocols. The union gives every training domain, organs and scanners, its own
    # BatchNorm slot in one stage (2 patches per slot per micro-batch and no accumulation: the 12 patches
    # per step of the others, and batch statistics of 2 patches per slot as in cross-task DSBN); a
    # candidate default, so its own learning-rate grid. Scanner only takes DSBN's rate.
    dsbn = ("--method", "dsbn")
    r.append(Row("protocols", "dsbn: union of both tasks", ("--union", "--steps", str(2 * STEPS), "--batch-size", "2",
                                                              "--accumulate", "1", *dsbn), 3))
    # §2: organ pretraining, then the union with the organ slots carried over (stage 1 is cross-task
    # DSBN's stage 1 to the bit; stage 2 the union's 2400 patches in 100 steps of 24), at the union's rate
    r.append(Row("protocols", "dsbn: organ, then union", ("--pretrain", "organ", "--finetune", "union", "--steps", str(STEPS),
                                                            *dsbn), 3, grid=False, parent="dsbn: union of both tasks"))
    # issue 31 §4: SDS on DSBN (whole, and its deep part alone: class-wise feature and head-gradient
    # alignment on DSBN's per-domain features), a variant of DSBN, so at DSBN's chosen rate per seed
    r.append(Row("methods", "dsbn + sds", (*CROSS, *sds, "--hp", "dsbn=true"), 3, grid=False, parent="dsbn"))
    r.append(Row("methods", "dsbn + sds deep part", (*CROSS, *sds, "--hp", "dsbn=true", "--hp", "shallow=false"), 3,
                 grid=False, parent="dsbn"))
    # issue 31 §3 (d): the default on twice the schedule (200 + 200 steps), at DSBN's chosen rate
    r.append(Row("methods", "dsbn, twice the steps", (*CROSS, "--method", "dsbn", "--steps", str(2 * STEPS)), 3,
                 grid=False, parent="dsbn"))
    r.append(Row("protocols", "dsbn: scanner task only", ("--domains", "scanner", "--steps", str(2 * STEPS), *dsbn), 3,
                 grid=False, parent="dsbn"))
    return r


# -- data ------------------------------------------------------------------------------------------
def histodg(*args, quiet=True, env=None) -> None:
    cmd = [sys.executable, "-m", "histodg", *map(str, args)]  # the interpreter this benchmark runs under
    r = subprocess.run(cmd, capture_output=quiet, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:] if quiet else ''}")


def _subset(manifest: Path, out: Path, keep) -> Path:
    with open(manifest, newline="") as f:
        rows_ = list(csv.DictReader(f))
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows_[0]))
        w.writeheader()
        for row in rows_:
            if keep(row):
                w.writerow({**row, "path": str(manifest.parent / row["path"]), "annotation": str(manifest.parent / row["annotation"])})
    return out


def tile_args(side: int = 128) -> list[str]:
    """`histodg tile`'s arguments for every store of this benchmark and those built on it (the
    optics, codec and context benchmarks): 1 um/px, `side` px patches, JPEG q90 stores."""
    return ["--mpp", "1.0", "--tile-size", str(side), "--min-tissue", "0.5", "--compression", "jpeg", "--jpeg-quality", "90"]


def prepare_data() -> None:
    """Synth sets, then stores: train, val, test and one oracle training set per unseen domain."""
    # JPEG q90 stores: what `histodg tile`'s default (`--compression auto`) makes of these JPEG-compressed
    # slides since issue 16, pinned so that the stores stay the same whatever the default becomes.
    # The tables made before 2026-12-02 were on lossless (lz4) stores of the same slides.
    tile = tile_args()
    names = ["train", "val", "test", *(f"oracle-{dom}" for dom in UNSEEN)]
    if all((OUT / "stores" / name / "summary.json").exists() for name in names):
        return  # every store finished earlier (or was copied here from the machine that made them)
    for seed, cases in ((0, 4), (1, 6)):
        synth = OUT / f"synth{seed}"
        if not (synth / "manifest.csv").exists():
            histodg("synth", synth, "--seed", seed, "--cases", cases, "--extra-scanner", EXTRA, "--overwrite")
    m0, m1 = OUT / "synth0" / "manifest.csv", OUT / "synth1" / "manifest.csv"

    def domain(row):
        return row["organ"] if row["task"] == "organ" else row["scanner"]

    def case(row):
        return int(Path(row["path"]).stem.rsplit("-", 1)[1])

    lists = {
        "train": _subset(m0, OUT / "train.csv", lambda r: domain(r) in SEEN and case(r) <= 3),
        "val": _subset(m0, OUT / "val.csv", lambda r: domain(r) in SEEN and case(r) == 4),
        "test": _subset(m1, OUT / "test.csv", lambda r: domain(r) in UNSEEN),
    }
    for dom in UNSEEN:
        lists[f"oracle-{dom}"] = _subset(m0, OUT / f"oracle-{dom}.csv", lambda r, d=dom: domain(r) == d)
    for name, manifest in lists.items():
        histodg("tile", manifest, "-o", OUT / "stores" / name, *tile)


# -- runs ------------------------------------------------------------------------------------------
@dataclass
class Plan:
    results: dict = field(default_factory=dict)

    @staticmethod
    def key(row: Row, seed: int, lr: str) -> str:
        return f"{row.table}|{row.name}|{seed}|{lr}"

    def chosen_lr(self, row_name: str, seed: int) -> str | None:
        """The learning rate the grid row `row_name` chose for `seed` (training-domain validation)."""
        best = None
        table = next((r.table for r in rows() if r.name == row_name), "methods")
        for lr in LRS:
            r = self.results.get(f"{table}|{row_name}|{seed}|{lr}")
            if r is None:
                return None  # not all settings have run yet
            score = np.mean([r["val"][d] for d in SEEN])
            if best is None or score > best[0]:
                best = (score, lr)
        return best[1]

    def todo(self, tiers, only=(), seeds=()) -> list[tuple[Row, int, str]]:
        """The runs still to make, most important first; runs that wait for a parent's choice are
        left for a later call."""
        out = []
        for row in rows():
            if row.tier not in tiers or (only and row.name not in only):
                continue
            for seed in row.seeds:
                if seeds and seed not in seeds:
                    continue
                if row.grid:
                    lrs = LRS
                elif row.parent is not None:
                    lr = self.chosen_lr(row.parent, seed)
                    if lr is None:
                        continue
                    lrs = (lr,)
                else:
                    lrs = ("1e-3",)
                for lr in lrs:
                    if self.key(row, seed, lr) not in self.results:
                        out.append((row, seed, lr))
        # seed by seed, so that partial results have every row paired; the oracles' later seeds last
        # (one oracle seed is the reference, the paired method seeds are the comparison)
        return sorted(out, key=lambda t: (t[0].tier, t[1] if t[0].table != "oracle" or t[1] == 0 else 99))


def score_stores(run_dir: Path, stores: Path, device: str, checkpoint: str = "last.pt") -> dict:
    """Per-slide Dice on `stores`, averaged per domain (an image is a store)."""
    import torch

    from histodg.device import resolve_device
    from histodg.evaluation.metrics import batch_counts, dice_from
    from histodg.model.checkpoint import load_checkpoint, model_from_checkpoint
    from histodg.model.normalize import Normalizer
    from histodg.store import find_stores, open_store

    model, config = model_from_checkpoint(load_checkpoint(run_dir / checkpoint))
    dev = resolve_device(device, "benchmark", lambda where, why: SystemExit(f"{where}: {why}"))
    model = model.eval().to(dev)
    # the checkpoint's stain normalisation too, as `histodg predict` applies it (None: without)
    norm = Normalizer(config.normalization.mean, config.normalization.std, dev, stain=config.normalization.stain)
    per_domain: dict[str, list[float]] = {}
    for path in find_stores([stores]):
        s = open_store(path)
        name = s.attrs.organ if s.attrs.organ != "unknown" else s.attrs.scanner
        with _batchnorm_for(model, config, norm, s, dev):
            tot = np.zeros(3)
            with torch.inference_mode():
                for i in range(0, len(s), 64):
                    x = torch.from_numpy(np.asarray(s.images[i:i + 64])).permute(0, 3, 1, 2).to(dev)
                    y = torch.from_numpy(np.asarray(s.masks[i:i + 64])).to(dev)
                    pred = model(norm(x.float()))[:, 0] > 0
                    tot += np.array([a.sum() for a in batch_counts(pred, y)])
        per_domain.setdefault(name, []).append(dice_from(*tot))
    return {d: float(np.mean(v)) for d, v in per_domain.items()}


def _batchnorm_for(model, config, norm, store, dev):
    """A DSBN model, as `histodg predict` runs it (`inference.adapt.slide_batchnorm`): a training
    domain through its own BatchNorm, any other through the shared one with the store's
    statistics (AdaBN). Others: as they are."""
    from types import SimpleNamespace

    from histodg.inference.adapt import slide_batchnorm

    shim = SimpleNamespace(config=config, model=model, meter=None, options=SimpleNamespace(adapt="none", batch_size=16, tta="none"),
                           model_input=lambda b: norm(b.to(dev).permute(0, 3, 1, 2).float()))
    job = SimpleNamespace(organ=store.attrs.organ, scanner=store.attrs.scanner)
    return slide_batchnorm(shim, job, store.tissue, lambda i: np.asarray(store.images[i]))


def run_dir_of(table: str, name: str, seed: int, lr: str) -> Path:
    return OUT / "runs" / "-".join(x for x in (table, name, f"s{seed}", f"lr{lr}")).replace(" ", "_").replace(":", "")


_FINGERPRINTS: dict[Path, str] = {}


def fingerprint(folder: Path) -> str:
    """sha256 over the chunks of every store's images, masks and coordinates in `folder` (relative
    paths and bytes, in sorted order; not the metadata, which holds times), first 16 hex digits:
    two runs whose stores have the same fingerprint read the same patches."""
    if folder not in _FINGERPRINTS:
        h = hashlib.sha256()
        for f in sorted(p for a in ("images", "masks", "coords") for p in folder.glob(f"*.zarr/{a}/c/**/*") if p.is_file()):
            h.update(str(f.relative_to(folder)).encode() + b"\0")
            h.update(f.read_bytes())
        _FINGERPRINTS[folder] = h.hexdigest()[:16]
    return _FINGERPRINTS[folder]


def environment(stores: str, threads: int) -> dict:
    """What a run's numbers depend on besides its arguments: the code (git commit, and whether the
    tree had changes), the packages, the torch threads, and the stores' fingerprints."""
    from importlib.metadata import PackageNotFoundError, version

    def git(*a):
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    packages = {}
    for name in ("torch", "timm", "segmentation-models-pytorch", "numpy", "zarr", "imagecodecs", "scikit-image"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "histodg")),
            "packages": packages, "threads": threads,
            "stores": {name: fingerprint(OUT / "stores" / name) for name in (stores, "val", "test")}}


def run_one(row: Row, seed: int, lr: str, args) -> dict:
    run_dir = run_dir_of(row.table, row.name, seed, lr)
    train_args = [*row.model, *COMMON, *row.args, "--seed", seed, "--device", args.device, "--overwrite"]
    if "--lr" not in row.args:
        train_args += ["--lr", lr]
    if args.quick:
        train_args += ["--steps", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.time()
    histodg("train", OUT / "stores" / row.stores, "-o", run_dir, *train_args, env=env)
    seconds = time.time() - t0
    val = score_stores(run_dir, OUT / "stores" / "val", args.device)
    test = score_stores(run_dir, OUT / "stores" / "test", args.device)
    # the optics scanner (optics_benchmark.py), when its stores are made: scored by the same run
    optics = OUT / "stores" / "test-optics"
    extra = {"optics": score_stores(run_dir, optics, args.device)} if (optics / "summary.json").exists() else {}
    return {"table": row.table, "name": row.name, "seed": seed, "lr": lr, "val": val, "test": test, **extra, "seconds": seconds,
            "env": environment(row.stores, args.threads),
            "command": "histodg train " + " ".join(map(str, [os.path.relpath(OUT / "stores" / row.stores, REPO), "-o",
                                                             os.path.relpath(run_dir, REPO), *train_args]))}


def run_all(args) -> dict:
    results_path = OUT / "results.json"
    plan = Plan(json.loads(results_path.read_text()) if results_path.exists() else {})
    prepare_data()
    tiers = {args.tier} if args.tier else {1, 2, 3}
    while True:  # rows that wait for a parent's choice become runnable as the parents finish
        todo = plan.todo(tiers, args.row, args.seeds)
        if not todo:
            return plan.results
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_one, row, seed, lr, args): (row, seed, lr) for row, seed, lr in todo}
            for i, fut in enumerate(futures, 1):
                row, seed, lr = futures[fut]
                res = fut.result()
                plan.results[Plan.key(row, seed, lr)] = res
                results_path.write_text(json.dumps(plan.results, indent=1))
                print(f"[{i}/{len(todo)}] {row.name} seed {seed} lr {lr}: val {np.mean([res['val'][d] for d in SEEN]):.3f}  "
                      + "  ".join(f"{d} {res['test'][d]:.3f}" for d in UNSEEN) + f"  ({res['seconds']:.0f} s)",
                      file=sys.stderr, flush=True)


# -- the pilot: SDS's default weights, chosen on training-domain validation --------------------------
PILOT = {"feat 0.5, grad 0.5": ("feat_align=0.5", "grad_align=0.5"), "feat 0.5, grad 0.1": ("feat_align=0.5", "grad_align=0.1"),
         "feat 0.5, grad 0.02": ("feat_align=0.5", "grad_align=0.02"), "feat 2, grad 0.1": ("feat_align=2", "grad_align=0.1")}


def run_pilot(args) -> str:
    """SDS at four weight settings, seeds 0 and 1, lr 1e-3: mean training-domain validation Dice."""
    path = OUT / "pilot.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    prepare_data()
    todo = {f"{name}|{seed}": Row("pilot", f"sds {name}", (*CROSS, "--method", "sds", *[a for h in hps for a in ("--hp", h)]),
                                  0, grid=False)
            for name, hps in PILOT.items() for seed in (0, 1) if f"{name}|{seed}" not in done}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {key: pool.submit(run_one, row, int(key.split("|")[1]), "1e-3", args) for key, row in todo.items()}
        for key, fut in futures.items():
            done[key] = fut.result()
            path.write_text(json.dumps(done, indent=1))
    lines = ["| SDS weights | seed 0 val | seed 1 val | mean val |", "|---|---|---|---|"]
    for name in PILOT:
        v = [np.mean([done[f"{name}|{s}"]["val"][d] for d in SEEN]) for s in (0, 1)]
        lines.append(f"| {name} | {v[0]:.3f} | {v[1]:.3f} | {np.mean(v):.3f} |")
    return "\n".join(lines)


# -- the curve: ERM's Dice over the schedule -----------------------------------------------------------
def run_curve(args) -> None:
    """ERM (seed 0, lr 1e-3) scored on the validation and test stores every 20 steps -> curve.json, curve.png."""
    import torch

    from histodg.training.config import TrainConfig
    from histodg.training.trainer import Callbacks, Trainer

    path = OUT / "curve.json"
    if path.exists():
        return
    prepare_data()
    torch.set_num_threads(max(1, args.threads * args.jobs))
    points = []

    def on_epoch(record):
        ckpt = OUT / "runs" / "curve" / "last.pt"
        val = score_stores(ckpt.parent, OUT / "stores" / "val", args.device)
        test = score_stores(ckpt.parent, OUT / "stores" / "test", args.device)
        points.append({"step": record["step"], "stage": record["stage"], "val": val, "test": test})

    cfg = TrainConfig(stores=(str(OUT / "stores" / "train"),), out_dir=str(OUT / "runs" / "curve"), arch="fpn",
                      encoder="tu-efficientnet_lite0", encoder_weights="imagenet", pretrain="organ", finetune="scanner",
                      steps=STEPS, steps_per_epoch=20, batch_size=2, accumulate=2, lr=1e-3, val_fraction=0, workers=1,
                      device=args.device, seed=0)
    Trainer(cfg, overwrite=True, callbacks=Callbacks(on_epoch=on_epoch)).run()
    path.write_text(json.dumps(points, indent=1))
    plot_curve(points)


def plot_curve(points) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [np.mean([p["val"][d] for d in SEEN]) for p in points], "k-o", label="seen domains (validation)")
    for d in UNSEEN:
        ax.plot(steps, [p["test"][d] for p in points], "--.", label=f"{d} (unseen, test)")
    ax.axvline(STEPS + 0.5, color="grey", ls=":", lw=1)
    ax.set(xlabel="optimizer step (organ stage, then scanner stage)", ylabel="Dice", ylim=(0, 1),
           title="ERM, FPN-EfficientNet-Lite0 (ImageNet), seed 0: Dice over the schedule")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "curve.png", dpi=90)
    plt.close(fig)


# -- cost: step time and peak memory ---------------------------------------------------------------
COST = [("erm", [], 2), ("dsbn", [], 2), ("stain", [], 2), ("mixstyle", [], 2), ("dsu", [], 2), ("coral", [], 2), ("fishr", [], 2),
        ("sds", [], 2), ("sds", ["pool=false"], 2), ("sds", [], 1), ("sds", [], 4)]


def cost_child(method: str, hp: list[str], accumulate: int, steps: int) -> None:
    """One method's optimizer steps on fixed batches (3 domains x 2 patches of 128 px per micro-batch)."""
    import resource

    import torch

    from histodg.model.build import build_model
    from histodg.model.config import IMAGENET_MEAN, IMAGENET_STD
    from histodg.model.normalize import Normalizer
    from histodg.training.methods import METHODS as REG
    from histodg.training.methods import SegTask, parse_hparams

    torch.manual_seed(0)
    model = build_model("fpn", "tu-efficientnet_lite0", "none", 1)
    cls = REG[method]
    m = cls(model, 3, parse_hparams(cls, hp), task=SegTask(), normalizer=Normalizer(IMAGENET_MEAN, IMAGENET_STD, "cpu"))
    m.start_stage(steps + 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    micro = [[(torch.randn(2, 3, 128, 128, generator=g), (torch.rand(2, 128, 128, generator=g) > 0.5).to(torch.uint8))
              for _ in range(3)] for _ in range(accumulate)]
    m.train()
    times = []
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process with its model, before any step
    for _ in range(steps + 2):
        t = time.perf_counter()
        m.begin_step(micro)
        for b in micro:
            loss, _ = m.loss(b)
            (loss / accumulate).backward()
        opt.step()
        opt.zero_grad()
        m.end_of_step()
        times.append((time.perf_counter() - t) / accumulate)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"micro_s": float(np.median(times[2:])), "peak_rss_mb": peak_mb, "train_mb": peak_mb - before_mb}))


def cost_table(steps: int, rounds: int = 3) -> str:
    """Every configuration `rounds` times in round-robin order (so that a slow minute of a shared
    machine falls on all of them alike), each in a fresh process; per configuration the median."""
    runs: dict[int, list[dict]] = {i: [] for i in range(len(COST))}
    for _ in range(rounds):
        for i, (method, hp, k) in enumerate(COST):
            r = subprocess.run([sys.executable, __file__, "--cost-child", method, "--accumulate", str(k), "--steps", str(steps),
                                *[f"--hp={h}" for h in hp]], capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "2"})
            if r.returncode:
                raise SystemExit(r.stderr)
            runs[i].append(json.loads(r.stdout.strip().splitlines()[-1]))
    med = {i: {key: float(np.median([x[key] for x in v])) for key in v[0]} for i, v in runs.items()}
    erm = med[0]
    lines = ["| method | --accumulate | s per micro-batch | x ERM | memory of training MB | x ERM | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for i, (method, hp, k) in enumerate(COST):
        c, label = med[i], method + (" (" + ", ".join(hp) + ")" if hp else "")
        lines.append(f"| {label} | {k} | {c['micro_s']:.3f} | "
                     f"{c['micro_s'] / erm['micro_s']:.2f} | {c['train_mb']:.0f} | {c['train_mb'] / erm['train_mb']:.2f} | "
                     f"{c['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


# -- tables ----------------------------------------------------------------------------------------
def selected(results: dict) -> dict[str, dict[int, dict]]:
    """Per row name and seed, the run the protocol keeps (grid rows: the best validation)."""
    plan = Plan(results)
    out: dict[str, dict[int, dict]] = {}
    for row in rows():
        for seed in row.seeds:
            if row.grid:
                lr = plan.chosen_lr(row.name, seed)
            elif row.parent is not None:
                lr = plan.chosen_lr(row.parent, seed)
            else:
                lr = "1e-3"
            r = results.get(Plan.key(row, seed, lr)) if lr else None
            if r is not None:
                out.setdefault(row.name, {})[seed] = r
    return out


def bootstrap_ci(diffs: np.ndarray, n: int = 10000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = rng.choice(diffs, (n, len(diffs)), replace=True).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(results: dict, base: str = "erm") -> str:
    """The tables; Δ is each row's paired difference to the row `base` (ERM unless --versus)."""
    sel = selected(results)
    erm = sel.get(base, {})
    cols = [("seen (val)", None)] + [(d, d) for d in UNSEEN] + [("unseen mean", "mean")]
    deltas_of = [*UNSEEN, "mean"]

    def test(run, d):
        return float(np.mean([run["test"][u] for u in UNSEEN])) if d == "mean" else run["test"][d]

    lines = []
    for table in ("methods", "ablations", "protocols", "from scratch", "oracle"):
        names = [r.name for r in rows() if r.table == table and r.name in sel]
        if not names:
            continue
        lines += [f"\n**{table}** (Dice; mean ± s.e. over seeds; Δ: paired difference to {base}, bootstrap 95% interval)\n",
                  "| run | seeds | lr chosen | " + " | ".join(c for c, _ in cols) + " | "
                  + " | ".join(f"Δ {d.replace('mean', 'unseen mean')}" for d in deltas_of) + " |",
                  "|---|---|---|" + "---|" * (len(cols) + len(deltas_of))]
        for name in names:
            runs = sel[name]
            seeds = sorted(runs)
            vals = {c: np.array([np.mean([runs[s]["val"][d] for d in SEEN]) if d is None else test(runs[s], d) for s in seeds])
                    for c, d in cols}
            cells = [f"{v.mean():.3f} ± {v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float('nan'):.3f}" for v in vals.values()]
            deltas = []
            for d in deltas_of:
                paired = [s for s in seeds if s in erm]
                if name == base or len(paired) < 2 or table == "oracle":
                    deltas.append("")
                    continue
                diff = np.array([test(runs[s], d) - test(erm[s], d) for s in paired])
                lo, hi = bootstrap_ci(diff)
                mark = " **+**" if lo > 0 else (" **−**" if hi < 0 else "")
                deltas.append(f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}")
            lrs = ",".join(sorted({runs[s]["lr"] for s in seeds}))
            lines.append(f"| {name} | {len(seeds)} | {lrs} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    return "\n".join(lines)


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", type=int, choices=[1, 2, 3], help="only this tier (1: ERM, SDS, strong augmentation, "
                                                               "oracles; 2: the peers; 3: ablations, protocols, from scratch)")
    ap.add_argument("--row", action="append", default=[], help="only the row of this name (repeatable), e.g. "
                                                                "--row 'erm + stain normalisation'")
    ap.add_argument("--seeds", type=int, nargs="+", default=[], help="only these seeds, e.g. --seeds 0 1 2")
    ap.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=OUT, help="the folder of stores, runs and results.json (default: "
                                                           "bench_out/dg2; e.g. bench_out/dg2-cuda for a GPU's own table)")
    ap.add_argument("--quick", action="store_true", help="4 steps per stage: a smoke run of the whole machinery")
    ap.add_argument("--tables", action="store_true", help="print the tables of what has run, run nothing")
    ap.add_argument("--versus", default="erm", metavar="ROW", help="the row the Δ columns are paired against, e.g. "
                                                                   "--versus dsbn (default: erm)")
    ap.add_argument("--pilot", action="store_true", help="the SDS weight pilot (training-domain validation only)")
    ap.add_argument("--curve", action="store_true", help="ERM's Dice over the schedule (curve.png)")
    ap.add_argument("--cost", action="store_true", help="step time and peak memory of every method (fresh process each)")
    ap.add_argument("--cost-child")
    ap.add_argument("--accumulate", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="with --cost: measurements per configuration (median)")
    ap.add_argument("--hp", action="append", default=[])
    args = ap.parse_args()
    if args.cost_child:
        return cost_child(args.cost_child, args.hp, args.accumulate, args.steps)
    if args.cost:
        print(cost_table(args.steps, args.rounds))
        return
    OUT = args.out.resolve()
    if args.quick:  # a smoke run never mixes with real results
        OUT = OUT.with_name(OUT.name + "-quick")
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    if args.pilot:
        print(run_pilot(args))
        return
    if args.curve:
        run_curve(args)
        print((OUT / "curve.json").read_text())
        return
    results = json.loads((OUT / "results.json").read_text()) if args.tables else run_all(args)
    text = summarise(results, args.versus)
    (OUT / "tables.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
