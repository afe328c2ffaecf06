"""`histodg export`: a checkpoint as a model other tools run, ONNX or TorchScript, with its contract inside.

    export_model("runs/a/best.pt", "model.onnx")                       # onnxruntime, any language
    export_model("runs/a/best.pt", "model.pt", fmt="torchscript")      # torch.jit.load, no histodg
    meta = exported_metadata("model.onnx")                             # the model card it carries

The exported network is the whole of what `predict` runs on one window, in one pass:

- input `rgb`: uint8, (N, 3, T, T), RGB, T the tile size it was trained at (`tile_size`), the
  slide read at `mpp` um/px (both in the metadata);
- the input normalisation (`(x / 255 - mean) / std`), then the network;
- output `probabilities`: float32, (N, C, T, T): the sigmoid of a binary model's one channel, or
  the softmax over a multi-class model's classes (channel k is label k of `labels`).

`histodg predict`'s foreground probability is channel 0 of a binary model and 1 - channel 0 of a
multi-class one; `--tta flip` (the mean of four flips) and the Gaussian-weighted stitching are the
caller's. A DSBN model exports one set of BatchNorm statistics: the shared slot (what `predict`
uses for a slide of a domain it was not trained on, without `--adapt bn`), or with `domain=` the
slot of one training domain; `dsbn_slot` in the metadata says which. A model trained with stain
normalisation is refused: its per-window Macenko / Reinhard fit is not a fixed graph.

Metadata: ONNX `metadata_props` (string keys and values), TorchScript an extra file
`histodg.json`; the same keys in both (`METADATA_KEYS`), and `histodg` the whole record as JSON.
"""
from __future__ import annotations

import copy
import json
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .. import HistodgError, __version__, exc_line
from ..files import atomic_write, file_sha256
from .config import ModelConfig

FORMATS = ("onnx", "torchscript")
INPUT, OUTPUT = "rgb", "probabilities"
METADATA_KEYS = ("histodg_version", "arch", "encoder", "classes", "labels", "mpp", "tile_size", "method", "dsbn_slot",
                 "input", "output", "checkpoint_sha256")
TORCHSCRIPT_EXTRA = "histodg.json"
OPSET = 18


class ExportError(HistodgError):
    """A checkpoint cannot be exported, or an exported file cannot be read back."""


class Exported(nn.Module):
    """uint8 RGB (N, 3, T, T) -> class probabilities (N, C, T, T): normalisation, network, sigmoid / softmax."""

    def __init__(self, net: nn.Module, config: ModelConfig):
        super().__init__()
        norm = config.normalization
        self.net = net
        self.binary = config.classes == 1
        self.tile = int(config.tile_size or 0)
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1) * 255)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        logits = self.net((rgb.float() - self.mean) / self.std)
        return torch.sigmoid(logits) if self.binary else torch.softmax(logits, dim=1)


@torch.no_grad()
def plain_batchnorm(model: nn.Module, slot: int | None) -> nn.Module:
    """A copy of `model` whose DSBN layers are plain BatchNorm again, holding slot `slot`'s
    parameters and statistics (None: the shared slot); a plain model is copied as it is."""
    from .domain_bn import _DomainSlots

    model = copy.deepcopy(model)
    for m in model.modules():
        if not isinstance(m, _DomainSlots):
            continue
        if slot is not None:
            m.weight.copy_(m.domain_weight[slot])
            m.bias.copy_(m.domain_bias[slot])
            m.running_mean.copy_(m.domain_mean[slot])
            m.running_var.copy_(m.domain_var[slot])
        for name in ("domain_weight", "domain_bias", "domain_mean", "domain_var"):
            delattr(m, name)
        m.__class__ = type(m).__bases__[1]  # _domain_class made (_DomainSlots, the layer's own class)
    return model


def metadata(config: ModelConfig, slot: str | None, sha256: str) -> dict:
    """The exported file's record: the model contract (without the shift reference's statistics,
    which only histodg reads) and how to feed the network."""
    tile = config.tile_size
    record = {
        "histodg_version": __version__, "arch": config.arch, "encoder": config.encoder, "classes": config.classes,
        "labels": config.labels, "mpp": config.mpp, "tile_size": tile, "method": config.method,
        "dsbn_slot": slot if config.domain_bn else None,
        "input": {"name": INPUT, "dtype": "uint8", "shape": ["N", 3, tile, tile], "channels": "RGB",
                  "normalization": {"mean": list(config.normalization.mean), "std": list(config.normalization.std),
                                    "inside": True}},
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["N", config.classes, tile, tile],
                   "meaning": "sigmoid of the tumour logit" if config.classes == 1 else "softmax over the labels"},
        "checkpoint_sha256": sha256}
    card = config.to_dict()
    card["shift"] = sorted((config.shift or {}).get("domains", {})) or None  # the reference's domains, not its numbers
    return {**record, "model_config": card}


def _slot_of(config: ModelConfig, domain: str | None, path) -> tuple[int | None, str | None]:
    names = list(config.domain_bn or [])
    if domain is None:
        return None, "shared" if names else None
    if domain not in names:
        have = ", ".join(names) if names else "none (not a DSBN model)"
        raise ExportError(path, f"--domain {domain}: the model has no slot of that name (its slots: {have})")
    return names.index(domain), domain


def export_model(checkpoint, out, fmt: str = "onnx", domain: str | None = None) -> dict:
    """Write `checkpoint` as `fmt` to `out` (atomically); returns the metadata written."""
    from .checkpoint import load_checkpoint, model_from_checkpoint

    if fmt not in FORMATS:
        raise ExportError(out, f"unknown format {fmt!r}: choose {' or '.join(FORMATS)}")
    model, config = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint)
    if config.normalization.stain:
        raise ExportError(checkpoint, f"trained with stain normalisation ({config.normalization.stain.get('method')}), "
                                      f"which is fitted per window and cannot be exported; export a model trained without it")
    if not config.tile_size:
        raise ExportError(checkpoint, "the checkpoint records no tile size to export for")
    k, slot = _slot_of(config, domain, checkpoint)
    net = Exported(plain_batchnorm(model, k), config).eval()
    meta = metadata(config, slot, file_sha256(checkpoint))
    example = torch.full((2, 3, config.tile_size, config.tile_size), 200, dtype=torch.uint8)
    writer = _write_onnx if fmt == "onnx" else _write_torchscript

    def write(tmp: Path) -> None:
        writer(net, example, meta, tmp)
        meta["check_max_abs_diff"] = check_export(net, tmp, fmt)  # the file, run, against the network it came from

    try:
        atomic_write(Path(out), write)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ExportError(checkpoint, f"cannot be exported as {fmt} ({exc_line(exc)})") from None
    return meta


CHECK_TOLERANCE = 1e-4  # probabilities; float32 reorderings give about 1e-6


@torch.no_grad()
def check_export(net: nn.Module, path: Path, fmt: str) -> float:
    """Run the written file (onnxruntime on the CPU, or torch.jit) and `net` on the same windows
    (a blank one, a dark one and noise); the largest probability difference, or an error above
    `CHECK_TOLERANCE`, so that a file that does not compute what the checkpoint does is never left."""
    import numpy as np

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, net.tile, net.tile), dtype=np.uint8))
    x[0] = 255
    x[1] = 40
    want = net(x).numpy()
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT], {INPUT: x.numpy()})[0]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = torch.jit.load(str(path), map_location="cpu")(x).numpy()
    diff = float(np.abs(got - want).max())
    if not diff <= CHECK_TOLERANCE:
        raise ValueError(f"the exported model differs from the checkpoint by {diff:.2g} (more than {CHECK_TOLERANCE})")
    return diff


def _strings(meta: dict) -> dict[str, str]:
    out = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if k in METADATA_KEYS}
    return {**out, "histodg": json.dumps(meta)}


def _write_onnx(net: nn.Module, example: torch.Tensor, meta: dict, tmp: Path) -> None:
    import onnx

    batch = torch.export.Dim("N", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes={"rgb": {0: batch}}, opset_version=OPSET, verbose=False)
    proto = program.model_proto
    for key, value in _strings(meta).items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.producer_version = "histodg", __version__
    onnx.save_model(proto, str(tmp))


def _write_torchscript(net: nn.Module, example: torch.Tensor, meta: dict, tmp: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example)
        torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(meta)})


def is_exported(path) -> bool:
    """An ONNX file, or a TorchScript archive histodg wrote (a checkpoint is a zip archive too)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith(f"/extra/{TORCHSCRIPT_EXTRA}") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def exported_metadata(path) -> dict:
    """The record an exported file carries (`metadata`), read as data: neither file's network runs
    (an ONNX file is a protobuf; a TorchScript file a zip archive whose extra file is read as text)."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith(f"/extra/{TORCHSCRIPT_EXTRA}")]
                if not names:
                    raise ValueError(f"no {TORCHSCRIPT_EXTRA} in the archive")
                return json.loads(archive.read(names[0]))
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if "histodg" not in props:
            raise ValueError("no histodg metadata")
        return json.loads(props["histodg"])
    except OSError as exc:
        raise ExportError(path, exc.strerror or exc_line(exc)) from None
    except Exception as exc:  # a damaged or foreign file: protobuf's DecodeError, zipfile's BadZipFile, JSON
        raise ExportError(path, f"not a model histodg exported ({exc_line(exc)})") from None
