"""`histodg predict` and `histodg evaluate`."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..constants import AXES, EXTRA_OUTPUTS, LAYOUTS
from .config_file import config_option, note_outputs, records_config
from .options import CONTEXT, fail_line, label_option, model_run_options, resolve_jobs, slide_batch_options


@click.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for one <name>/ folder per input.")
@click.option("--mpp", type=float, default=None, help="Model resolution, um/px  [default: the checkpoint's]")
@click.option("--tile-size", type=int, default=None, help="Window side in model pixels  [default: the checkpoint's]")
@click.option("--overlap", type=float, default=0.5, show_default=True,
              help="Overlap of neighbouring windows: a fraction of the tile (< 1) or pixels (>= 1).")
@model_run_options()
@click.option("--devices", default=None, metavar="LIST",
              help="Several devices at once: cuda:0,cuda:1 (or all: every GPU), one worker process each, slides "
                   "handed out as they finish; cpu,cpu works too.")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="Tumour where the probability is at least this.")
@click.option("--geojson-tiles", is_flag=True,
              help="Also write tiles.geojson: the probability map as locked QuPath tiles with a measurement per class.")
@click.option("--outputs", "outputs", multiple=True, type=click.Choice(EXTRA_OUTPUTS),
              help="More files per input (repeatable): prob-tiff = prob.ome.tiff, the probability (0-255) as a pyramidal "
                   "OME-TIFF at the mask's size, which QuPath opens as an overlay image.")
@click.option("--roi", type=click.Path(path_type=Path), default=None, metavar="FILE|DIR",
              help="Predict inside a region only: what --annotations of `tile` takes (QuPath GeoJSON, Aperio/ASAP XML, "
                   "a mask image at any downsample), or a folder of them named after the slides (a slide without "
                   "one is predicted whole). Only windows touching the region run; outside it every output is 0.")
@click.option("--roi-class", default=None, metavar="NAME",
              help="With --roi: only the annotations of this class make the region (e.g. \"Tumor bed\").")
@click.option("--layout", type=click.Choice(LAYOUTS), default="folders", show_default=True,
              help="flat: the files a viewer opens beside the input folders, OUT/<name>.ome.tiff, OUT/<name>.geojson "
                   "(OUT/<name>.qc.geojson, OUT/<name>.prob.ome.tiff), as QuPath batch-import scripts expect; "
                   "done.json, prob.zarr and overlay.png stay in OUT/<name>/.")
@slide_batch_options(recorded="(recorded for `histodg evaluate`)", overwrite_help="Redo inputs that have finished outputs.",
                     tissue_help="Run windows that touch tissue (none: every window).")
@config_option
@records_config()
def predict(checkpoint, out_dir, mpp, tile_size, overlap, batch_size, tta, device, adapt, stain_norm, stain_ref, devices, threshold,
            runtime, geojson_tiles, outputs, roi, roi_class, layout, inputs, tissue_method,
            backend, workers, organ, scanner, mpp_override, domain_axis, max_bad_fraction, qc, shard, overwrite, as_json):
    """Segment tumour on whole slides and images with a trained model.

    INPUTS are as for `histodg tile`: slides, PNG/JPEG/TIFF images, folders, CSV manifests,
    COSAS layouts. Windows cover the tissue at the model's resolution with Gaussian-weighted
    overlaps. Per input, OUT/<name>/ gets prob.zarr (uint8 probability at the model's resolution),
    mask.ome.tiff (pyramidal 0/255 mask at the slide's size and pixel size: open it in QuPath),
    tumor.geojson (polygons with holes in level-0 pixels: QuPath > File > Import objects),
    overlay.png, mask.png (plain images: same size as the input), qc.geojson (the windows artefact
    QC flagged, one QuPath class per flag) and done.json (settings, timings, tumour area in mm²,
    written last). --roi limits each slide to a drawn region. Finished inputs are skipped, unfinished ones
    redone; a bad input fails alone and the batch goes on. OUT/summary.csv and summary.json
    list every input; OUT/report.html shows every slide on one self-contained page. Windows with
    pen, blur or a fold are not predicted (--qc exclude; their tissue area is in done.json's qc).
    """
    from dataclasses import replace

    from ..batch import run_jobs
    from ..device import reader_threads
    from ..inference import PredictOptions, Predictor, predict_slide
    from ..inference.devices import parse_devices, predict_on_devices
    from ..inference.options import WriteOptions
    from ..slides.reading import ReadOptions
    from .views import PREDICT_SUMMARY, BatchView, err, error_markup

    try:
        opts = PredictOptions(mpp=mpp, tile_size=tile_size, overlap=overlap, batch_size=batch_size, tta=tta, adapt=adapt,
                              stain_norm=stain_norm, stain_ref=stain_ref, threshold=threshold, device=device,
                              runtime=runtime, tissue_method=tissue_method, roi=None if roi is None else str(roi), roi_class=roi_class,
                              read=ReadOptions(backend, workers or reader_threads(), max_bad_fraction, qc),
                              write=WriteOptions(geojson_tiles=geojson_tiles, outputs=tuple(outputs), layout=layout,
                                                 overwrite=overwrite))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    jobs = _jobs_with_regions(resolve_jobs(inputs, organ, scanner, domain_axis, None, mpp_override, shard), roi, roi_class)
    device_list = parse_devices(devices) if devices else [device]
    if len(device_list) == 1:
        opts = replace(opts, device=device_list[0])
    predictor = Predictor.from_checkpoint(checkpoint, opts if len(device_list) == 1 else replace(opts, device="cpu", runtime="torch"))
    out_dir.mkdir(parents=True, exist_ok=True)
    from ..inference.report import write_report
    from ..summary import BatchSummary

    summary = BatchSummary(out_dir, "predict")
    with BatchView("predict", PREDICT_SUMMARY, as_json, summary) as view:
        if len(device_list) > 1:  # the checkpoint was checked above; each worker loads it on its device
            del predictor
            results = predict_on_devices(checkpoint, opts, jobs, out_dir, device_list, view)
        else:
            results = run_jobs(jobs, lambda job, progress: predict_slide(predictor, job, out_dir, progress), view)
    try:
        write_report(out_dir, summary.rows())
    except OSError as exc:
        err.print(error_markup(f"{out_dir / 'report.html'}: not written ({exc.strerror or exc})"))
    if any(r.status == "failed" for r in results):
        note_outputs(results)  # config.yaml is still written when some inputs have outputs of these settings
        sys.exit(1)


def _jobs_with_regions(jobs, roi, roi_class):
    """--roi: each job's region file (one file for one slide, or a folder matched by name)."""
    if roi_class is not None and roi is None:
        raise click.UsageError("--roi-class picks annotations of the --roi file: give --roi too")
    if roi is None:
        return jobs
    from ..slides.inputs import attach_regions

    return attach_regions(jobs, roi)


@click.command(context_settings=CONTEXT)
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--truth", type=click.Path(path_type=Path), default=None,
              help="Ground truth for predictions: a folder of GeoJSON / XML / mask images named after the slides, one file, or a CSV manifest (path, annotation, organ, scanner).")
@click.option("--domain-axis", type=click.Choice(AXES), default=None,
              help="Domains are organs or scanners  [default: per image, whichever it knows]")
@label_option("every polygon is tumour.")
@click.option("--threshold", type=float, default=None, help="Probability cut  [default: 0.5, or each prediction's own]")
@model_run_options(purpose="With a checkpoint: ")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@config_option
def evaluate(sources, truth, domain_axis, labels, objects, threshold, batch_size, tta, device, adapt, stain_norm, stain_ref, runtime,
             as_json):
    """Dice and IoU per image, per domain and overall (the mean over images).

    \b
      histodg evaluate CHECKPOINT STORES...          # run the model on stores with masks, score
      histodg evaluate PREDICTIONS... --truth TRUTH  # score `histodg predict` outputs

    With a checkpoint, STORES are patch stores with masks (or folders / CSV lists of them); each
    store is one image, its counts summed over its patches (the image's Dice when tiled without
    overlap, as COSAS images are). PREDICTIONS are `histodg predict` output folders (with
    done.json) or the folders holding them; the truth is rasterised at the prediction's
    resolution. An image where both prediction and truth are empty scores 1. Label 255 is ignored.
    """
    from ..evaluation.predictions import evaluate_predictions
    from ..evaluation.scoring import to_json
    from ..evaluation.stores import evaluate_stores
    from ..slides.annotations import LabelMap
    from .views import err, print_evaluation

    first = sources[0]
    with_checkpoint = first.is_file() and first.suffix.lower() != ".csv"
    try:
        label_map = LabelMap.parse(labels, objects)
        _check_evaluate_args(with_checkpoint, len(sources), truth, threshold, _given(click.get_current_context()))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if with_checkpoint:
        from ..inference import PredictOptions, Predictor

        try:
            opts = PredictOptions(batch_size=batch_size, tta=tta, device=device, adapt=adapt, stain_norm=stain_norm,
                                  stain_ref=stain_ref, runtime=runtime,
                                  **({"threshold": threshold} if threshold is not None else {}))
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        predictor = Predictor.from_checkpoint(first, opts)
        with err.status("scoring stores"):
            ev = evaluate_stores(predictor, sources[1:], domain_axis)
    else:
        with err.status("scoring predictions"):
            ev = evaluate_predictions(sources, truth, domain_axis, threshold, label_map)
    for e in ev.errors:
        fail_line(e)
    table = ev.table()
    if as_json:
        click.echo(to_json(table))
    elif ev.images:
        print_evaluation(table)
    if ev.errors or not ev.images:
        if not ev.images:
            fail_line("nothing could be scored")
        sys.exit(1)


# what each mode of `evaluate` reads; an option of the other mode given explicitly is refused, never ignored
CHECKPOINT_ONLY = ("batch_size", "tta", "device", "adapt", "stain_norm", "stain_ref", "runtime")
PREDICTIONS_ONLY = ("truth", "labels", "objects")


def _given(ctx: click.Context) -> set[str]:
    """The parameters the user set (on the command line, from the environment or in a --config file), not defaults."""
    from click.core import ParameterSource

    return {name for name in ctx.params if ctx.get_parameter_source(name) in (
        ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.DEFAULT_MAP)}


def _option(name: str) -> str:
    return {"labels": "--label"}.get(name, "--" + name.replace("_", "-"))


def _check_evaluate_args(with_checkpoint: bool, n_sources: int, truth, threshold, given: set[str]) -> None:
    """The option combinations `evaluate` refuses (ValueError: a usage error)."""
    if threshold is not None and not 0 < threshold < 1:
        raise ValueError(f"--threshold {threshold} must be between 0 and 1 (exclusive)")
    if with_checkpoint and truth is not None:
        raise ValueError("--truth is for scoring predictions; with a checkpoint the stores' masks are the truth")
    if with_checkpoint and n_sources < 2:
        raise ValueError("give the stores to score after the checkpoint")
    ignored = [_option(n) for n in (PREDICTIONS_ONLY if with_checkpoint else CHECKPOINT_ONLY) if n in given]
    if ignored and with_checkpoint:
        raise ValueError(f"{', '.join(ignored)}: for scoring predictions; with a checkpoint the stores' masks are "
                         "the truth, as they were tiled")
    if ignored:
        raise ValueError(f"{', '.join(ignored)}: for a checkpoint run on stores (predictions were made, adapted and "
                         "normalised by predict)")
    if not with_checkpoint and truth is None:
        raise ValueError("give --truth to score predictions (or a checkpoint first to score stores)")
