"""Models and their contract: the typed ModelConfig, and ImageNet weights that work offline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histodg.model.config import ModelConfig, Normalization


def test_model_config_round_trips_and_reads_old_checkpoints():
    mc = ModelConfig(arch="FPN", encoder="resnet18", mpp=1.0, tile_size=128, labels={"0": "background", "1": "tumor"},
                     method="sds", hparams={"grad_align": 0.5})
    d = mc.to_dict()
    assert d["version"] == 1 and d["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                                       "stain": None}
    assert ModelConfig.from_dict(d) == mc
    old = {k: v for k, v in d.items() if k != "version"}  # checkpoints written before the version field
    assert ModelConfig.from_dict(old) == mc
    with pytest.raises(ValueError, match="version 7"):
        ModelConfig.from_dict({**d, "version": 7})
    with pytest.raises(ValueError, match="encoder"):
        ModelConfig.from_dict({"arch": "FPN"})
    with pytest.raises(ValueError, match="positive stds"):
        Normalization(std=(0.2, 0.0, 0.2))


def _top3(model, rgb):
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return set(model(x)[0].topk(3).indices.tolist())


def test_packaged_imagenet_weights_classify_like_imagenet(one_torch_thread):
    """The remapped tensors are the real network: as a classifier it sees a cat and an espresso."""
    import timm
    from skimage import data

    from histodg.model.pretrained import efficientnet_lite0_imagenet

    net = timm.create_model("efficientnet_lite0", pretrained=False)
    net.load_state_dict(efficientnet_lite0_imagenet())  # strict: every tensor has its place
    net.eval()
    assert _top3(net, data.chelsea()) & set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert _top3(net, data.coffee()) & {967, 968}  # espresso, cup
    astronaut = _top3(net, data.astronaut())
    assert not astronaut & set(range(281, 286)) and not astronaut & {967, 968}  # and not for everything


def test_tu_efficientnet_lite0_gets_them_with_no_download(monkeypatch):
    import segmentation_models_pytorch as smp

    from histodg.model.build import build_model
    from histodg.model.pretrained import efficientnet_lite0_imagenet

    real = smp.create_model

    def no_download(*args, **kwargs):
        assert kwargs.get("encoder_weights") is None, "smp was asked to download weights"
        return real(*args, **kwargs)

    monkeypatch.setattr(smp, "create_model", no_download)
    model = build_model("fpn", "tu-efficientnet_lite0", "imagenet", 1)
    weights = efficientnet_lite0_imagenet()
    own = model.encoder.model.state_dict()
    assert len(own) == 288 and all(torch.equal(own[k], weights[k]) for k in own)
    scratch = build_model("fpn", "tu-efficientnet_lite0", "none", 1)
    assert not torch.equal(scratch.encoder.model.state_dict()["conv_stem.weight"], weights["conv_stem.weight"])
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64) and np.isfinite(
        model(torch.rand(1, 3, 64, 64)).detach().numpy()).all()


def test_a_checkpoint_payload_saves_what_predict_and_resume_read(tmp_path):
    from histodg.model.checkpoint import Payload, load_checkpoint, save_checkpoint

    net = torch.nn.Conv2d(3, 1, 1)
    config = ModelConfig(arch="unet", encoder="resnet18", mpp=1.0, tile_size=64)
    light = Payload(net.state_dict(), config, {"lr": 1e-3}, 1, 2, 30, 0.5, done=False, metrics={"dice": 0.5})
    full = Payload(net.state_dict(), config, None, 1, 2, 30, 0.5, done=False, resume={"optimizer_state": {"k": 1}})
    adapted = Payload(net.state_dict(), config, None, None, None, 100, None)
    for name, p in (("light", light), ("full", full), ("adapted", adapted)):
        save_checkpoint(tmp_path / f"{name}.pt", p)
    ck = {n: load_checkpoint(tmp_path / f"{n}.pt") for n in ("light", "full", "adapted")}
    assert ck["light"]["metrics"] == {"dice": 0.5} and "optimizer_state" not in ck["light"]
    assert ck["full"]["optimizer_state"] == {"k": 1} and ck["full"]["global_step"] == 30
    assert "done" not in ck["adapted"] and ck["adapted"]["best"] is None
    assert ck["adapted"]["model_config"]["tile_size"] == 64  # the ModelConfig as plain data
