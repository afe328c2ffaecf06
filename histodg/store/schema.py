"""The patch store's schema: its arrays, every attribute with its type, and the format version.

A store is one zarr v3 group per slide or image (`<name>.zarr`):

| array | shape, type | meaning |
| --- | --- | --- |
| `images` | (N, S, S, 3) uint8, one chunk per patch, in shards | RGB at the target mpp |
| `masks` | (N, S, S) uint8, optional | label per pixel, 0 background, 255 ignore |
| `coords` | (N, 2) int64 | level-0 (x, y) of each window's top-left |
| `tissue` | (N,) float32 | tissue fraction of each window |
| `qc` | (N,) uint8, optional | artefact flags of each patch (`slides.qc.FLAGS` bits; 0 clean) |

Its attributes are `StoreAttrs`; `complete: true` is written last, alone. A store of another
`format_version` is refused by readers with a message saying to re-tile.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..constants import COMPRESSIONS, UNKNOWN

FORMAT_VERSION = 1
PROGRESS_FILE = "histodg_progress.json"  # the resume journal of an unfinished store
ARRAYS = ("images", "masks", "coords", "tissue", "qc")

# the settings a rerun of `histodg tile` must match to skip or resume an existing store
REUSE_KEYS = ("tile_size", "mpp", "magnification", "overlap", "min_tissue", "tissue_method", "mpp_tolerance", "organ",
              "scanner", "compression", "jpeg_quality", "qc", "mpp_override")
# attributes left out of zarr.json when they have no value
OMITTED_WHEN_NONE = ("annotation_objects", "annotations_skipped", "source_tiles_copied", "source_tiles_not_copied", "qc",
                     "qc_report")


@dataclass(frozen=True)
class StoreAttrs:
    """Every attribute of a store, typed. Unknown keys of a store are ignored when reading."""

    # what was asked (REUSE_KEYS)
    tile_size: int
    mpp: float  # the target um/px (with --magnification: the resolved one)
    magnification: float | None = None
    overlap: int = 0
    min_tissue: float = 0.25
    tissue_method: str = "otsu"
    mpp_tolerance: float = 0.02
    organ: str = UNKNOWN
    scanner: str = UNKNOWN
    compression: str = "lz4"
    jpeg_quality: int | None = None  # only for compression "jpeg"
    qc: str | None = None  # --qc exclude|flag|off (None: made before artefact QC)
    mpp_override: float | None = None  # --mpp-override (or a manifest's mpp): the um/px the slide was said to have
    # how the slide was read
    mpp_actual: float | None = None  # the patches' true um/px (a level within the tolerance is read as is)
    level0_size: float | None = None  # a window's side in level-0 px
    read_level: int | None = None
    read_size: int | None = None
    source: dict | None = None  # files.source_fingerprint of the slide
    annotation: str | None = None  # resolved path of the annotation file
    annotation_source: dict | None = None  # files.source_fingerprint of the annotation file
    label_map: dict | None = None  # --label NAME=VALUE as {name: value} ({}: every annotation is 1)
    annotation_objects: list | None = None  # --objects: the GeoJSON object types read
    labels: dict | None = None  # {"0": "background", "1": "tumor", ...} when the store has masks
    backend: str | None = None
    slide_mpp: float | None = None
    slide_dimensions: list | None = None
    windows_total: int | None = None
    windows_planned: int | None = None
    meta: dict = field(default_factory=dict)  # other manifest columns (split, ...)
    annotations_skipped: dict | None = None
    # written when the store is finished
    tissue_area_mm2: float | None = None
    bad_windows: list = field(default_factory=list)  # [{"x", "y", "reason"}] of undecodable windows
    n_patches: int | None = None
    source_tiles_copied: int | None = None  # jpeg stores: patches stored as the slide's own JPEG tile
    source_tiles_not_copied: str | None = None  # jpeg stores: why no tile could be copied
    qc_report: dict | None = None  # {"counts": {flag: windows}, "excluded", "flagged", "windows", "thresholds"}
    complete: bool = False
    format_version: int = FORMAT_VERSION
    histodg_version: str | None = None

    def __post_init__(self):
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression {self.compression!r} is not one of {', '.join(COMPRESSIONS)}")

    def to_attrs(self) -> dict:
        """The zarr.json attributes."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if not (k in OMITTED_WHEN_NONE and v is None)}

    @classmethod
    def from_attrs(cls, attrs: dict) -> StoreAttrs:
        """Typed attributes of a store; raises ValueError naming a missing or mistyped key."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in attrs.items() if k in known}
        for key in ("tile_size", "mpp"):
            if values.get(key) is None:
                raise ValueError(f"no {key!r} attribute")
        try:
            values["tile_size"] = int(values["tile_size"])
            values["mpp"] = float(values["mpp"])
        except (TypeError, ValueError):
            raise ValueError(f"tile_size {values['tile_size']!r} / mpp {values['mpp']!r} are not numbers") from None
        values["organ"] = str(values.get("organ") or UNKNOWN)
        values["scanner"] = str(values.get("scanner") or UNKNOWN)
        values["meta"] = values.get("meta") or {}
        values["bad_windows"] = values.get("bad_windows") or []
        values["compression"] = values.get("compression") or "lz4"
        return cls(**values)

    def replace(self, **changes) -> StoreAttrs:
        return dataclasses.replace(self, **changes)
