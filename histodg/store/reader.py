"""Reading patch stores: open with one clear error for each way a store can be unusable.

    store = open_store("stores/colon-01.zarr")     # .images, .masks, .coords, .tissue, .attrs (StoreAttrs)
    ref = store.ref()                               # what training keeps of it (picklable, no open arrays)

`store_state` tells a finished store from an unfinished (resumable) or broken one; `find_stores`
expands folders and CSV lists into store paths; `describe_store` is what `histodg info` shows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import HistodgError
from ..domains import Domain
from ..files import read_csv_rows
from .codecs import registered_zarr
from .integrity import shard_problem
from .metadata import MetadataError, read_metadata
from .schema import ARRAYS, FORMAT_VERSION, PROGRESS_FILE, StoreAttrs


class StoreError(HistodgError):
    """A patch store is missing, unfinished, from another version or inconsistent."""


def read_attrs(path) -> dict:
    """The raw attributes of a store's group (any state)."""
    return dict(registered_zarr().open_group(str(path), mode="r").attrs)


def store_state(path) -> str:
    """'missing' | 'complete' | 'partial' (resumable) | 'broken' (must be rewritten)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    try:
        attrs = read_attrs(path)
    except Exception:
        return "broken"
    if attrs.get("complete") is True:
        return "complete"
    if (path / PROGRESS_FILE).is_file() and attrs.get("format_version") == FORMAT_VERSION:
        return "partial"
    return "broken"


@dataclass(frozen=True)
class StoreRef:
    """A store as training sees it: where it is, how many patches, its typed attributes."""

    path: Path
    n: int
    attrs: StoreAttrs

    @property
    def name(self) -> str:
        return store_name(self.path)

    @property
    def organ(self) -> str:
        return self.attrs.organ

    @property
    def scanner(self) -> str:
        return self.attrs.scanner

    def domain(self, axis: str | None = None) -> str:
        """This store's domain on `axis` (`domains.Domain.name`: with no axis, the organ, else the scanner)."""
        return Domain.of(self.attrs).name(axis)


def store_name(path: Path) -> str:
    name = Path(path).name
    return name[:-5] if name.endswith(".zarr") else name


@dataclass
class PatchStore:
    """A store opened for reading. Its zarr group is opened on first use of an array: what the
    attributes and the row count answer (`len`, `ref()`) needs no zarr call (`metadata`)."""

    path: Path
    attrs: StoreAttrs
    rows: int
    arrays: tuple = ()  # the arrays it has (`schema.ARRAYS` names)
    _group: object = None

    @property
    def has_masks(self) -> bool:
        return "masks" in self.arrays

    @property
    def group(self):
        if self._group is None:
            self._group = registered_zarr().open_group(str(self.path), mode="r")
        return self._group

    @property
    def images(self):
        return self.group["images"]

    @property
    def masks(self):
        return self.group["masks"] if "masks" in self.group else None

    @property
    def coords(self) -> np.ndarray:
        return np.asarray(self.group["coords"][:])

    @property
    def tissue(self) -> np.ndarray:
        return np.asarray(self.group["tissue"][:])

    @property
    def qc(self) -> np.ndarray:
        """The artefact flags of each patch (`slides.qc.FLAGS` bits); zeros for a store made without QC."""
        if "qc" in self.group:
            return np.asarray(self.group["qc"][:])
        return np.zeros(len(self), np.uint8)

    def __len__(self) -> int:
        return self.rows

    @property
    def name(self) -> str:
        return store_name(self.path)

    def ref(self) -> StoreRef:
        return StoreRef(self.path, len(self), self.attrs)


def open_store(path, require_complete: bool = True, verify: bool = True) -> PatchStore:
    """Open a store for reading, with one clear error for each way it can be unusable (`verify`:
    also that every shard of a complete store is there and whole, `integrity.shard_problem`)."""
    path = Path(path)
    if not path.exists():
        raise StoreError(path, "no such store")
    try:
        meta = read_metadata(path)
    except MetadataError as exc:
        raise StoreError(path, f"not a zarr v3 patch store ({exc})") from None
    raw = meta.attrs
    version = raw.get("format_version")
    if version is None:
        raise StoreError(path, "not a histodg patch store (no format_version attribute)")
    if version != FORMAT_VERSION:
        raise StoreError(
            path, f"store format version {version}, this histodg reads version {FORMAT_VERSION}: re-run `histodg tile`"
        )
    if require_complete and raw.get("complete") is not True:
        raise StoreError(path, "store is incomplete (tiling was interrupted): re-run `histodg tile` to finish it")
    for name in ("images", "coords", "tissue"):
        if name not in meta.arrays:
            raise StoreError(path, f"store has no '{name}' array")
    n = meta.arrays["images"].rows
    for name in ARRAYS[1:]:
        if name in meta.arrays and meta.arrays[name].rows != n:
            raise StoreError(path, f"'{name}' has {meta.arrays[name].rows} rows but 'images' has {n}")
    try:
        attrs = StoreAttrs.from_attrs(raw)
    except ValueError as exc:
        raise StoreError(path, f"malformed store attributes: {exc}") from None
    if verify and raw.get("complete") is True:  # zarr would read what is missing as black patches
        problem = shard_problem(path, meta)
        if problem:
            raise StoreError(path, f"damaged: {problem}; re-tile its slide with `histodg tile --overwrite`")
    return PatchStore(path, attrs, n, tuple(meta.arrays))


def describe_store(path, verify: bool = True) -> dict:
    """Plain-data summary of a store (for `histodg info`), complete or not."""
    path = Path(path)
    state = store_state(path)
    if state == "broken":
        raise StoreError(path, "not a readable histodg patch store")
    s = open_store(path, require_complete=False, verify=verify)
    a = s.attrs
    out = {
        "path": str(path),
        "kind": "store",
        "complete": a.complete is True,
        "patches": len(s) if state == "complete" else json.loads((path / PROGRESS_FILE).read_text())["count"],
        "tile_size": a.tile_size,
        "mpp": a.mpp,
        "overlap": a.overlap,
        "organ": a.organ,
        "scanner": a.scanner,
        "labels": a.labels,
        "has_masks": s.masks is not None,
        "bad_windows": len(a.bad_windows),
        "qc": None if a.qc is None else {"mode": a.qc, **{k: v for k, v in (a.qc_report or {}).items() if k != "thresholds"}},
        "compression": a.compression,
        "source": a.source,
        "format_version": a.format_version,
        "histodg_version": a.histodg_version,
    }
    if a.compression == "jpeg":
        out["jpeg_quality"] = a.jpeg_quality
        out["source_tiles_copied"] = a.source_tiles_copied
    return out


def find_stores(paths) -> list[Path]:
    """Expand store paths, folders of stores (recursively) and CSV lists (a `path` or `store`
    column, relative to the CSV) into store paths. A folder scan passes over `*.zarr` folders
    without `zarr.json` (tiling that never began); one given by name is a bad input."""
    found = []
    for p in paths:
        p = Path(p)
        if p.is_file() and p.suffix.lower() == ".csv":
            found.extend(_stores_from_csv(p))
        elif (p / "zarr.json").is_file():
            found.append(p)
        elif p.is_dir():
            inside = sorted(q for q in p.rglob("*.zarr") if (q / "zarr.json").is_file())
            if not inside and p.suffix.lower() == ".zarr":
                raise StoreError(p, "not a patch store (no zarr.json in it)")
            found.extend(inside)
        else:
            raise StoreError(p, "not a patch store, a folder of stores or a CSV list of stores")
    return found


def _stores_from_csv(path: Path) -> list[Path]:
    rows = read_csv_rows(path)
    col = next((c for c in ("store", "path") if rows and c in rows[0]), None)
    if col is None:
        raise StoreError(path, "a CSV of stores needs a 'store' or 'path' column")
    out = []
    for i, row in enumerate(rows, start=2):
        p = Path(row[col].strip())
        p = p if p.is_absolute() else path.parent / p
        if not (p / "zarr.json").is_file():
            raise StoreError(path, f"line {i}: {p} is not a patch store")
        out.append(p)
    return out
