"""What many tests build: small synthetic stores, fake models, tiny checkpoints, fake slides.

Stores: each patch shows a disc of a textured 'tumour' on a 'stroma' background; the mask is
the disc. Each domain tints the whole patch (its 'scanner') so domains differ while the task
stays the same.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from histodg.model.config import ModelConfig, Normalization
from histodg.store import StoreAttrs, StoreWriter

# `histodg train` arguments for a run of two steps of a tiny U-Net on CPU
TINY_TRAIN = ("--arch", "unet", "--encoder", "resnet18", "--encoder-weights", "none", "--batch-size", "2", "--method",
              "erm", "--device", "cpu", "--workers", "0", "--val-fraction", "0", "--steps", "2")
RAW_RGB = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # the model sees RGB / 255


# -- stores ------------------------------------------------------------------------------------------
def toy_patch(rng, size: int, centre=(0.25, 0.75), radius=(0.15, 0.35), empty: float = 0.2, noise: float = 12,
              tint=(0, 0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """(RGB float image in 0-255, tumour mask) of one toy patch: a striped purple disc (tumour) on pink
    (stroma), with noise and a tint per domain; `empty` of the patches have no tumour."""
    yy, xx = np.mgrid[:size, :size]
    cx, cy = rng.uniform(*centre, 2) * size
    r = rng.uniform(*radius) * size
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    if empty and rng.random() < empty:
        disc[:] = False  # some patches without tumour
    stripes = 25 * (np.sin(xx / 2.0 + yy / 3.0) > 0)[..., None]  # tumour texture
    img = np.where(disc[..., None], np.array((120, 60, 150)) + stripes, np.array((225, 160, 190)))
    img = img + rng.normal(0, noise, (size, size, 1)) + np.asarray(tint)
    return np.clip(img, 0, 255), disc


def make_store(path: Path, n: int = 24, size: int = 64, organ: str = "unknown", scanner: str = "unknown",
               seed: int = 0, tint=(0, 0, 0), masks: bool = True, mpp: float = 1.0) -> Path:
    rng = np.random.default_rng(seed)
    attrs = StoreAttrs(tile_size=size, mpp=mpp, organ=organ, scanner=scanner,
                       labels={"0": "background", "1": "tumor"} if masks else None)
    w = StoreWriter(Path(path), attrs, n, masks).create()
    for i in range(n):
        img, disc = toy_patch(rng, size, tint=tint)
        w.append(w.encode(img.astype(np.uint8), disc.astype(np.uint8) if masks else None), (i * size, 0), 1.0,
                 plan_done=i + 1)
    w.finish()
    return Path(path)


def uniform_store(path: Path, n: int = 4, size: int = 64, organ: str = "unknown", scanner: str = "unknown") -> Path:
    """A store of plain grey patches without any tumour."""
    attrs = StoreAttrs(tile_size=size, mpp=1.0, organ=organ, scanner=scanner, labels={"0": "background", "1": "tumor"})
    w = StoreWriter(path, attrs, n, True).create()
    for i in range(n):
        w.append(w.encode(np.full((size, size, 3), 200, np.uint8), np.zeros((size, size), np.uint8)), (i * size, 0), 1.0)
    w.finish()
    return path


def make_domains(root: Path, organs=("colon", "stomach", "lung"), scanners=("s1", "s2", "s3"), stores_per_domain: int = 2,
                 n: int = 16, size: int = 64) -> Path:
    """Organ-task stores (scanner unknown) and scanner-task stores (organ unknown), like COSAS."""
    k = 0
    for j, o in enumerate(organs):
        for s in range(stores_per_domain):
            make_store(root / f"organ-{o}-{s}.zarr", n, size, organ=o, seed=k, tint=(0, 10 * j, 0))
            k += 1
    for j, sc in enumerate(scanners):
        for s in range(stores_per_domain):
            make_store(root / f"scanner-{sc}-{s}.zarr", n, size, scanner=sc, seed=k, tint=(15 * j, -10 * j, 5 * j))
            k += 1
    return root


# -- fake models ---------------------------------------------------------------------------------------
class DarkModel(torch.nn.Module):
    """Tumour where the pixel is dark: a pointwise model, so stitching cannot change its mask."""

    def forward(self, x):
        return (20 * (0.5 - x.mean(1, keepdim=True))).float()


def encode_position(h: int, w: int) -> np.ndarray:
    """RGB whose pixels say where they are: R, G = x, y mod 256, B = their high bits."""
    y, x = np.mgrid[:h, :w]
    return np.stack([x % 256, y % 256, x // 256 + 16 * (y // 256)], -1).astype(np.uint8)


def position_value(y, x):
    """A known function of position (test_predict's PositionModel outputs it), as uint8 probability (1..253)."""
    return 1 + (3 * x + 7 * y) % 253


def raw_config(mpp: float = 1.0, tile: int = 64, classes: int = 1) -> ModelConfig:
    """The ModelConfig of a fake model that sees RGB / 255."""
    return ModelConfig(arch="fake", encoder="fake", mpp=mpp, tile_size=tile, classes=classes, normalization=RAW_RGB)


def tiny_checkpoint(path: Path, mpp: float = 4.0, tile: int = 64, seed: int = 0, head_logit: float | None = None) -> Path:
    """A Unet-resnet18 checkpoint (no download): untrained from `seed`, or, with `head_logit`, every
    weight 0 and the head's bias `head_logit`, so it predicts one probability everywhere."""
    from histodg.model.build import build_model
    from histodg.model.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = build_model("unet", "resnet18", "none", 1)
    if head_logit is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
            model.segmentation_head[0].bias.fill_(head_logit)
    mc = ModelConfig(arch="unet", encoder="resnet18", mpp=mpp, tile_size=tile)
    save_checkpoint(path, {"model_state": model.state_dict(), "model_config": mc})
    return path


# -- slides ------------------------------------------------------------------------------------------
def openslide_rgb(osr, x, y, size) -> np.ndarray:
    """An OpenSlide level-0 read with transparency (past the slide's edge) composited on white:
    the reference every reader of histodg must match."""
    rgba = np.asarray(osr.read_region((int(x), int(y)), 0, (size, size))).astype(np.float64)
    a = rgba[..., 3:] / 255.0
    return np.round(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)


# -- fake slides ---------------------------------------------------------------------------------------
def tissue_field(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An RGB field on white glass: a pink, textured blob of 'tissue' in the middle, dark spots in it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    inside = ((xx - 0.45 * w) / (0.35 * w)) ** 2 + ((yy - 0.5 * h) / (0.3 * h)) ** 2 < 1
    rgb = np.full((h, w, 3), 245, np.float32)
    tissue = np.array((215, 140, 185), np.float32) + rng.normal(0, 10, (h, w, 1))
    spots = (np.sin(xx / 7.0) * np.sin(yy / 5.0)) > 0.7
    tissue[spots] = (90, 40, 130)
    rgb[inside] = tissue[inside]
    return np.clip(rgb, 0, 255).astype(np.uint8)


BATCH_REPORT = {"summary.csv", "summary.json", ".summary.lock", "report.html", "config.yaml"}  # what every batch leaves in OUT_DIR


def outputs(folder: Path) -> list[str]:
    """The names in an output folder, less the batch report."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in BATCH_REPORT)


def stem_input(model, x):
    """What the first BatchNorm of a ResNet encoder sees for `x`."""
    with torch.no_grad():
        return model.encoder.model.conv1(x) if hasattr(model.encoder, "model") else model.encoder.conv1(x)


def feature_moments(model, normalizer, patches: np.ndarray):
    """The domain-shift meter's `Moments` of (N, T, T, 3) uint8 `patches` through `model` (one forward)."""
    from histodg.model.shift import FeatureMeter

    meter = FeatureMeter(model)
    with torch.inference_mode():
        model(normalizer(torch.from_numpy(patches).permute(0, 3, 1, 2)))
    meter.remove()
    return meter.take()
