#!/usr/bin/env python
"""One H&E patch under each augmentation of `histodg train --augment strong`, one at a time.

    .venv/bin/python examples/augmentation_gallery.py examples/augmentations.png

The patch is the real carcinoma field in ../shared/data (a synthetic one when it is absent);
each panel applies one setting of the strong preset (one random draw up to its strength).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from histodg.training.augment import PRESETS, AugmentSettings, augment_batch

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "he_carcinoma_1000.png"
SIZE = 256


def patch() -> np.ndarray:
    from PIL import Image

    if REAL.is_file():
        with Image.open(REAL) as im:
            return np.asarray(im.convert("RGB"))[300 : 300 + SIZE, 350 : 350 + SIZE]
    from histodg.synth.dataset import DOMAINS, CaseJob, render_job

    return render_job(CaseJob("-", DOMAINS[0], 1, 0, 600.0, ("wsi",))).rgb[:SIZE, :SIZE]


def main(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histodg.synth.gallery import save_figure_png

    rgb = patch()
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float()
    m = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
    strong = PRESETS["strong"]
    names = ["scale", "hed_scale", "hed_bias", "hed_vectors", "white", "jitter", "hue", "gamma", "blur", "sharpen",
             "noise", "jpeg"]
    panels = [("original", rgb)]
    for i, name in enumerate(names):
        only = AugmentSettings(flips=False, p=1.0, **{name: getattr(strong, name)})
        y, _ = augment_batch(x, m, only, torch.Generator().manual_seed(7 + i))
        panels.append((f"{name} {getattr(strong, name):g}", y[0].permute(1, 2, 0).round().byte().numpy()))
    y, _ = augment_batch(x, m, dataclasses.replace(strong, p=1.0), torch.Generator().manual_seed(1))
    panels.append(("all of strong", y[0].permute(1, 2, 0).round().byte().numpy()))
    cols = 7
    fig, axes = plt.subplots(2, cols, figsize=(2.2 * cols, 4.8))
    for ax, (title, img) in zip(axes.ravel(), panels):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("histodg train --augment strong: each setting alone (a random draw up to its strength), then all of them",
                 fontsize=10)
    save_figure_png(fig, out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/augmentations.png"))
