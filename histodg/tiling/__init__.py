"""`histodg tile`: slides in, patch stores out.

- `settings`: `TileSettings` (windows: size, resolution, overlap, tissue) and `TileOptions` (how to run, with
  `slides.reading.ReadOptions`: how slides are read, shared with predict);
- `runner`: `tile_slide(job, out_dir, options)` plans a slide's windows (`slides.plan`), reads
  them in threads, rasterises their masks and writes the store (`store.StoreWriter`), resumably;
- `source_tiles`: `--compression jpeg` copies windows that are one JPEG tile of the slide as they are.

May import: `slides`, `store` and the top-level helpers.
"""
from ..slides.reading import ReadOptions
from .runner import TileResult, plan_tiles, tile_slide
from .settings import TileOptions, TileSettings

__all__ = ["ReadOptions", "TileOptions", "TileResult", "TileSettings", "plan_tiles", "tile_slide"]
