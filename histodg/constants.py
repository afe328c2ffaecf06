"""The few values every part of histodg agrees on: label values, the tumour class, domain axes."""
from __future__ import annotations

TUMOR = 1  # label of the tumour (the foreground of a binary model)
IGNORE = 255  # label of pixels no loss or score counts
DEFAULT_LABELS = {"0": "background", "1": "tumor"}  # a store's `labels` when every polygon is tumour

# how QuPath shows the tumour: the classification of every annotation histodg writes
TUMOR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}

AXES = ("organ", "scanner")  # what a domain can be
UNKNOWN = "unknown"  # an organ or scanner nobody recorded

# the choices of command-line options, here so that `histodg --help` imports nothing heavy
BACKENDS = ("auto", "openslide", "tiffslide", "image")  # slides.opening
TISSUE_METHODS = ("otsu", "saturation", "none")  # slides.tissue
COMPRESSIONS = ("lz4", "none", "jpeg")  # store.codecs
TTA_MODES = ("none", "flip")  # inference.predictor
LOSSES = ("bce", "bce+dice")  # training.methods.base
AUGMENT_PRESETS = ("none", "light", "strong")  # training.augment
DEVICE_MODES = ("auto", "on", "off")  # device: --amp, --channels-last
