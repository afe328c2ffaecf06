"""`open_slide(path, backend="auto")`: pick the reader for a file and open it.

``auto``: PNG/JPEG/BMP (by their magic bytes) are plain images; TIFFs that OpenSlide calls
Aperio or generic-tiff (or does not know) go to histodg's own tile reader (pixel-identical,
checked in tests), falling back to OpenSlide, then to a plain image for stripped TIFFs; every
other format OpenSlide opens goes to OpenSlide.
"""
from __future__ import annotations

from pathlib import Path

from .. import SlideError
from ..constants import BACKENDS
from .backends import ImageSlide, OpenSlideSlide, TiffTileSlide
from .base import Slide
from .inputs import unusable

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
# OpenSlide formats whose pixels our TIFF tile reader decodes identically (checked in tests).
FAST_FORMATS = {"aperio", "generic-tiff"}


JPEG_MAGIC = b"\xff\xd8\xff"


def image_kind(head: bytes) -> str:
    """"tiff", "image" (PNG, JPEG, BMP) or "other", from a file's first bytes."""
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith((b"\x89PNG", JPEG_MAGIC, b"BM")):
        return "image"
    return "other"


def _head(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _sniff(path: Path) -> str:
    return image_kind(_head(path))


# TIFF compressions that keep every pixel (tifffile.COMPRESSION): none, LZW, deflate, PackBits, zstd, LZMA
LOSSLESS_TIFF = {1, 5, 8, 32946, 32773, 50000, 34925}


def lossy_source(path) -> bool:
    """Whether a slide's or image's pixels are stored with a lossy codec (JPEG, JPEG 2000, WebP...),
    read from the header only. PNG/BMP and TIFFs of LOSSLESS_TIFF are lossless; OpenSlide's other
    formats (NDPI, MRXS, SCN, BIF, DICOM) store JPEG. A file that cannot be read counts as lossy:
    opening it reports the problem."""
    path = Path(path)
    head = _head(path) if path.is_file() else b""
    kind = image_kind(head)
    if kind == "image":
        return head.startswith(JPEG_MAGIC)
    if kind == "tiff":
        import tifffile

        try:
            with tifffile.TiffFile(path) as tf:
                return int(tf.pages.first.compression) not in LOSSLESS_TIFF
        except Exception:
            return True
    return True


def open_slide(path, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a slide or image; `mpp` overrides (or supplies) the microns per pixel."""
    path = Path(path)
    if backend not in BACKENDS:
        raise SlideError(path, f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if why := unusable(path):  # missing, a dangling symlink, a FIFO (opening it would block), unreadable
        raise SlideError(path, why)
    if path.is_dir() and path.suffix.lower() != ".dcm" and not any(path.glob("*.dcm")):
        raise SlideError(path, "is a directory, not a slide")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(path, "empty file (0 bytes)")
    slide = _open(path, backend)
    slide.set_mpp_override(mpp)
    return slide


def _open(path: Path, backend: str) -> Slide:
    if path.is_dir():  # a DICOM WSI folder: OpenSlide opens the series from any file of it
        files = sorted(p for p in path.glob("*.dcm") if p.is_file())
        if not files:
            raise SlideError(path, "a folder without .dcm files, not a DICOM slide")
        return OpenSlideSlide(files[0]) if backend in ("auto", "openslide") else _open(files[0], backend)
    if backend == "openslide":
        return OpenSlideSlide(path)
    if backend == "tiffslide":
        return TiffTileSlide(path)
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
                return TiffTileSlide(path)
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
