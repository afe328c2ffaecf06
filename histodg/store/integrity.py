"""Is a store's data all there? Shard files, their indexes, and (deep) every chunk.

zarr reads a missing shard or chunk as its fill value (a black patch, an all-background mask)
without a word, and reports a truncated shard as a checksum error deep in its codec pipeline.
histodg's shards (written by `writer.ShardEncoder`) are the compressed chunks followed by an
index of (offset, nbytes) little-endian uint64 pairs and the index's crc32c, so what makes a
store whole can be checked cheaply, without decoding:

- `shard_problem(path, meta)`: every shard file of `images` and `masks` is present, its index
  checksum holds, and every patch of the store has an entry that lies inside the file. Readers
  run it when they open a complete store (`reader.open_store`): a few hundred bytes per shard.
- the deep check, every patch of every array decoded (`histodg info --check`), is `check.py`'s.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHARDED = ("images", "masks")
MISSING = 2**64 - 1  # an index entry for a chunk that was never written


def shard_file(array_dir: Path, index: int) -> Path:
    """Where shard `index` (along the patch axis) of the array in `array_dir` is stored."""
    meta = json.loads((array_dir / "zarr.json").read_text())
    enc = meta["chunk_key_encoding"]
    sep = (enc.get("configuration") or {}).get("separator", "/")
    prefix = ["c"] if enc["name"] == "default" else []
    return array_dir / sep.join(prefix + [str(index)] + ["0"] * (len(meta["shape"]) - 1))


def read_index(path: Path, chunks: int) -> np.ndarray | None:
    """The (chunks, 2) index at the end of a shard file, or None if its checksum fails."""
    import google_crc32c

    size = chunks * 16 + 4
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() < size:
            return None
        f.seek(-size, 2)
        tail = f.read(size)
    raw, crc = tail[:-4], np.frombuffer(tail[-4:], "<u4")[0]
    if google_crc32c.value(raw) != int(crc):
        return None
    return np.frombuffer(raw, "<u8").reshape(chunks, 2)


def shard_problem(path: Path, meta) -> str | None:
    """The first thing missing or damaged in the shards of a complete store, or None (`meta`:
    its `metadata.StoreMetadata`)."""
    return next(shard_problems(path, meta), None)


def shard_problems(path: Path, meta):
    """Yield what is missing or damaged in the shards of a complete store (one line per shard)."""
    for name in SHARDED:
        if name not in meta.arrays:
            continue
        n, rows = meta.arrays[name].rows, meta.arrays[name].rows_per_shard
        for s in range(-(-n // rows)):
            first, last = s * rows, min(n, (s + 1) * rows) - 1
            f = shard_file(path / name, s)
            where = f"{name} shard {f.relative_to(path)} (patches {first}-{last})"
            if not f.is_file():
                yield f"{where} is missing"
                continue
            index = read_index(f, rows)
            if index is None:
                yield f"{where} is truncated or damaged (its index checksum fails)"
                continue
            data_end = f.stat().st_size - (rows * 16 + 4)
            for k in range(last - first + 1):
                offset, nbytes = (int(v) for v in index[k])
                if offset == MISSING:
                    yield f"{name} patch {first + k} was never written ({where})"
                    break
                if offset + nbytes > data_end:
                    yield f"{name} patch {first + k} lies past the end of {where}: truncated"
                    break
