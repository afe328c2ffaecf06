"""`--roi`: the region of a slide a pathologist wants analysed, from what `tile --annotations` reads.

    region = Region.load("case1.geojson", slide.dimensions, "Tumor bed")   # None: every annotation
    plan = region.restrict(plan)              # only the windows that touch the region
    inside = region.raster(x0, y0, scale, size)          # bool, pixel centres, as annotations rasterise

A region is the union of the file's annotations (QuPath GeoJSON, Aperio / ASAP XML: of the class
`--roi-class` when given, holes and erasers kept), or the non-zero pixels of a mask image at any
downsample. Its area is counted on a grid of at most `AREA_GRID_PX` a side (the slide's area
unit, whatever the resolution the model runs at).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..constants import IGNORE
from .annotation_files import load_annotations
from .annotations import AnnotationError, LabelMap

AREA_GRID_PX = 4096


@dataclass
class Region:
    source: Path
    roi_class: str | None
    annotations: object  # PolygonAnnotations | MaskAnnotations
    dimensions: tuple[int, int]
    level0_px: float = 0.0  # its area in level-0 pixels, counted once on the `AREA_GRID_PX` grid

    @classmethod
    def load(cls, path, dimensions: tuple[int, int], roi_class: str | None = None) -> Region:
        """The region in `path` for a slide of `dimensions` (AnnotationError: unreadable, or nothing in it)."""
        labels = LabelMap.parse([f"{roi_class}=1"]) if roi_class else None
        ann = load_annotations(Path(path), dimensions, labels)
        region = cls(Path(path), roi_class, ann, (int(dimensions[0]), int(dimensions[1])))
        inside, ds = region.grid(AREA_GRID_PX)
        region.level0_px = float(inside.sum()) * ds**2
        if not inside.any():
            what = f"no annotation of class {roi_class!r}" if roi_class else "no region (no annotation, or an empty mask)"
            raise AnnotationError(path, f"{what} to predict inside")
        return region

    def raster(self, x0: float, y0: float, scale: float, size: int) -> np.ndarray:
        """(size, size) bool: inside the region, for the window at level-0 (x0, y0), `scale` level-0 px per pixel."""
        labels = self.annotations.rasterize(x0, y0, scale, size)  # type: ignore[attr-defined]
        return (labels > 0) & (labels != IGNORE)

    def grid(self, max_px: int) -> tuple[np.ndarray, float]:
        """The region over the whole slide on a grid of at most `max_px` a side, and its level-0 px per cell."""
        w, h = self.dimensions
        ds = max(1.0, max(w, h) / max_px)
        side = int(np.ceil(max(w, h) / ds))
        return self.raster(0, 0, ds, side)[: int(np.ceil(h / ds)), : int(np.ceil(w / ds))], ds

    def on(self, shape: tuple[int, int], downsample: float) -> np.ndarray:
        """The region on a grid of `shape` with `downsample` level-0 px per cell (a plan's thumbnail)."""
        h, w = shape
        return self.raster(0, 0, downsample, max(h, w))[:h, :w]

    def area_mm2(self, mpp: float | None) -> float | None:
        if mpp is None:
            return None
        return self.level0_px * mpp**2 / 1e6

    def restrict(self, plan):
        """The plan's windows that touch the region (a `WindowPlan`, the tissue mask limited to the region)."""
        from .tissue import window_fractions

        thumb = plan.thumbnail
        inside = self.on(plan.tissue_mask.shape, thumb.downsample)
        boxes = np.concatenate([plan.level0_xy, plan.level0_xy + plan.resolution.level0_size], 1) / thumb.downsample
        keep = window_fractions(inside, boxes) > 0
        return dataclasses.replace(plan, windows=plan.windows[keep], level0_xy=plan.level0_xy[keep],
                                   tissue=plan.tissue[keep], unreadable=plan.unreadable[keep],
                                   tissue_mask=plan.tissue_mask & inside)

    def record(self) -> dict:
        """done.json's `roi`: the file (and its contents' SHA-256) and the class."""
        from ..files import file_sha256

        return {"file": str(self.source.resolve()), "sha256": file_sha256(self.source), "class": self.roi_class}
