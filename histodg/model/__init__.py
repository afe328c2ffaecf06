"""Models: how they are built, what is known about them, how they are saved.

- `build`: `build_model(arch, encoder, weights, classes)` over segmentation-models-pytorch,
  with a 1x1 segmentation head; local and ImageNet weights;
- `config`: `ModelConfig`, the typed, versioned contract between training and prediction;
- `checkpoint`: save / load self-describing checkpoints, rebuild a model from one;
- `normalize`: `Normalizer`, the model's input normalisation on the device;
- `taps`: forward hooks methods use (decoder features, shallow encoder stages, the head);
- `batchnorm`: BatchNorm statistics estimated on a slide's windows and put back (AdaBN's core);
- `domain_bn`: DSBN's per-domain BatchNorm slots;
- `export`: a checkpoint as ONNX or TorchScript with its contract as metadata (`histodg export`);
- `card`: a checkpoint's model card (`histodg info best.pt`).

May import: the top-level helpers. Knows nothing of slides, stores, training or inference.
"""
from .config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, Normalization

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ModelConfig", "Normalization"]
