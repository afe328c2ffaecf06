"""Which stores train, validate and are held out, stage by stage.

- `--pretrain A --finetune B`: stage 1 on the stores whose A (organ or scanner) is known, one
  domain per value; stage 2 on the stores whose B is known.
- `--domains A`: one stage on axis A. Nothing given (`default_protocol`): for a COSAS layout
  organ pretraining, then the union; else one stage by organ if any store knows its organ, else
  by scanner, else one domain "all".
- `--union`: one stage on both tasks: stores with a known organ are grouped by organ, the
  others by scanner.
- `--val-domain NAME` (repeatable): the stores of that organ or scanner are never trained on and
  are scored every epoch of every stage ("held out").
- Validation of the seen domains: `--val-fraction` of each domain's stores (whole slides) while
  at least one store stays for training; a domain of one store gives up a block of its patches.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..constants import UNKNOWN
from ..store import StoreRef
from .data import DataError, Part, domains_on, split_domain


@dataclass
class Stage:
    index: int
    axis: str  # "organ" | "scanner" | "union" | "all"
    train: dict[str, list[Part]]
    val: dict[str, list[Part]]
    heldout: dict[str, list[Part]]

    @property
    def domain_names(self) -> list[str]:
        return list(self.train)

    def summary(self) -> dict:
        def n(parts):
            return {d: sum(len(p) for p in ps) for d, ps in parts.items()}

        return {"index": self.index, "axis": self.axis, "train_patches": n(self.train), "val_patches": n(self.val),
                "heldout_patches": n(self.heldout)}


def default_axis(stores: list[StoreRef]) -> str:
    """The axis of a stage given none: both tasks together ("union") when some stores name an
    organ and others only a scanner (a COSAS layout: nothing is left out, and every training organ
    and scanner gets its own DSBN slot), else the organ, else the scanner, else one domain."""
    organ = any(s.organ != UNKNOWN for s in stores)
    if organ and any(s.organ == UNKNOWN and s.scanner != UNKNOWN for s in stores):
        return "union"
    if organ:
        return "organ"
    if any(s.scanner != UNKNOWN for s in stores):
        return "scanner"
    return "all"


def heldout_stores(stores: list[StoreRef], names) -> dict[str, list[StoreRef]]:
    out = {}
    for name in names:
        if name == UNKNOWN:
            raise DataError(name, "--val-domain: not a domain name (it marks stores without an organ or scanner)")
        hit = [s for s in stores if name in (s.organ, s.scanner)]
        if not hit:
            known = sorted(({s.organ for s in stores} | {s.scanner for s in stores}) - {UNKNOWN})
            raise DataError(name, f"--val-domain: no store has this organ or scanner (known: {', '.join(known)})")
        out[name] = hit
    return out


def group(stores: list[StoreRef], axis: str) -> dict[str, list[StoreRef]]:
    if axis == "all":
        return {"all": list(stores)}
    if axis == "union":  # the domain rule with no axis (`domains`): a store's organ, else its scanner; organs first
        out = domains_on(stores, "organ")
        for d, ss in domains_on([s for s in stores if s.organ == UNKNOWN], "scanner").items():
            out.setdefault(d, []).extend(ss)
        return out
    return domains_on(stores, axis)


def default_protocol(stores: list[StoreRef]) -> list[str]:
    """The stages of a run given no protocol. A COSAS layout: organ pretraining, then the union of
    both tasks (a DSBN model's organ slots carried over), the best protocol measured (issue 31:
    above the union on every seen and unseen domain, the cross-task protocol's unseen mean with
    the seen organs kept); else one stage on `default_axis`."""
    axis = default_axis(stores)
    return ["organ", "union"] if axis == "union" else [axis]


def plan_stages(stores: list[StoreRef], axes: list[str | None], val_domains=(), val_fraction: float = 0.2,
                seed: int = 0) -> list[Stage]:
    held = heldout_stores(stores, val_domains)
    held_paths = {s.path for ss in held.values() for s in ss}
    usable = [s for s in stores if s.path not in held_paths]
    heldout = {name: [Part(s, 0, s.n) for s in ss] for name, ss in held.items()}
    stages = []
    if list(axes) == [None]:
        axes = list[str | None](default_protocol(usable))
    for i, axis in enumerate(axes):
        axis = axis or default_axis(usable)
        groups = group(usable, axis)
        if not groups:
            raise DataError(stores[0].path.parent, f"no store has a known {axis}: tile with --{axis} NAME, a manifest "
                            f"'{axis}' column or a COSAS layout (stage {i + 1})")
        rng = np.random.default_rng([seed, i, 11])
        train, val = {}, {}
        for d, ss in groups.items():
            tr, va = split_domain(ss, val_fraction, rng)
            train[d] = tr
            if va:
                val[d] = va
        stages.append(Stage(i, axis, train, val, heldout))
    return stages


def capped_indices(parts: list[Part], limit: int) -> list[tuple[Part, int]]:
    """At most `limit` (part, patch index) pairs spread evenly over the parts' patches."""
    total = sum(len(p) for p in parts)
    picks = np.arange(total) if total <= limit else np.linspace(0, total - 1, limit).round().astype(np.int64)
    out, bounds = [], np.cumsum([0] + [len(p) for p in parts])
    for g in picks:
        k = int(np.searchsorted(bounds, g, side="right") - 1)
        out.append((parts[k], parts[k].start + int(g - bounds[k])))
    return out
