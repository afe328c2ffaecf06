"""The target inputs of `histodg adapt`: patch stores as they are; slides, images, folders and
manifests (anything `histodg tile` takes) tiled first into RUN_DIR/target/ at the checkpoint's
resolution and tile size, tissue only, without masks (the target has no labels). A rerun reuses
the stores it finished."""
from __future__ import annotations

from pathlib import Path

from .. import HistodgError
from ..constants import UNKNOWN

MIN_TISSUE = 0.5  # target patches: at least this much tissue


class AdaptError(HistodgError):
    """`histodg adapt` cannot run as asked."""


def is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def target_stores(inputs, run_dir: Path, mpp: float, tile: int, slide_mpp: float | None = None, progress=None) -> list[Path]:
    """Store paths for every target input, tiling the ones that are not stores."""
    from ..slides.inputs import resolve_inputs
    from ..store import find_stores
    from ..tiling.runner import tile_slide
    from ..tiling.settings import TileOptions, TileSettings

    stores, slides = [], []
    for raw in inputs:
        p = Path(raw)
        if is_store(p) or (p.is_dir() and any(is_store(c) for c in p.iterdir())):
            stores.extend(find_stores([p]))
        else:
            slides.append(p)
    if slides:
        opts = TileOptions(settings=TileSettings(tile_size=tile, mpp=mpp, min_tissue=MIN_TISSUE))
        jobs = resolve_inputs(slides, UNKNOWN, UNKNOWN, None, None, slide_mpp)
        for i, job in enumerate(jobs):
            if job.problem:
                raise AdaptError(job.path, job.problem)
            result = tile_slide(job, run_dir / "target", opts)
            if result.status == "failed":
                raise AdaptError(job.path, f"cannot be tiled as a target: {result.error}")
            stores.append(Path(result.store))
            if progress:
                progress(i + 1, len(jobs))
    if not stores:
        raise AdaptError(inputs[0], "no target stores or slides found")
    return stores
