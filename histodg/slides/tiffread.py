"""Fast region reads from tiled (or stripped) TIFF pyramids: decode each stored tile once.

`TiffTileReader` reads the raw bytes of a tile with `os.pread` (thread-safe, no shared file
position), decodes it with the page's own codec (imagecodecs through tifffile, which releases
the GIL) and keeps decoded tiles in a byte-bounded LRU cache, so overlapping windows read
by several threads decode each source tile once. A tile that fails to decode raises
`TileDecodeError`; the reader itself stays usable (unlike an OpenSlide handle).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np

from .. import SlideError

SUPPORTED_SAMPLES = (1, 3, 4)


class TileDecodeError(SlideError):
    """One stored tile of a slide could not be decoded."""


class _Level:
    """One pyramid level backed by a tifffile page."""

    def __init__(self, page):
        self.page = page
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.tile_h, self.tile_w = int(page.chunks[0]), int(page.chunks[1])
        self.ny = -(-self.height // self.tile_h)
        self.nx = -(-self.width // self.tile_w)
        self.samples = int(page.samplesperpixel)
        self.offsets = page.dataoffsets
        self.bytecounts = page.databytecounts
        self.jpegtables = getattr(page, "jpegtables", None)
        self.is_jpeg = int(page.compression) == 7
        self.jpeg_prefix = _jpeg_prefix(page) if self.is_jpeg and self.samples == 3 else None


# APP14 "Adobe" segment, transform 0: the three components are R, G, B (no YCbCr conversion)
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def _jpeg_prefix(page) -> bytes:
    """What goes before a tile's stream (minus its SOI) to make it a self-contained JPEG file:
    SOI, an Adobe marker when the TIFF says the components are RGB (Aperio writes such tiles;
    without it decoders would assume YCbCr), and the page's shared JPEGTables (DQT/DHT)."""
    prefix = b"\xff\xd8"
    if int(page.photometric) == 2:
        prefix += _ADOBE_RGB
    tables = getattr(page, "jpegtables", None)
    if tables is not None and len(tables) > 4:
        prefix += bytes(tables)[2:-2]  # without the tables' own SOI and EOI
    return prefix


def check_page(page) -> str | None:
    """Why this page cannot be read by the fast path, or None when it can."""
    comp = page.compression
    if getattr(comp, "name", None) is None:
        return f"unsupported TIFF compression {int(comp)}"
    try:
        decoder = page.decode
    except Exception as exc:  # pragma: no cover - depends on tifffile version
        return f"unsupported TIFF page ({exc})"
    if "raise" in getattr(decoder, "__name__", ""):
        return f"TIFF page cannot be decoded (compression {comp.name})"
    if int(page.samplesperpixel) not in SUPPORTED_SAMPLES or page.dtype != np.uint8:
        return f"unsupported pixel layout ({page.samplesperpixel} samples of {page.dtype})"
    if int(getattr(page, "imagedepth", 1)) != 1 or (page.planarconfig == 2 and page.samplesperpixel > 1):
        return "unsupported planar or volumetric TIFF layout"
    ny = -(-int(page.imagelength) // int(page.chunks[0]))
    nx = -(-int(page.imagewidth) // int(page.chunks[1]))
    if len(page.dataoffsets) != ny * nx:
        return "TIFF tile table does not match the image size"
    return None


class TiffTileReader:
    """Region reads over a list of tifffile pages (level 0 first), with a shared tile cache."""

    def __init__(self, path, pages, cache_bytes: int = 128 * 2**20):
        self.path = str(path)
        self.levels = [_Level(p) for p in pages]
        self._fd = os.open(self.path, os.O_RDONLY)
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self.cache_limit = cache_bytes
        self._lock = threading.Lock()
        self._inflight: dict[tuple[int, int, int], threading.Event] = {}
        self.decoded_tiles = 0  # counter, for benchmarks and tests
        # A caller whose windows are whole tiles that no other window touches (no overlap) sets
        # this False: such reads then skip the cache, which would only hold tiles never read again.
        self.cache_whole_tiles = True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def cached_tiles(self) -> int:
        """Decoded tiles held in the cache now."""
        return len(self._cache)

    def stored_bytes(self, level: int, index: int) -> bytes:
        """Tile `index` of `level` exactly as stored in the file (no checks, no decoding)."""
        lv = self.levels[level]
        return os.pread(self._fd, int(lv.bytecounts[index]), int(lv.offsets[index]))

    def tile_size(self, level: int) -> tuple[int, int]:
        lv = self.levels[level]
        return lv.tile_w, lv.tile_h

    # -- tiles -----------------------------------------------------------------------------
    def _stored(self, level: int, ty: int, tx: int) -> bytes | None:
        """The stored bytes of a tile (None for a sparse one: nothing scanned there). A JPEG tile
        whose scan is damaged raises `TileDecodeError` here, before anything decodes it."""
        lv = self.levels[level]
        index = ty * lv.nx + tx
        nbytes = int(lv.bytecounts[index])
        if nbytes == 0:
            return None
        try:
            data = os.pread(self._fd, nbytes, int(lv.offsets[index]))
        except OSError as exc:
            raise TileDecodeError(self.path, f"cannot decode tile ({tx}, {ty}) of level {level}: {exc}") from None
        why = jpeg_scan_error(data) if lv.is_jpeg else None
        if why:
            raise TileDecodeError(self.path, f"cannot decode tile ({tx}, {ty}) of level {level}: corrupt JPEG data ({why})")
        return data

    def _decode(self, level: int, ty: int, tx: int) -> np.ndarray:
        lv = self.levels[level]
        h = min(lv.tile_h, lv.height - ty * lv.tile_h)
        w = min(lv.tile_w, lv.width - tx * lv.tile_w)
        data = self._stored(level, ty, tx)
        if data is None:
            return np.full((h, w, 3), 255, np.uint8)
        try:
            arr = lv.page.decode(data, ty * lv.nx + tx, jpegtables=lv.jpegtables)[0]
        except Exception as exc:
            raise TileDecodeError(
                self.path, f"cannot decode tile ({tx}, {ty}) of level {level}: {exc}"
            ) from None
        arr = np.asarray(arr).reshape(arr.shape[-3:])[:h, :w]
        if arr.shape[:2] != (h, w):
            raise TileDecodeError(self.path, f"tile ({tx}, {ty}) of level {level} is truncated")
        return to_rgb(arr)

    def tile(self, level: int, ty: int, tx: int, keep: bool = True) -> np.ndarray:
        """The decoded tile (read-only; from the cache, and kept there unless `keep` is False)."""
        key = (level, ty, tx)
        while True:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return hit
                event = self._inflight.get(key)
                if event is None:
                    event = self._inflight[key] = threading.Event()
                    owner = True
                else:
                    owner = False
            if not owner:
                event.wait()
                continue  # the owner stored it (or failed: then we try ourselves)
            try:
                arr = self._decode(level, ty, tx)
                arr.setflags(write=False)
                with self._lock:
                    self.decoded_tiles += 1
                    if keep:
                        self._cache[key] = arr
                        self._cache_bytes += arr.nbytes
                    while self._cache_bytes > self.cache_limit and len(self._cache) > 1:
                        _, old = self._cache.popitem(last=False)
                        self._cache_bytes -= old.nbytes
                return arr
            finally:
                with self._lock:
                    self._inflight.pop(key, None)
                event.set()

    def raw_jpeg(self, level: int, ty: int, tx: int) -> bytes | None:
        """Tile (ty, tx) of `level` as a self-contained JPEG stream, without decoding it; None when
        the level is not 3-sample JPEG, or the tile is sparse or runs past the image's edge.
        A damaged stream raises `TileDecodeError`, as a decode would."""
        lv = self.levels[level]
        if lv.jpeg_prefix is None or (tx + 1) * lv.tile_w > lv.width or (ty + 1) * lv.tile_h > lv.height:
            return None
        data = self._stored(level, ty, tx)
        if data is None or data[:2] != b"\xff\xd8":
            return None  # sparse, or not a stream we can splice: let the decoder judge it
        return lv.jpeg_prefix + data[2:]

    # -- regions ---------------------------------------------------------------------------
    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of level pixels [x, x+w) x [y, y+h); outside the image is white.

        A region that is exactly one stored tile comes back as the cached tile itself
        (read-only, no copy).
        """
        lv = self.levels[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lv.width), min(y + h, lv.height)
        if x0 >= x1 or y0 >= y1:
            return np.full((h, w, 3), 255, np.uint8)
        if (w, h) == (lv.tile_w, lv.tile_h) and x % lv.tile_w == 0 and y % lv.tile_h == 0 and (x1 - x, y1 - y) == (w, h):
            return self.tile(level, y // lv.tile_h, x // lv.tile_w, keep=self.cache_whole_tiles)
        out = np.empty((h, w, 3), np.uint8)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            out.fill(255)
        for _, ty, tx in self.tiles_for(level, x, y, w, h):
            tile = self.tile(level, ty, tx)
            tx0, ty0 = tx * lv.tile_w, ty * lv.tile_h
            a0, a1 = max(y0, ty0), min(y1, ty0 + tile.shape[0])
            b0, b1 = max(x0, tx0), min(x1, tx0 + tile.shape[1])
            out[a0 - y : a1 - y, b0 - x : b1 - x] = tile[a0 - ty0 : a1 - ty0, b0 - tx0 : b1 - tx0]
        return out

    def tiles_for(self, level: int, x: int, y: int, w: int, h: int) -> list[tuple[int, int, int]]:
        """The (level, ty, tx) keys a region read would decode."""
        lv = self.levels[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lv.width), min(y + h, lv.height)
        if x0 >= x1 or y0 >= y1:
            return []
        return [
            (level, ty, tx)
            for ty in range(y0 // lv.tile_h, (y1 - 1) // lv.tile_h + 1)
            for tx in range(x0 // lv.tile_w, (x1 - 1) // lv.tile_w + 1)
        ]


def jpeg_scan_error(data: bytes) -> str | None:
    """Why a baseline JPEG stream is corrupt, or None. About 25 us for a 10 KB tile.

    libjpeg (and so imagecodecs) only *warns* when it meets a marker inside the entropy-coded
    scan ("premature end of data segment") and returns an image with the rest filled grey:
    a silent hole. In a valid baseline scan 0xFF is followed only by 0x00 (stuffing), RST0-7
    or more 0xFF fill bytes, so any other pair means the tile was damaged. Progressive streams
    (several scans) are not checked.
    """
    b = np.frombuffer(data, np.uint8)
    i = 2 if len(b) >= 2 and b[0] == 0xFF and b[1] == 0xD8 else 0
    start = None
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return "bad marker structure"
        marker = int(b[i + 1])
        if marker == 0xFF:
            i += 1
            continue
        if 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return None  # progressive / lossless / arithmetic: not checked
        length = (int(b[i + 2]) << 8) | int(b[i + 3])
        if marker == 0xDA:
            start = i + 2 + length
            break
        i += 2 + length
    if start is None:
        return "no image data"
    scan = b[start:]
    if len(scan) < 2 or scan[-2] != 0xFF or scan[-1] != 0xD9:
        return "no end-of-image marker"
    scan = scan[:-2]
    if len(scan) and scan[-1] == 0xFF:
        return "image data ends inside a marker"
    ff = np.flatnonzero(scan[:-1] == 0xFF)
    nxt = scan[ff + 1]
    bad = ~((nxt == 0x00) | ((nxt >= 0xD0) & (nxt <= 0xD7)) | (nxt == 0xFF))
    if bad.any():
        return f"marker 0x{int(nxt[bad][0]):02X} inside the image data"
    return None


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """uint8 gray / RGB / RGBA (H, W, S) -> RGB, transparent pixels composited on white."""
    if arr.ndim == 2:
        arr = arr[..., None]
    s = arr.shape[2]
    if s == 1:
        return np.repeat(arr, 3, axis=2)
    if s == 3:
        return np.ascontiguousarray(arr)
    if s == 4:
        return composite_on_white(arr)
    if s == 2:  # gray + alpha
        return composite_on_white(np.concatenate([np.repeat(arr[..., :1], 3, 2), arr[..., 1:]], 2))
    raise ValueError(f"unsupported number of samples: {s}")


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Straight-alpha RGBA uint8 -> RGB on a white background."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)
