"""What the commands share: context settings, the option blocks of `tile` and `predict`, parsers."""
from __future__ import annotations

from pathlib import Path

import click

from ..constants import ADAPT_MODES, AXES, BACKENDS, RUNTIMES, STAIN_METHODS, TISSUE_METHODS, TTA_MODES, UNKNOWN

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
BACKEND_CHOICE = click.Choice(BACKENDS)
TISSUE_CHOICE = click.Choice(TISSUE_METHODS)


def fail_line(message: str) -> None:
    """One line on stderr: `error: <path>: <reason>`."""
    from .views import err, error_markup

    err.print(error_markup(message))


def read_options() -> list:
    """The options of `ReadOptions` (`--backend`, `--workers`, `--max-bad-fraction`, `--qc`), made from its
    fields: each default and help is the field's (`cli_default` where the command line decides later)."""
    from ..slides.reading import ReadOptions, option_specs

    made = []
    for name, default, help, settings in option_specs(ReadOptions):
        settings = dict(settings)
        choices = settings.pop("choices", None)
        kind = click.Choice(choices) if choices else type(default)  # the field's own default's type
        default = settings.pop("cli_default", default)
        made.append(click.option(f"--{name.replace('_', '-')}", type=kind, default=default,
                                 show_default=default is not None, help=help, **settings))
    return made


def slide_batch_options(*, recorded: str, overwrite_help: str, tissue_help: str | None = None):
    """INPUTS, -o and the options every batch over slides takes (`tile`, `predict`).

    `recorded` says what the organ/scanner of the inputs is used for."""
    options = [
        # readable=False: an input without read permission is its own failed row (`slides.inputs.unusable`), not a
        # usage error that stops the batch
        click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path, readable=False)),
        click.option("--tissue-method", type=TISSUE_CHOICE, default="otsu", show_default=True, help=tissue_help),
        click.option("--organ", default=UNKNOWN, show_default=True, help=f"Organ of the inputs {recorded}."),
        click.option("--scanner", default=UNKNOWN, show_default=True, help=f"Scanner of the inputs {recorded}."),
        click.option("--mpp-override", type=float, default=None,
                     help="Microns per pixel of the inputs, used instead of their metadata (images without it, or a "
                          "wrong value); a manifest's mpp column wins."),
        click.option("--domain-axis", type=click.Choice(AXES), default=None,
                     help="What the domain folders of a COSAS layout are."),
        *read_options(),
        click.option("--shard", default=None, metavar="I/N",
                     help="Do only the I-th of N parts of the inputs  [default: from SLURM_ARRAY_TASK_ID]"),
        click.option("--overwrite", is_flag=True, help=overwrite_help),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def model_run_options(*, purpose: str = ""):
    """--batch-size, --tta, --device, --adapt, --stain-norm/--stain-ref and --runtime of anything that runs a model (`predict`, `evaluate`)."""
    options = [
        click.option("--batch-size", type=int, default=8, show_default=True, help=f"{purpose}Windows per forward pass."),
        click.option("--tta", type=click.Choice(TTA_MODES), default="flip", show_default=True,
                     help=f"{purpose}flip: mean of the 4 flipped predictions (4x the model time; better on unseen "
                          "organs and scanners, BENCHMARKS.md); none: one pass, 4x faster."),
        click.option("--device", default="auto", show_default=True, help=f"{purpose}auto, cpu, cuda, cuda:1, ..."),
        click.option("--adapt", type=click.Choice(ADAPT_MODES), default="none", show_default=True,
                     help=f"{purpose}bn: re-estimate the model's BatchNorm statistics on each slide's own tissue "
                          "(test-time adaptation to a new scanner; the checkpoint is not changed); tent: that, then "
                          "10 entropy-minimisation steps on the BatchNorm weights per slide."),
        click.option("--stain-norm", type=click.Choice(("checkpoint", *STAIN_METHODS)), default="checkpoint",
                     show_default=True, help=f"{purpose}checkpoint: the stain normalisation the model was trained "
                                             "with (none if it had none); none: off; macenko / reinhard: to --stain-ref."),
        click.option("--stain-ref", type=click.Path(exists=True, dir_okay=False), default=None,
                     help=f"{purpose}Reference image of --stain-norm macenko|reinhard."),
        click.option("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
                     help=f"{purpose}What runs the network: torch; onnx = onnxruntime on the CPU (2.6x faster there, "
                          "probabilities within 1e-5 of torch's; exported once per run); auto = onnx on a CPU for a slide "
                          "(or, in evaluate, all stores together) of 500 windows or more, torch otherwise and on a GPU."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def label_option(default_help: str):
    """--label NAME=VALUE (repeatable) and --objects TYPES: the `labels` and `objects` parameters."""
    def deco(f):
        f = click.option("--objects", default="annotation", show_default=True, metavar="TYPES",
                         help="QuPath object types read from GeoJSON, comma-separated: annotation, detection, "
                              "cell, tile.")(f)
        return click.option("--label", "labels", multiple=True, metavar="NAME=VALUE",
                            help=f"Map an annotation class to a label (repeat); '*' matches any class. "
                                 f"Default: {default_help}")(f)
    return deco


def resolve_jobs(inputs, organ, scanner, domain_axis, annotations, mpp_override, shard):
    """The jobs of a batch over slides, this shard's share of them."""
    from ..slides.inputs import parse_shard, resolve_inputs, take_shard

    try:
        shard_ij = parse_shard(shard)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return take_shard(resolve_inputs(inputs, organ, scanner, domain_axis, annotations, mpp_override), shard_ij)


def magnification(ctx, param, value):
    if value is None:
        return None
    text = str(value).strip().lower().rstrip("x")
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a magnification such as 20x") from None


def parse_pairs(items, option: str) -> dict:
    """KEY=VALUE ... -> {key: "value"} (whoever uses them converts and checks the values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


def parse_hp(items) -> dict:
    """--hp KEY=VALUE ... -> {key: "value"} (the method converts and checks the values)."""
    return parse_pairs(items, "--hp")
