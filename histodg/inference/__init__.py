"""`histodg predict`: a trained model over whole slides, stitched into slide-level outputs.

- `options`: `PredictOptions` (what a rerun compares, the device) with `slides.reading.ReadOptions`
  (how slides are read, shared with tile) and `WriteOptions` (what is written); `predictor`: `Predictor` (device, precision, normalisation, TTA);
- `pipeline`: `predict_slide(predictor, job, out_dir)`: plan (`slides.plan`), `windows` (reader
  threads -> model -> `stitching`), `prob_map` (prob.zarr), `outputs` (`mask_tiff`,
  `polygons` for GeoJSON, `rasters` for the overlay and mask.png), `done` (done.json, last).

May import: `slides`, `model` and the top-level helpers. Knows nothing of training or stores.
"""
from ..slides.reading import ReadOptions
from .options import PredictOptions, WriteOptions
from .pipeline import PredictResult, plan_prediction, predict_slide
from .predictor import PredictError, Predictor

__all__ = ["PredictError", "PredictOptions", "PredictResult", "Predictor", "ReadOptions", "WriteOptions", "plan_prediction",
           "predict_slide"]
