"""`histodg info` and `histodg tile`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..batch import collected
from ..constants import COMPRESSIONS
from .config_file import config_option, note_outputs, records_config
from .options import BACKEND_CHOICE, CONTEXT, fail_line, label_option, magnification, resolve_jobs, slide_batch_options


@click.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--backend", type=BACKEND_CHOICE, default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of tables.")
@click.option("--check", is_flag=True, help="Stores: decode every patch and mask and report what is missing or damaged.")
def info(paths, backend, as_json, check):
    """What is in slides, images, patch stores and models.

    For a slide: reader backend, vendor, dimensions, levels and downsamples, mpp, objective
    power, associated images. For a store: patch count, tile size, mpp, organ, scanner, labels,
    complete or not; with --check, whether every shard is there and every chunk decodes (exit
    status 1 if not). For a checkpoint (.pt): the model card (network, input, method, the organs,
    scanners and patches it was trained on, validation Dice per domain, the shift reference's
    domains, the training command). For an exported model (.onnx, TorchScript): its metadata.
    """
    from ..model.card import describe_model_file, is_model_file
    from ..slides.opening import open_slide
    from ..store import check_store, describe_store
    from .views import print_info

    out, errors = [], []
    for p in paths:
        with collected(errors, p):
            if is_model_file(p):
                out.append(describe_model_file(p))
            elif (p / "zarr.json").is_file():
                d = describe_store(p, verify=not check)
                if check and d["complete"]:
                    n, problems = check_store(p)
                    d["check"] = f"ok: {n} patches decoded" if not problems else problems
                    errors.extend(f"{p}: damaged: {line}" for line in problems)
                out.append(d)
            else:
                with open_slide(p, backend) as s:
                    out.append({"kind": "slide", **s.describe()})
    for line in errors:
        fail_line(line)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        print_info(out)
    if errors:
        sys.exit(1)


@click.command(context_settings=CONTEXT)
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the <name>.zarr stores.")
@click.option("--mpp", type=float, default=None, help="Target microns per pixel  [default: 0.5 unless --magnification]")
@click.option("--magnification", callback=magnification, default=None, help="Target magnification instead of --mpp, e.g. 20x.")
@click.option("--mpp-tolerance", type=float, default=0.02, show_default=True,
              help="Read a level within this relative distance of the target as is (0.499 for 0.5 um/px), no resampling; 0 always resamples.")
@click.option("--tile-size", type=int, default=512, show_default=True, help="Patch side in target pixels.")
@click.option("--overlap", type=int, default=0, show_default=True, help="Overlap of neighbouring patches, target pixels.")
@click.option("--min-tissue", type=float, default=0.25, show_default=True, help="Keep windows with at least this tissue fraction (0 keeps all).")
@click.option("--annotations", type=click.Path(path_type=Path), default=None, help="GeoJSON / ASAP XML / mask image, or a folder of them named after the slides.")
@label_option("every polygon is 1.")
@click.option("--compression", type=click.Choice(("auto", *COMPRESSIONS)), default="auto", show_default=True,
              help="Patch compression: jpeg (8x smaller than lz4, fastest: patches that are one JPEG tile of the "
                   "slide are copied as they are, others encoded at --jpeg-quality); lz4 (lossless); none; auto: "
                   "jpeg when the source is JPEG/JPEG 2000 (whole slides), lz4 when it is lossless (PNG, LZW "
                   "TIFF). See BENCHMARKS.md.")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=90, show_default=True,
              help="Quality of the patches --compression jpeg has to encode.")
@slide_batch_options(recorded="(a manifest column or COSAS folder wins)", overwrite_help="Rewrite stores that exist.")
@config_option
@records_config()
def tile(inputs, out_dir, mpp, magnification, mpp_tolerance, tile_size, overlap, min_tissue, annotations, labels, objects,
         compression, jpeg_quality, tissue_method, backend, workers, organ, scanner, mpp_override, domain_axis,
         max_bad_fraction, qc, shard, overwrite, as_json):
    """Cut slides and image data sets into zarr patch stores, keeping tissue.

    INPUTS are slides (anything OpenSlide or tiffslide opens), PNG/JPEG/TIFF images, folders of
    them, CSV manifests (path, annotation, organ, scanner, mpp) or COSAS-layout folders
    (<task>/<domain>/image/*.png with mask/ beside). One store per input; complete stores are
    skipped, interrupted ones resumed. Windows that cannot be decoded are skipped and listed in
    the store's bad_windows attribute and in the summary (also on disk: OUT/summary.csv and
    summary.json, one row per input). Windows with pen, blur or a fold are left out
    (--qc exclude) or kept (--qc flag); the stored patches' flags are the store's qc array.
    """
    from ..batch import run_jobs
    from ..device import reader_threads
    from ..slides.annotations import LabelMap
    from ..slides.reading import ReadOptions
    from ..tiling import TileOptions, TileSettings, tile_slide
    from .views import TILE_SUMMARY, BatchView

    try:
        if magnification is not None and mpp is not None:
            raise ValueError("give --mpp or --magnification, not both")
        settings = TileSettings(tile_size=tile_size, mpp=None if magnification is not None else (mpp if mpp is not None else 0.5),
                                magnification=magnification, overlap=overlap, min_tissue=min_tissue,
                                tissue_method=tissue_method, mpp_tolerance=mpp_tolerance)
        read = ReadOptions(backend, workers or reader_threads(), max_bad_fraction, qc)
        opts = TileOptions(settings, read, LabelMap.parse(labels, objects), overwrite, compression, jpeg_quality)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    jobs = resolve_jobs(inputs, organ, scanner, domain_axis, annotations, mpp_override, shard)
    out_dir.mkdir(parents=True, exist_ok=True)
    from ..summary import BatchSummary

    with BatchView("tile", TILE_SUMMARY, as_json, BatchSummary(out_dir, "tile")) as view:
        results = run_jobs(jobs, lambda job, progress: tile_slide(job, out_dir, opts, progress), view)
    if any(r.status == "failed" for r in results):
        note_outputs(results)  # config.yaml is still written when some inputs have outputs of these settings
        sys.exit(1)
