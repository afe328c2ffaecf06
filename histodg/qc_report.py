"""What artefact QC found on one slide's windows: `QCReport`, one record for both commands.

`tile` counts it window by window while it writes (journalled, so a resumed store goes on counting)
and keeps it as the store's `qc_report`; `predict` makes it from the flags its reader threads found
and writes it into done.json's `qc`, with the mode, the excluded windows' list and their tissue area
beside it. A batch row carries its counts (`batch.qc_summary`).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .constants import QC_FLAGS, qc_flag_names


@dataclass
class QCReport:
    windows: int = 0  # windows examined
    flagged: int = 0  # with any flag
    excluded: int = 0  # flagged and left out (--qc exclude)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(QC_FLAGS, 0))  # windows per flag
    thresholds: dict | None = None  # the rules' thresholds and the slide's references (`WindowQC.describe`)

    def add(self, flags: int, kept: bool) -> None:
        """Count one examined window with its `flags`; `kept`: not left out."""
        self.windows += 1
        if flags:
            self.flagged += 1
            self.excluded += not kept
            for name in qc_flag_names(flags):
                self.counts[name] = self.counts.get(name, 0) + 1

    @classmethod
    def of_windows(cls, examined: int, flagged: Iterable[tuple[int, bool]], thresholds: dict | None = None) -> QCReport:
        """The report of `examined` windows, of which `flagged` gives the flagged ones as (flags, kept)."""
        report = cls(thresholds=thresholds)
        for flags, kept in flagged:
            report.add(flags, kept)
        report.windows = examined
        return report

    def to_dict(self) -> dict:
        return {"windows": self.windows, "flagged": self.flagged, "excluded": self.excluded,
                "counts": dict(self.counts), "thresholds": self.thresholds}

    @classmethod
    def from_dict(cls, d: dict | None) -> QCReport:
        """A report written by `to_dict` (or a journal of an earlier histodg, without thresholds)."""
        d = d or {}
        return cls(int(d.get("windows", 0)), int(d.get("flagged", 0)), int(d.get("excluded", 0)),
                   {**dict.fromkeys(QC_FLAGS, 0), **(d.get("counts") or {})}, d.get("thresholds"))
