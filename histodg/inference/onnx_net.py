"""`predict --runtime onnx`: the predictor's network run by onnxruntime on the CPU.

    net = OnnxNetwork(model, tile, meter)   # exports `model` once (torch.onnx, dynamo), in memory
    logits = net(x)                          # normalised (N, 3, T, T) float32 -> (N, C, T, T) logits

Why: on a CPU, eager PyTorch runs EfficientNet-Lite0's depthwise convolutions far below what the
machine can do; onnxruntime on the same graph is about 2.5x faster (BENCHMARKS.md, "CPU runtimes").
Only the network moves: reading, normalisation (stain included), flips, sigmoid / softmax and
stitching stay histodg's, so the outputs are the torch runtime's within float32 rounding.

What stays the torch model's. The graph keeps every BatchNorm layer's four tensors as named
initializers (the export is not optimised, so they are not folded into the convolutions), and
before each call the values the torch model would use now are read: the layer's own, or its DSBN
slot when a `domain(...)` route is set; statistics re-estimated on a slide (`--adapt bn`) or
tent's BatchNorm weights. Each new set of values (by content) builds one onnxruntime session (its
optimiser then folds them into the convolutions: about 0.1 s), so a slide costs one or two
sessions (its adapted statistics; the checkpoint's, for the shift meter's unadapted pass) and the
slots of a DSBN model's known domains are kept (`CACHED_SESSIONS`). Training-mode passes (the
adaptation's estimation, tent's steps) stay torch's (`runs_now`).

The domain-shift meter. The graph also returns each encoder stage's per-channel sum and sum of
squares (`model.shift.stage_sums`), handed to the `FeatureMeter` as its hook would have measured them.
"""
from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..model.shift import stage_features, stage_sums

OPSET = 18
CACHED_SESSIONS = 4  # BatchNorm states kept as sessions: a DSBN model's slots, the shared one
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
SLOT_TENSORS = ("domain_weight", "domain_bias", "domain_mean", "domain_var")


def available() -> str | None:
    """None when onnxruntime can run here, else why not (found, not imported: that costs a second
    and a half, paid only when a slide runs on it)."""
    from importlib.util import find_spec

    for name in ("onnxruntime", "onnxscript"):
        if find_spec(name) is None:
            return f"onnxruntime is not installed ({name})"
    return None


class _Graph(nn.Module):
    """What is exported: normalised input -> (logits, then per stage its sums and sums of squares)."""

    def __init__(self, net: nn.Module, stages: bool):
        super().__init__()
        self.net = net
        self.stages = stages
        self._features: list = []

    def keep(self, module, inputs, features) -> None:
        self._features = features

    def forward(self, x):
        logits = self.net(x)
        if not self.stages:
            return (logits,)
        out = [logits]
        for f in stage_features(self._features):
            out.extend(stage_sums(f))
        return tuple(out)


def _layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]


class OnnxNetwork:
    """`model` (in eval mode) exported once; called like the network, with the torch model's current
    BatchNorm statistics. `meter`: the predictor's `FeatureMeter` (None without a shift reference)."""

    def __init__(self, model: nn.Module, tile: int, meter=None, threads: int | None = None):
        self.model, self.meter = model, meter
        self.encoder: nn.Module = model.encoder  # type: ignore[assignment]
        self.threads = threads or torch.get_num_threads()
        self.layers = _layers(model)
        self._spatial = self._stage_positions(tile)
        self.proto = self._export(tile)
        index = {t.name: i for i, t in enumerate(self.proto.graph.initializer)}
        missing = [f"net.{n}.{k}" for n, m in self.layers for k in BN_TENSORS
                   if getattr(m, k) is not None and f"net.{n}.{k}" not in index]
        if missing:  # an exporter that renames or folds them: the statistics could not follow the model
            raise RuntimeError(f"the exported graph has no initializer {missing[0]}")
        self._index = index
        self._sessions: OrderedDict = OrderedDict()

    def _stage_positions(self, tile: int) -> list[int]:
        """Positions per window at each encoder stage (for the meter's counts)."""
        if self.meter is None:
            return []
        found = []
        hook = self.encoder.register_forward_hook(lambda m, i, f: found.extend(stage_features(f)))
        try:
            with torch.inference_mode(), self.meter.paused():
                self.model(torch.zeros(1, 3, tile, tile))
        finally:
            hook.remove()
        return [int(f.shape[2] * f.shape[3]) for f in found]

    def _export(self, tile: int):
        import onnxscript.optimizer as optimizer

        from ..model.domain_bn import domain

        graph = _Graph(self.model, stages=self.meter is not None).eval()
        hook = self.encoder.register_forward_hook(graph.keep) if graph.stages else None
        example = torch.zeros(2, 3, tile, tile)
        try:
            # every layer's own tensors in the graph (a slide's DSBN route is set by then: not that slot's)
            with warnings.catch_warnings(), (self.meter.paused() if self.meter is not None else nullcontext()), \
                    domain(self.model, None):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(graph, (example,), dynamo=True, input_names=["x"], opset_version=OPSET,
                                            dynamic_shapes={"x": {0: torch.export.Dim("N", min=1, max=4096)}},
                                            optimize=False, verbose=False)
        finally:
            if hook is not None:
                hook.remove()
        # fold what only depends on constants (a bias-free convolution's zero bias), never the
        # BatchNorm statistics, which stay initializers
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        optimizer.fold_constants(program.model)
        optimizer.remove_unused_nodes(program.model)
        return program.model_proto

    # -- the BatchNorm the torch model would use now -------------------------------------------------
    def runs_now(self) -> bool:
        """Whether the torch model is as this graph computes it: in eval mode, every BatchNorm too
        (an adaptation's estimating pass puts only its BatchNorm layers in training mode)."""
        return not self.model.training and not any(m.training for _, m in self.layers)

    def _values(self) -> dict[str, np.ndarray]:
        values = {}
        for name, m in self.layers:
            route = getattr(m, "route", None)
            if route is not None and not isinstance(route, int):
                raise RuntimeError("a batch of several domains is a training pass: it runs in torch")
            for k, slot_key in zip(BN_TENSORS, SLOT_TENSORS):
                t = getattr(m, k) if route is None else getattr(m, slot_key)[route]
                if t is not None:
                    values[f"net.{name}.{k}"] = t.detach().float().cpu().numpy()
        return values

    def _session(self):
        import onnxruntime
        from onnx import numpy_helper

        values = self._values()
        digest = hashlib.blake2b(digest_size=16)  # the values themselves: a slot, a slide's statistics, the checkpoint's
        for array in values.values():
            digest.update(array.tobytes())
        key = digest.digest()
        if key in self._sessions:
            self._sessions.move_to_end(key)
            return self._sessions[key]
        for name, array in values.items():
            self.proto.graph.initializer[self._index[name]].CopyFrom(numpy_helper.from_array(array, name))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        options.log_severity_level = 3  # no optimiser chatter on the console
        session = onnxruntime.InferenceSession(self.proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self._sessions[key] = session
        while len(self._sessions) > CACHED_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self._session().run(None, {"x": np.ascontiguousarray(x.detach().float().cpu().numpy())})
        if self.meter is not None:
            n = x.shape[0]
            sums = [torch.from_numpy(a) for a in outputs[1:]]
            self.meter.add([(float(n * p), sums[2 * i], sums[2 * i + 1]) for i, p in enumerate(self._spatial)], n)
        return torch.from_numpy(outputs[0])

