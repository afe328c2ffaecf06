"""A model ready for windows: device, precision, normalisation, flips, Gaussian weights.

    predictor = Predictor.from_checkpoint("runs/a/best.pt", PredictOptions(tta="flip"))
    prob = predictor.probabilities(batch)        # (N, T, T, 3) uint8 -> (N, T, T) float32 on the device

Probability. Binary models (1 output channel): sigmoid. Multi-class models: the foreground
probability 1 - softmax[background], so ``prob.zarr`` and the mask always mean "tumour / any
annotated class"; `weighted` (what is stitched) is then the whole softmax, so that each class's
label can be kept (`prob_map.ProbabilityMap`'s classes.zarr). `--tta flip`: the mean over the four flips (none, horizontal, vertical, both),
each flipped back. On CUDA: bf16 autocast, channels_last, pinned host buffers.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import HistodgError, exc_line
from ..device import HostTransfers, autocast, bind_device, place_model, resolve_device, resolve_placement
from ..files import file_sha256
from ..model.config import ModelConfig
from ..model.stain import resolve_stain
from .options import PredictOptions
from .stitching import gaussian_map

if TYPE_CHECKING:
    from .onnx_net import OnnxNetwork

# --runtime auto: onnxruntime for a slide of at least this many windows on a CPU. Exporting costs about
# as much as 150 windows of the default network in eager torch and saves 60% of each (BENCHMARKS.md)
AUTO_ONNX_WINDOWS = 500


class PredictError(HistodgError):
    """A prediction cannot be made or an existing output cannot be reused."""


@dataclass
class ShiftScore:
    """A slide's domain-shift score, once `Predictor.shift_of_slide` has left (None: no reference)."""

    score: dict | None = None


class Predictor:
    """`model` is any module mapping (N, 3, T, T) normalised floats to (N, C, T, T) logits,
    described by `config` (classes, mpp, tile size, normalisation)."""

    def __init__(self, model, config: ModelConfig, options: PredictOptions = PredictOptions(),
                 checkpoint: str | None = None, checkpoint_sha256: str | None = None):
        import torch

        from ..model.normalize import Normalizer

        self.options = options
        self.checkpoint = checkpoint
        self.checkpoint_sha256 = checkpoint_sha256  # what the weights are, whatever the path
        self.config = config
        where = checkpoint or "model"
        self.placement = resolve_placement(resolve_device(options.device, where, PredictError), options.amp, "auto")
        self.device, self.cuda = self.placement.device, self.placement.cuda
        bind_device(self.device)  # cuda:1's streams and events, not cuda:0's
        self.classes = config.classes
        self.mpp = float(options.mpp if options.mpp is not None else (config.mpp or 0)) or None
        if self.mpp is None:
            raise PredictError(where, "the checkpoint records no mpp: pass --mpp")
        self.tile = int(options.tile_size or config.tile_size or 0)
        if not self.tile:
            raise PredictError(where, "the checkpoint records no tile size: pass --tile-size")
        try:
            self.overlap = options.overlap_px(self.tile)
        except ValueError as exc:
            raise PredictError(where, str(exc)) from None
        self.stride = self.tile - self.overlap
        norm = config.normalization
        try:
            self.stain = resolve_stain(options.stain_norm, options.stain_ref, norm.stain)
        except ValueError as exc:
            raise PredictError(options.stain_ref or where, str(exc)) from None
        self.normalizer = Normalizer(norm.mean, norm.std, self.device, self.placement.channels_last, self.stain)
        self.model = place_model(model.eval(), self.placement)
        shape = (options.batch_size, self.tile, self.tile) if config.classes == 1 else (
            options.batch_size, config.classes, self.tile, self.tile)
        self.transfers = HostTransfers(self.device, shape)  # results to the host
        self.gaussian = gaussian_map(self.tile)
        self._gaussian_dev = torch.from_numpy(self.gaussian).to(self.device)
        self.onnx: OnnxNetwork | None = None  # --runtime: the network on onnxruntime, once exported
        self.onnx_unavailable: str | None = None  # why onnx cannot run here (auto then runs torch)
        self.onnx_export_s = 0.0  # how long the export took
        self._use_onnx = False
        self._check_shapes()
        self.meter = None  # the domain-shift score's feature statistics (model.shift), when the checkpoint has a reference
        if config.shift:
            from ..model.shift import FeatureMeter

            self.meter = FeatureMeter(self.model)
        self._prepare_runtime(where)
        if options.adapt in ("bn", "tent"):
            from ..model.batchnorm import batchnorm_layers

            if not batchnorm_layers(self.model):
                raise PredictError(where, f"--adapt {options.adapt}: this model ({config.arch}-{config.encoder}) has no BatchNorm layers "
                                          f"(transformer encoders such as MiT normalise with LayerNorm); predict without --adapt")

    def _prepare_runtime(self, where: str) -> None:
        """`--runtime`: onnx is exported now (its errors are the checkpoint's, in one line); auto
        exports on the first slide that is large enough (`runtime_for`)."""
        runtime = self.options.runtime
        if runtime == "torch":
            return
        from . import onnx_net

        why = onnx_net.available()
        if self.device.type != "cpu" or self.placement.amp_dtype is not None:
            why = f"onnxruntime runs here on the CPU in float32, not on {self.device}" + (
                " with autocast" if self.placement.amp_dtype is not None else "")
        self.onnx_unavailable = why
        if runtime == "onnx":
            if why:
                raise PredictError(where, f"--runtime onnx: {why}; use --runtime torch")
            self._build_onnx(where)

    def _build_onnx(self, where: str) -> None:
        from .onnx_net import OnnxNetwork

        t = time.perf_counter()
        try:
            self.onnx = OnnxNetwork(self.model, self.tile, self.meter)
            self.onnx_export_s = time.perf_counter() - t
        except Exception as exc:  # an exporter or runtime that cannot take this network
            self.onnx_unavailable = f"the model could not be exported to onnxruntime ({exc_line(exc)})"
            if self.options.runtime == "onnx":
                raise PredictError(where, f"--runtime onnx: {self.onnx_unavailable}; use --runtime torch") from None

    @contextmanager
    def runtime_for(self, windows: int):
        """Inside: one slide's prediction pass of `windows` windows, run by the runtime `--runtime`
        chose for it; yields its name for done.json ("torch" or "onnx"). auto: onnx on a CPU for
        slides of at least `AUTO_ONNX_WINDOWS` windows (the export, once per run, then pays for itself)."""
        use = self.options.runtime == "onnx" or (
            self.options.runtime == "auto" and self.onnx_unavailable is None and windows >= AUTO_ONNX_WINDOWS)
        if use and self.onnx is None:
            self._build_onnx(self.checkpoint or "model")
        self._use_onnx = use and self.onnx is not None
        try:
            yield "onnx" if self._use_onnx else "torch"
        finally:
            self._use_onnx = False

    @classmethod
    def from_checkpoint(cls, path, options: PredictOptions = PredictOptions()) -> Predictor:
        from ..model.checkpoint import load_checkpoint, model_from_checkpoint

        model, config = model_from_checkpoint(load_checkpoint(path), path)
        return cls(model, config, options, checkpoint=str(Path(path).resolve()), checkpoint_sha256=file_sha256(path))

    def _check_shapes(self) -> None:
        """One forward on a blank window: a tile size the network cannot take fails here, clearly."""
        import torch

        x = torch.full((1, self.tile, self.tile, 3), 255, dtype=torch.uint8)
        where = self.checkpoint or "model"
        try:
            out = self._logits(x.to(self.device))
        except RuntimeError as exc:
            raise PredictError(where, f"the model cannot take {self.tile} px windows "
                                      f"({exc_line(exc)}); try a multiple of 32") from None
        if tuple(out.shape[-2:]) != (self.tile, self.tile) or out.shape[1] != self.classes:
            raise PredictError(where, f"the model maps a {self.tile} px window to {tuple(out.shape)}, "
                                      f"expected (1, {self.classes}, {self.tile}, {self.tile})")

    def model_input(self, batch_nhwc):
        """(N, T, T, 3) uint8 on any device -> the model's normalised input, on its device, in its layout."""
        x = self.normalizer(batch_nhwc.to(self.device).permute(0, 3, 1, 2))
        return x if self.placement.channels_last else x.contiguous()

    def _logits(self, x_nhwc):
        import torch

        x = self.model_input(x_nhwc)
        with torch.inference_mode(), autocast(self.placement):
            return self.network(x)

    def network(self, x):
        """The network on model-ready input, by the slide's runtime: onnxruntime inside `runtime_for`
        when it chose onnx and the model is in eval mode, else the torch model."""
        if self._use_onnx and self.onnx is not None and self.onnx.runs_now():
            return self.onnx(x)
        return self.model(x)

    def _prob(self, logits):
        import torch

        logits = logits.float()
        if self.classes == 1:
            return torch.sigmoid(logits[:, 0])
        return 1.0 - torch.softmax(logits, dim=1)[:, 0]

    def _class_prob(self, logits):
        import torch

        return torch.softmax(logits.float(), dim=1)

    def _averaged(self, batch, per_pass):
        """`per_pass(logits)` -> (N, [C,] H, W) on `batch`, averaged over `--tta`'s flips (each flipped back)."""
        import torch

        x = batch.to(self.device, non_blocking=True)
        with torch.inference_mode():
            if self.options.tta == "none":
                return per_pass(self._logits(x))
            total = None
            for dims in ((), (2,), (1,), (1, 2)):  # NHWC: 2 = width, 1 = height
                # the shift score counts each window once, and measures every flip
                with self.meter.flip(first=not dims) if self.meter is not None else nullcontext():
                    xi = x.flip(dims) if dims else x
                    p = per_pass(self._logits(xi))
                if dims:  # (N, H, W): the same dims; (N, C, H, W): one further on
                    p = p.flip(tuple(d + p.dim() - 3 for d in dims))
                total = p if total is None else total + p
            return total / 4

    def probabilities(self, batch):
        """(N, T, T, 3) uint8 (any device) -> (N, T, T) float32 foreground probability on the device."""
        return self._averaged(batch, self._prob)

    def class_probabilities(self, batch):
        """(N, T, T, 3) uint8 -> (N, C, T, T) float32 softmax of a multi-class model (label k in channel k)."""
        return self._averaged(batch, self._class_prob)

    @property
    def channels(self) -> int:
        """What a window's stitched output holds: 1 (the foreground probability) for a binary model,
        the classes' probabilities for a multi-class one."""
        return 1 if self.classes == 1 else self.classes

    def weighted(self, batch):
        """Probabilities times the Gaussian importance map (on the device): (N, T, T), or (N, C, T, T)
        of the class probabilities for a multi-class model."""
        import torch

        with torch.inference_mode():
            if self.classes == 1:
                return self.probabilities(batch) * self._gaussian_dev
            return self.class_probabilities(batch) * self._gaussian_dev

    def new_batch(self):
        import torch

        return torch.empty((self.options.batch_size, self.tile, self.tile, 3), dtype=torch.uint8, pin_memory=self.cuda)

    @contextmanager
    def shift_of_slide(self):
        """Inside: one slide's (or store's) forwards measured for its domain-shift score; yields a
        `ShiftScore` whose `score` (`model.shift.slide_shift`; None without a reference) is set on
        leaving."""
        found = ShiftScore()
        if self.meter is None or self.config.shift is None:  # a meter is made only for a checkpoint with a reference
            yield found
            return
        from ..model.shift import slide_shift

        with self.meter.one_slide():
            yield found
            windows = self.meter.images
            found.score = slide_shift(self.config.shift, self.meter.take(), windows)

    def describe(self) -> dict:
        mc = self.config
        return {"checkpoint": self.checkpoint, "checkpoint_sha256": self.checkpoint_sha256, "arch": mc.arch,
                "encoder": mc.encoder, "classes": self.classes, "labels": mc.labels, "method": mc.method,
                "trained_mpp": mc.mpp, "trained_tile_size": mc.tile_size, "adapt": self.options.adapt}
