"""`--compression jpeg`: windows that are exactly one JPEG tile of the slide are copied, not re-encoded.

Such a window's patch goes into the store as the tile's own bytes (made self-contained: the
slide's shared JPEG tables spliced in), so it is neither decoded nor re-encoded and reads back
pixel for pixel as the slide decodes. It applies when the slide is read by histodg's TIFF tile
reader, the read level's tiles are square JPEG of the patch size and windows are read without
resampling; then every window on the tile grid and inside the image qualifies. The first such
tile is decoded both ways once per slide: if a plain JPEG decode of the spliced stream differs
from the slide's own decode (an unusual colour space), nothing is copied.
"""
from __future__ import annotations

import numpy as np

from ..slides.plan import WindowPlan
from ..slides.tiffread import TiffTileReader, TileDecodeError


def tiff_reader(slide) -> TiffTileReader | None:
    """The slide's TIFF tile reader, when it is read by one (not by OpenSlide or as an image)."""
    reader = getattr(slide, "reader", None)
    return reader if isinstance(reader, TiffTileReader) else None


class SourceTiles:
    """Which windows of a plan can be stored as the source's own JPEG tile, and their bytes."""

    def __init__(self, slide, plan: WindowPlan):
        res = plan.resolution
        self.reader = tiff_reader(slide)
        self.level = res.level
        self.ds = res.level_downsample
        self.size = res.tile
        self.ok = False
        self.why = "the slide is not read by the TIFF tile reader"
        if self.reader is None:
            return
        tw, th = self.reader.tile_size(self.level)
        if not self.reader.levels[self.level].is_jpeg:
            self.why = "the source tiles are not JPEG"
        elif (tw, th) != (self.size, self.size) or res.read_size != self.size:
            self.why = f"patches of {self.size} px read as {res.read_size} px do not match {tw}x{th} px source tiles"
        else:
            self.ok, self.why = self._verify(plan), "a plain JPEG decode of a source tile differs from the slide's"

    def tile_of(self, xy) -> tuple[int, int] | None:
        x, y = int(np.floor(xy[0] / self.ds)), int(np.floor(xy[1] / self.ds))
        if x % self.size or y % self.size:
            return None
        return y // self.size, x // self.size

    def raw(self, xy) -> bytes | None:
        """The window's patch as the source's JPEG stream, or None to read and encode it."""
        t = self.tile_of(xy) if self.ok else None
        return self.reader.raw_jpeg(self.level, *t) if t is not None else None

    def _verify(self, plan: WindowPlan) -> bool:
        from ..store.jpegcodec import decode_patch

        for xy in plan.level0_xy[:64]:
            t = self.tile_of(xy)
            if t is None:
                continue
            try:
                data = self.reader.raw_jpeg(self.level, *t)
                if data is None:
                    continue
                ref = self.reader.tile(self.level, *t)
                return bool(np.array_equal(decode_patch(data, ref.shape), ref))
            except (TileDecodeError, ValueError, RuntimeError):
                continue  # a damaged tile proves nothing: try the next
        return False
