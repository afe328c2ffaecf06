"""The slide readers behind `open_slide`.

- `TiffTileSlide` (``tiffslide``): metadata from tiffslide, pixels from `TiffTileReader` (each
  stored tile decoded once, in threads, with a cache). `auto` uses it for Aperio SVS and
  generic tiled TIFF.
- `OpenSlideSlide` (``openslide``): everything OpenSlide opens (MRXS, NDPI, SCN, BIF, DICOM, ...).
  OpenSlide handles are dead after a failed read, so a failed read reopens the handle first.
- `ImageSlide` (``image``): PNG / JPEG / non-pyramidal TIFF, held in memory as one level.
"""
from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from .. import SlideError, exc_line
from ..constants import too_large
from .base import MPP_RANGE, Slide
from .tiffread import TiffTileReader, check_page, to_rgb


def _float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def _mpp_from(props, prefix: str) -> float | None:
    x, y = _float(props.get(f"{prefix}.mpp-x")), _float(props.get(f"{prefix}.mpp-y"))
    vals = [v for v in (x, y) if v is not None and MPP_RANGE[0] <= v <= MPP_RANGE[1]]
    return float(np.mean(vals)) if vals else None


class OpenSlideSlide(Slide):
    backend = "openslide"

    def __init__(self, path: Path):
        super().__init__(path)
        import openslide

        self._openslide = openslide
        self._lock = threading.Lock()
        self._retired: list = []
        try:
            self._osr = openslide.OpenSlide(str(path))
        except Exception as exc:
            raise SlideError(path, f"OpenSlide cannot open it: {_clean(exc)}") from None
        p = self._osr.properties
        self.properties = dict(p)
        self.vendor = p.get("openslide.vendor")
        self.level_dimensions = [(int(d[0]), int(d[1])) for d in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        self.mpp = _mpp_from(p, "openslide")
        self.mpp_source = "metadata" if self.mpp else None
        self.objective_power = _float(p.get("openslide.objective-power"))
        self.associated_images = sorted(self._osr.associated_images)
        self._tiles = [
            (int(p.get(f"openslide.level[{i}].tile-width", 0) or 0), int(p.get(f"openslide.level[{i}].tile-height", 0) or 0))
            for i in range(self.level_count)
        ]

    def level_tile_size(self, level: int) -> tuple[int, int]:
        w, h = self._tiles[level]
        return (w, h) if w and h else (1024, 1024)

    def read_region(self, xy0, level, size):
        args = ((int(xy0[0]), int(xy0[1])), int(level), (int(size[0]), int(size[1])))
        osr = self._osr
        try:
            return to_rgb(np.asarray(osr.read_region(*args)))
        except Exception:
            self._reopen(osr)
        # The failure may be another thread's (the shared handle died under us): confirm it on a
        # private handle that no other thread touches, so a region fails only for its own damage.
        try:
            private = self._openslide.OpenSlide(str(self.path))
        except Exception as exc:
            raise SlideError(self.path, f"OpenSlide cannot reopen it: {_clean(exc)}") from None
        try:
            return to_rgb(np.asarray(private.read_region(*args)))
        except Exception as exc:
            raise SlideError(self.path, f"cannot read region at {args[0]} level {level}: {_clean(exc)}") from None
        finally:
            private.close()

    def _reopen(self, dead) -> None:
        """OpenSlide errors are sticky: replace the handle (once, even when threads race here).

        The dead handle is not closed yet: another thread may still be inside a read on it,
        and closing it then aborts the process (an assertion in OpenSlide's TIFF cache).
        """
        with self._lock:
            if self._osr is dead:
                self._retired.append(dead)
                self._osr = self._openslide.OpenSlide(str(self.path))

    def close(self):
        for osr in self._retired + [self._osr]:
            try:
                osr.close()
            except Exception:
                pass
        self._retired = []


class TiffTileSlide(Slide):
    backend = "tiffslide"

    def __init__(self, path: Path):
        super().__init__(path)
        import tiffslide

        try:
            ts = tiffslide.TiffSlide(str(path))
        except Exception as exc:
            raise SlideError(path, f"not a readable TIFF slide: {_clean(exc)}") from None
        self._ts = ts
        try:  # tiffslide parses lazily: a truncated or damaged file fails here, in any way
            p = ts.properties
            self.properties = {k: str(v) for k, v in p.items() if v is not None}
            self.level_dimensions = [(int(d[0]), int(d[1])) for d in ts.level_dimensions]
            self.level_downsamples = [float(d) for d in ts.level_downsamples]
            self.associated_images = sorted(ts.associated_images)
        except Exception as exc:
            ts.close()
            raise SlideError(path, f"cannot read the slide's structure, truncated or damaged? ({_clean(exc)})") from None
        self.vendor = p.get("tiffslide.vendor")
        self.mpp = _mpp_from(p, "tiffslide")
        self.mpp_source = "metadata" if self.mpp else None
        self.objective_power = _float(p.get("tiffslide.objective-power"))
        try:
            series = ts.ts_tifffile.series[int(p.get("tiffslide.series-index") or 0)]
            pages = [lv.keyframe for lv in series.levels]
        except Exception as exc:
            raise SlideError(path, f"cannot read the TIFF pyramid: {_clean(exc)}") from None
        for page in pages:
            why = check_page(page)
            if why:
                raise SlideError(path, why)
        dims = [(int(pg.imagewidth), int(pg.imagelength)) for pg in pages]
        if dims[: self.level_count] != self.level_dimensions:
            raise SlideError(path, "TIFF pages do not match the slide's levels")
        self.reader = TiffTileReader(path, pages[: self.level_count])

    def level_tile_size(self, level: int) -> tuple[int, int]:
        return self.reader.tile_size(level)

    def read_region(self, xy0, level, size):
        ds = self.level_downsamples[level]
        x, y = int(np.floor(xy0[0] / ds)), int(np.floor(xy0[1] / ds))
        return self.reader.read(int(level), x, y, int(size[0]), int(size[1]))

    def close(self):
        self.reader.close()
        self._ts.close()


class MemorySlide(Slide):
    """A pyramid held in memory: level 0 is `rgb`, each further level halves the one before (area
    averaging). Plain images are one-level memory slides; tests use it as a slide without a file."""

    backend = "memory"

    def __init__(self, rgb: np.ndarray, mpp: float | None = None, path="memory", levels: int = 1,
                 tile_size: int | None = None, objective_power: float | None = None):
        super().__init__(Path(path))
        pyramid = [np.ascontiguousarray(rgb)]
        while len(pyramid) < levels:
            h, w = pyramid[-1].shape[:2]
            pyramid.append(cv2.resize(pyramid[-1], ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA))
        self._levels = pyramid
        self.mpp, self.mpp_source = mpp, ("metadata" if mpp else None)
        self.objective_power = objective_power
        self.vendor = "memory"
        self.level_dimensions = [(int(a.shape[1]), int(a.shape[0])) for a in pyramid]
        self.level_downsamples = [self.level_dimensions[0][0] / d[0] for d in self.level_dimensions]
        self._tile = tile_size

    def level_tile_size(self, level):
        return (self._tile, self._tile) if self._tile else self.level_dimensions[level]

    def read_region(self, xy0, level, size):
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"level {level} does not exist ({self.level_count} level(s))")
        img, ds = self._levels[level], self.level_downsamples[level]
        x, y = int(np.floor(xy0[0] / ds)), int(np.floor(xy0[1] / ds))
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)
        H, W = img.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x0 < x1 and y0 < y1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = img[y0:y1, x0:x1]
        return out


class ImageSlide(MemorySlide):
    """A plain image (PNG, JPEG, BMP, non-pyramidal TIFF) as a one-level slide, held in memory."""

    backend = "image"

    def __init__(self, path: Path):
        rgb, mpp = _load_image(Path(path))
        super().__init__(rgb, mpp, path)
        self.vendor = "image"


def _load_image(path: Path) -> tuple[np.ndarray, float | None]:
    """RGB uint8 pixels and the mpp from TIFF resolution tags or PNG pHYs, when plausible."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                page = tf.pages.first
                if why := too_large(int(page.imagewidth), int(page.imagelength)):
                    raise SlideError(path, why)
                arr = page.asarray()
                mpp = _tiff_mpp(page)
        else:
            with Image.open(path) as im:
                if why := too_large(*im.size):  # the header's size, before anything is decoded
                    raise SlideError(path, why)
                im.load()
                dpi = im.info.get("dpi")
                mode = im.mode
                if mode in ("I;16", "I;16B", "I", "F"):
                    raise SlideError(path, f"{mode} images are not supported (8-bit RGB expected)")
                rgb = im.convert("RGBA" if ("A" in mode or "transparency" in im.info) else "RGB")
                arr = np.asarray(rgb)
            mpp = 25400.0 / float(dpi[0]) if dpi and _float(dpi[0]) else None
    except SlideError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SlideError(path, f"not a readable image: {_clean(exc)}") from None
    except Exception as exc:  # decoders raise their own types
        raise SlideError(path, f"cannot decode image: {_clean(exc)}") from None
    if arr.dtype != np.uint8:
        raise SlideError(path, f"{arr.dtype} pixels are not supported (8-bit RGB expected)")
    if arr.ndim == 3 and arr.shape[2] > 4:
        raise SlideError(path, f"unsupported image with {arr.shape[2]} channels")
    if mpp is not None and not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        mpp = None  # 72 dpi and friends say nothing about a microscope
    return to_rgb(arr), mpp


def _tiff_mpp(page) -> float | None:
    try:
        unit = int(page.tags["ResolutionUnit"].value)
        num, den = page.tags["XResolution"].value
    except (KeyError, TypeError, ValueError):
        return None
    px_per_unit = num / den if den else 0
    if px_per_unit <= 0:
        return None
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
    return um_per_unit / px_per_unit if um_per_unit else None


def _clean(exc: Exception) -> str:
    """One line from an exception, without library noise."""
    return exc_line(exc, 10_000).rstrip(".")
