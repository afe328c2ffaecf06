"""`histodg predict`: a trained model over whole slides, stitched into slide-level outputs.

- `options`: `PredictOptions`; `predictor`: `Predictor` (device, precision, normalisation, TTA);
- `pipeline`: `predict_slide(predictor, job, out_dir)`: plan (`slides.plan`), `windows` (reader
  threads -> model -> `stitching`), `prob_map` (prob.zarr), `outputs` (`mask_tiff`,
  `polygons` for GeoJSON, `rasters` for the overlay and mask.png), `done` (done.json, last).

May import: `slides`, `model` and the top-level helpers. Knows nothing of training or stores.
"""
from .options import PredictOptions
from .pipeline import PredictResult, plan_prediction, predict_slide
from .predictor import PredictError, Predictor

__all__ = ["PredictError", "PredictOptions", "PredictResult", "Predictor", "plan_prediction", "predict_slide"]
