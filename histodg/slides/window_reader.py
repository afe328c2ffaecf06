"""Reading one window of a plan, the same for `tile` and `predict`: `WindowReader.read(i)`.

Both commands read a plan's windows from their reader threads through this: the pixels (or, for
`tile --compression jpeg`, the slide's own JPEG tile as it is, from `source`), a read error kept
as the window's reason instead of failing the slide (the caller counts them against
`--max-bad-fraction`, `batch.check_bad_windows`), and the artefact QC flags (`slides.qc`), with
whether `--qc exclude` leaves the window out. What each command then does with a window (encode
it into a store, or batch it for the model) is its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import SlideError
from ..constants import QC_EXCLUDED
from .qc import decode_for_qc


@dataclass
class WindowRead:
    """One window as read: `image` (uint8 RGB) or `raw` (the source's JPEG tile), or `error`."""

    index: int
    image: np.ndarray | None = None
    raw: bytes | None = None
    error: str | None = None
    flags: int = 0  # artefact QC flags (`constants.QC_FLAGS` bits)
    excluded: bool = False  # --qc exclude leaves it out


class WindowReader:
    """Reads windows of `plan` from `slide`; thread-safe as the slide readers are.

    `qc`: a `slides.qc.WindowQC` (None: QC off); `exclude`: flagged windows are left out
    (`--qc exclude`); `source`: an object whose `raw(xy)` gives a window's bytes as stored in the
    slide, or None to decode (tile's `--compression jpeg`, `tiling.source_tiles`)."""

    def __init__(self, slide, plan, qc=None, exclude: bool = True, source=None):
        self.slide, self.plan, self.qc, self.exclude, self.source = slide, plan, qc, exclude, source

    def read(self, i: int) -> WindowRead:
        xy, res = self.plan.level0_xy[i], self.plan.resolution
        try:
            raw = self.source.raw(xy) if self.source is not None else None
            image = res.read(self.slide, xy) if raw is None else None
        except SlideError as exc:
            return WindowRead(i, error=exc.reason)
        flags = 0
        if self.qc is not None:  # a copied JPEG tile is decoded for it, at QC's size: QC needs the pixels
            flags = self.qc(decode_for_qc(raw, res.tile) if raw is not None else image)
        return WindowRead(i, image, raw, None, flags, bool(flags & QC_EXCLUDED) and self.exclude)
