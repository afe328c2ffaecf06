"""One interface over whole-slide files and plain images.

    slide = open_slide("case.svs")            # backend="auto" | "openslide" | "tiffslide" | "image"
    rgb = slide.read_region((x0, y0), level, (w, h))   # uint8 (h, w, 3), transparency on white

Backends:
- ``tiffslide``: metadata from tiffslide, pixels from `TiffTileReader` (each stored tile decoded
  once, in threads, with a cache). Used by ``auto`` for Aperio SVS and generic tiled TIFF.
- ``openslide``: everything OpenSlide opens (MRXS, NDPI, SCN, BIF, DICOM, ...). OpenSlide handles
  are dead after a failed read, so a failed read reopens the handle before raising.
- ``image``: PNG / JPEG / non-pyramidal TIFF, held in memory as one level.

Every failure raises `SlideError(path, reason)`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from . import SlideError
from .tiffread import TiffTileReader, check_page, to_rgb

BACKENDS = ("auto", "openslide", "tiffslide", "image")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
# OpenSlide formats whose pixels our TIFF tile reader decodes identically (checked in tests).
FAST_FORMATS = {"aperio", "generic-tiff"}
MPP_RANGE = (0.02, 50.0)  # plausible microscope pixel sizes, um


@dataclass
class Thumbnail:
    rgb: np.ndarray  # (h, w, 3) uint8
    readable: np.ndarray  # (h, w) bool: False where the slide could not be decoded
    downsample: float  # level-0 px per thumbnail px
    first_error: str | None = None


class Slide:
    """Base class: geometry, metadata and the helpers every backend shares."""

    backend = "?"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.vendor: str | None = None
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []
        self.mpp: float | None = None
        self.mpp_source: str | None = None  # "metadata" | "override" | None
        self.objective_power: float | None = None
        self.associated_images: list[str] = []
        self.properties: dict[str, str] = {}

    # -- geometry ----------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def level_tile_size(self, level: int) -> tuple[int, int]:
        """Natural read block at a level (the stored tile size when known)."""
        return (1024, 1024)

    def best_level(self, downsample: float, tolerance: float = 0.01) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (within tolerance)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + tolerance):
                best = i
        return best

    def require_mpp(self) -> float:
        if self.mpp is None:
            raise SlideError(self.path, "no microns-per-pixel in the slide's metadata; pass --mpp-override")
        return self.mpp

    def set_mpp_override(self, mpp: float | None) -> None:
        if mpp is not None:
            if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
                raise SlideError(self.path, f"mpp override {mpp} is outside {MPP_RANGE[0]}-{MPP_RANGE[1]} um")
            self.mpp, self.mpp_source = float(mpp), "override"

    # -- pixels ------------------------------------------------------------------------------
    def read_region(self, xy0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def thumbnail_checked(self, max_px: int) -> Thumbnail:
        """The slide at a downsample where the longest side is at most `max_px`.

        Read block by block (stored tiles) at the closest level so memory stays small and a
        corrupt block only marks its own area as unreadable (`readable` False, pixels white).
        """
        w0, h0 = self.dimensions
        ds = max(1.0, max(w0, h0) / max_px)
        level = self.best_level(ds)
        lds = self.level_downsamples[level]
        f = max(1, int(np.ceil(ds / lds - 1e-9)))  # integer box factor: level px per thumbnail px
        lw, lh = self.level_dimensions[level]
        tw, th = -(-lw // f), -(-lh // f)
        rgb = np.full((th, tw, 3), 255, np.uint8)
        ok = np.ones((th, tw), bool)
        first_error = None
        tile_w, tile_h = self.level_tile_size(level)
        bw, bh = f * max(1, round(tile_w / f)), f * max(1, round(tile_h / f))  # blocks of whole f x f cells
        for by in range(0, lh, bh):
            for bx in range(0, lw, bw):
                w, h = min(bw, lw - bx), min(bh, lh - by)
                dx0, dy0 = bx // f, by // f
                dx1, dy1 = dx0 + -(-w // f), dy0 + -(-h // f)
                try:
                    xy0 = (int(np.ceil(bx * lds - 1e-6)), int(np.ceil(by * lds - 1e-6)))
                    block = self.read_region(xy0, level, (w, h))
                except SlideError as exc:
                    ok[dy0:dy1, dx0:dx1] = False
                    first_error = first_error or exc.reason
                    continue
                rgb[dy0:dy1, dx0:dx1] = box_reduce(block, f)
        return Thumbnail(rgb, ok, lds * f, first_error)

    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        thumb = self.thumbnail_checked(max_px)
        if thumb.first_error:
            raise SlideError(self.path, f"{(~thumb.readable).mean():.1%} of the slide cannot be decoded: {thumb.first_error}")
        return thumb.rgb

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> dict:
        """Plain-data summary (for `histodg info`)."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "associated_images": self.associated_images,
        }


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (w, h); area averaging when shrinking by more than 1.25x, bilinear otherwise."""
    w, h = size
    if img.shape[1] == w and img.shape[0] == h:
        return img
    shrink = img.shape[1] / w > 1.25 or img.shape[0] / h > 1.25
    out = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out if out.ndim == img.ndim else out[..., None]


def box_reduce(img: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f cells; a partial cell at the right/bottom edge averages what it has.

    Whole cells go through OpenCV's area resize (an exact box mean for integer factors, about
    40x faster than numpy here; rounding may differ by 1), the partial edge strips through numpy.
    """
    if f == 1:
        return img
    h, w, c = img.shape
    H, W = h // f, w // f
    out = np.empty((-(-h // f), -(-w // f), c), np.uint8)
    if H and W:
        core = cv2.resize(np.ascontiguousarray(img[: H * f, : W * f]), (W, H), interpolation=cv2.INTER_AREA)
        out[:H, :W] = core.reshape(H, W, c)
    if h % f:
        out[H:, :] = _box_reduce_exact(img[H * f :], f)
    if w % f and H:
        out[:H, W:] = _box_reduce_exact(img[: H * f, W * f :], f)
    return out


def _box_reduce_exact(img: np.ndarray, f: int) -> np.ndarray:
    """box_reduce in numpy (for the thin partial strips at the edges)."""
    h, w, c = img.shape
    H, W = -(-h // f), -(-w // f)
    padded = np.zeros((H * f, W * f, c), np.uint32)
    padded[:h, :w] = img
    acc = padded.reshape(H, f, W, f, c).sum((1, 3))
    cnt = np.minimum(f, h - np.arange(H) * f)[:, None, None] * np.minimum(f, w - np.arange(W) * f)[None, :, None]
    return (acc / cnt + 0.5).astype(np.uint8)


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
        self.level_dimensions = [tuple(int(v) for v in d) for d in self._osr.level_dimensions]
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


class TiffSlideSlide(Slide):
    backend = "tiffslide"

    def __init__(self, path: Path):
        super().__init__(path)
        import tiffslide

        try:
            ts = tiffslide.TiffSlide(str(path))
        except Exception as exc:
            raise SlideError(path, f"not a readable TIFF slide: {_clean(exc)}") from None
        self._ts = ts
        p = ts.properties
        self.properties = {k: str(v) for k, v in p.items() if v is not None}
        self.vendor = p.get("tiffslide.vendor")
        self.level_dimensions = [tuple(int(v) for v in d) for d in ts.level_dimensions]
        self.level_downsamples = [float(d) for d in ts.level_downsamples]
        self.mpp = _mpp_from(p, "tiffslide")
        self.mpp_source = "metadata" if self.mpp else None
        self.objective_power = _float(p.get("tiffslide.objective-power"))
        self.associated_images = sorted(ts.associated_images)
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


class ImageSlide(Slide):
    """A plain image as a one-level slide, held in memory."""

    backend = "image"

    def __init__(self, path: Path):
        super().__init__(path)
        self._img, self.mpp = _load_image(path)
        self.mpp_source = "metadata" if self.mpp else None
        self.vendor = "image"
        h, w = self._img.shape[:2]
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]

    def level_tile_size(self, level):
        return self.dimensions

    def read_region(self, xy0, level, size):
        if level != 0:
            raise SlideError(self.path, f"level {level} does not exist (plain image)")
        x, y = int(xy0[0]), int(xy0[1])
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)
        H, W = self._img.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x0 < x1 and y0 < y1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._img[y0:y1, x0:x1]
        return out

    @property
    def array(self) -> np.ndarray:
        return self._img


def _load_image(path: Path) -> tuple[np.ndarray, float | None]:
    """RGB uint8 pixels and the mpp from TIFF resolution tags or PNG pHYs, when plausible."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                arr = page.asarray()
                mpp = _tiff_mpp(page)
        else:
            with Image.open(path) as im:
                im.load()
                dpi = im.info.get("dpi")
                mode = im.mode
                if mode in ("I;16", "I;16B", "I", "F"):
                    raise SlideError(path, f"{mode} images are not supported (8-bit RGB expected)")
                im = im.convert("RGBA" if ("A" in mode or "transparency" in im.info) else "RGB")
                arr = np.asarray(im)
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
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.rstrip(".")


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff") or head.startswith(b"BM"):
        return "image"
    return "other"


def open_slide(path, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a slide or image; `mpp` overrides (or supplies) the microns per pixel."""
    path = Path(path)
    if backend not in BACKENDS:
        raise SlideError(path, f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if not path.exists():
        raise SlideError(path, "no such file")
    if path.is_dir() and path.suffix.lower() != ".dcm" and not any(path.glob("*.dcm")):
        raise SlideError(path, "is a directory, not a slide")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(path, "empty file (0 bytes)")
    slide = _open(path, backend)
    slide.set_mpp_override(mpp)
    return slide


def _open(path: Path, backend: str) -> Slide:
    if backend == "openslide":
        return OpenSlideSlide(path)
    if backend == "tiffslide":
        return TiffSlideSlide(path)
    if backend == "image":
        return ImageSlide(path)
    kind = _sniff(path) if path.is_file() else "other"
    if kind == "image":
        return ImageSlide(path)
    import openslide

    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:
        fmt = None
    if kind == "tiff":
        if fmt in FAST_FORMATS or fmt is None:
            try:
                return TiffSlideSlide(path)
            except SlideError as fast_error:
                if fmt is None:
                    return _plain_tiff_or(path, fast_error)
                try:
                    return OpenSlideSlide(path)
                except SlideError:
                    raise fast_error from None
        return OpenSlideSlide(path)
    if fmt is not None:
        return OpenSlideSlide(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSlide(path)
    raise SlideError(path, "not a slide or image that OpenSlide, tiffslide or Pillow can open")


def _plain_tiff_or(path: Path, error: SlideError) -> Slide:
    """A TIFF that is not a tiled slide may still be a plain image (stripped RGB TIFF)."""
    try:
        return ImageSlide(path)
    except SlideError:
        raise error from None
