"""`histodg adapt` settings: `AdaptConfig`, validated once, written to RUN_DIR/config.json.

The parts and their settings (`--hp KEY=VALUE`) are `AdaptHparams`; each part has a switch
(`global=false`, `local=false`, `self_train=true`) so that its worth can be measured.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..training.augment import PRESETS as AUGMENT_PRESETS
from .styles import STYLES


@dataclass(frozen=True)
class AdaptHparams:
    global_: bool = field(default=True, metadata={"help": "re-style the source patches to the target (the global part)",
                                                  "key": "global"})
    style: str = field(default="reinhard", metadata={"help": "reinhard | macenko (the target's stain statistics) | fda "
                                                             "(its low-frequency Fourier amplitude)"})
    global_p: float = field(default=1.0, metadata={"help": "share of source patches re-styled"})
    beta: float = field(default=0.05, metadata={"help": "FDA: half-side of the swapped low-frequency square, per image side"})
    local: bool = field(default=True, metadata={"help": "align the features where the domain gap is largest (the local part)"})
    local_weight: float = field(default=1.0, metadata={"help": "weight of the local alignment loss"})
    mask_ratio: float = field(default=0.5, metadata={"help": "share of channels (largest gap first) the alignment acts on"})
    self_train: bool = field(default=False, metadata={"help": "self-training: a mean teacher's confident pseudo-labels "
                                                                "on the target, learnt from a strong view"})
    threshold: float = field(default=0.9, metadata={"help": "self-training: the teacher's probability a pixel's label needs"})
    ema: float = field(default=0.99, metadata={"help": "self-training: the teacher's moving-average decay per step"})
    self_weight: float = field(default=1.0, metadata={"help": "self-training: weight of the pseudo-label loss"})
    self_augment: str = field(default="strong", metadata={"help": "self-training: the --augment preset of the strong view"})
    bn: bool = field(default=True, metadata={"help": "re-estimate the BatchNorm statistics on the target at the end"})

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"--hp style={self.style}: choose {', '.join(STYLES)}")
        if not 0 <= self.global_p <= 1 or not 0 < self.mask_ratio <= 1:
            raise ValueError("--hp global_p is in [0, 1] and mask_ratio in (0, 1]")
        if not 0 < self.beta <= 0.5 or self.local_weight < 0:
            raise ValueError("--hp beta is in (0, 0.5] and local_weight is not negative")
        if not 0.5 <= self.threshold < 1 or not 0 <= self.ema < 1 or self.self_weight < 0:
            raise ValueError("--hp threshold is in [0.5, 1), ema in [0, 1) and self_weight is not negative")
        if self.self_augment not in AUGMENT_PRESETS:
            raise ValueError(f"--hp self_augment={self.self_augment}: choose {', '.join(AUGMENT_PRESETS)}")

    def to_dict(self) -> dict:
        return {_key(f): getattr(self, f.name) for f in dataclasses.fields(self)}


def _key(f) -> str:
    return f.metadata.get("key", f.name)


def parse_adapt_hparams(items) -> AdaptHparams:
    """`--hp key=value` strings (or a dict) -> AdaptHparams; one clear error for a bad one."""
    from ..training.methods.base import parse_settings

    return parse_settings(AdaptHparams, items, "histodg adapt has no setting")


@dataclass(frozen=True)
class AdaptConfig:
    checkpoint: str
    source: tuple[str, ...]
    target: tuple[str, ...]
    out_dir: str
    hparams: dict = field(default_factory=dict)
    steps: int = 200
    batch_size: int = 8  # source patches and target patches per step
    lr: float = 1e-4
    weight_decay: float = 1e-2
    seed: int = 0
    device: str = "auto"
    target_mpp: float | None = None  # --mpp-override of target slides that record none (plain images)
    overwrite: bool = False

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError("--steps must be at least 1 and --batch-size at least 2")
        if self.lr <= 0:
            raise ValueError("--lr must be positive")
        if not self.source or not self.target:
            raise ValueError("give --source (labelled stores) and --target (stores or slides of the new domain)")
        parse_adapt_hparams(self.hparams)

    @property
    def settings(self) -> AdaptHparams:
        return parse_adapt_hparams(self.hparams)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["source"], d["target"] = list(self.source), list(self.target)
        return d
