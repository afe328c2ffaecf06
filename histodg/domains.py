"""Which domain a slide or store belongs to: `Domain(organ, scanner)` and the one rule that names it.

Every slide has an organ and a scanner, either of which may be unknown (a COSAS layout records one
of the two). The rule, used everywhere a slide's domain is needed:

- on an axis (`--domain-axis organ|scanner`, a training stage's axis), the domain is that value;
- with no axis, the first known of (organ, scanner): the organ first, because the organ shift is
  the larger one (BENCHMARKS.md) and a slide of a known organ on a new scanner is still that organ;
  evaluation tables, the union stage's groups and a DSBN model's route (the first of the two that
  is one of its slots, `Domain.slot`) all follow it;
- `first="scanner"` turns the order round, for the one place that wants it: `histodg adapt` names
  its target and groups its source by scanner first, because adaptation is asked for a new scanner
  of a known organ far more often than the other way, and its record says which scanner it was.
"""
from __future__ import annotations

from dataclasses import dataclass

from .constants import AXES, UNKNOWN


@dataclass(frozen=True)
class Domain:
    organ: str = UNKNOWN
    scanner: str = UNKNOWN

    @classmethod
    def of(cls, thing) -> Domain:
        """The domain of anything with `organ` and `scanner` (a `SlideJob`, `StoreAttrs`, `StoreRef`);
        None or empty counts as unknown."""
        return cls(getattr(thing, "organ", None) or UNKNOWN, getattr(thing, "scanner", None) or UNKNOWN)

    def order(self, first: str = "organ") -> tuple[str, str]:
        """(organ, scanner), or (scanner, organ) with `first="scanner"`."""
        if first not in AXES:
            raise ValueError(f"first must be one of {', '.join(AXES)}")
        return (self.organ, self.scanner) if first == "organ" else (self.scanner, self.organ)

    def name(self, axis: str | None = None, first: str = "organ") -> str:
        """On `axis`, that value; else the first known of `order(first)`; `unknown` when neither is."""
        if axis is not None:
            return self.order(axis)[0]
        return next((d for d in self.order(first) if d != UNKNOWN), UNKNOWN)

    def slot(self, names) -> int | None:
        """The index in `names` (a DSBN model's slot domains) of the first of (organ, scanner) that is
        one of them; None: the shared slot."""
        names = list(names or ())
        return next((names.index(d) for d in self.order() if d in names), None)
