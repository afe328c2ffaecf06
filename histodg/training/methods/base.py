"""The method contract: how one training step turns per-domain minibatches into a loss.

    class MyMethod(Method):
        name = "mine"
        Hparams = MyHparams                  # a frozen dataclass of settings, with defaults

        def loss(self, batches):             # batches[d] = (images, masks) of domain d
            ...
            return loss, {"loss": loss.detach(), "domain_losses": ..., ...}   # tensors: no host sync

The loop owns everything else (optimizer, AMP, accumulation, logging, checkpoints) and tells
the method about it through hooks: `start_stage(total_steps)` before a stage,
`begin_step(micro_batches)` with every micro-batch of an optimizer step (all `--accumulate` of
them, before their `loss` calls: a method can pool statistics over the whole step), and
`end_of_step()` after each optimizer step (return True to have the optimizer's state reset),
and `close()` when the stage ends (remove the hooks the method put on the model);
`evaluation_route(index)` is the context validation scores a domain in (DSBN: its BatchNorm).
Around the stages, class methods the trainer calls: `check_config` (settings the method cannot take),
`refuse_model` (a model it cannot train), `between_stages` (what goes on into the next stage), and
`recorded_domains` (what the checkpoint records, by which `predict` routes each slide).
Domain-specific BatchNorm is a part any method can take: `uses_domain_bn(hparams)` says whether
a run of it has slots (DSBN always; SDS with `--hp dsbn=true`), `use_domain_bn()` converts the
model, and `forward_domains(x, sizes)` is the forward with each domain through its own slot (the
plain forward without slots); the slots' shared mixture is kept after every step by the base
`end_of_step`.
Images arrive normalised (NCHW float); masks are (N, H, W) integer labels with 255 = ignore.
`self.net` is what to call for a forward pass (the model, or its DDP wrapper), `self.model` the
plain model for feature taps; `self.task` says binary/multi-class and the loss;
`self.normalizer` converts between normalised and 0-255 RGB for input-space augmentation.
A new method is a file in this folder plus one entry in `METHODS` (methods/__init__.py).
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...constants import IGNORE, LOSSES, TUMOR


@dataclass(frozen=True)
class SegTask:
    """What is being segmented: `classes` outputs (1 = binary with sigmoid) and the loss."""

    classes: int = 1
    loss: str = "bce"

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.classes < 1:
            raise ValueError("classes must be >= 1")

    @property
    def binary(self) -> bool:
        return self.classes == 1


def seg_loss(logits: torch.Tensor, masks: torch.Tensor, task: SegTask, reduction: str = "mean") -> torch.Tensor:
    """BCE (binary) or cross-entropy (multi-class), ignoring label 255; + soft Dice if asked.

    With reduction="none" returns the per-image loss (N,), so domains can be weighed or told apart.
    """
    valid = (masks != IGNORE)
    if task.binary:
        target = (masks == TUMOR).float()
        px = F.binary_cross_entropy_with_logits(logits[:, 0].float(), target, reduction="none") * valid
    else:
        px = F.cross_entropy(logits.float(), masks.long().clamp(max=task.classes - 1), reduction="none") * valid
    per_image = px.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)
    if "dice" in task.loss:
        per_image = per_image + soft_dice_loss(logits, masks, task)
    return per_image.mean() if reduction == "mean" else per_image


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor, task: SegTask, eps: float = 1.0) -> torch.Tensor:
    """Per-image 1 - soft Dice of the foreground class(es), ignoring label 255."""
    valid = (masks != IGNORE).unsqueeze(1).float()
    if task.binary:
        prob = torch.sigmoid(logits.float())
        target = (masks == TUMOR).float().unsqueeze(1)
    else:
        prob = torch.softmax(logits.float(), 1)[:, 1:]
        target = F.one_hot(masks.long().clamp(max=task.classes - 1), task.classes).permute(0, 3, 1, 2)[:, 1:].float()
    prob, target = prob * valid, target * valid
    inter = (prob * target).flatten(2).sum(2)
    denom = prob.flatten(2).sum(2) + target.flatten(2).sum(2)
    return (1 - (2 * inter + eps) / (denom + eps)).mean(1)


@dataclass(frozen=True)
class NoHparams:
    """This method has no settings."""


class Method(nn.Module):
    name = "?"
    Hparams: type = NoHparams

    def __init__(self, model: nn.Module, num_domains: int, hparams=None, task: SegTask | None = None, normalizer=None):
        super().__init__()
        self.model = model
        self.use_net(model)
        self.num_domains = num_domains
        self.hparams = hparams if hparams is not None else self.Hparams()
        self.task = task or SegTask()
        self.normalizer = normalizer
        self.slots = False  # True once `use_domain_bn` has converted the model

    # -- the run-level contract: what the trainer asks of a method before, between and after stages --
    @classmethod
    def check_config(cls, batch_size: int, hparams) -> str | None:
        """Why a run with these settings cannot train this method (one line naming the option), or None."""
        return None

    @classmethod
    def uses_domain_bn(cls, hparams) -> bool:
        """Whether a run of this method with `hparams` has domain-specific BatchNorm slots."""
        return False

    @classmethod
    def refuse_model(cls, model: nn.Module, hparams) -> str | None:
        """Why this method cannot train `model` (checked before the run folder is touched), or None:
        a method with slots needs BatchNorm layers to make domain-specific."""
        from ...model.domain_bn import convertible

        if cls.uses_domain_bn(hparams) and not convertible(model):
            return "has no BatchNorm layers to make domain-specific (MiT / SegFormer encoders use LayerNorm)"
        return None

    @classmethod
    def recorded_domains(cls, hparams, domain_names) -> list[str] | None:
        """What the checkpoint records for prediction (`ModelConfig.domain_bn`): the slots' domains, in
        slot order, when the method has slots. `predict` routes a slide by it (`domains.Domain.slot`)."""
        return list(domain_names) if cls.uses_domain_bn(hparams) else None

    @classmethod
    def between_stages(cls, model: nn.Module, hparams, before, after) -> None:
        """Carry what a stage learned into the next one's model: a slot's BatchNorm goes on by its
        domain's name (organ -> union); nothing for a method without slots."""
        if cls.uses_domain_bn(hparams):
            from ...model.domain_bn import carry_slots

            carry_slots(model, before, after)

    def use_domain_bn(self) -> None:
        """Give every BatchNorm layer of the model one slot per domain (`model.domain_bn.convert`),
        the shared slot their mixture; refused in one line for a model without BatchNorm."""
        from ... import HistodgError
        from ...model.domain_bn import convert, sync_shared

        try:
            convert(self.model, self.num_domains)
        except ValueError as exc:
            raise HistodgError(f"--method {self.name}", f"{exc} (MiT / SegFormer encoders use LayerNorm): choose a "
                                                        f"ResNet or EfficientNet encoder") from None
        sync_shared(self.model)
        self.slots = True

    def forward_domains(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """`self.net(x)` for a batch of the stage's domains in order (`sizes` images each), each
        domain through its own BatchNorm slot when the method has slots."""
        if not self.slots:
            return self.net(x)
        from ...model.domain_bn import domain

        with domain(self.model, tuple(sizes)):
            return self.net(x)

    def use_net(self, net: nn.Module) -> None:
        """Forward through `net` (the model, or the loop's DDP wrapper of it). Kept out of the
        module tree, so the method's state holds the model's weights once."""
        self.__dict__["_net"] = net

    @property
    def net(self) -> nn.Module:
        return self.__dict__["_net"]

    def loss(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def start_stage(self, total_steps: int) -> None:
        """Called by the loop before a stage of `total_steps` optimizer steps."""
        self.total_steps = int(total_steps)

    def begin_step(self, micro_batches: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Called by the loop with the micro-batches of one optimizer step, before their `loss` calls."""

    def end_of_step(self) -> bool:
        """Called by the loop after each optimizer step (e.g. to count steps); True: reset the
        optimizer's state (its moment estimates), as DomainBed does when a penalty switches on.
        With BatchNorm slots: the shared slot := their mixture (a subclass that overrides this
        and uses slots calls it)."""
        if self.slots:
            from ...model.domain_bn import sync_shared

            sync_shared(self.model)
        return False

    def close(self) -> None:
        """Called by the loop when the stage ends: remove hooks this method put on the model."""

    def evaluation_route(self, index: int | None):
        """A context for scoring domain `index` of the stage (None: a held-out domain): with
        BatchNorm slots the domain's slot (None: the shared one). Nothing without slots."""
        if not self.slots:
            return nullcontext()
        from ...model.domain_bn import domain

        return domain(self.model, index)

    def own_statistics(self, index: int | None) -> bool:
        """Whether validation scores each slide of domain `index` (None: held out) with BatchNorm
        statistics of its own, as `histodg predict` predicts a slide of an unknown domain: with
        slots, held-out domains do."""
        return self.slots and index is None

    # -- helpers for subclasses ------------------------------------------------------------
    @staticmethod
    def concat(batches):
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        sizes = [len(b[0]) for b in batches]
        return x, y, sizes

    @staticmethod
    def domain_losses(per_image: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Each domain's mean loss (what the loop logs, and names when a loss turns NaN), on the
        device: the loop reads a step's logs once, after its last micro-batch."""
        return torch.stack([d.mean() for d in torch.split(per_image.detach(), sizes)])


def parse_hparams(cls, items) -> object:
    """`--hp key=value` strings (or a dict) -> a validated `cls.Hparams` instance."""
    return parse_settings(cls.Hparams, items, f"method {cls.name!r} has no hyperparameter")


def parse_settings(hp_cls, items, unknown: str) -> object:
    """`--hp key=value` strings (or a dict) -> a validated `hp_cls` instance. A field's key is its
    name, or its `metadata["key"]` (for a name Python reserves, such as `global`); `unknown`
    starts the error for a key it does not have."""
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(hp_cls)}
    values = {}
    pairs = items.items() if isinstance(items, dict) else (str(i).split("=", 1) for i in items or ())
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"--hp {'='.join(pair)!r}: expected KEY=VALUE")
        key, raw = pair[0].strip(), pair[1]
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ValueError(f"{unknown} {key!r} (it has: {known})")
        values[fields[key].name] = _coerce(key, raw, fields[key].default)
    return hp_cls(**values)


def _coerce(key, raw, default):
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--hp {key}={raw}: expected true or false")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ValueError(f"--hp {key}={raw}: expected a {type(default).__name__}") from None
    return text


def describe(cls) -> list[dict]:
    """[{name, default, help}] of a method's hyperparameters (from field metadata)."""
    return [
        {"name": f.name, "default": f.default, "help": f.metadata.get("help", "")}
        for f in dataclasses.fields(cls.Hparams)
    ]
