"""Each default in one place: an option of `tile`, `predict` or `evaluate` that sets a field of the
library's settings has that field's default, so the library and the command line cannot drift apart
(issue 32 §1). The few options whose default means "decide later" are listed with the reason."""
from __future__ import annotations

import dataclasses

import pytest

from histodg.adaptation.config import AdaptConfig
from histodg.cli import main
from histodg.inference.options import PredictOptions, WriteOptions
from histodg.slides.reading import ReadOptions
from histodg.tiling.settings import TileOptions, TileSettings
from histodg.training.config import TrainConfig

# (command, field): why the command line's default differs from the dataclass's
DECIDED_LATER = {
    ("tile", "workers"): "None: the CPU count, at most 8 (the library's 2 suits a caller that shares the machine)",
    ("predict", "workers"): "None: the CPU count, at most 8",
    ("tile", "mpp"): "None: 0.5 unless --magnification is given",
    ("evaluate", "threshold"): "None: 0.5, or each prediction's own threshold",
    ("train", "workers"): "None: CPUs - 1 data-loading processes, at most 4",
}


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING


@pytest.mark.parametrize("command, classes", [("tile", (TileSettings, TileOptions, ReadOptions)),
                                              ("predict", (PredictOptions, ReadOptions, WriteOptions)),
                                              ("evaluate", (PredictOptions,)), ("train", (TrainConfig,)),
                                              ("adapt", (AdaptConfig,))])
def test_an_option_that_sets_a_field_has_the_fields_default(command, classes):
    params = {p.name: p for p in main.commands[command].params}
    shared, differ = 0, []
    for cls in classes:
        for field in dataclasses.fields(cls):
            p = params.get(field.name)
            if (p is None or getattr(p, "is_flag", False) or p.multiple or (command, field.name) in DECIDED_LATER
                    or _default(field) is dataclasses.MISSING):  # a required argument has no default to compare
                continue  # flags are off, repeated options build other values (`--label` -> LabelMap)
            shared += 1
            if p.default != _default(field):
                differ.append(f"--{field.name.replace('_', '-')}: {p.default!r} on the command line, "
                              f"{_default(field)!r} in {cls.__name__}")
    assert shared >= 5  # the comparison sees the options
    assert not differ, "\n".join(differ)


def test_the_listed_exceptions_still_exist_and_still_differ():
    for (command, name), why in DECIDED_LATER.items():
        p = next(p for p in main.commands[command].params if p.name == name)
        assert p.default is None, f"{command} --{name}: {why}"


@pytest.mark.parametrize("command", ["tile", "predict"])
def test_the_read_options_are_made_from_the_fields(command):
    """`--backend`, `--workers`, `--max-bad-fraction` and `--qc` of both commands carry ReadOptions' own help
    and choices: one text for both commands, written once beside the default."""
    params = {p.name: p for p in main.commands[command].params}
    for field in dataclasses.fields(ReadOptions):
        p = params[field.name]
        assert p.help == field.metadata["help"]
        choices = field.metadata["click"].get("choices")
        assert list(getattr(p.type, "choices", [])) == list(choices or [])
