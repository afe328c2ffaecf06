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
ADAPT_MODES = ("none", "bn", "tent")  # inference.adapt, inference.tent
RUNTIMES = ("auto", "torch", "onnx")  # what runs the network in predict (inference.predictor, inference.onnx_net)
STAIN_METHODS = ("none", "macenko", "reinhard")  # model.stain
LOSSES = ("bce", "bce+dice")  # training.methods.base
AUGMENT_PRESETS = ("none", "light", "strong")  # training.augment
DEVICE_MODES = ("auto", "on", "off")  # device: --amp, --channels-last

# plain images (PNG, JPEG, untiled TIFF) and label-mask images are decoded whole into memory:
# above this many megapixels (3 bytes each as RGB) they are refused; HISTODG_MAX_IMAGE_MPX changes it
MAX_IMAGE_MPX = 256


def max_image_pixels() -> int:
    import os

    try:
        return int(float(os.environ.get("HISTODG_MAX_IMAGE_MPX", MAX_IMAGE_MPX)) * 1e6)
    except ValueError:
        return int(MAX_IMAGE_MPX * 1e6)


def too_large(width: int, height: int, what: str = "plain image") -> str | None:
    """Why an image of this size is not decoded into memory, or None."""
    limit = max_image_pixels()
    if width * height <= limit:
        return None
    return (f"{width} x {height} px {what} ({width * height / 1e6:.0f} Mpx, {width * height * 3 / 2**30:.1f} GiB as RGB): "
            f"over the {limit / 1e6:.0f} Mpx histodg decodes into memory; convert it to a tiled pyramidal TIFF "
            f"(vips tiffsave in.png out.tif --tile --pyramid) or raise HISTODG_MAX_IMAGE_MPX")


# artefact QC (slides.qc): the flag bits of a window, and what --qc does with flagged windows
QC_FLAGS = {"pen": 1, "blur": 2, "dark": 4, "glass": 8}
QC_MODES = ("exclude", "flag", "off")
MAX_BAD_FRACTION = 0.1  # --max-bad-fraction of tile and predict: a slide fails past this share of bad windows
# what --qc exclude leaves out: glass is only recorded (--min-tissue already decides how much tissue a
# window needs, and a mostly empty window may hold a tumour's edge)
QC_EXCLUDED = QC_FLAGS["pen"] | QC_FLAGS["blur"] | QC_FLAGS["dark"]


def qc_flag_names(mask: int) -> list[str]:
    """The names of the QC flags set in a bitmask."""
    return [name for name, bit in QC_FLAGS.items() if int(mask) & bit]

# predict's outputs beyond the defaults (`--outputs`), and where the viewer's files go (`--layout`)
EXTRA_OUTPUTS = ("prob-tiff",)
LAYOUTS = ("folders", "flat")
