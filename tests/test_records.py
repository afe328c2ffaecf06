"""The typed records histodg writes: each field documented where the record is described."""
from __future__ import annotations

import dataclasses
import re

import histodg.inference.done as done


def test_every_part_of_done_json_is_in_its_documented_table():
    table = " ".join(line.split("|")[1] for line in done.__doc__.splitlines() if line.startswith("| `"))
    documented = set(re.findall(r"`(\w+)`", table))
    parts = {f.name for f in dataclasses.fields(done.DoneRecord)} - {"input"}
    assert parts <= documented, parts - documented
    assert {"name", "source", "organ", "scanner", "meta", "histodg_version"} <= documented  # the input's keys


def test_done_json_keeps_the_input_at_the_top_level():
    parts = {f.name: None for f in dataclasses.fields(done.DoneRecord)}
    record = done.DoneRecord(**{**parts, "input": {"name": "a", "organ": "colon"}, "files": ["prob.zarr"]})
    d = record.to_dict()
    assert d["name"] == "a" and d["organ"] == "colon" and "input" not in d and d["files"] == ["prob.zarr"]
    assert list(d)[0] == "histodg_version"
