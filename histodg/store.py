"""The zarr v3 patch store: one group per slide or image, written resumably, read and validated.

Arrays (see DESIGN.md): ``images`` (N, S, S, 3) uint8, ``masks`` (N, S, S) uint8 (optional),
``coords`` (N, 2) int64 level-0 (x, y), ``tissue`` (N,) float32. Each patch is one chunk inside
shards of `shard_patches` patches (zarr v3 sharding): reading one patch reads one chunk, writing
happens a whole shard at a time, so the per-chunk cost of zarr stays off the hot path.

Writing is resumable: every committed shard is journalled in ``histodg_progress.json`` (written
to a temporary name and renamed); ``complete: true`` is the last attribute written, after the
arrays are trimmed to their final length. A store without it is unfinished.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import HistodgError, __version__

FORMAT_VERSION = 1
PROGRESS_FILE = "histodg_progress.json"
SHARD_BYTES = 48 * 2**20


class StoreError(HistodgError):
    """A patch store is missing, unfinished, from another version or inconsistent."""


def _zarr():
    import zarr

    from .jpegcodec import register

    register()  # the entry point does this when histodg is installed; not when run from a checkout
    return zarr


def shard_patches(tile_size: int) -> int:
    """Patches per shard: about SHARD_BYTES of raw RGB, a power of two, 1-1024."""
    n = max(1, SHARD_BYTES // (tile_size * tile_size * 3))
    return int(min(1024, 2 ** int(np.log2(n))))


COMPRESSIONS = ("lz4", "none", "jpeg")


def _compressor(compression: str = "lz4"):
    """zarr codec of the images/masks arrays: blosc-lz4 (level 1: same ratio as level 5 on H&E,
    about half the CPU) or none (jpeg is a serializer, see `_serializer`)."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle") if compression == "lz4" else None


def _serializer(compression: str, quality: int):
    """zarr array->bytes codec of the images array: JPEG for --compression jpeg, else zarr's default."""
    if compression != "jpeg":
        return "auto"
    from .jpegcodec import JpegCodec

    return JpegCodec(quality=quality)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def store_state(path) -> str:
    """'missing' | 'complete' | 'partial' (resumable) | 'broken' (must be rewritten)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    try:
        attrs = dict(_zarr().open_group(str(path), mode="r").attrs)
    except Exception:
        return "broken"
    if attrs.get("complete") is True:
        return "complete"
    if (path / PROGRESS_FILE).is_file() and attrs.get("format_version") == FORMAT_VERSION:
        return "partial"
    return "broken"


class ShardEncoder:
    """Writes whole shards of one sharded zarr v3 array directly, in zarr's own byte format.

    zarr's sharding codec costs about 1 ms of Python per inner chunk on the writing thread; here
    each patch is compressed by the thread that read it (blosc releases the GIL) and a shard is
    just the compressed chunks, then the index of (offset, nbytes) little-endian uint64 pairs with
    its crc32c appended (the `sharding_indexed` codec with index_location "end"). The bytes are
    identical to what zarr writes (checked in tests); reading goes through zarr as usual.
    """

    MISSING = 2**64 - 1

    def __init__(self, array_dir: Path, shard: int, compressor):
        meta = json.loads((array_dir / "zarr.json").read_text())
        enc = meta["chunk_key_encoding"]
        self.sep = (enc.get("configuration") or {}).get("separator", "/")
        self.prefix = "c" if enc["name"] == "default" else None
        self.ndim = len(meta["shape"])
        self.array_dir = array_dir
        self.shard = shard
        self.compressor = compressor

    def encode(self, chunk: np.ndarray) -> bytes:
        return self.compressor.encode(np.ascontiguousarray(chunk))

    def key(self, shard_index: int) -> Path:
        parts = [str(shard_index)] + ["0"] * (self.ndim - 1)
        name = self.sep.join(([self.prefix] if self.prefix else []) + parts)
        return self.array_dir / name

    def write(self, shard_index: int, chunks: list[bytes]) -> None:
        import google_crc32c

        index = np.full((self.shard, 2), self.MISSING, dtype="<u8")
        offset = 0
        for i, c in enumerate(chunks):
            index[i] = (offset, len(c))
            offset += len(c)
        raw = index.tobytes()
        crc = np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()
        path = self.key(shard_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.write(raw)
            f.write(crc)
        os.replace(tmp, path)


class _Raw:
    """Identity 'codec' for --compression none."""

    @staticmethod
    def encode(a: np.ndarray) -> bytes:
        return a.tobytes()


def _numcodecs_compressor(compression: str = "lz4", quality: int = 90):
    """The numcodecs-style twin of `_compressor()` / `_serializer()` (same parameters, same bytes)."""
    from numcodecs import Blosc

    if compression == "jpeg":
        from .jpegcodec import JpegEncoder

        return JpegEncoder(quality)
    return Blosc(cname="lz4", clevel=1, shuffle=Blosc.NOSHUFFLE, blocksize=0) if compression == "lz4" else _Raw()


class StoreWriter:
    """Create (or resume) a store of at most `capacity` patches; encode, append, flush, finish.

    `encode` (thread-safe, called by the reader threads) compresses a patch; `append` collects
    encoded patches in plan order; `flush` writes whole shards; `commit` journals progress (how
    many patches are stored and how far through the caller's plan they reach). Resume with
    `StoreWriter.resume`.
    """

    def __init__(self, path: Path, attrs: dict, capacity: int, tile_size: int, with_masks: bool,
                 compression: str = "lz4", jpeg_quality: int = 90):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")
        self.compression = compression
        self.jpeg_quality = int(jpeg_quality)
        self.copied = 0  # patches stored as the source's own JPEG tile (--compression jpeg)
        self.path = Path(path)
        self.tile_size = tile_size
        self.with_masks = with_masks
        self.shard = shard_patches(tile_size)
        self.capacity = max(int(capacity), 1)
        self.count = 0  # patches durably written
        self.plan_done = 0  # caller's plan position matching `count`
        self.bad: list[dict] = []
        self._buf_img: list[bytes] = []
        self._buf_mask: list[bytes] = []
        self._buf_xy: list[tuple[int, int]] = []
        self._buf_tissue: list[float] = []
        # coords/tissue of flushed shards not yet written: zarr costs ~8 ms of GIL-holding Python
        # per write, so they go out at commits, not at every shard
        self._pending_xy: list[tuple[int, int]] = []
        self._pending_tissue: list[float] = []
        self._group = None
        self._attrs = attrs
        self._codec = _numcodecs_compressor(compression, self.jpeg_quality)

    # -- create / resume --------------------------------------------------------------------
    def create(self) -> StoreWriter:
        zarr = _zarr()
        if self.path.exists():
            shutil.rmtree(self.path)
        g = zarr.open_group(str(self.path), mode="w")
        s, n, k = self.tile_size, self.capacity, self.shard
        g.create_array("images", shape=(n, s, s, 3), chunks=(1, s, s, 3), shards=(k, s, s, 3), dtype="uint8",
                       compressors=_compressor(self.compression),
                       serializer=_serializer(self.compression, self.jpeg_quality))
        if self.with_masks:
            g.create_array("masks", shape=(n, s, s), chunks=(1, s, s), shards=(k, s, s), dtype="uint8",
                           compressors=_compressor())  # masks always compress ~100x
        g.create_array("coords", shape=(n, 2), chunks=(min(n, 65536), 2), dtype="int64")
        g.create_array("tissue", shape=(n,), chunks=(min(n, 65536),), dtype="float32")
        # update_attributes writes zarr.json once; attrs.update would rewrite it for every key
        g.update_attributes({**self._attrs, "format_version": FORMAT_VERSION, "histodg_version": __version__,
                        "compression": self.compression, "complete": False,
                        **({"jpeg_quality": self.jpeg_quality} if self.compression == "jpeg" else {})})
        self._group = g
        self._open_encoders()
        self._journal()
        return self

    def _open_encoders(self) -> None:
        self._enc_img = ShardEncoder(self.path / "images", self.shard, self._codec)
        self._enc_mask = ShardEncoder(self.path / "masks", self.shard, _numcodecs_compressor()) if self.with_masks else None

    @classmethod
    def resume(cls, path: Path) -> StoreWriter:
        """Reopen an unfinished store at its last committed shard."""
        zarr = _zarr()
        g = zarr.open_group(str(path), mode="r+")
        progress = json.loads((Path(path) / PROGRESS_FILE).read_text())
        attrs = dict(g.attrs)
        w = cls(path, attrs, g["images"].shape[0], int(attrs["tile_size"]), "masks" in g,
                attrs.get("compression", "lz4"), int(attrs.get("jpeg_quality") or 90))
        w._group = g
        w.count, w.plan_done, w.bad = progress["count"], progress["plan_done"], progress["bad"]
        w.copied = int(progress.get("copied", 0))
        w._open_encoders()
        return w

    # -- write ----------------------------------------------------------------------------------
    def encode(self, image: np.ndarray | None, mask: np.ndarray | None, image_bytes: bytes | None = None
               ) -> tuple[bytes, bytes | None]:
        """Compress one patch (and mask); safe to call from many threads. `image_bytes` is a patch
        already in the store's image encoding (a source JPEG tile for --compression jpeg)."""
        img = image_bytes if image_bytes is not None else self._enc_img.encode(image)
        return img, (self._enc_mask.encode(mask) if self.with_masks else None)

    def append(self, encoded: tuple[bytes, bytes | None], xy, tissue: float, copied: bool = False) -> None:
        self.copied += bool(copied)
        self._buf_img.append(encoded[0])
        if self.with_masks:
            self._buf_mask.append(encoded[1])
        self._buf_xy.append((int(xy[0]), int(xy[1])))
        self._buf_tissue.append(float(tissue))

    @property
    def buffered(self) -> int:
        return len(self._buf_img)

    def flush(self) -> None:
        """Write the buffered patches as one shard (the last one of a store may be partial)."""
        n = len(self._buf_img)
        if not n:
            return
        a, b = self.count, self.count + n
        if b > self.capacity:
            raise StoreError(self.path, f"more patches ({b}) than planned ({self.capacity})")
        if a % self.shard:
            raise StoreError(self.path, "internal error: shards must be written whole")
        self._enc_img.write(a // self.shard, self._buf_img)
        if self.with_masks:
            self._enc_mask.write(a // self.shard, self._buf_mask)
        self._pending_xy += self._buf_xy
        self._pending_tissue += self._buf_tissue
        self.count = b
        self._buf_img, self._buf_mask, self._buf_xy, self._buf_tissue = [], [], [], []

    def _write_pending(self) -> None:
        n = len(self._pending_xy)
        if n:
            g, a = self._group, self.count - n
            g["coords"][a:self.count] = np.asarray(self._pending_xy, np.int64)
            g["tissue"][a:self.count] = np.asarray(self._pending_tissue, np.float32)
            self._pending_xy, self._pending_tissue = [], []

    def commit(self, plan_done: int) -> None:
        """Record that the flushed patches, up to plan position `plan_done`, are durably written
        (their coords and tissue too). Only committed patches survive an interruption."""
        self._write_pending()
        self.plan_done = int(plan_done)
        self._journal()

    def add_bad(self, xy, reason: str) -> None:
        self.bad.append({"x": int(xy[0]), "y": int(xy[1]), "reason": reason})

    def _journal(self) -> None:
        _write_json_atomic(self.path / PROGRESS_FILE, {"count": self.count, "plan_done": self.plan_done, "bad": self.bad,
                                                  "copied": self.copied})

    def finish(self, extra_attrs: dict | None = None) -> None:
        """Trim arrays to the patches written, then mark complete (the last write)."""
        self.flush()
        self._write_pending()
        g = self._group
        n = self.count
        for name in ("images", "masks", "coords", "tissue"):
            if name in g:
                arr = g[name]
                arr.resize((n,) + arr.shape[1:])
        extra = {**(extra_attrs or {}), "bad_windows": self.bad, "n_patches": n}
        if self.compression == "jpeg":
            extra["source_tiles_copied"] = self.copied
        g.update_attributes(extra)
        g.update_attributes({"complete": True})  # a write of its own, the last one
        (self.path / PROGRESS_FILE).unlink(missing_ok=True)


@dataclass
class PatchStore:
    """A complete store opened for reading."""

    path: Path
    attrs: dict
    group: object

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

    def __len__(self) -> int:
        return int(self.group["images"].shape[0])

    @property
    def tile_size(self) -> int:
        return int(self.attrs["tile_size"])

    @property
    def mpp(self) -> float:
        return float(self.attrs["mpp"])

    @property
    def organ(self) -> str:
        return str(self.attrs.get("organ") or "unknown")

    @property
    def scanner(self) -> str:
        return str(self.attrs.get("scanner") or "unknown")

    @property
    def name(self) -> str:
        return self.path.name[:-5] if self.path.name.endswith(".zarr") else self.path.name


def open_store(path, require_complete: bool = True) -> PatchStore:
    """Open a store for reading, with one clear error for each way it can be unusable."""
    path = Path(path)
    if not path.exists():
        raise StoreError(path, "no such store")
    zarr = _zarr()
    try:
        g = zarr.open_group(str(path), mode="r")
        attrs = dict(g.attrs)
    except Exception as exc:
        raise StoreError(path, f"not a zarr v3 patch store ({str(exc).splitlines()[0]})") from None
    version = attrs.get("format_version")
    if version is None:
        raise StoreError(path, "not a histodg patch store (no format_version attribute)")
    if version != FORMAT_VERSION:
        raise StoreError(
            path, f"store format version {version}, this histodg reads version {FORMAT_VERSION}: re-run `histodg tile`"
        )
    if require_complete and attrs.get("complete") is not True:
        raise StoreError(path, "store is incomplete (tiling was interrupted): re-run `histodg tile` to finish it")
    for name in ("images", "coords", "tissue"):
        if name not in g:
            raise StoreError(path, f"store has no '{name}' array")
    n = g["images"].shape[0]
    for name in ("masks", "coords", "tissue"):
        if name in g and g[name].shape[0] != n:
            raise StoreError(path, f"'{name}' has {g[name].shape[0]} rows but 'images' has {n}")
    return PatchStore(path, attrs, g)


def describe_store(path) -> dict:
    """Plain-data summary of a store (for `histodg info`), complete or not."""
    path = Path(path)
    state = store_state(path)
    if state == "broken":
        raise StoreError(path, "not a readable histodg patch store")
    s = open_store(path, require_complete=False)
    out = {
        "path": str(path),
        "kind": "store",
        "complete": s.attrs.get("complete") is True,
        "patches": len(s) if state == "complete" else json.loads((path / PROGRESS_FILE).read_text())["count"],
        "tile_size": s.attrs.get("tile_size"),
        "mpp": s.attrs.get("mpp"),
        "overlap": s.attrs.get("overlap"),
        "organ": s.organ,
        "scanner": s.scanner,
        "labels": s.attrs.get("labels"),
        "has_masks": s.masks is not None,
        "bad_windows": len(s.attrs.get("bad_windows") or []),
        "compression": s.attrs.get("compression", "lz4"),
        "source": s.attrs.get("source"),
        "format_version": s.attrs.get("format_version"),
        "histodg_version": s.attrs.get("histodg_version"),
    }
    if out["compression"] == "jpeg":
        out["jpeg_quality"] = s.attrs.get("jpeg_quality")
        out["source_tiles_copied"] = s.attrs.get("source_tiles_copied")
    return out


def find_stores(paths) -> list[Path]:
    """Expand store paths, folders of stores (recursively) and CSV lists (a `path` or `store`
    column, relative to the CSV) into store paths."""
    found = []
    for p in paths:
        p = Path(p)
        if p.is_file() and p.suffix.lower() == ".csv":
            found.extend(_stores_from_csv(p))
        elif (p / "zarr.json").is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(q for q in p.rglob("*.zarr") if (q / "zarr.json").is_file()))
        else:
            raise StoreError(p, "not a patch store, a folder of stores or a CSV list of stores")
    return found


def _stores_from_csv(path: Path) -> list[Path]:
    import csv

    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
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
