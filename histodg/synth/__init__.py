"""`histodg synth`: a built-in multi-organ, multi-scanner adenocarcinoma data set, made on the spot.

- `dataset`: `make_dataset(out_dir, DatasetSpec(seed=...))`, the domains, the case writers (pyramidal TIFF,
  QuPath GeoJSON, COSAS PNGs) and `manifest.csv`;
- `profiles`: the built-in organs (morphology) and scanners (acquisition);
- `tissue` / `shapes` / `scanner`: how a case is drawn, then "scanned";
- `gallery`: one patch of every domain in one PNG;
- `artefacts`: pen, blur and a fold drawn onto real tissue (the QC tests and benchmark).

May import: `slides` (rasterisation, reading back for the gallery) and the top-level helpers.
"""
from .dataset import DOMAINS, DatasetSpec, make_dataset
from .gallery import make_gallery

__all__ = ["DOMAINS", "DatasetSpec", "make_dataset", "make_gallery"]
