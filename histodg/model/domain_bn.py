"""Domain-specific BatchNorm (`--method dsbn`; MS-Net, Liu, Dou et al., IEEE TMI 2020): one set of
BatchNorm statistics and affine parameters per training domain, every convolution shared.

    convert(model, slots=3)                    # every BatchNorm layer gets 3 domain slots
    with domain(model, (4, 4, 4)):             # a batch of 3 domains, 4 images each, in order:
        model(x)                               #   each domain's images through its own slot
    with domain(model, 1):                     # every image through domain 1's slot
        model(x)

A converted layer keeps its own class (timm's `BatchNormAct2d` keeps its activation) and its own
parameters and statistics, the *shared* slot that is used outside `domain(...)`: for a slide of
a domain the model was not trained on. `sync_shared` sets it to the mixture of the domain slots
(mean affine parameters; the mean and variance of the pooled domains), and it is what
`--adapt bn` re-estimates on a slide. In the state dict the slots are `domain_weight`,
`domain_bias`, `domain_mean`, `domain_var` (slots x channels) beside the layer's usual entries.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

SLOT_KEYS = ("domain_weight", "domain_bias", "domain_mean", "domain_var")


class _DomainSlots:
    """Mixed into a BatchNorm class: the domain-slot forward. `self.route` is None (the layer's own
    statistics and parameters), a slot index, or the per-domain sizes of a batch in slot order."""

    route = None

    def forward(self, x):
        route = self.route
        if route is None:
            return super().forward(x)
        if isinstance(route, int):
            y = self._slot(x, route)
        else:
            y = torch.cat([self._slot(part, k) for k, part in enumerate(torch.split(x, list(route)))])
        if hasattr(self, "act"):  # timm's BatchNormAct2d: dropout and activation after the norm
            y = self.act(self.drop(y))
        return y

    def _slot(self, x, k: int):
        momentum = 0.1 if self.momentum is None else self.momentum
        return F.batch_norm(x, self.domain_mean[k], self.domain_var[k], self.domain_weight[k], self.domain_bias[k],
                            self.training, momentum, self.eps)


_CLASSES: dict[type, type] = {}


def _domain_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Domain{cls.__name__}", (_DomainSlots, cls), {})
    return _CLASSES[cls]


def _slotted(m: nn.Module) -> bool:
    """A BatchNorm layer that can take domain slots (affine, with running statistics)."""
    return isinstance(m, _BatchNorm) and m.affine and m.track_running_stats


def convertible(model: nn.Module) -> int:
    """How many BatchNorm layers of the model can take domain slots; 0: `--method dsbn` cannot be
    used (MiT / SegFormer encoders use LayerNorm)."""
    return sum(map(_slotted, model.modules()))


def domain_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, _DomainSlots)]


def slots(model: nn.Module) -> int:
    """How many domain slots the model's BatchNorm layers have (0: not converted)."""
    layers = domain_layers(model)
    return int(layers[0].domain_weight.shape[0]) if layers else 0


def slots_in_state(state: dict) -> int:
    """The same, read from a state dict (0: a plain model's)."""
    return max((int(v.shape[0]) for k, v in state.items() if k.endswith(".domain_weight")), default=0)


@torch.no_grad()
def convert(model: nn.Module, n_slots: int) -> int:
    """Give every BatchNorm layer `n_slots` domain slots, each a copy of its shared parameters and
    statistics; a converted layer with another number of slots starts them again from its shared
    slot. The shared affine parameters stop being trained (only the slots are). Returns the layers."""
    if n_slots < 1:
        raise ValueError("domain-specific BatchNorm needs at least one domain")
    count = 0
    for m in model.modules():
        if not _slotted(m):
            continue
        count += 1
        if isinstance(m, _DomainSlots) and m.domain_weight.shape[0] == n_slots:
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
            continue
        if not isinstance(m, _DomainSlots):
            m.__class__ = _domain_class(type(m))
        m.domain_weight = nn.Parameter(m.weight.detach().repeat(n_slots, 1))
        m.domain_bias = nn.Parameter(m.bias.detach().repeat(n_slots, 1))
        m.register_buffer("domain_mean", m.running_mean.detach().repeat(n_slots, 1))
        m.register_buffer("domain_var", m.running_var.detach().repeat(n_slots, 1))
        m.weight.requires_grad_(False)
        m.bias.requires_grad_(False)
        m.route = None
    if not count:
        raise ValueError("this model has no BatchNorm layers to make domain-specific")
    return count


@torch.no_grad()
def carry_slots(model: nn.Module, before: list[str], after: list[str]) -> bool:
    """Slots for the next stage's domains `after`: each the slot of the same name among the last
    stage's `before` (`--pretrain organ --finetune union`: the organ slots go on), the others its
    shared slot. Only when some name recurs and the model has `before`'s slots and `after` another
    number (a resumed stage has its own slots already); True when done."""
    layers = domain_layers(model)
    if not layers or slots(model) != len(before) or len(before) == len(after) or not set(before) & set(after):
        return False
    for m in layers:
        for key, shared in (("domain_weight", m.weight), ("domain_bias", m.bias), ("domain_mean", m.running_mean),
                            ("domain_var", m.running_var)):
            rows = torch.stack([getattr(m, key)[before.index(name)] if name in before else shared for name in after])
            if key in ("domain_weight", "domain_bias"):
                setattr(m, key, nn.Parameter(rows.clone()))
            else:
                m.register_buffer(key, rows.clone())
    return True


@torch.no_grad()
def sync_shared(model: nn.Module) -> None:
    """Each layer's shared slot := the mixture of its domain slots."""
    for m in domain_layers(model):
        m.weight.copy_(m.domain_weight.mean(0))
        m.bias.copy_(m.domain_bias.mean(0))
        m.running_mean.copy_(m.domain_mean.mean(0))
        m.running_var.copy_(m.domain_var.mean(0) + m.domain_mean.var(0, unbiased=False))


@torch.no_grad()
def estimate_slot(model: nn.Module, k: int, inputs) -> int:
    """Slot `k`'s running statistics := the average over the batches `inputs` (normalised NCHW
    tensors; each batch weighs the same, as PyTorch's cumulative average), every weight and every
    other slot untouched. Returns how many batches there were."""
    layers = domain_layers(model)
    saved, was, n = [m.momentum for m in layers], model.training, 0
    model.train()
    try:
        with domain(model, k):
            for n, x in enumerate(inputs, 1):
                for m in layers:
                    m.momentum = 1.0 / n  # the first batch replaces the old statistics
                model(x)
    finally:
        for m, mom in zip(layers, saved):
            m.momentum = mom
        model.train(was)
    return n


@contextmanager
def domain(model: nn.Module, route):
    """Inside: the converted layers of `model` use `route` (see `_DomainSlots`); after: as before."""
    layers = domain_layers(model)
    before = [m.route for m in layers]
    for m in layers:
        m.route = route
    try:
        yield
    finally:
        for m, r in zip(layers, before):
            m.route = r


def domain_context(model: nn.Module, names, name: str):
    """`domain(model, slot of name)`, or nothing for a domain without a slot (or a plain model)."""
    names = list(names or ())
    return nullcontext() if name not in names or not slots(model) else domain(model, names.index(name))


def load_model_state(model: nn.Module, state: dict) -> None:
    """`model.load_state_dict(state)`, converting the model first when the state has domain slots."""
    k = slots_in_state(state)
    if k:
        convert(model, k)
    model.load_state_dict(state)
