"""Writing a patch store: resumable, a shard at a time, in zarr's own byte format.

    w = StoreWriter(path, StoreAttrs(tile_size=512, mpp=0.5, ...), capacity=n, with_masks=True).create()
    w.append(w.encode(image, mask), xy, tissue, plan_done=i + 1)   # the writer flushes and commits
    w.add_qc(flags, kept=True)                                       # --qc: every window examined, in plan order
    w.finish({"tissue_area_mm2": 1.2})                               # trim, then complete: true, last

Each patch is one chunk inside shards of `shard_patches` patches (zarr v3 sharding): a patch
is compressed by the thread that read it (`encode`, blosc and JPEG release the GIL), and a
full shard is written as one file by `ShardEncoder`, so zarr's per-chunk Python cost stays off
the hot path. Reading goes through zarr as usual.

Resuming: when a shard is written and `COMMIT_SECONDS` have passed since the last commit, the
writer journals how many patches are durably written and how far through the caller's plan
they reach (``histodg_progress.json``, replaced atomically), so an interruption loses at most
that much work; `StoreWriter.resume` reopens an unfinished store at its last commit.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..batch import bad_window
from ..files import atomic_write, write_json_atomic
from ..qc_report import QCReport
from .codecs import patch_encoder, registered_zarr, zarr_compressor, zarr_serializer
from .integrity import MISSING, shard_file
from .reader import StoreError
from .schema import FORMAT_VERSION, PROGRESS_FILE, StoreAttrs

SHARD_BYTES = 48 * 2**20
COMMIT_SECONDS = 2.0  # how often the journal advances: an interruption loses at most this much work


def shard_patches(tile_size: int) -> int:
    """Patches per shard: about SHARD_BYTES of raw RGB, a power of two, 1-1024."""
    n = max(1, SHARD_BYTES // (tile_size * tile_size * 3))
    return int(min(1024, 2 ** int(np.log2(n))))


class ShardEncoder:
    """Writes whole shards of one sharded zarr v3 array directly, in zarr's own byte format.

    A shard is the compressed chunks, then the index of (offset, nbytes) little-endian uint64
    pairs with its crc32c appended (the `sharding_indexed` codec with index_location "end").
    """

    def __init__(self, array_dir: Path, shard: int, encoder):
        self.array_dir = array_dir
        self.shard = shard
        self.encoder = encoder

    def encode(self, chunk: np.ndarray) -> bytes:
        return self.encoder.encode(np.ascontiguousarray(chunk))

    def key(self, shard_index: int) -> Path:
        return shard_file(self.array_dir, shard_index)

    def write(self, shard_index: int, chunks: list[bytes]) -> None:
        import google_crc32c

        index = np.full((self.shard, 2), MISSING, dtype="<u8")
        offset = 0
        for i, c in enumerate(chunks):
            index[i] = (offset, len(c))
            offset += len(c)
        raw = index.tobytes()
        crc = np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()
        path = self.key(shard_index)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp):
            with open(tmp, "wb") as f:
                for c in chunks:
                    f.write(c)
                f.write(raw)
                f.write(crc)

        atomic_write(path, write)


class StoreWriter:
    """Create (or resume) a store of at most `capacity` patches; encode, append, finish."""

    def __init__(self, path: Path, attrs: StoreAttrs, capacity: int, with_masks: bool):
        self.path = Path(path)
        self.attrs = attrs
        self.tile_size = attrs.tile_size
        self.with_masks = with_masks
        self.shard = shard_patches(self.tile_size)
        self.capacity = max(int(capacity), 1)
        self.count = 0  # patches durably written
        self.plan_done = 0  # caller's plan position matching `count`
        self.copied = 0  # patches stored as the source's own JPEG tile (--compression jpeg)
        self.bad: list[dict] = []
        self.qc = QCReport()  # --qc, so far
        self.with_qc = attrs.qc not in (None, "off")
        self._buf: tuple[list, list, list, list, list] = ([], [], [], [], [])  # images, masks, xy, tissue, qc
        # coords/tissue/qc of flushed shards not yet written: zarr costs ~8 ms of GIL-holding Python
        # per write, so they go out at commits, not at every shard
        self._pending: tuple[list, list, list] = ([], [], [])
        self._group = None
        self._encoder = patch_encoder(attrs.compression, attrs.jpeg_quality or 90)
        self._last_commit = time.monotonic()

    # -- create / resume --------------------------------------------------------------------
    def create(self) -> StoreWriter:
        zarr = registered_zarr()
        if self.path.exists():
            shutil.rmtree(self.path)
        g = zarr.open_group(str(self.path), mode="w")
        s, n, k, comp = self.tile_size, self.capacity, self.shard, self.attrs.compression
        g.create_array("images", shape=(n, s, s, 3), chunks=(1, s, s, 3), shards=(k, s, s, 3), dtype="uint8",
                       compressors=zarr_compressor(comp), serializer=zarr_serializer(comp, self.attrs.jpeg_quality or 90))
        if self.with_masks:
            g.create_array("masks", shape=(n, s, s), chunks=(1, s, s), shards=(k, s, s), dtype="uint8",
                           compressors=zarr_compressor())  # masks always compress ~100x
        g.create_array("coords", shape=(n, 2), chunks=(min(n, 65536), 2), dtype="int64")
        g.create_array("tissue", shape=(n,), chunks=(min(n, 65536),), dtype="float32")
        if self.with_qc:
            g.create_array("qc", shape=(n,), chunks=(min(n, 65536),), dtype="uint8")
        self.attrs = self.attrs.replace(format_version=FORMAT_VERSION, histodg_version=__version__, complete=False)
        attrs = self.attrs.to_attrs()
        for key in ("bad_windows", "n_patches", "tissue_area_mm2", "qc_report") + ("source_tiles_copied", "source_tiles_not_copied"):
            attrs.pop(key, None)  # written by finish()
        g.update_attributes(attrs)  # writes zarr.json once; attrs.update would rewrite it for every key
        self._group = g
        self._open_encoders()
        self._journal()
        return self

    def _open_encoders(self) -> None:
        self._enc_img = ShardEncoder(self.path / "images", self.shard, self._encoder)
        self._enc_mask = ShardEncoder(self.path / "masks", self.shard, patch_encoder()) if self.with_masks else None

    @classmethod
    def resume(cls, path: Path) -> StoreWriter:
        """Reopen an unfinished store at its last committed shard."""
        g = registered_zarr().open_group(str(path), mode="r+")
        progress = json.loads((Path(path) / PROGRESS_FILE).read_text())
        w = cls(path, StoreAttrs.from_attrs(dict(g.attrs)), g["images"].shape[0], "masks" in g)
        w._group = g
        w.count, w.plan_done, w.bad = progress["count"], progress["plan_done"], progress["bad"]
        w.copied = int(progress.get("copied", 0))
        w.qc = QCReport.from_dict(progress.get("qc"))
        w.with_qc = "qc" in g
        w._open_encoders()
        return w

    # -- write ----------------------------------------------------------------------------------
    def encode(self, image: np.ndarray | None, mask: np.ndarray | None, image_bytes: bytes | None = None
               ) -> tuple[bytes, bytes | None]:
        """Compress one patch (and mask); safe to call from many threads. `image_bytes` is a patch
        already in the store's image encoding (a source JPEG tile for --compression jpeg)."""
        img = image_bytes if image_bytes is not None else self._enc_img.encode(image)
        return img, (self._enc_mask.encode(mask) if self.with_masks else None)

    def add_qc(self, flags: int, kept: bool) -> None:
        """Count one examined window's artefact flags (in plan order, before its `append` if kept);
        `excluded` counts the flagged ones left out."""
        self.qc.add(flags, kept)

    def append(self, encoded: tuple[bytes, bytes | None], xy, tissue: float, copied: bool = False,
               plan_done: int | None = None, qc: int = 0) -> None:
        """Add one encoded patch, in plan order; `plan_done` is the caller's plan position after it.
        A full shard is written at once, and journalled when COMMIT_SECONDS have passed."""
        images, masks, xys, tissues, qcs = self._buf
        qcs.append(int(qc))
        self.copied += bool(copied)
        images.append(encoded[0])
        if self.with_masks:
            masks.append(encoded[1])
        xys.append((int(xy[0]), int(xy[1])))
        tissues.append(float(tissue))
        if len(images) >= self.shard:
            self.flush()
            if plan_done is not None and time.monotonic() - self._last_commit >= COMMIT_SECONDS:
                self.commit(plan_done)

    def flush(self) -> None:
        """Write the buffered patches as one shard (the last one of a store may be partial)."""
        images, masks, xys, tissues, qcs = self._buf
        n = len(images)
        if not n:
            return
        a, b = self.count, self.count + n
        if b > self.capacity:
            raise StoreError(self.path, f"more patches ({b}) than planned ({self.capacity})")
        if a % self.shard:
            raise StoreError(self.path, "internal error: shards must be written whole")
        self._enc_img.write(a // self.shard, images)
        if self.with_masks:
            self._enc_mask.write(a // self.shard, masks)
        self._pending[0].extend(xys)
        self._pending[1].extend(tissues)
        self._pending[2].extend(qcs)
        self.count = b
        self._buf = ([], [], [], [], [])

    def _write_pending(self) -> None:
        xys, tissues, qcs = self._pending
        if xys:
            g, a = self._group, self.count - len(xys)
            g["coords"][a:self.count] = np.asarray(xys, np.int64)
            g["tissue"][a:self.count] = np.asarray(tissues, np.float32)
            if self.with_qc:
                g["qc"][a:self.count] = np.asarray(qcs, np.uint8)
            self._pending = ([], [], [])

    def commit(self, plan_done: int) -> None:
        """Record that the flushed patches, up to plan position `plan_done`, are durably written
        (their coords and tissue too). Only committed patches survive an interruption."""
        self._write_pending()
        self.plan_done = int(plan_done)
        self._journal()
        self._last_commit = time.monotonic()

    def add_bad(self, xy, reason: str) -> None:
        self.bad.append(bad_window(xy, reason))

    def _journal(self) -> None:
        write_json_atomic(self.path / PROGRESS_FILE, {"count": self.count, "plan_done": self.plan_done, "bad": self.bad,
                                                      "copied": self.copied, "qc": self.qc.to_dict()}, indent=None)

    def finish(self, extra_attrs: dict | None = None) -> None:
        """Trim the arrays to the patches written, write the final attributes, then mark the
        store complete (a write of its own, the last one)."""
        self.flush()
        self._write_pending()
        g, n = self._group, self.count
        for name in ("images", "masks", "coords", "tissue", "qc"):
            if name in g:
                arr = g[name]
                arr.resize((n,) + arr.shape[1:])
        extra = dict(extra_attrs or {})
        thresholds = extra.pop("qc_thresholds", None)  # the QC's thresholds join its counts in qc_report
        self.qc.thresholds = thresholds
        qc_report = self.qc.to_dict() if self.with_qc else None
        final = self.attrs.replace(**extra, qc_report=qc_report, bad_windows=self.bad, n_patches=n,
                                   source_tiles_copied=self.copied if self.attrs.compression == "jpeg" else None)
        attrs = final.to_attrs()
        g.update_attributes({k: attrs[k] for k in attrs if k != "complete"})
        g.update_attributes({"complete": True})
        self.attrs = final.replace(complete=True)
        (self.path / PROGRESS_FILE).unlink(missing_ok=True)
