"""The run-level part of the method contract (`training.methods.base.Method`): what the trainer asks
of a method before, between and after its stages, so no method is a special case in the trainer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from histodg.model.domain_bn import convert, domain, domain_layers
from histodg.training.config import TrainConfig
from histodg.training.methods import METHODS, parse_hparams


def _hp(name: str, **given):
    return parse_hparams(METHODS[name], {k: str(v).lower() for k, v in given.items()})


def test_fishr_refuses_a_batch_of_one_in_the_config():
    assert METHODS["fishr"].check_config(1, _hp("fishr")) is not None
    assert METHODS["fishr"].check_config(2, _hp("fishr")) is None
    with pytest.raises(ValueError, match="fishr needs --batch-size 2"):
        TrainConfig(stores=("s",), out_dir="o", method="fishr", batch_size=1)
    TrainConfig(stores=("s",), out_dir="o", method="erm", batch_size=1)  # the others take it


def test_a_method_with_slots_refuses_a_model_without_batchnorm_and_one_without_slots_takes_it():
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    assert "BatchNorm" in METHODS["dsbn"].refuse_model(no_bn, _hp("dsbn"))
    assert METHODS["sds"].refuse_model(no_bn, _hp("sds", dsbn=True)) is not None
    assert METHODS["sds"].refuse_model(no_bn, _hp("sds")) is None
    assert METHODS["erm"].refuse_model(no_bn, _hp("erm")) is None


def test_only_a_method_with_slots_records_domains_for_prediction():
    assert METHODS["dsbn"].recorded_domains(_hp("dsbn"), ("colon", "s1")) == ["colon", "s1"]
    assert METHODS["erm"].recorded_domains(_hp("erm"), ("colon", "s1")) is None


def test_between_stages_a_slot_goes_on_by_its_domains_name_and_a_plain_method_leaves_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    convert(model, 2)
    with domain(model, 1), torch.no_grad():  # stage 1's slot 1 is "colon"
        model(torch.randn(8, 3, 4, 4) + 3)
    colon = domain_layers(model)[0].domain_mean[1].clone()
    assert colon.abs().sum() > 0  # the slot learned something to carry
    before = {k: v.clone() for k, v in model.state_dict().items()}
    METHODS["erm"].between_stages(model, _hp("erm"), ["s1", "colon"], ["colon", "s1", "s2"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    METHODS["dsbn"].between_stages(model, _hp("dsbn"), ["s1", "colon"], ["colon", "s1", "s2"])
    layer = domain_layers(model)[0]
    assert layer.domain_mean.shape[0] == 3 and torch.equal(layer.domain_mean[0], colon)  # "colon" is slot 0 next
