"""histodg command line: thin Click commands over the library (parse, call, print with rich).

Heavy modules (torch, smp, zarr, openslide) are imported inside command bodies so that
`histodg --help` stays instant.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import HistodgError, __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def fail_line(message: str) -> None:
    """One line on stderr: `error: <path>: <reason>`."""
    from rich.markup import escape

    _console().print(f"[bold red]error[/]: {escape(message)}")


class Group(click.Group):
    """Turn library errors into one line and exit 1; never a traceback for bad input."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HistodgError as exc:
            fail_line(str(exc))
            sys.exit(1)
        except KeyboardInterrupt:
            fail_line("interrupted; rerun the same command to resume")
            sys.exit(130)


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="histodg")
def main():
    """histodg: cross-organ, cross-scanner adenocarcinoma segmentation on whole-slide images.

    \b
      histodg tile slides/*.svs -o stores/ --organ colon --scanner kfbio
      histodg train stores/ --pretrain organ --finetune scanner -o runs/a
      histodg predict runs/a/best.pt slides/*.svs -o preds/
    """


# -- info ------------------------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["auto", "openslide", "tiffslide", "image"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of tables.")
def info(paths, backend, as_json):
    """What is in slides, images and patch stores.

    For a slide: reader backend, vendor, dimensions, levels and downsamples, mpp, objective
    power, associated images. For a store: patch count, tile size, mpp, organ, scanner, labels,
    complete or not.
    """
    from .slide import open_slide
    from .store import describe_store

    out, failed = [], 0
    for p in paths:
        try:
            if (p / "zarr.json").is_file():
                out.append(describe_store(p))
            else:
                with open_slide(p, backend) as s:
                    out.append({"kind": "slide", **s.describe()})
        except HistodgError as exc:
            fail_line(str(exc))
            failed += 1
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        from .report import print_info

        print_info(out)
    if failed:
        sys.exit(1)


# -- tile --------------------------------------------------------------------------------------
def _magnification(ctx, param, value):
    if value is None:
        return None
    text = str(value).strip().lower().rstrip("x")
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a magnification such as 20x") from None


@main.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for the <name>.zarr stores.")
@click.option("--mpp", type=float, default=None, help="Target microns per pixel  [default: 0.5 unless --magnification]")
@click.option("--magnification", callback=_magnification, default=None, help="Target magnification instead of --mpp, e.g. 20x.")
@click.option("--mpp-tolerance", type=float, default=0.02, show_default=True,
              help="Read a level within this relative distance of the target as is (0.499 for 0.5 um/px), no resampling; 0 always resamples.")
@click.option("--tile-size", type=int, default=512, show_default=True, help="Patch side in target pixels.")
@click.option("--overlap", type=int, default=0, show_default=True, help="Overlap of neighbouring patches, target pixels.")
@click.option("--min-tissue", type=float, default=0.25, show_default=True, help="Keep windows with at least this tissue fraction (0 keeps all).")
@click.option("--tissue-method", type=click.Choice(["otsu", "saturation", "none"]), default="otsu", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "openslide", "tiffslide", "image"]), default="auto", show_default=True)
@click.option("--workers", type=int, default=None, help="Reader threads  [default: CPU count, at most 8]")
@click.option("--organ", default="unknown", show_default=True, help="Organ of the inputs (a manifest column or COSAS folder wins).")
@click.option("--scanner", default="unknown", show_default=True, help="Scanner of the inputs (a manifest column or COSAS folder wins).")
@click.option("--mpp-override", type=float, default=None, help="Microns per pixel of the inputs, used instead of their metadata (images without it, or a wrong value); a manifest's mpp column wins.")
@click.option("--annotations", type=click.Path(path_type=Path), default=None, help="GeoJSON / ASAP XML / mask image, or a folder of them named after the slides.")
@click.option("--label", "labels", multiple=True, metavar="NAME=VALUE", help="Map an annotation class to a label (repeat); '*' matches any class. Default: every polygon is 1.")
@click.option("--domain-axis", type=click.Choice(["organ", "scanner"]), default=None, help="What the domain folders of a COSAS layout are.")
@click.option("--max-bad-fraction", type=float, default=0.1, show_default=True, help="Fail a slide when more of its windows than this cannot be decoded.")
@click.option("--compression", type=click.Choice(["lz4", "none", "jpeg"]), default="lz4", show_default=True,
              help="Patch compression: lz4 (lossless); none; jpeg (5-10x smaller, fastest: patches that are one "
                   "JPEG tile of the slide are copied as they are, others encoded at --jpeg-quality). See BENCHMARKS.md.")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=90, show_default=True,
              help="Quality of the patches --compression jpeg has to encode.")
@click.option("--shard", default=None, metavar="I/N", help="Do only the I-th of N parts of the inputs  [default: from SLURM_ARRAY_TASK_ID]")
@click.option("--overwrite", is_flag=True, help="Rewrite stores that exist.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def tile(inputs, out_dir, mpp, magnification, mpp_tolerance, tile_size, overlap, min_tissue, tissue_method, backend, workers,
         organ, scanner, mpp_override, annotations, labels, domain_axis, max_bad_fraction, compression, jpeg_quality, shard, overwrite, as_json):
    """Cut slides and image data sets into zarr patch stores, keeping tissue.

    INPUTS are slides (anything OpenSlide or tiffslide opens), PNG/JPEG/TIFF images, folders of
    them, CSV manifests (path, annotation, organ, scanner, mpp) or COSAS-layout folders
    (<task>/<domain>/image/*.png with mask/ beside). One store per input; complete stores are
    skipped, interrupted ones resumed. Windows that cannot be decoded are skipped and listed in
    the store's bad_windows attribute and in the summary.
    """
    from .annotations import LabelMap
    from .extract import TileOptions, default_workers, tile_slide
    from .inputs import parse_shard, resolve_inputs, take_shard
    from .report import run_batch
    from .tiling import TileSettings

    try:
        settings = TileSettings(
            tile_size=tile_size,
            mpp=None if magnification is not None else (mpp if mpp is not None else 0.5),
            magnification=magnification,
            overlap=overlap,
            min_tissue=min_tissue,
            tissue_method=tissue_method,
            mpp_tolerance=mpp_tolerance,
        )
        if magnification is not None and mpp is not None:
            raise ValueError("give --mpp or --magnification, not both")
        label_map = LabelMap.parse(labels)
        shard_ij = parse_shard(shard)
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError("--max-bad-fraction must be between 0 and 1")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    jobs = take_shard(
        resolve_inputs(inputs, organ, scanner, domain_axis, annotations, mpp_override), shard_ij
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = TileOptions(settings, backend, workers or default_workers(), label_map, overwrite, max_bad_fraction, compression,
                       jpeg_quality)
    results = run_batch(jobs, lambda job, progress: tile_slide(job, out_dir, opts, progress), "tile", as_json)
    if any(r.status == "failed" for r in results):
        sys.exit(1)


# -- train -------------------------------------------------------------------------------------
@main.command(context_settings=CONTEXT, epilog="Methods and their --hp settings: `histodg methods`.")
@click.argument("stores", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Run folder.")
@click.option("--arch", default="FPN", show_default=True, help="smp architecture: FPN, Unet, UnetPlusPlus, DeepLabV3Plus, ...")
@click.option("--encoder", default="mit_b2", show_default=True, help="smp encoder: mit_b2, resnet34, resnet18, ...")
@click.option("--encoder-weights", default="imagenet", show_default=True, help="imagenet, none, or a local weights file.")
@click.option("--pretrain", type=click.Choice(["organ", "scanner"]), default=None, help="Stage 1 domains (cross-task pretraining).")
@click.option("--finetune", type=click.Choice(["organ", "scanner"]), default=None, help="Stage 2 domains, from stage 1's weights.")
@click.option("--domains", type=click.Choice(["organ", "scanner"]), default=None, help="One stage on this axis.")
@click.option("--union", is_flag=True, help="One stage on both tasks together (organ stores by organ, the others by scanner).")
@click.option("--val-domain", "val_domains", multiple=True, metavar="NAME", help="Hold this organ or scanner out (repeatable).")
@click.option("--cv", is_flag=True, help="Leave-one-domain-out cross-validation over the last stage's domains.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Share of each seen domain's slides for validation.")
@click.option("--val-max-patches", type=int, default=512, show_default=True, help="Validation patches per domain and epoch, at most.")
@click.option("--method", default="erm", show_default=True, help="Training method (see `histodg methods`).")
@click.option("--hp", "hp", multiple=True, metavar="KEY=VALUE", help="A hyperparameter of the method (repeatable).")
@click.option("--epochs", type=int, default=None, help="Epochs per stage  [default: 10]")
@click.option("--steps", type=int, default=None, help="Optimizer steps per stage, instead of --epochs.")
@click.option("--steps-per-epoch", type=int, default=None, help="Steps between validations  [default: one pass over the data]")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Patches per domain in each step.")
@click.option("--accumulate", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=3e-4, show_default=True)
@click.option("--weight-decay", type=float, default=1e-2, show_default=True)
@click.option("--warmup", type=float, default=0.05, show_default=True, help="Warm-up, as a fraction of each stage's steps.")
@click.option("--loss", type=click.Choice(["bce", "bce+dice"]), default="bce", show_default=True)
@click.option("--jitter", type=float, default=0.1, show_default=True, help="Colour jitter strength (0 = none).")
@click.option("--no-augment", is_flag=True, help="No flips, rotations or colour jitter.")
@click.option("--amp", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True, help="bf16 autocast (auto: on CUDA).")
@click.option("--channels-last", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda")
@click.option("--workers", type=int, default=None, help="Data-loading processes  [default: CPUs - 1, at most 4]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt (its saved settings win).")
@click.option("--overwrite", is_flag=True, help="Start again in a folder that holds a run.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train(stores, out_dir, arch, encoder, encoder_weights, pretrain, finetune, domains, union, val_domains, cv,
          val_fraction, val_max_patches, method, hp, epochs, steps, steps_per_epoch, batch_size, accumulate, lr,
          weight_decay, warmup, loss, jitter, no_augment, amp, channels_last, device, workers, seed, resume, overwrite,
          as_json):
    """Train a tumour segmentation model on patch stores, stage by stage.

    STORES are store paths, folders of stores, or a CSV with a `path` column. `--pretrain organ
    --finetune scanner` trains stage 1 with one domain per organ, then stage 2 from its weights
    with one domain per scanner (the cross-task pretraining protocol). Writes RUN_DIR/config.json,
    metrics.jsonl, last.pt, best.pt, curves.png and result.json.
    """
    from .config import TrainConfig
    from .report import TrainView, print_cv, print_train_result
    from .train import Callbacks, Trainer, default_workers

    if resume and (out_dir / "config.json").is_file():
        cfg = TrainConfig.from_dict(json.loads((out_dir / "config.json").read_text())).replace(out_dir=str(out_dir))
    else:
        if not stores:
            raise click.UsageError("give the patch stores to train on (or --resume an existing run)")
        try:
            cfg = TrainConfig(
                stores=tuple(str(s) for s in stores), out_dir=str(out_dir), arch=arch, encoder=encoder,
                encoder_weights=encoder_weights, pretrain=pretrain, finetune=finetune, domains=domains, union=union,
                val_domains=tuple(val_domains), cv=cv, val_fraction=val_fraction, val_max_patches=val_max_patches,
                method=method, hparams=_parse_hp(hp),
                epochs=epochs, steps=steps, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
                accumulate=accumulate, lr=lr, weight_decay=weight_decay, warmup=warmup, loss=loss, jitter=jitter,
                augment=not no_augment, amp=amp, channels_last=channels_last, device=device,
                workers=default_workers() if workers is None else workers, seed=seed)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    with TrainView() as view:
        cbs = Callbacks(view.on_stage_start, view.on_step, view.on_epoch)
        if cfg.cv:
            from .crossval import run_cv

            result = run_cv(cfg, resume=resume, overwrite=overwrite, callbacks=cbs)
        else:
            result = Trainer(cfg, resume=resume, overwrite=overwrite, callbacks=cbs).run()
    if not result:  # a non-zero rank of a distributed run
        return
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    elif cfg.cv:
        print_cv(result)
    else:
        print_train_result(result)
        click.echo(f"run: {out_dir}  (best.pt, last.pt, metrics.jsonl, curves.png)")


def _parse_hp(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--hp {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def methods(as_json):
    """The training methods and their hyperparameters (set with `histodg train --hp KEY=VALUE`)."""
    from .methods import METHODS, describe
    from .report import print_methods

    rows = [{"name": n, "doc": (c.__doc__ or "").strip().splitlines()[0], "hparams": describe(c)} for n, c in METHODS.items()]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        print_methods(rows)


# -- synth -------------------------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--format", "fmt", type=click.Choice(["wsi", "cosas", "both"]), default="wsi", show_default=True,
              help="wsi: pyramidal TIFF + QuPath GeoJSON per case; cosas: COSAS-layout PNG image/mask folders.")
@click.option("--cases", type=int, default=None, help="Cases per domain  [default: the library's, see `histodg.synth`]")
@click.option("--size-um", type=float, default=None, help="Side of each case in microns  [default: the library's]")
@click.option("--gallery", type=click.Path(path_type=Path), default=None, help="Also write a PNG with one patch of every domain.")
@click.option("--overwrite", is_flag=True, help="Replace an existing data set in OUT_DIR.")
def synth(out_dir, seed, fmt, cases, size_um, gallery, overwrite):
    """Write a small COSAS-shaped multi-organ, multi-scanner adenocarcinoma data set.

    Task `organ`: training organs and a held-out organ from one scanner; task `scanner`: one
    organ from training scanners and a held-out scanner. Writes OUT_DIR/manifest.csv (path,
    annotation, organ, scanner, split, task, mpp), ready for `histodg tile OUT_DIR/manifest.csv`.
    """
    from .report import err
    from .synth import make_dataset, make_gallery

    formats = ("wsi", "cosas") if fmt == "both" else (fmt,)
    kwargs = {k: v for k, v in {"cases": cases, "size_um": size_um}.items() if v is not None}
    try:
        with err.status("generating synthetic slides") as status:
            manifest = make_dataset(out_dir, seed=seed, formats=formats, overwrite=overwrite,
                                    progress=lambda msg: status.update(msg), **kwargs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"wrote {manifest}")
    if gallery is not None:
        click.echo(f"wrote {make_gallery(manifest, gallery)}")


# -- predict -----------------------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for one <name>/ folder per input.")
@click.option("--mpp", type=float, default=None, help="Model resolution, um/px  [default: the checkpoint's]")
@click.option("--tile-size", type=int, default=None, help="Window side in model pixels  [default: the checkpoint's]")
@click.option("--overlap", type=float, default=0.5, show_default=True,
              help="Overlap of neighbouring windows: a fraction of the tile (< 1) or pixels (>= 1).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per forward pass.")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="flip: mean of the 4 flipped predictions (4x the model time).")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="Tumour where the probability is at least this.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--workers", type=int, default=None, help="Reader threads  [default: CPU count, at most 8]")
@click.option("--backend", type=click.Choice(["auto", "openslide", "tiffslide", "image"]), default="auto", show_default=True)
@click.option("--tissue-method", type=click.Choice(["otsu", "saturation", "none"]), default="otsu", show_default=True,
              help="Run windows that touch tissue (none: every window).")
@click.option("--mpp-override", type=float, default=None, help="Microns per pixel of the inputs, used instead of their metadata (images without it, or a wrong value); a manifest's mpp column wins.")
@click.option("--organ", default="unknown", show_default=True, help="Organ of the inputs, recorded for `histodg evaluate`.")
@click.option("--scanner", default="unknown", show_default=True, help="Scanner of the inputs, recorded for `histodg evaluate`.")
@click.option("--domain-axis", type=click.Choice(["organ", "scanner"]), default=None, help="What the domain folders of a COSAS layout are.")
@click.option("--max-bad-fraction", type=float, default=0.1, show_default=True, help="Fail a slide when more of its windows than this cannot be decoded.")
@click.option("--shard", default=None, metavar="I/N", help="Do only the I-th of N parts of the inputs  [default: from SLURM_ARRAY_TASK_ID]")
@click.option("--overwrite", is_flag=True, help="Redo inputs that have finished outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def predict(checkpoint, inputs, out_dir, mpp, tile_size, overlap, batch_size, tta, threshold, device, workers, backend,
            tissue_method, mpp_override, organ, scanner, domain_axis, max_bad_fraction, shard, overwrite, as_json):
    """Segment tumour on whole slides and images with a trained model.

    INPUTS are as for `histodg tile`: slides, PNG/JPEG/TIFF images, folders, CSV manifests,
    COSAS layouts. Windows cover the tissue at the model's resolution with Gaussian-weighted
    overlaps. Per input, OUT/<name>/ gets prob.zarr (uint8 probability at the model's resolution),
    mask.ome.tiff (pyramidal 0/255 mask at the slide's size and pixel size: open it in QuPath),
    tumor.geojson (polygons with holes in level-0 pixels: QuPath > File > Import objects),
    overlay.png, mask.png (plain images: same size as the input) and done.json (settings,
    timings, tumour area in mm², written last). Finished inputs are skipped, unfinished ones
    redone; a bad input fails alone and the batch goes on.
    """
    from .extract import default_workers
    from .inputs import parse_shard, resolve_inputs, take_shard
    from .predict import PredictOptions, Predictor, predict_slide
    from .report import run_batch

    try:
        opts = PredictOptions(mpp=mpp, tile_size=tile_size, overlap=overlap, batch_size=batch_size, tta=tta,
                              threshold=threshold, device=device, workers=workers or default_workers(), backend=backend,
                              tissue_method=tissue_method, max_bad_fraction=max_bad_fraction, overwrite=overwrite)
        shard_ij = parse_shard(shard)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    jobs = take_shard(resolve_inputs(inputs, organ, scanner, domain_axis, None, mpp_override), shard_ij)
    predictor = Predictor.from_checkpoint(checkpoint, opts)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = run_batch(jobs, lambda job, progress: predict_slide(predictor, job, out_dir, progress), "predict", as_json)
    if any(r.status == "failed" for r in results):
        sys.exit(1)


# -- evaluate ----------------------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--truth", type=click.Path(path_type=Path), default=None,
              help="Ground truth for predictions: a folder of GeoJSON / XML / mask images named after the slides, one file, or a CSV manifest (path, annotation, organ, scanner).")
@click.option("--domain-axis", type=click.Choice(["organ", "scanner"]), default=None,
              help="Domains are organs or scanners  [default: per image, whichever it knows]")
@click.option("--label", "labels", multiple=True, metavar="NAME=VALUE", help="Map an annotation class to a label (repeat); '*' matches any class. Default: every polygon is tumour.")
@click.option("--threshold", type=float, default=None, help="Probability cut  [default: 0.5, or each prediction's own]")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True, help="With a checkpoint: flip test-time augmentation.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="With a checkpoint: patches per forward pass.")
@click.option("--device", default="auto", show_default=True, help="With a checkpoint: auto, cpu, cuda, ...")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def evaluate(sources, truth, domain_axis, labels, threshold, tta, batch_size, device, as_json):
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
    from .annotations import LabelMap
    from .evaluate import evaluate_predictions, evaluate_stores, print_evaluation, to_json
    from .report import err

    first = sources[0]
    with_checkpoint = first.is_file() and first.suffix.lower() != ".csv"
    try:
        label_map = LabelMap.parse(labels)
        if threshold is not None and not 0 < threshold < 1:
            raise ValueError(f"--threshold {threshold} must be between 0 and 1 (exclusive)")
        if with_checkpoint and truth is not None:
            raise ValueError("--truth is for scoring predictions; with a checkpoint the stores' masks are the truth")
        if with_checkpoint and len(sources) < 2:
            raise ValueError("give the stores to score after the checkpoint")
        if not with_checkpoint and truth is None:
            raise ValueError("give --truth to score predictions (or a checkpoint first to score stores)")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if with_checkpoint:
        from .predict import PredictOptions, Predictor

        try:
            opts = PredictOptions(batch_size=batch_size, tta=tta, device=device,
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


if __name__ == "__main__":  # pragma: no cover
    main()
