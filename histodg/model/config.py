"""The model contract: what a trained model is, saved in every checkpoint and read by `predict`.

    mc = ModelConfig(arch="FPN", encoder="resnet18", mpp=1.0, tile_size=128)
    ckpt["model_config"] = mc.to_dict()            # plain data, versioned
    mc = ModelConfig.from_dict(ckpt["model_config"])

Everything `histodg predict` needs to run a model as it was trained is here: the network
(arch, encoder, classes), its labels, the resolution and window it saw (mpp, tile size), the
input normalisation, the training domains' feature statistics (the domain-shift score), the
domains of a DSBN model's BatchNorm slots, and for
the record the method, its settings and the loss.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..constants import DEFAULT_LABELS

MODEL_CONFIG_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of RGB in [0, 1]: x' = (x / 255 - mean) / std, after the stain
    normalisation `stain` (a `model.stain` reference, or None) when there is one."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    stain: dict | None = None

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"normalization needs 3 means and 3 positive stds (got {self.mean}, {self.std})")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    encoder: str
    mpp: float | None  # um/px of the patches it was trained on
    tile_size: int | None  # patch side it was trained on
    classes: int = 1  # 1: binary (sigmoid); more: softmax over labels 0..classes-1
    labels: dict = field(default_factory=lambda: dict(DEFAULT_LABELS))
    normalization: Normalization = Normalization()
    method: str = "erm"
    hparams: dict = field(default_factory=dict)
    loss: str = "bce"
    augmentation: dict | None = None  # {"preset": ..., settings...} it was trained with
    shift: dict | None = None  # the training domains' description for the domain-shift score (model.shift)
    adaptation: dict | None = None  # `histodg adapt`: the checkpoint it started from, the target, the settings
    domain_bn: list | None = None  # --method dsbn: the domains of its BatchNorm slots, in slot order (model.domain_bn)
    trained_on: dict | None = None  # the model card's data: the stores given, patches per organ and scanner, the stages, the command
    version: int = MODEL_CONFIG_VERSION

    def __post_init__(self):
        if self.classes < 1:
            raise ValueError(f"classes must be at least 1 (got {self.classes})")
        if self.version != MODEL_CONFIG_VERSION:
            raise ValueError(f"model config version {self.version}, this histodg reads {MODEL_CONFIG_VERSION}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["normalization"] = {"mean": list(self.normalization.mean), "std": list(self.normalization.std),
                              "stain": self.normalization.stain}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """From a checkpoint's `model_config` (checkpoints before the version field are version 1)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        for key in ("arch", "encoder"):
            if key not in values:
                raise ValueError(f"model config has no {key!r}")
        norm = values.get("normalization") or {}
        values["normalization"] = Normalization(tuple(norm.get("mean", IMAGENET_MEAN)), tuple(norm.get("std", IMAGENET_STD)),
                                                norm.get("stain"))
        values.setdefault("mpp", None)
        values.setdefault("tile_size", None)
        values["classes"] = int(values.get("classes", 1))
        return cls(**values)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)
