"""Slides and what is known about them: readers, tissue, annotations, inputs, the window plan.

- `opening.open_slide` picks a reader (`backends`: our TIFF tile reader, OpenSlide, plain
  images in memory) behind the `base.Slide` contract;
- `tissue` finds tissue on a thumbnail; `plan` decides which windows of a slide are read, at
  which level and size, for both `histodg tile` and `histodg predict`;
- `annotations` turns QuPath GeoJSON, ASAP XML and label masks into a label raster per window;
- `qc` flags a window's artefacts (pen, blur, folds, glass) for both commands;
- `inputs` turns command-line INPUTS (files, folders, manifests, COSAS layouts) into jobs.

May import: the top-level helpers (`histodg`, `constants`, `files`). Nothing here knows about
stores, models or training.
"""
from .base import Slide, Thumbnail
from .opening import open_slide

__all__ = ["Slide", "Thumbnail", "open_slide"]
