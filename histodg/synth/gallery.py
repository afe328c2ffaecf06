"""`histodg synth --gallery`: one patch of every domain, with its tumour outline, in one PNG."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np

from ..files import atomic_write, read_csv_rows
from ..slides.annotation_files import load_annotations
from ..slides.base import resize
from ..slides.opening import open_slide
from ..slides.tissue import tissue_mask

GALLERY_UM = 320.0  # side of each patch
GALLERY_PX = 320  # shown at 1 um/px


def read_manifest(manifest_path) -> list[dict]:
    return read_csv_rows(manifest_path)


def _gallery_patch(row: dict, base: Path):
    """A window of the case that shows tumour and normal tissue: (rgb, tumour mask, mpp)."""
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
    return save_figure_png(fig, png_path, dpi=110)


def save_figure_png(fig, png_path: Path, dpi: int) -> Path:
    """A matplotlib figure as a small PNG (a 256-colour palette), written atomically; the figure is closed."""
    import matplotlib.pyplot as plt
    from PIL import Image

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    buf.seek(0)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(buf) as im:
        small = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
        atomic_write(png_path, lambda tmp: small.save(tmp, format="PNG", optimize=True))
    return png_path


