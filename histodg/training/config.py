"""Training settings: one frozen dataclass, validated once, written to RUN_DIR/config.json."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..constants import AXES, STAIN_METHODS
from ..device import MODES
from .augment import resolve_augment
from .methods import METHODS, parse_hparams
from .methods.base import LOSSES


@dataclass(frozen=True)
class TrainConfig:
    stores: tuple[str, ...]
    out_dir: str
    arch: str = "FPN"
    # the defaults are what the DG benchmark measured best (BENCHMARKS.md): FPN with the ImageNet
    # EfficientNet-Lite0, whose weights come with a dependency (no download), trained with DSBN
    encoder: str = "tu-efficientnet_lite0"
    encoder_weights: str = "imagenet"
    pretrain: str | None = None  # axis of stage 1 (cross-task pretraining)
    finetune: str | None = None  # axis of stage 2
    domains: str | None = None  # axis of a single stage
    union: bool = False  # one stage on both tasks together
    val_domains: tuple[str, ...] = ()
    cv: bool = False
    val_fraction: float = 0.2
    val_max_patches: int = 512
    method: str = "dsbn"
    hparams: dict = field(default_factory=dict)
    epochs: int | None = None
    steps: int | None = None
    steps_per_epoch: int | None = None
    batch_size: int = 8  # patches per domain per micro-batch
    accumulate: int = 1
    lr: float = 3e-4
    weight_decay: float = 1e-2
    warmup: float = 0.05  # fraction of a stage's steps
    loss: str = "bce"
    augment: str = "light"  # preset: none | light | strong (training.augment)
    aug: dict = field(default_factory=dict)  # --aug KEY=VALUE overrides of the preset
    stain_norm: str = "none"  # none | macenko | reinhard (model.stain), fitted on stain_ref or the training stores
    stain_ref: str | None = None
    amp: str = "auto"
    channels_last: str = "auto"
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    command: str | None = None  # the command line that started the run, for the model card (`histodg info best.pt`)

    def __post_init__(self):
        def bad(msg):
            raise ValueError(msg)

        if self.stain_norm not in STAIN_METHODS:
            bad(f"--stain-norm {self.stain_norm!r}: choose {', '.join(STAIN_METHODS)}")
        if self.stain_ref and self.stain_norm == "none":
            bad("--stain-ref needs --stain-norm macenko or reinhard")
        for name in ("pretrain", "finetune", "domains"):
            v = getattr(self, name)
            allowed = (*AXES, "union") if name == "finetune" else AXES
            if v is not None and v not in allowed:
                bad(f"--{name} {v!r}: choose {' or '.join(allowed)}")
        if (self.pretrain is None) != (self.finetune is None):
            bad("--pretrain and --finetune go together (for one stage use --domains)")
        if self.pretrain is not None and self.pretrain == self.finetune:
            bad("--pretrain and --finetune must be different axes")
        if self.union and (self.pretrain or self.domains):
            bad("--union trains one stage on both tasks: do not combine it with --pretrain/--domains")
        if self.domains and self.pretrain:
            bad("give --domains (one stage) or --pretrain/--finetune (two stages), not both")
        if self.epochs is not None and self.steps is not None:
            bad("give --epochs or --steps, not both")
        if self.epochs is not None and self.epochs < 1:
            bad("--epochs must be at least 1")
        if self.steps is not None and self.steps < 1:
            bad("--steps must be at least 1")
        if self.batch_size < 1 or self.accumulate < 1:
            bad("--batch-size and --accumulate must be at least 1")
        if not 0 <= self.val_fraction < 1:
            bad("--val-fraction must be in [0, 1)")
        if self.lr <= 0:
            bad("--lr must be positive")
        if not 0 <= self.warmup < 1:
            bad("--warmup is a fraction of the steps, in [0, 1)")
        if self.loss not in LOSSES:
            bad(f"--loss {self.loss!r}: choose {' or '.join(LOSSES)}")
        for name in ("amp", "channels_last"):
            if getattr(self, name) not in MODES:
                bad(f"--{name.replace('_', '-')}: choose auto, on or off")
        resolve_augment(self.augment, self.aug)  # raises ValueError on a bad --augment / --aug
        if self.method not in METHODS:
            bad(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        hparams = parse_hparams(METHODS[self.method], self.hparams)  # raises ValueError on a bad --hp
        if why := METHODS[self.method].check_config(self.batch_size, hparams):
            bad(why)

    @property
    def domain_bn(self) -> bool:
        """Whether the run's method has domain-specific BatchNorm slots (dsbn; sds with dsbn=true)."""
        method = METHODS[self.method]
        return method.uses_domain_bn(parse_hparams(method, self.hparams))

    @property
    def stage_axes(self) -> list[str | None]:
        """One entry per stage: the axis of its domains (None: union, or the default axis)."""
        if self.pretrain:
            return [self.pretrain, self.finetune]
        if self.union:
            return ["union"]
        return [self.domains]

    @property
    def augmentation(self):
        """The resolved `AugmentSettings` of --augment and --aug."""
        return resolve_augment(self.augment, self.aug)

    @property
    def total_epochs(self) -> int:
        return self.epochs if self.epochs is not None else (10 if self.steps is None else 0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stores"] = list(self.stores)
        d["val_domains"] = list(self.val_domains)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if isinstance(d.get("augment"), bool):  # config.json of runs made before --augment presets
            d = {**d, "augment": "light" if d["augment"] else "none",
                 "aug": {} if d.get("jitter", 0.1) == 0.1 else {"jitter": d["jitter"]}}
        d = {k: v for k, v in d.items() if k in known}
        d["stores"] = tuple(d.get("stores", ()))
        d["val_domains"] = tuple(d.get("val_domains", ()))
        return cls(**d)

    def replace(self, **kw) -> TrainConfig:
        return dataclasses.replace(self, **kw)
