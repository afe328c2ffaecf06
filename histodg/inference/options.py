"""What `histodg predict` is asked to do: `PredictOptions` with its `ReadOptions` and `WriteOptions`, validated once."""
from __future__ import annotations

from dataclasses import dataclass

from ..constants import ADAPT_MODES, EXTRA_OUTPUTS, LAYOUTS, RUNTIMES, STAIN_METHODS, TISSUE_METHODS, TTA_MODES
from ..device import MODES
from ..slides.reading import ReadOptions


@dataclass(frozen=True)
class WriteOptions:
    """What `predict` writes beside the mask, whether it redoes finished slides, and its stitching chunks."""

    geojson_tiles: bool = False  # also tiles.geojson: the probability map as QuPath tile objects
    outputs: tuple[str, ...] = ()  # more files: "prob-tiff" (prob.ome.tiff, the probability as a pyramidal OME-TIFF)
    layout: str = "folders"  # "flat": the viewer's files as OUT/<slide>.ome.tiff, OUT/<slide>.geojson (outputs.FLAT_NAMES)
    overwrite: bool = False
    chunk_px: int = 512  # stitching chunk and prob.zarr chunk side
    cache_chunks: int | None = None  # stitching chunks held in memory; None: enough for a strip

    def __post_init__(self):
        if unknown := set(self.outputs) - set(EXTRA_OUTPUTS):
            raise ValueError(f"--outputs {', '.join(sorted(unknown))}: choose from {', '.join(EXTRA_OUTPUTS)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout {self.layout!r}: choose {' or '.join(LAYOUTS)}")
        if self.chunk_px < 16:
            raise ValueError("chunk_px must be at least 16")
        if self.cache_chunks is not None and self.cache_chunks < 1:
            raise ValueError("cache_chunks must be at least 1")


@dataclass(frozen=True)
class PredictOptions:
    """How to predict (what a rerun compares, and the device), then how slides are read and what is
    written; None means "the checkpoint's" for mpp and tile size."""

    mpp: float | None = None
    tile_size: int | None = None
    overlap: float = 0.5  # < 1: fraction of the tile; >= 1: pixels
    batch_size: int = 8
    tta: str = "flip"  # the mean of the 4 flips (4x the model time; the DG benchmark's best, BENCHMARKS.md); "none": one pass
    adapt: str = "none"  # "bn": BatchNorm statistics re-estimated on each slide (inference.adapt); "tent": and entropy steps (inference.tent)
    stain_norm: str = "checkpoint"  # checkpoint (what training did) | none | macenko | reinhard (model.stain)
    stain_ref: str | None = None  # the reference image of --stain-norm macenko|reinhard
    threshold: float = 0.5
    device: str = "auto"
    amp: str = "auto"
    runtime: str = "auto"  # what runs the network: torch, onnx (onnxruntime, CPU), auto (onnx for large slides on a CPU)
    tissue_method: str = "otsu"
    mpp_tolerance: float = 0.02
    window_fraction: float = 1.0  # benchmarks: run only the first part of the windows (strip order)
    roi: str | None = None  # --roi FILE|DIR: each slide predicted inside its region (`SlideJob.region`, slides.roi)
    roi_class: str | None = None  # --roi-class: only the region file's annotations of this class
    read: ReadOptions = ReadOptions()  # how slides are read: backend, threads, bad windows, QC (shared with tile)
    write: WriteOptions = WriteOptions()  # what is written and how

    def __post_init__(self):
        def bad(msg):
            raise ValueError(msg)

        if self.mpp is not None and not 0.05 <= self.mpp <= 100:
            bad(f"--mpp {self.mpp} is outside 0.05-100 um/px")
        if self.tile_size is not None and not 16 <= self.tile_size <= 8192:
            bad(f"--tile-size {self.tile_size} is outside 16-8192 px")
        if self.overlap < 0:
            bad(f"--overlap {self.overlap} must not be negative")
        if self.batch_size < 1:
            bad("--batch-size must be at least 1")
        if self.stain_norm not in ("checkpoint", *STAIN_METHODS):
            bad(f"--stain-norm {self.stain_norm!r}: choose checkpoint, {', '.join(STAIN_METHODS)}")
        if self.tta not in TTA_MODES:
            bad(f"--tta {self.tta!r}: choose {' or '.join(TTA_MODES)}")
        if self.adapt not in ADAPT_MODES:
            bad(f"--adapt {self.adapt!r}: choose {', '.join(ADAPT_MODES)}")
        if not 0 < self.threshold < 1:
            bad(f"--threshold {self.threshold} must be between 0 and 1 (exclusive)")
        if self.amp not in MODES:
            bad(f"amp {self.amp!r}: choose from {', '.join(MODES)}")
        if self.runtime not in RUNTIMES:
            bad(f"--runtime {self.runtime!r}: choose from {', '.join(RUNTIMES)}")
        if self.tissue_method not in TISSUE_METHODS:
            bad(f"--tissue-method {self.tissue_method!r} is not one of {', '.join(TISSUE_METHODS)}")
        if not 0 < self.window_fraction <= 1:
            bad("window_fraction must be in (0, 1]")

    def overlap_px(self, tile: int) -> int:
        px = round(self.overlap * tile) if self.overlap < 1 else int(round(self.overlap))
        if px >= tile:
            raise ValueError(f"--overlap {self.overlap} leaves no stride for a {tile} px tile")
        return px
