"""How slides are read, the same for `tile` and `predict`: `ReadOptions`, validated once.

Each field's default and help live here; the command line's options are made from them
(`cli.options.read_options`), so the two commands and the library cannot drift apart."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..constants import BACKENDS, MAX_BAD_FRACTION, QC_MODES


def _opt(default, help: str, **click):
    """A field with its command-line help (and any other Click settings) beside its default."""
    return field(default=default, metadata={"help": help, "click": click})


@dataclass(frozen=True)
class ReadOptions:
    """The reader backend, its threads, when bad windows fail a slide, and artefact QC."""

    backend: str = _opt("auto", "Slide reader. auto: plain images by their bytes; Aperio and generic TIFFs by "
                                "histodg's own tile reader with tiffslide's metadata (`tiffslide`); other formats "
                                "by OpenSlide.", choices=BACKENDS)
    workers: int = _opt(2, "Reader threads  [default: CPU count, at most 8]", cli_default=None)
    max_bad_fraction: float = _opt(MAX_BAD_FRACTION, "Fail a slide when more of its windows than this cannot be "
                                                     "decoded.")
    qc: str = _opt("exclude", "Artefact QC of every window, no weights (pen marks, out-of-focus, folds and dark "
                              "debris, glass): exclude windows with pen, blur or a fold (tile: not stored; predict: "
                              "not predicted, their area reported; glass is only recorded), flag them (kept, "
                              "recorded), or off. Counts in the summary and `histodg info`.", choices=QC_MODES)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend {self.backend!r}: choose {', '.join(BACKENDS)}")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError("--max-bad-fraction must be between 0 and 1")
        if self.qc not in QC_MODES:
            raise ValueError(f"--qc must be one of {', '.join(QC_MODES)}")

    @property
    def excludes(self) -> bool:
        """Whether windows QC flags are left out (`--qc exclude`)."""
        return self.qc == "exclude"


def option_specs(cls) -> list[tuple[str, object, str, dict]]:
    """(name, default, help, Click settings) of each field of a settings class made with `_opt`."""
    return [(f.name, f.default, f.metadata["help"], f.metadata["click"]) for f in fields(cls) if "help" in f.metadata]
