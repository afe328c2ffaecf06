"""What `histodg tile` is asked to do: the window settings and the run options, validated once."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..constants import COMPRESSIONS
from ..slides.annotations import LabelMap
from ..slides.reading import ReadOptions
from ..slides.tissue import METHODS


@dataclass(frozen=True)
class TileSettings:
    """What `histodg tile` cuts: validated once, recorded in every store."""

    tile_size: int = 512
    mpp: float | None = 0.5
    magnification: float | None = None
    overlap: int = 0
    min_tissue: float = 0.25
    tissue_method: str = "otsu"
    mpp_tolerance: float = 0.02

    def __post_init__(self):
        if self.tile_size < 16 or self.tile_size > 8192:
            raise ValueError(f"tile size {self.tile_size} is outside 16-8192 px")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap {self.overlap} must be >= 0 and smaller than the tile size {self.tile_size}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min tissue {self.min_tissue} must be between 0 and 1")
        if self.tissue_method not in METHODS:
            raise ValueError(f"tissue method {self.tissue_method!r} is not one of {', '.join(METHODS)}")
        if self.mpp is None and self.magnification is None:
            raise ValueError("give a target resolution: mpp or magnification")
        if self.mpp is not None and self.magnification is not None:
            raise ValueError("give mpp or magnification, not both")
        if self.mpp is not None and not 0.05 <= self.mpp <= 100:
            raise ValueError(f"target mpp {self.mpp} is outside 0.05-100 um/px")
        if not 0.0 <= self.mpp_tolerance <= 0.25:
            raise ValueError(f"mpp tolerance {self.mpp_tolerance} must be between 0 and 0.25")
        if self.magnification is not None and not 0.1 <= self.magnification <= 200:
            raise ValueError(f"magnification {self.magnification} is outside 0.1-200x")

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap


@dataclass(frozen=True)
class TileOptions:
    """How to run: the settings, how slides are read (shared with predict), labels, overwrite, compression."""

    settings: TileSettings = TileSettings()
    read: ReadOptions = ReadOptions()
    labels: LabelMap = field(default_factory=LabelMap)
    overwrite: bool = False
    compression: str = "auto"  # auto: jpeg for a lossy source (JPEG slides), lz4 for a lossless one
    jpeg_quality: int = 90

    def for_source(self, path, existing: str | None = None) -> TileOptions:
        """These options with `auto` compression resolved for one input: the compression of the
        store it already has (`existing`: a rerun resumes or reuses it), else `jpeg` when the
        source's pixels are lossy (copying its JPEG tiles loses nothing), else lossless `lz4`."""
        if self.compression != "auto":
            return self
        from ..slides.opening import lossy_source

        return replace(self, compression=existing or ("jpeg" if lossy_source(path) else "lz4"))

    def __post_init__(self):
        if self.compression not in ("auto", *COMPRESSIONS):
            raise ValueError(f"--compression must be auto or one of {', '.join(COMPRESSIONS)}")
