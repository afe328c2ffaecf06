"""The built-in synthetic multi-organ, multi-scanner adenocarcinoma data set (`histodg synth`).

Shaped like COSAS 2024, small enough to make in seconds, with no download:

- task ``organ``: colon, stomach and pancreas for training and lung held out, all from one
  scanner (``scanner-o``). The organs differ in morphology (gland size, shape and density,
  nucleus size, stroma texture), not in staining.
- task ``scanner``: colon from ``scanner-a``, ``-b``, ``-c`` for training and ``scanner-d`` held out.
  The scanners differ in acquisition (stain vectors, white balance, illumination, blur, noise,
  JPEG quality, resolution: ``-b`` and ``-d`` image at 0.25 um/px, the others at 0.5).

Layout under OUT_DIR::

    wsi/<task>/<domain>/<case>.tiff       pyramidal tiled JPEG TIFF with resolution tags (mpp)
    wsi/<task>/<domain>/<case>.geojson    QuPath FeatureCollection of the tumour regions, level-0 px
    cosas/<task>/<domain>/image/<case>.png   with --format cosas: the case at its native mpp
    cosas/<task>/<domain>/mask/<case>.png    0/255 tumour mask, same size
    manifest.csv                          written last: path, annotation, organ, scanner, split,
                                          task, mpp, true_organ, true_scanner

As in COSAS, rows of task ``organ`` give the organ and scanner ``unknown``, rows of task
``scanner`` give the scanner and organ ``unknown``; the true values are in ``true_organ`` and
``true_scanner``. Every case is rendered from its own seed (the data set seed, its domain and
its number), so the same seed gives the same bytes and more cases never change the first ones.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..constants import TUMOR_CLASS, UNKNOWN
from ..files import atomic_write, csv_cell, write_text_atomic
from ..locks import run_lock
from .profiles import EXTRA_PREFIX, ORGANS, SCANNERS, scanner_profile
from .tissue import Case, render_case


@dataclass(frozen=True)
class Domain:
    """One domain of one task: which organ on which scanner, and whether it is for training."""

    task: str  # "organ" | "scanner"
    organ: str
    scanner: str
    split: str  # "train" | "heldout"

    @property
    def name(self) -> str:
        """The domain's folder name: its organ in the organ task, its scanner in the scanner task."""
        return self.organ if self.task == "organ" else self.scanner


DOMAINS = (
    Domain("organ", "colon", "scanner-o", "train"),
    Domain("organ", "stomach", "scanner-o", "train"),
    Domain("organ", "pancreas", "scanner-o", "train"),
    Domain("organ", "lung", "scanner-o", "heldout"),
    Domain("scanner", "colon", "scanner-a", "train"),
    Domain("scanner", "colon", "scanner-b", "train"),
    Domain("scanner", "colon", "scanner-c", "train"),
    Domain("scanner", "colon", "scanner-d", "heldout"),
)

DEFAULT_CASES = 2
DEFAULT_SIZE_UM = 1500.0
MIN_SIZE_UM = 400.0  # room for a tumour and normal glands around it
MAX_SIZE_UM = 20000.0
FORMATS = ("wsi", "cosas")
MANIFEST_COLUMNS = ("path", "annotation", "organ", "scanner", "split", "task", "mpp", "true_organ", "true_scanner")
TILE_PX = 256
PARALLEL_PIXELS = 40e6  # a data set of more pixels than this is made by two processes


def case_size_um(size_um: float, mpp: float, rng) -> tuple[float, float]:
    """(width, height) of a case in microns.

    Scanners finer than 0.5 um/px image a smaller field (side scaled by sqrt(mpp / 0.5)), so a
    case costs at most twice the pixels of a 0.5 um/px one; the height is 80-100 % of the width.
    """
    side = size_um * min(1.0, np.sqrt(mpp / 0.5))
    return side, side * rng.uniform(0.8, 1.0)


@dataclass(frozen=True)
class CaseJob:
    """Everything a worker process needs to make one case."""

    out_dir: str
    domain: Domain
    index: int  # 1-based case number within the domain
    seed: int
    size_um: float
    formats: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.domain.name}-{self.index:02d}"

    def seed_sequence(self) -> list[int]:
        return [self.seed, zlib.crc32(f"{self.domain.task}/{self.domain.name}".encode()), self.index]


def render_job(job: CaseJob) -> Case:
    """Render one case of a data set (no files)."""
    d = job.domain
    scanner = scanner_profile(d.scanner)
    rng = np.random.default_rng(job.seed_sequence() + [1])
    w_um, h_um = case_size_um(job.size_um, scanner.mpp, rng)
    return render_case(ORGANS[d.organ], scanner, w_um, h_um, job.seed_sequence())


def make_case(job: CaseJob) -> dict:
    """Render one case and write its files; returns its manifest row (paths relative to out_dir)."""
    case = render_job(job)
    d, out = job.domain, Path(job.out_dir)
    scanner = scanner_profile(d.scanner)
    row = {
        "organ": d.organ if d.task == "organ" else UNKNOWN,
        "scanner": d.scanner if d.task == "scanner" else UNKNOWN,
        "split": d.split,
        "task": d.task,
        "mpp": f"{case.mpp:g}",
        "true_organ": d.organ,
        "true_scanner": d.scanner,
    }
    if "cosas" in job.formats:
        folder = Path("cosas") / d.task / d.name
        image, mask = folder / "image" / f"{job.name}.png", folder / "mask" / f"{job.name}.png"
        write_png(out / image, codec_roundtrip(case.rgb, scanner.codec), case.mpp)
        write_png(out / mask, case.label * np.uint8(255), case.mpp)
        row.update(path=image.as_posix(), annotation=mask.as_posix())
    if "wsi" in job.formats:
        folder = Path("wsi") / d.task / d.name
        slide, geojson = folder / f"{job.name}.tiff", folder / f"{job.name}.geojson"
        description = (f"histodg synthetic slide {job.name}: task={d.task} organ={d.organ} scanner={d.scanner} "
                       f"mpp={case.mpp:g} seed={job.seed}")
        write_pyramid(out / slide, case.rgb, case.mpp, scanner.codec, description)
        write_geojson(out / geojson, case.polygons)
        row.update(path=slide.as_posix(), annotation=geojson.as_posix())
    return row


# -- writers ---------------------------------------------------------------------------------------
def pyramid_levels(rgb: np.ndarray, min_side_px: int = 512) -> list[np.ndarray]:
    """Level 0 and halvings (area averaging) until the smaller side is at most `min_side_px`."""
    levels = [rgb]
    while min(levels[-1].shape[:2]) > min_side_px:
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA))
    return levels


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float, codec: tuple[str, dict], description: str = "") -> None:
    """A tiled pyramidal TIFF compressed with the scanner's `codec` (JPEG: OpenSlide's generic-tiff and
    tiffslide open it; JPEG 2000: tiffslide).

    Resolution tags are in pixels per centimetre, so both report `mpp` (and mpp x 2^k for level
    k); reduced levels are flagged as such (NewSubfileType 1). No date or software tags: the same
    pixels give the same bytes.
    """
    import tifffile

    px_per_cm = 1e4 / mpp
    levels = pyramid_levels(rgb)

    def write(tmp):
        with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tw:
            for k, level in enumerate(levels):
                ds = rgb.shape[1] / level.shape[1]
                tw.write(level, tile=(TILE_PX, TILE_PX), photometric="rgb", compression=codec[0],
                         compressionargs=codec[1], resolution=(px_per_cm / ds, px_per_cm / ds),
                         resolutionunit="CENTIMETER", subfiletype=1 if k else 0, metadata=None, software=False,
                         description=description if k == 0 else None, maxworkers=1)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def write_geojson(path: Path, polygons: list) -> None:
    """QuPath GeoJSON: one Tumor annotation per region, rings closed, level-0 pixel coordinates."""
    features = []
    for rings in polygons:
        coords = [[[float(x), float(y)] for x, y in ring] + [[float(ring[0, 0]), float(ring[0, 1])]] for ring in rings]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": {"objectType": "annotation", "classification": dict(TUMOR_CLASS)},
        })
    text = json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":"))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def codec_roundtrip(rgb: np.ndarray, codec: tuple[str, dict]) -> np.ndarray:
    """The pixels after the scanner's compression (for the PNG copies)."""
    name, args = codec
    if name == "jpeg2000":
        import imagecodecs

        return imagecodecs.jpeg2k_decode(imagecodecs.jpeg2k_encode(rgb, level=args["level"]))
    return jpeg_roundtrip(rgb, args["level"])


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """The pixels after a JPEG compression at `quality`."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def write_png(path: Path, pixels: np.ndarray, mpp: float) -> None:
    """PNG (RGB or single-channel) with its resolution in the pHYs chunk."""
    from PIL import Image

    dpi = 25400.0 / mpp

    def write(tmp):
        Image.fromarray(pixels).save(tmp, format="PNG", dpi=(dpi, dpi), compress_level=3)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


# -- the data set ------------------------------------------------------------------------------------
def domains(extra_scanners=()) -> tuple[Domain, ...]:
    """The built-in domains, and an extra held-out colon domain per extra scanner: a seed (a
    scanner drawn at random, `scanner-x<SEED>`) or the name of a built-in opt-in one (`scanner-f`)."""
    return DOMAINS + tuple(Domain("scanner", "colon", extra_scanner_name(s), "heldout") for s in extra_scanners)


def extra_scanner_name(value) -> str:
    """`7` or "7" -> scanner-x7; a built-in scanner no default domain uses (scanner-f) -> itself."""
    text = str(value).strip()
    if text.isdigit():
        return f"{EXTRA_PREFIX}{int(text)}"
    used = {d.scanner for d in DOMAINS}
    if text in SCANNERS and text not in used:
        return text
    opt_in = sorted(set(SCANNERS) - used)
    raise ValueError(f"extra scanner {text!r}: give a seed (a scanner drawn at random) or one of {', '.join(opt_in)}")


@dataclass(frozen=True)
class DatasetSpec:
    """What `histodg synth` makes: the seed, the formats, cases per domain, each case's size, and
    `extra_scanners`: seeds of extra held-out scanners (`profiles.random_scanner`, each a colon
    domain `scanner-x<SEED>` of the scanner task) or opt-in built-in scanners (`scanner-f`)."""

    seed: int = 0
    formats: tuple[str, ...] = ("wsi",)
    cases: int = DEFAULT_CASES
    size_um: float = DEFAULT_SIZE_UM
    extra_scanners: tuple = ()

    def __post_init__(self):
        formats = (self.formats,) if isinstance(self.formats, str) else self.formats
        object.__setattr__(self, "formats", tuple(dict.fromkeys(formats)))
        object.__setattr__(self, "extra_scanners", tuple(self.extra_scanners))
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise ValueError(f"formats must be one or both of {', '.join(FORMATS)} "
                             f"(got {', '.join(map(str, self.formats)) or 'none'})")
        if int(self.cases) != self.cases or self.cases < 1:
            raise ValueError(f"cases must be a whole number of at least 1 (got {self.cases})")
        if not MIN_SIZE_UM <= self.size_um <= MAX_SIZE_UM:
            raise ValueError(f"size {self.size_um:g} um is outside {MIN_SIZE_UM:g}-{MAX_SIZE_UM:g} um")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be a whole number >= 0 (got {self.seed})")
        for extra in self.extra_scanners:
            extra_scanner_name(extra)  # a name that is no scanner: refused before anything is removed


def plan(out_dir, spec: DatasetSpec) -> list[CaseJob]:
    """The cases of a data set, in manifest order."""
    return [CaseJob(str(out_dir), d, i, int(spec.seed), float(spec.size_um), spec.formats)
            for d in domains(spec.extra_scanners) for i in range(1, int(spec.cases) + 1)]


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir} is not empty: use --overwrite to replace the data set in it")


def make_dataset(out_dir, spec: DatasetSpec = DatasetSpec(), *, overwrite: bool = False, progress=None,
                 workers: int | None = None) -> Path:
    """Write the data set `spec` describes; return the path of OUT_DIR/manifest.csv. progress(msg:
    str) may be None.

    Cases are made by `workers` processes (default: one, or two for sets of more than 40 million
    pixels when there are two CPU cores); the bytes do not depend on it. With `overwrite`
    only what this function writes (manifest.csv, wsi/, cosas/) is removed first, the manifest
    before anything else, so an interrupted run never leaves a manifest that looks finished.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    with run_lock(out_dir, on_note=progress):  # one writer: a second `histodg synth` into OUT_DIR is refused
        return _make(out_dir, spec, progress, workers)


def _make(out_dir: Path, spec: DatasetSpec, progress, workers) -> Path:
    manifest = out_dir / "manifest.csv"
    if out_dir.is_dir():
        manifest.unlink(missing_ok=True)
        for sub in FORMATS:
            shutil.rmtree(out_dir / sub, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan(out_dir, spec)
    say = progress or (lambda msg: None)
    rows: dict[str, dict] = {}
    if workers is None:  # processes pay off for big sets only (each one imports numpy, OpenCV, ...)
        pixels = sum((case_size_um(job.size_um, scanner_profile(job.domain.scanner).mpp, np.random.default_rng(0))[0]
                      / scanner_profile(job.domain.scanner).mpp) ** 2 for job in jobs)
        workers = min(2, os.cpu_count() or 1) if pixels > PARALLEL_PIXELS else 1
    workers = max(1, min(int(workers), len(jobs)))
    # biggest cases first, so the last ones to finish are small
    order = sorted(jobs, key=lambda j: scanner_profile(j.domain.scanner).mpp)
    if workers == 1:
        for k, job in enumerate(order, 1):
            rows[job.name] = make_case(job)
            say(f"made {k}/{len(jobs)} cases ({job.domain.task}/{job.name})")
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        try:
            futures = {pool.submit(make_case, job): job for job in order}
            for k, fut in enumerate(as_completed(futures), 1):
                job = futures[fut]
                rows[job.name] = fut.result()
                say(f"made {k}/{len(jobs)} cases ({job.domain.task}/{job.name})")
        except BaseException:  # an error or Ctrl-C: do not wait for the queued cases
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
            w.writeheader()
            for job in jobs:
                w.writerow({k: csv_cell(v) for k, v in rows[job.name].items()})

    atomic_write(manifest, write)
    return manifest
