"""What the commands share: context settings, the option blocks of `tile` and `predict`, parsers."""
from __future__ import annotations

from pathlib import Path

import click

from ..constants import AXES

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
BACKEND_CHOICE = click.Choice(["auto", "openslide", "tiffslide", "image"])
TISSUE_CHOICE = click.Choice(["otsu", "saturation", "none"])


def fail_line(message: str) -> None:
    """One line on stderr: `error: <path>: <reason>`."""
    from rich.markup import escape

    from .views import err

    err.print(f"[bold red]error[/]: {escape(message)}")


def slide_batch_options(*, recorded: str, overwrite_help: str, tissue_help: str | None = None):
    """INPUTS, -o and the options every batch over slides takes (`tile`, `predict`).

    `recorded` says what the organ/scanner of the inputs is used for."""
    options = [
        click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path)),
        click.option("--tissue-method", type=TISSUE_CHOICE, default="otsu", show_default=True, help=tissue_help),
        click.option("--backend", type=BACKEND_CHOICE, default="auto", show_default=True),
        click.option("--workers", type=int, default=None, help="Reader threads  [default: CPU count, at most 8]"),
        click.option("--organ", default="unknown", show_default=True, help=f"Organ of the inputs {recorded}."),
        click.option("--scanner", default="unknown", show_default=True, help=f"Scanner of the inputs {recorded}."),
        click.option("--mpp-override", type=float, default=None,
                     help="Microns per pixel of the inputs, used instead of their metadata (images without it, or a "
                          "wrong value); a manifest's mpp column wins."),
        click.option("--domain-axis", type=click.Choice(AXES), default=None,
                     help="What the domain folders of a COSAS layout are."),
        click.option("--max-bad-fraction", type=float, default=0.1, show_default=True,
                     help="Fail a slide when more of its windows than this cannot be decoded."),
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
