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
import io
import json
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .synth_scanner import ScannerProfile
from .synth_tissue import Case, OrganProfile, render_case


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
TUMOR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}


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
    scanner = SCANNERS[d.scanner]
    rng = np.random.default_rng(job.seed_sequence() + [1])
    w_um, h_um = case_size_um(job.size_um, scanner.mpp, rng)
    return render_case(ORGANS[d.organ], scanner, w_um, h_um, job.seed_sequence())


def make_case(job: CaseJob) -> dict:
    """Render one case and write its files; returns its manifest row (paths relative to out_dir)."""
    case = render_job(job)
    d, out = job.domain, Path(job.out_dir)
    scanner = SCANNERS[d.scanner]
    row = {
        "organ": d.organ if d.task == "organ" else "unknown",
        "scanner": d.scanner if d.task == "scanner" else "unknown",
        "split": d.split,
        "task": d.task,
        "mpp": f"{case.mpp:g}",
        "true_organ": d.organ,
        "true_scanner": d.scanner,
    }
    if "cosas" in job.formats:
        folder = Path("cosas") / d.task / d.name
        image, mask = folder / "image" / f"{job.name}.png", folder / "mask" / f"{job.name}.png"
        write_png(out / image, jpeg_roundtrip(case.rgb, scanner.jpeg_quality), case.mpp)
        write_png(out / mask, case.label * np.uint8(255), case.mpp)
        row.update(path=image.as_posix(), annotation=mask.as_posix())
    if "wsi" in job.formats:
        folder = Path("wsi") / d.task / d.name
        slide, geojson = folder / f"{job.name}.tiff", folder / f"{job.name}.geojson"
        description = (f"histodg synthetic slide {job.name}: task={d.task} organ={d.organ} scanner={d.scanner} "
                       f"mpp={case.mpp:g} seed={job.seed}")
        write_pyramid(out / slide, case.rgb, case.mpp, scanner.jpeg_quality, description)
        write_geojson(out / geojson, case.polygons)
        row.update(path=slide.as_posix(), annotation=geojson.as_posix())
    return row


# -- writers ---------------------------------------------------------------------------------------
def _replace_atomically(path: Path, write) -> None:
    """write(tmp_path), then rename: a killed run never leaves a file that looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def pyramid_levels(rgb: np.ndarray, min_side_px: int = 512) -> list[np.ndarray]:
    """Level 0 and halvings (area averaging) until the smaller side is at most `min_side_px`."""
    levels = [rgb]
    while min(levels[-1].shape[:2]) > min_side_px:
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA))
    return levels


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float, quality: int, description: str = "") -> None:
    """A tiled, JPEG-compressed pyramidal TIFF that OpenSlide (generic-tiff) and tiffslide open.

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
                tw.write(level, tile=(TILE_PX, TILE_PX), photometric="rgb", compression="jpeg",
                         compressionargs={"level": int(quality)}, resolution=(px_per_cm / ds, px_per_cm / ds),
                         resolutionunit="CENTIMETER", subfiletype=1 if k else 0, metadata=None, software=False,
                         description=description if k == 0 else None, maxworkers=1)

    _replace_atomically(Path(path), write)


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
    _replace_atomically(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """The pixels after the scanner's JPEG compression (for the PNG copies)."""
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

    _replace_atomically(Path(path), write)


# -- the data set ------------------------------------------------------------------------------------
def plan(out_dir, seed: int, cases: int, size_um: float, formats) -> list[CaseJob]:
    """The cases of a data set, in manifest order."""
    return [CaseJob(str(out_dir), d, i, seed, size_um, tuple(formats)) for d in DOMAINS for i in range(1, cases + 1)]


def _check_args(out_dir: Path, seed, formats, cases, size_um, overwrite) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys((formats,) if isinstance(formats, str) else formats))
    if not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"formats must be one or both of {', '.join(FORMATS)} (got {', '.join(map(str, formats)) or 'none'})")
    if int(cases) != cases or cases < 1:
        raise ValueError(f"cases must be a whole number of at least 1 (got {cases})")
    if not MIN_SIZE_UM <= size_um <= MAX_SIZE_UM:
        raise ValueError(f"size {size_um:g} um is outside {MIN_SIZE_UM:g}-{MAX_SIZE_UM:g} um")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0 (got {seed})")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir} is not empty: use --overwrite to replace the data set in it")
    return formats


def make_dataset(out_dir, *, seed: int = 0, formats: tuple[str, ...] = ("wsi",), cases: int = DEFAULT_CASES,
                 size_um: float = DEFAULT_SIZE_UM, overwrite: bool = False, progress=None,
                 workers: int | None = None) -> Path:
    """Write the data set; return the path of OUT_DIR/manifest.csv. progress(msg: str) may be None.

    Cases are made by `workers` processes (default: one, or two for sets of more than 40 million
    pixels when there are two CPU cores); the bytes do not depend on it. With `overwrite`
    only what this function writes (manifest.csv, wsi/, cosas/) is removed first, the manifest
    before anything else, so an interrupted run never leaves a manifest that looks finished.
    """
    out_dir = Path(out_dir)
    formats = _check_args(out_dir, seed, formats, cases, size_um, overwrite)
    manifest = out_dir / "manifest.csv"
    if out_dir.is_dir():
        manifest.unlink(missing_ok=True)
        for sub in FORMATS:
            shutil.rmtree(out_dir / sub, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan(out_dir, int(seed), int(cases), float(size_um), formats)
    say = progress or (lambda msg: None)
    rows: dict[str, dict] = {}
    if workers is None:  # processes pay off for big sets only (each one imports numpy, OpenCV, ...)
        pixels = sum((case_size_um(job.size_um, SCANNERS[job.domain.scanner].mpp, np.random.default_rng(0))[0]
                      / SCANNERS[job.domain.scanner].mpp) ** 2 for job in jobs)
        workers = min(2, os.cpu_count() or 1) if pixels > PARALLEL_PIXELS else 1
    workers = max(1, min(int(workers), len(jobs)))
    # biggest cases first, so the last ones to finish are small
    order = sorted(jobs, key=lambda j: SCANNERS[j.domain.scanner].mpp)
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
                w.writerow(rows[job.name])

    _replace_atomically(manifest, write)
    return manifest


# -- gallery ------------------------------------------------------------------------------------------
GALLERY_UM = 320.0  # side of each patch
GALLERY_PX = 320  # shown at 1 um/px


def read_manifest(manifest_path) -> list[dict]:
    with open(manifest_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _gallery_patch(row: dict, base: Path):
    """A window of the case that shows tumour and normal tissue: (rgb, tumour mask, mpp)."""
    from .annotations import load_annotations
    from .slide import open_slide, resize
    from .tissue import tissue_mask

    with open_slide(base / row["path"], mpp=float(row["mpp"]) if row.get("mpp") else None) as slide:
        mpp0 = slide.require_mpp()
        ann = load_annotations(base / row["annotation"], slide.dimensions)
        w0, h0 = slide.dimensions
        win0 = min(GALLERY_UM / mpp0, w0, h0)  # window side, level-0 px
        # score windows on a grid of 1/8 window: tumour and normal tissue both present
        low = slide.level_count - 1
        lw, lh = slide.level_dimensions[low]
        scale = win0 / 8
        tw, th = max(1, round(w0 / scale)), max(1, round(h0 / scale))
        thumb = resize(slide.read_region((0, 0), low, (lw, lh)), (tw, th))
        tumour = ann.rasterize(0, 0, scale, max(th, tw))[:th, :tw].astype(np.float32)
        tissue = tissue_mask(thumb).astype(np.float32)
        t_frac = cv2.blur(tumour, (8, 8), anchor=(0, 0), borderType=cv2.BORDER_CONSTANT)
        n_frac = cv2.blur(tissue * (1 - tumour), (8, 8), anchor=(0, 0), borderType=cv2.BORDER_CONSTANT)
        score = np.minimum(t_frac, n_frac)
        score[max(1, th - 7) :, :] = -1  # the window must fit in the slide
        score[:, max(1, tw - 7) :] = -1
        y, x = np.unravel_index(int(np.argmax(score)), score.shape)
        x0, y0 = int(x * scale), int(y * scale)
        s = win0 / GALLERY_PX
        level = slide.best_level(s)
        size = int(round(win0 / slide.level_downsamples[level]))
        rgb = resize(slide.read_region((x0, y0), level, (size, size)), (GALLERY_PX, GALLERY_PX))
        mask = ann.rasterize(x0, y0, s, GALLERY_PX)
    return rgb, mask, mpp0


def make_gallery(manifest_path, png_path) -> Path:
    """One figure: a patch from every domain (both tasks) with its tumour-mask outline and the domain name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    manifest_path, png_path = Path(manifest_path), Path(png_path)
    rows = read_manifest(manifest_path)
    firsts: dict[tuple[str, str], dict] = {}
    for row in rows:
        task = row.get("task") or "?"
        domain = (row.get("true_organ") if task == "organ" else row.get("true_scanner")) or row.get(task) or "?"
        firsts.setdefault((task, domain), row)
    if not firsts:
        raise ValueError(f"{manifest_path} lists no cases")
    tasks = list(dict.fromkeys(t for t, _ in firsts))
    ncol = max(sum(1 for t, _ in firsts if t == task) for task in tasks)
    fig, axes = plt.subplots(len(tasks), ncol, figsize=(2.6 * ncol, 3.0 * len(tasks)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, task in enumerate(tasks):
        for c, ((_, domain), row) in enumerate((k, v) for k, v in firsts.items() if k[0] == task):
            rgb, mask, mpp0 = _gallery_patch(row, manifest_path.parent)
            ax = axes[r, c]
            ax.imshow(rgb, interpolation="lanczos")
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=["#00d000"], linewidths=1.3)
            held = " (held out)" if row.get("split") == "heldout" else ""
            other = row.get("true_scanner") if task == "organ" else row.get("true_organ")
            ax.set_title(f"{task}: {domain}{held}", fontsize=10, fontweight="bold" if held else "normal")
            ax.text(0.02, 0.02, f"{other}, {mpp0:g} um/px", transform=ax.transAxes, fontsize=7, color="black",
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1.5})
    fig.suptitle(f"histodg synth: {GALLERY_UM:g} um of every domain, tumour annotation in green", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    buf.seek(0)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(buf) as im:  # a 256-colour palette keeps the file small
        im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(png_path, optimize=True)
    return png_path


# -- the built-in profiles ----------------------------------------------------------------------------
ORGANS = {
    o.name: o
    for o in (
        # colon: round crypts, tall columnar nuclei, many goblet cells, lymphocyte-rich lamina propria;
        # tumour: large fused and cribriform glands with dirty necrosis
        OrganProfile("colon", gland_radius_um=27, gland_aspect=1.15, gland_aligned=False, gland_gap_um=12,
                     gland_irregularity=0.05, lumen_fraction=0.3, nucleus_um=9.0, nucleus_elongation=2.5,
                     nucleus_radial=True, nucleus_spacing_um=4.5, goblet=0.55, apical_mucin=0.0,
                     cytoplasm_eosin=0.36, stroma_eosin=0.5, fibre_um=10, fibre_contrast=0.35,
                     fibroblasts_per_mm2=1500, lymphocytes_per_mm2=4500, tumour_radius_um=42, tumour_gap_um=14,
                     tumour_lumen_fraction=0.45, tumour_nucleus_scale=1.4, cribriform=0.3, necrosis=0.5),
        # stomach: small tubular foveolar glands cut lengthwise, apical mucin caps, small round nuclei
        OrganProfile("stomach", gland_radius_um=17, gland_aspect=2.6, gland_aligned=True, gland_gap_um=14,
                     gland_irregularity=0.06, lumen_fraction=0.32, nucleus_um=7.0, nucleus_elongation=1.3,
                     nucleus_radial=True, nucleus_spacing_um=5.5, goblet=0.0, apical_mucin=0.45,
                     cytoplasm_eosin=0.38, stroma_eosin=0.4, fibre_um=8, fibre_contrast=0.3,
                     fibroblasts_per_mm2=1800, lymphocytes_per_mm2=3000, tumour_radius_um=30, tumour_gap_um=18,
                     tumour_lumen_fraction=0.4, tumour_nucleus_scale=1.6, cribriform=0.1, necrosis=0.15),
        # pancreas: dense lobules of small acini with tiny lumens, granular eosinophilic cytoplasm;
        # tumour: sparse angulated ducts in abundant desmoplastic stroma
        OrganProfile("pancreas", gland_radius_um=13, gland_aspect=1.1, gland_aligned=False, gland_gap_um=5,
                     gland_irregularity=0.08, lumen_fraction=0.15, nucleus_um=7.5, nucleus_elongation=1.1,
                     nucleus_radial=True, nucleus_spacing_um=7.0, goblet=0.0, apical_mucin=0.0,
                     cytoplasm_eosin=0.55, stroma_eosin=0.5, fibre_um=18, fibre_contrast=0.55,
                     fibroblasts_per_mm2=1200, lymphocytes_per_mm2=800, tumour_radius_um=32, tumour_gap_um=45,
                     tumour_lumen_fraction=0.55, tumour_nucleus_scale=1.4, cribriform=0.05, necrosis=0.1),
        # lung (held out): large alveoli lined by sparse flat nuclei, thin septa; acinar adenocarcinoma
        OrganProfile("lung", gland_radius_um=32, gland_aspect=1.0, gland_aligned=False, gland_gap_um=12,
                     gland_irregularity=0.06, lumen_fraction=0.9, nucleus_um=7.0, nucleus_elongation=2.6,
                     nucleus_radial=False, nucleus_spacing_um=20, goblet=0.0, apical_mucin=0.0,
                     cytoplasm_eosin=0.3, stroma_eosin=0.45, fibre_um=14, fibre_contrast=0.45,
                     fibroblasts_per_mm2=1500, lymphocytes_per_mm2=1500, tumour_radius_um=36, tumour_gap_um=20,
                     tumour_lumen_fraction=0.45, tumour_nucleus_scale=1.6, cribriform=0.15, necrosis=0.1,
                     alveolar=True),
    )
}

SCANNERS = {
    s.name: s
    for s in (
        # the scanner of the organ task: reference H&E vectors, a good camera
        ScannerProfile("scanner-o", mpp=0.5, stain_h=(0.56, 0.72, 0.41), stain_e=(0.22, 0.80, 0.56), stain_scale=1.0,
                       white=(243, 242, 245), vignetting=0.03, field_um=500, gradient=0.02, blur_um=0.4, gamma=1.0,
                       noise=1.5, jpeg_quality=85),
        ScannerProfile("scanner-a", mpp=0.5, stain_h=(0.60, 0.74, 0.31), stain_e=(0.18, 0.88, 0.44), stain_scale=1.05,
                       white=(244, 243, 247), vignetting=0.02, field_um=450, gradient=0.02, blur_um=0.35, gamma=1.0,
                       noise=1.5, jpeg_quality=90),
        # finer resolution, lighter and bluer staining, warm white, more noise
        ScannerProfile("scanner-b", mpp=0.25, stain_h=(0.52, 0.74, 0.43), stain_e=(0.12, 0.90, 0.42), stain_scale=0.85,
                       white=(250, 247, 240), vignetting=0.05, field_um=300, gradient=0.03, blur_um=0.3, gamma=1.0,
                       noise=2.5, jpeg_quality=80),
        # darker, redder, cool white, softer optics
        ScannerProfile("scanner-c", mpp=0.5, stain_h=(0.66, 0.70, 0.27), stain_e=(0.25, 0.92, 0.30), stain_scale=1.15,
                       white=(236, 240, 248), vignetting=0.04, field_um=600, gradient=0.04, blur_um=0.6, gamma=1.1,
                       noise=1.0, jpeg_quality=75),
        # held out: orange-red eosin, brown-black haematoxylin, yellowish white, blurry, noisy, low JPEG quality
        ScannerProfile("scanner-d", mpp=0.25, stain_h=(0.72, 0.64, 0.27), stain_e=(0.05, 0.72, 0.69), stain_scale=1.25,
                       white=(247, 242, 232), vignetting=0.08, field_um=350, gradient=0.06, blur_um=0.9, gamma=0.9,
                       noise=3.5, jpeg_quality=60),
    )
}
