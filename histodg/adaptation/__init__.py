"""`histodg adapt`: a trained model fitted to a new domain from its unlabelled slides (unsupervised
domain adaptation, after "Global-Local Union Alignment"):

- `config`: `AdaptConfig` and the `--hp` settings of the two parts;
- `styles`: the global part: source patches re-styled to the target's stain statistics
  (Reinhard in LAB, or Macenko) or its low-frequency Fourier amplitude (FDA);
- `align`: the local part: source and target encoder features aligned by their channel moments,
  masked to the channels whose domain gap is largest;
- `targets`: the target inputs, stores as they are, slides tiled first;
- `runner`: the run (`adapt(config)`), its checkpoint and its record.

May import: `model`, `store`, `training` (stores, the seg loss), `tiling` and `slides` (targets
that are slides) and the top-level helpers.
"""
