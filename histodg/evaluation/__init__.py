"""`histodg evaluate`: Dice and IoU per image, per domain and overall.

- `metrics`: Dice / IoU counts and the per-domain score board (challenge conventions);
- `scoring`: `Evaluation`, the scores of many images, their table and JSON;
- `stores`: a checkpoint run on patch stores with masks, each store one image;
- `predictions`: finished `histodg predict` outputs against annotation files.

May import: `inference` (to run a checkpoint, to read done.json), `slides`, `store` and the
top-level helpers.
"""
