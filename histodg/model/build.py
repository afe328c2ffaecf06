"""Segmentation models through segmentation-models-pytorch.

`build_model(arch, encoder, weights, classes)`: an smp model whose segmentation head is a 1x1
convolution (smp's Unet uses 3x3): the pixel classifier is then linear in the decoder's last
features, which SDS's closed-form head gradient relies on. `weights` is "imagenet", "none" or a
path to a state dict (an encoder's, a whole model's or a histodg checkpoint). ImageNet weights
of `tu-efficientnet_lite0` come from an installed package, with no download (`pretrained`).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .. import exc_line
from .errors import ModelError
from .safe_load import read_torch_file

ARCHS = {"unet": "Unet", "fpn": "FPN", "unetplusplus": "UnetPlusPlus", "deeplabv3plus": "DeepLabV3Plus",
         "manet": "MAnet", "linknet": "Linknet", "pspnet": "PSPNet", "pan": "PAN", "segformer": "Segformer", "upernet": "UPerNet"}


def arch_name(arch: str) -> str:
    key = arch.lower().replace("_", "").replace("-", "")
    if key not in ARCHS:
        raise ModelError(arch, f"unknown architecture (choose from {', '.join(sorted(set(ARCHS.values())))})")
    return ARCHS[key]


def build_model(arch: str = "FPN", encoder: str = "tu-efficientnet_lite0", weights: str | None = "imagenet", classes: int = 1) -> nn.Module:
    """An smp model with a 1x1 segmentation head; `weights` 'imagenet' | 'none' | PATH."""
    import segmentation_models_pytorch as smp

    from .pretrained import OFFLINE_ENCODERS, load_offline_imagenet

    name = arch_name(arch)
    offline = weights == "imagenet" and encoder in OFFLINE_ENCODERS
    pretrained = weights if weights == "imagenet" and not offline else None
    try:
        model = smp.create_model(name, encoder_name=encoder, encoder_weights=pretrained, classes=classes)
    except KeyError as exc:
        raise ModelError(encoder, f"unknown encoder for {name} ({exc})") from None
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise ModelError(
                encoder,
                f"cannot load ImageNet weights ({exc_line(exc)}); without internet use "
                "--encoder-weights none, or a local file: --encoder-weights path/to/weights.pth",
            ) from None
        raise ModelError(encoder, f"cannot build {name}: {exc}") from None
    _one_by_one_head(model)
    if offline:
        load_offline_imagenet(model, encoder)
    if weights not in (None, "none", "imagenet"):
        load_weights(model, Path(weights))
    return model


def _one_by_one_head(model: nn.Module) -> None:
    head = model.segmentation_head
    conv = head[0]
    if isinstance(conv, nn.Conv2d) and conv.kernel_size != (1, 1):
        head[0] = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=1)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict: a histodg checkpoint, a whole smp model, or just its encoder."""
    if not path.is_file():
        raise ModelError(path, "weights file not found")
    state = read_torch_file(path, ModelError, "PyTorch weights file")  # as data: a weights file from elsewhere cannot run code
    if isinstance(state, dict) and "model_state" in state:
        state = state["model_state"]
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(path, "no state dict inside")
    own = model.state_dict()
    if any(k in own for k in state):
        target, prefix = model, ""
    elif any(f"encoder.{k}" in own for k in state):
        target, prefix = model.encoder, "encoder."
    else:
        raise ModelError(path, "its weights match neither this model nor its encoder")
    mismatched = [k for k, v in state.items() if f"{prefix}{k}" in own and own[f"{prefix}{k}"].shape != v.shape]
    if mismatched:
        raise ModelError(path, f"{len(mismatched)} weights have other shapes (first: {mismatched[0]})")
    missing, _ = target.load_state_dict({k: v for k, v in state.items() if f"{prefix}{k}" in own}, strict=False)
    if target is model.encoder and len(missing) > len(own) // 2:
        raise ModelError(path, "fewer than half of the encoder's weights are in the file")
