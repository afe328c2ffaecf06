"""`histodg export`: a checkpoint as an ONNX or TorchScript model other tools run."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .options import CONTEXT


@click.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write, e.g. model.onnx or model.ts.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default=None,
              help="onnx (onnxruntime, any language) or torchscript (torch.jit.load)  [default: torchscript for "
                   "an -o ending in .pt, .pth or .ts, else onnx]")
@click.option("--domain", default=None, metavar="NAME",
              help="A DSBN model: export this training domain's BatchNorm slot instead of the shared one "
                   "(the one `predict` uses for a slide of a domain the model was not trained on).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata written as JSON.")
def export(checkpoint, out, fmt, domain, overwrite, as_json):
    """Export a checkpoint as a model other tools run, with its contract inside.

    The network takes uint8 RGB windows (N, 3, T, T) of the slide read at the model's mpp and
    returns class probabilities (N, C, T, T); normalisation is inside. The metadata (ONNX
    metadata_props, or TorchScript's extra file histodg.json) holds mpp, tile size, classes,
    labels, encoder, method, the DSBN slot exported and the histodg version. The written file is
    run once against the checkpoint before it is kept (largest difference printed).
    """
    from .. import HistodgError
    from ..model.export import export_model

    if fmt is None:
        fmt = "torchscript" if out.suffix.lower() in (".pt", ".pth", ".ts") else "onnx"
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise HistodgError(out, "exists: pass --overwrite to replace it")
    meta = export_model(checkpoint, out, fmt, domain)
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    slot = f", DSBN slot {meta['dsbn_slot']}" if meta.get("dsbn_slot") else ""
    click.echo(f"{out}: {fmt}, input uint8 (N, 3, {meta['tile_size']}, {meta['tile_size']}) at {meta['mpp']} um/px, "
               f"{meta['classes']} output channel(s){slot}; matches the checkpoint within "
               f"{meta['check_max_abs_diff']:.1g}")
