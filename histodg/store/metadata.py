"""A store's metadata read as the JSON it is: the group's attributes and each array's rows and
rows per shard, without zarr.

`open_store` needs only these to check a store (version, completeness, arrays, row counts, shard
files), and zarr's own open answers each question with a round trip through its event loop:
about 17 of them, ~10 ms, per store. A training set of thousands of small images (COSAS: one store
per image) spent most of its start there (benchmarks/many_stores.py, BENCHMARKS.md); the arrays
themselves are opened by zarr when first read.

Each `zarr.json` is read with a size limit and parsed with `files.parse_json` (no deep nesting):
a store is a file a user gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..files import parse_json
from .schema import ARRAYS

MAX_JSON_BYTES = 16 << 20  # a store's attributes hold a QC report and a plan summary: kilobytes


class MetadataError(ValueError):
    """A store's zarr.json is missing, unreadable or not zarr v3's."""


@dataclass(frozen=True)
class ArrayMeta:
    rows: int  # length along the patch axis
    rows_per_shard: int  # the outer chunk grid along the patch axis (the shard, or the chunk when unsharded)
    ndim: int


@dataclass(frozen=True)
class StoreMetadata:
    attrs: dict
    arrays: dict[str, ArrayMeta]


def _json(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise MetadataError(f"{path.name}: {exc.strerror or exc}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise MetadataError(f"{path.name} is larger than {MAX_JSON_BYTES >> 20} MB")
    try:
        data = parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MetadataError(f"{path.name} is not JSON ({str(exc)[:120]})") from None
    if not isinstance(data, dict) or data.get("zarr_format") != 3:
        raise MetadataError(f"{path.name} is not zarr v3 metadata")
    return data


def read_metadata(path) -> StoreMetadata:
    """The store's attributes and arrays (MetadataError when its metadata is not a zarr v3 group's)."""
    path = Path(path)
    group = _json(path / "zarr.json")
    if group.get("node_type") != "group":
        raise MetadataError("zarr.json is not a group's")
    attrs = group.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise MetadataError("the group's attributes are not a mapping")
    arrays = {}
    for name in ARRAYS:
        f = path / name / "zarr.json"
        if not f.is_file():
            continue
        meta = _json(f)
        try:
            shape = [int(v) for v in meta["shape"]]
            grid = [int(v) for v in meta["chunk_grid"]["configuration"]["chunk_shape"]]
            arrays[name] = ArrayMeta(shape[0], grid[0], len(shape))
        except (KeyError, TypeError, ValueError, IndexError):
            raise MetadataError(f"{name}/zarr.json has no usable shape and chunk grid") from None
    return StoreMetadata(attrs, arrays)
