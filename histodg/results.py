"""The per-input result every batch command (tile, predict) returns and `report` summarises."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BatchResult:
    """One input of a batch: what happened to it. Commands add their own counts and paths."""

    name: str
    source: str
    status: str  # "done" | "skipped" | "failed"
    bad_windows: int = 0
    seconds: float = 0.0
    error: str | None = None  # one line naming the file and the problem
    resumed: bool = False  # an unfinished output was found and finished or redone
