"""One rule names a slide's domain (`histodg.domains`), wherever histodg needs it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from histodg.constants import UNKNOWN
from histodg.domains import Domain


def test_with_no_axis_the_organ_comes_first_and_the_scanner_stands_in_for_an_unknown_one():
    assert Domain("colon", "s1").name() == "colon"
    assert Domain(UNKNOWN, "s1").name() == "s1"
    assert Domain().name() == UNKNOWN


def test_an_axis_names_that_value_even_when_unknown():
    assert Domain("colon", "s1").name("scanner") == "s1"
    assert Domain(UNKNOWN, "s1").name("organ") == UNKNOWN


def test_adapt_turns_the_order_round():
    assert Domain("colon", "s1").name(first="scanner") == "s1"
    assert Domain("colon", UNKNOWN).name(first="scanner") == "colon"


def test_a_dsbn_slot_is_the_first_of_organ_then_scanner_among_the_models_domains():
    slots = ["s1", "colon", "s2"]
    assert Domain("colon", "s1").slot(slots) == 1  # the organ wins though the scanner has a slot too
    assert Domain("lung", "s2").slot(slots) == 2
    assert Domain("lung", "s9").slot(slots) is None  # the shared slot
    assert Domain("colon", "s1").slot(None) is None  # a model without slots


def test_of_reads_anything_with_an_organ_and_a_scanner_and_none_is_unknown():
    assert Domain.of(SimpleNamespace(organ=None, scanner="s1")) == Domain(UNKNOWN, "s1")
    assert Domain.of(SimpleNamespace(organ="colon")) == Domain("colon", UNKNOWN)


def test_an_order_that_is_no_axis_is_refused():
    with pytest.raises(ValueError):
        Domain().name(first="stain")
