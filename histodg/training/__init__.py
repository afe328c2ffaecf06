"""`histodg train`: cross-organ / cross-scanner training on patch stores.

- `config`: `TrainConfig`, every setting, validated once, written to RUN_DIR/config.json;
- `data` / `sampler` / `splits`: stores opened and checked, split into stages, domains,
  validation and held-out sets; domain-balanced batches;
- `augment`: acquisition augmentation of batches on the device (stain, colour, optics, noise,
  JPEG, scale);
- `trainer` / `stage` / `state` / `validation`: the run, one stage's loop, what a checkpoint
  carries, per-domain scores every epoch; `crossval`: leave-one-domain-out;
- `methods`: the training methods (ERM, SDS and its peers), one file each, in a plain dict.

May import: `model`, `store`, `evaluation.metrics` and the top-level helpers. Knows nothing
of slides or of whole-slide prediction.
"""
