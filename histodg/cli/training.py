"""`histodg train` and `histodg methods`."""
from __future__ import annotations

import json
import shlex
import sys
from contextlib import nullcontext
from pathlib import Path

import click

from ..constants import AUGMENT_PRESETS, AXES, DEVICE_MODES, LOSSES, STAIN_METHODS
from .config_file import config_option, records_config
from .options import CONTEXT, parse_hp, parse_pairs


@click.command(context_settings=CONTEXT, epilog="Methods and their --hp settings: `histodg methods`.")
@click.argument("stores", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--arch", default="FPN", show_default=True, help="smp architecture: FPN, Unet, UnetPlusPlus, DeepLabV3Plus, ...")
@click.option("--encoder", default="tu-efficientnet_lite0", show_default=True,
              help="smp encoder: tu-efficientnet_lite0 (ImageNet weights without a download), resnet34, mit_b2, ...")
@click.option("--encoder-weights", default="imagenet", show_default=True, help="imagenet, none, or a local weights file.")
@click.option("--pretrain", type=click.Choice(AXES), default=None, help="Stage 1 domains (cross-task pretraining).")
@click.option("--finetune", type=click.Choice([*AXES, "union"]), default=None,
              help="Stage 2 domains, from stage 1's weights; union: both tasks (a DSBN model keeps stage 1's slots).")
@click.option("--domains", type=click.Choice(AXES), default=None, help="One stage on this axis.")
@click.option("--union", is_flag=True, help="One stage on both tasks together (organ stores by organ, the others by scanner).")
@click.option("--val-domain", "val_domains", multiple=True, metavar="NAME", help="Hold this organ or scanner out (repeatable).")
@click.option("--cv", is_flag=True, help="Leave-one-domain-out cross-validation over the last stage's domains.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Share of each seen domain's slides for validation.")
@click.option("--val-max-patches", type=int, default=512, show_default=True, help="Validation patches per domain and epoch, at most.")
@click.option("--method", default="dsbn", show_default=True,
              help="Training method (see `histodg methods`); dsbn needs an encoder with BatchNorm, else use erm.")
@click.option("--hp", "hp", multiple=True, metavar="KEY=VALUE", help="A hyperparameter of the method (repeatable).")
@click.option("--epochs", type=int, default=None, help="Epochs per stage  [default: 10]")
@click.option("--steps", type=int, default=None, help="Optimizer steps per stage, instead of --epochs.")
@click.option("--steps-per-epoch", type=int, default=None, help="Steps between validations  [default: one pass over the data]")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Patches per domain in each step.")
@click.option("--accumulate", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=3e-4, show_default=True)
@click.option("--weight-decay", type=float, default=1e-2, show_default=True)
@click.option("--warmup", type=float, default=0.05, show_default=True, help="Warm-up, as a fraction of each stage's steps.")
@click.option("--loss", type=click.Choice(LOSSES), default="bce", show_default=True)
@click.option("--augment", "augment", type=click.Choice(AUGMENT_PRESETS), default="light", show_default=True,
              help="Augmentation preset: none; light (flips, rotations, light colour jitter); strong (also stain, "
                   "white balance, hue, gamma, blur/sharpening, noise, JPEG, +-25% scale). See README.")
@click.option("--aug", "aug", multiple=True, metavar="KEY=VALUE", help="Change one augmentation setting of the preset (repeatable).")
@click.option("--jitter", type=float, default=None, help="Same as --aug jitter=VALUE.")
@click.option("--no-augment", is_flag=True, help="Same as --augment none.")
@click.option("--stain-norm", type=click.Choice(STAIN_METHODS), default="none", show_default=True,
              help="Normalise every patch's stain to a reference (fitted on --stain-ref, else on the training "
                   "stores), in training and, from the checkpoint, in predict.")
@click.option("--stain-ref", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Reference image of --stain-norm  [default: the training stores' patches with most tissue]")
@click.option("--amp", type=click.Choice(DEVICE_MODES), default="auto", show_default=True, help="bf16 autocast (auto: on CUDA).")
@click.option("--channels-last", type=click.Choice(DEVICE_MODES), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda")
@click.option("--workers", type=int, default=None, help="Data-loading processes  [default: CPUs - 1, at most 4]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt (its saved settings win).")
@click.option("--overwrite", is_flag=True, help="Start again in a folder that holds a run.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@config_option
@records_config(skip_when="resume")
def train(stores, out_dir, arch, encoder, encoder_weights, pretrain, finetune, domains, union, val_domains, cv,
          val_fraction, val_max_patches, method, hp, epochs, steps, steps_per_epoch, batch_size, accumulate, lr,
          weight_decay, warmup, loss, augment, aug, jitter, no_augment, stain_norm, stain_ref, amp, channels_last, device, workers, seed, resume,
          overwrite,
          as_json):
    """Train a tumour segmentation model on patch stores, stage by stage.

    STORES are store paths, folders of stores, or a CSV with a `path` column. `--pretrain organ
    --finetune scanner` trains stage 1 with one domain per organ, then stage 2 from its weights
    with one domain per scanner (the cross-task pretraining protocol). Writes RUN_DIR/config.json,
    metrics.jsonl, last.pt, best.pt, curves.png and result.json.
    """
    from ..device import loader_processes
    from ..training.config import TrainConfig
    from ..training.state import end_process_group, launch_rank
    from ..training.trainer import Callbacks, Trainer
    from .views import TrainView, print_cv, print_train_result

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
                method=method, hparams=parse_hp(hp),
                epochs=epochs, steps=steps, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
                accumulate=accumulate, lr=lr, weight_decay=weight_decay, warmup=warmup, loss=loss,
                augment="none" if no_augment else augment,
                aug={**parse_pairs(aug, "--aug"), **({"jitter": jitter} if jitter is not None else {})},
                stain_norm=stain_norm, stain_ref=stain_ref,
                amp=amp, channels_last=channels_last, device=device,
                workers=loader_processes() if workers is None else workers, seed=seed,
                command=shlex.join(["histodg", *click.get_current_context().meta.get("histodg.argv", sys.argv[1:])]))
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    main = launch_rank() == 0  # under torchrun only rank 0 shows progress and results
    try:
        with TrainView() if main else nullcontext() as view:
            cbs = Callbacks(view.on_stage_start, view.on_step, view.on_epoch, view.on_note) if main else Callbacks()
            if cfg.cv:
                from ..training.crossval import run_cv

                result = run_cv(cfg, resume=resume, overwrite=overwrite, callbacks=cbs)
            else:
                result = Trainer(cfg, resume=resume, overwrite=overwrite, callbacks=cbs).run()
    finally:
        end_process_group()
    if not main:
        return
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    elif cfg.cv:
        print_cv(result)
    else:
        print_train_result(result)
        click.echo(f"run: {out_dir}  (best.pt, last.pt, metrics.jsonl, curves.png)")


@click.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def methods(as_json):
    """The training methods and their hyperparameters (set with `histodg train --hp KEY=VALUE`)."""
    from ..training.config import TrainConfig
    from ..training.methods import METHODS, describe
    from .views import print_methods

    rows = [{"name": n, "doc": (c.__doc__ or "").strip().splitlines()[0], "hparams": describe(c), "default": n == TrainConfig.method}
            for n, c in METHODS.items()]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        print_methods(rows)
