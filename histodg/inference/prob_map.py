"""`prob.zarr`: the stitched tumour probability, uint8 0-255 at the model's resolution, chunked.

`ProbabilityMap.on_final` receives each finished stitching chunk (from `ChunkAccumulator`),
counts its tumour pixels and hands non-empty chunks to a writer thread (zarr costs ~2 ms of
Python per chunk, which then hides behind the model); chunks without any probability are never
written (they read back as 0, the fill value).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .rasters import threshold_u8

MAX_QUEUED_WRITES = 32
NAME = "prob.zarr"
CLASSES = "classes.zarr"
CLASS_PROBS = "class_prob.zarr"  # a group: one uint8 array per annotated label ("1", "2", ...)


def open_probability(prediction_dir: Path):
    """A finished prediction's probability map (read-only zarr array, uint8 0-255)."""
    import zarr

    return zarr.open_array(str(Path(prediction_dir) / NAME), mode="r")


def open_classes(prediction_dir: Path):
    """A multi-class prediction's label map (`classes.zarr`, uint8 labels), or None for a binary model's."""
    import zarr

    path = Path(prediction_dir) / CLASSES
    return zarr.open_array(str(path), mode="r") if path.exists() else None


class ProbabilityMap:
    """prob.zarr (and for a multi-class model classes.zarr: at each pixel the label of the most
    probable class among the annotated ones where the foreground probability reaches the threshold,
    else 0), written chunk by chunk as stitching finishes them."""

    def __init__(self, path: Path, shape: tuple[int, int], chunk: int, attrs: dict, threshold: float, classes: int = 1,
                 class_probs: bool = False):
        import zarr

        h, w = shape
        self.chunk = chunk
        chunks = (min(chunk, h), min(chunk, w))
        self.array = zarr.create_array(str(path), shape=(h, w), chunks=chunks, dtype="uint8", fill_value=0)
        self.array.update_attributes({**attrs, "threshold": threshold, "threshold_u8": threshold_u8(threshold),
                                      "meaning": "tumour (foreground) probability x 255; 0 where no window ran"})
        self.labels = None
        if classes > 1:
            self.labels = zarr.create_array(str(Path(path).parent / CLASSES), shape=(h, w), chunks=chunks, dtype="uint8",
                                            fill_value=0)
            self.labels.update_attributes({**attrs, "meaning": "the most probable annotated class's label where the "
                                                               "foreground probability reaches the threshold, else 0"})
        self.class_probs: dict[int, object] = {}  # --outputs prob-tiff on a multi-class model: each class's probability x 255
        if classes > 1 and class_probs:
            group = zarr.open_group(str(Path(path).parent / CLASS_PROBS), mode="w")
            for k in range(1, classes):
                self.class_probs[k] = group.create_array(str(k), shape=(h, w), chunks=chunks, dtype="uint8", fill_value=0)
        self.class_px = np.zeros(max(classes, 2), np.int64)  # pixels of each label (0: background and uncovered)
        self.cut = threshold_u8(threshold)
        self.tumor_px = 0
        self.write_seconds = 0.0
        self.nonempty: set[tuple[int, int]] = set()
        self.inside: Callable[..., np.ndarray] | None = None  # --roi: (y0, x0, h, w) -> bool mask of the region on the map; outside is 0
        self._writes: deque = deque()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histodg-prob")

    def _write(self, y0: int, x0: int, u8: np.ndarray, labels: np.ndarray | None, per_class: dict) -> float:
        t = time.perf_counter()
        rows, cols = slice(y0, y0 + u8.shape[0]), slice(x0, x0 + u8.shape[1])
        self.array[rows, cols] = u8
        if labels is not None and self.labels is not None:
            self.labels[rows, cols] = labels
        for k, plane in per_class.items():
            self.class_probs[k][rows, cols] = plane  # type: ignore[index]
        return time.perf_counter() - t

    def _collect(self, block: bool) -> None:
        while self._writes and (block or self._writes[0].done()):
            self.write_seconds += self._writes.popleft().result()

    def on_final(self, cy: int, cx: int, p: np.ndarray) -> None:
        """A finished chunk: (h, w) foreground probability, or a multi-class model's (C, h, w) class
        probabilities (all 0 where no window ran)."""
        labels, per_class = None, {}
        if p.ndim == 3:
            covered = p.sum(0) > 0.5  # the softmax sums to 1 where a window ran
            fg = np.where(covered, 1.0 - p[0], 0.0)
            labels = (np.argmax(p[1:], 0) + 1).astype(np.uint8)
            per_class = {k: (p[k] * 255 + 0.5).astype(np.uint8) for k in self.class_probs}
            p = fg
        u8 = (p * 255 + 0.5).astype(np.uint8)
        if self.inside is not None:
            outside = ~self.inside(cy * self.chunk, cx * self.chunk, *u8.shape)
            u8[outside] = 0
            for plane in per_class.values():
                plane[outside] = 0
        hit = u8 >= self.cut
        self.tumor_px += int(np.count_nonzero(hit))
        if labels is not None:
            labels[~hit] = 0
            self.class_px += np.bincount(labels.ravel(), minlength=len(self.class_px))[: len(self.class_px)]
        else:
            self.class_px[1] += int(np.count_nonzero(hit))
        if u8.any():
            self.nonempty.add((cy, cx))
            self._writes.append(self._pool.submit(self._write, cy * self.chunk, cx * self.chunk, u8, labels, per_class))
            self._collect(block=len(self._writes) > MAX_QUEUED_WRITES)

    def flush(self) -> None:
        """Wait for every queued chunk to be written."""
        self._collect(block=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
