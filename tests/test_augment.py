"""The augmentation module: each transform does what it says and nothing else, seeded, on batches."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from histodg.training.augment import (
    PRESETS,
    AugmentSettings,
    augment_batch,
    color_jitter,
    hed_jitter,
    jpeg_roundtrip,
    resolve_augment,
    stain_jitter,
)

ONLY = {  # one transform at a time, applied to every image
    "scale": dict(scale=0.25, p=1.0),
    "hed_scale": dict(hed_scale=0.3),
    "hed_bias": dict(hed_bias=0.05),
    "hed_vectors": dict(hed_vectors=0.15),
    "white": dict(white=0.05),
    "jitter": dict(jitter=0.2),
    "hue": dict(hue=0.03),
    "gamma": dict(gamma=0.25),
    "blur": dict(blur=1.5, p=1.0),
    "sharpen": dict(sharpen=1.0, p=1.0),
    "noise": dict(noise=6.0, p=1.0),
    "jpeg": dict(jpeg=40, p=1.0),
}


def he_batch(n=6, size=64, seed=0):
    """H&E-like patches: pink stroma with purple discs (the 'tumour', also the mask) and texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs, masks = [], []
    for _ in range(n):
        cx, cy, r = *rng.uniform(0.3, 0.7, 2) * size, rng.uniform(0.15, 0.3) * size
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        img = np.where(disc[..., None], (110, 50, 150), (230, 160, 200)) + rng.normal(0, 8, (size, size, 3))
        imgs.append(np.clip(img, 0, 255).transpose(2, 0, 1))
        masks.append(disc)
    return torch.tensor(np.stack(imgs), dtype=torch.float32), torch.tensor(np.stack(masks), dtype=torch.uint8)


def run(settings, x, m, seed=0):
    return augment_batch(x.clone(), m.clone(), settings, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(ONLY))
def test_each_transform_changes_the_image_and_only_geometry_moves_the_mask(name):
    x, m = he_batch()
    s = AugmentSettings(flips=False, **ONLY[name])
    y, m2 = run(s, x, m)
    assert y.shape == x.shape and y.dtype == torch.float32 and 0 <= y.min() and y.max() <= 255
    per_image = (y - x).abs().flatten(1).mean(1)
    assert (per_image > 0.2).float().mean() >= 0.8, per_image  # it did something to (nearly) every image
    if name == "scale":
        assert not torch.equal(m2, m)
    else:
        assert torch.equal(m2, m)  # photometric: the labels stay where they are
    off = dataclasses.replace(s, **{k: type(v)(0) for k, v in ONLY[name].items() if k != "p"})
    y0, m0 = run(off, x, m)
    torch.testing.assert_close(y0, x) and torch.testing.assert_close(m0, m)  # switched off: nothing


def test_scale_jitter_resizes_image_and_mask_together():
    size = 64
    yy, xx = np.mgrid[:size, :size] + 0.5
    disc = ((xx - 32) ** 2 + (yy - 32) ** 2 < 12**2)
    x = torch.tensor(np.where(disc[None], 40.0, 220.0).repeat(3, 0)[None], dtype=torch.float32).repeat(4, 1, 1, 1)
    m = torch.tensor(disc[None], dtype=torch.uint8).repeat(4, 1, 1)
    y, m2 = run(AugmentSettings(flips=False, scale=0.25, p=1.0), x, m)
    for i in range(4):
        area = int(m2[i].sum())
        factor = (area / disc.sum()) ** 0.5  # the disc's radius grew or shrank by the zoom factor
        assert 0.74 < factor < 1.26
        dark = y[i].mean(0) < 130
        assert (dark == m2[i].bool()).float().mean() > 0.99  # the image's disc is the mask's disc
    assert len({int(a.sum()) for a in m2}) > 1  # each image its own factor


def test_same_seed_same_batch_and_the_light_preset_is_the_old_jitter():
    x, m = he_batch()
    strong = PRESETS["strong"]
    a, ma = run(strong, x, m, seed=3)
    b, mb = run(strong, x, m, seed=3)
    c, _ = run(strong, x, m, seed=4)
    assert torch.equal(a, b) and torch.equal(ma, mb) and not torch.equal(a, c)
    light, _ = run(PRESETS["light"], x, m, seed=3)
    old = color_jitter(x.clone(), torch.Generator().manual_seed(3), 0.1)  # what training did before presets
    assert torch.equal(light, old)
    none, _ = run(PRESETS["none"], x, m)
    assert torch.equal(none, x) and not PRESETS["none"].flips and PRESETS["light"].flips


def test_jpeg_is_what_libjpeg_does():
    import imagecodecs

    x, _ = he_batch(n=1, size=96)
    img = x[0].permute(1, 2, 0).round().numpy().astype(np.uint8)
    for q in (40, 75, 95):
        real = imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(img, level=q, subsampling="420")).astype(np.float32)
        ours = jpeg_roundtrip(torch.from_numpy(img).permute(2, 0, 1)[None].float(), torch.tensor([float(q)]))[0]
        ours = ours.permute(1, 2, 0).numpy()
        error = np.abs(img - real).mean()  # what the real codec does to the patch: 5-7 grey levels
        assert np.abs(ours - real).mean() < min(1.5, 0.25 * error)  # the same, within the codecs' rounding


def test_stain_jitter_is_the_identity_at_rest_and_moves_stain_colours():
    x, _ = he_batch(n=2)
    n = len(x)
    same = stain_jitter(x, torch.ones(n, 3), torch.zeros(n, 3), torch.zeros(n, 3, 3))
    assert (same - x).abs().max() < 0.05  # RGB -> stains -> RGB
    assert (hed_jitter(x, 1e-9, 1e-9) - x).abs().max() < 0.05
    turned = stain_jitter(x, torch.ones(n, 3), torch.zeros(n, 3), torch.full((n, 3, 3), 0.1) * torch.tensor([1.0, -1.0, 0.0]))
    assert (turned - x).abs().mean() > 2


def test_presets_and_overrides():
    s = resolve_augment("strong", {"jpeg": "50", "flips": "false", "blur": 0})
    assert (s.jpeg, s.flips, s.blur, s.hed_scale) == (50, False, 0.0, PRESETS["strong"].hed_scale)
    with pytest.raises(ValueError, match="no such setting"):
        resolve_augment("light", {"bogus": 1})
    with pytest.raises(ValueError, match="choose from"):
        resolve_augment("medium")
    with pytest.raises(ValueError, match="JPEG quality"):
        resolve_augment("light", {"jpeg": 99})
