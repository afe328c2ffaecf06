"""The compressions of a store's arrays, twice: as zarr codecs (what zarr.json declares and zarr
reads with) and as numcodecs-style encoders (what histodg's own shard writer uses, byte for byte
the same; tested).

- ``lz4``: blosc-lz4, level 1 (the ratio of level 5 on H&E at about half the CPU), no shuffle;
- ``none``: raw bytes;
- ``jpeg``: one baseline JPEG stream per patch (`jpegcodec`), images only; masks are always lz4.
"""
from __future__ import annotations

import numpy as np


def registered_zarr():
    """zarr, with the histodg.jpeg codec registered (the package's entry point does this when
    histodg is installed; not when it runs from a checkout)."""
    import zarr

    from .jpegcodec import register

    register()
    return zarr


def zarr_compressor(compression: str = "lz4"):
    """The zarr bytes->bytes codec of an images/masks array (None: uncompressed, or jpeg)."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle") if compression == "lz4" else None


def zarr_serializer(compression: str, quality: int):
    """The zarr array->bytes codec of the images array: JPEG for compression "jpeg", else zarr's default."""
    if compression != "jpeg":
        return "auto"
    from .jpegcodec import JpegCodec

    return JpegCodec(quality=quality)


class RawEncoder:
    """Identity encoder for compression "none"."""

    @staticmethod
    def encode(a: np.ndarray) -> bytes:
        return a.tobytes()


def patch_encoder(compression: str = "lz4", quality: int = 90):
    """The numcodecs-style twin of `zarr_compressor` / `zarr_serializer`: encode(array) -> bytes."""
    from numcodecs import Blosc

    if compression == "jpeg":
        from .jpegcodec import JpegEncoder

        return JpegEncoder(quality)
    return Blosc(cname="lz4", clevel=1, shuffle=Blosc.NOSHUFFLE, blocksize=0) if compression == "lz4" else RawEncoder()
