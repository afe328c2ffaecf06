"""`histodg synth`."""
from __future__ import annotations

from pathlib import Path

import click

from .options import CONTEXT


@click.command(context_settings=CONTEXT)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--format", "fmt", type=click.Choice(["wsi", "cosas", "both"]), default="wsi", show_default=True,
              help="wsi: pyramidal TIFF + QuPath GeoJSON per case; cosas: COSAS-layout PNG image/mask folders.")
@click.option("--cases", type=int, default=None, help="Cases per domain  [default: the library's, see `histodg.synth`]")
@click.option("--size-um", type=float, default=None, help="Side of each case in microns  [default: the library's]")
@click.option("--gallery", type=click.Path(path_type=Path), default=None, help="Also write a PNG with one patch of every domain.")
@click.option("--extra-scanner", "extra_scanners", multiple=True, metavar="SEED|scanner-f|scanner-j",
              help="Add a held-out colon domain: scanner-x<SEED>, a scanner whose acquisition is drawn at random, or "
                   "scanner-f, one that differs in optics and resolution rather than stain, or scanner-j, one that "
                   "differs in its codec alone (JPEG 2000) (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace an existing data set in OUT_DIR.")
def synth(out_dir, seed, fmt, cases, size_um, gallery, extra_scanners, overwrite):
    """Write a small COSAS-shaped multi-organ, multi-scanner adenocarcinoma data set.

    Task `organ`: training organs and a held-out organ from one scanner; task `scanner`: one
    organ from training scanners and a held-out scanner. Writes OUT_DIR/manifest.csv (path,
    annotation, organ, scanner, split, task, mpp), ready for `histodg tile OUT_DIR/manifest.csv`.
    """
    from ..synth import DatasetSpec, make_dataset, make_gallery
    from .views import err

    formats = ("wsi", "cosas") if fmt == "both" else (fmt,)
    kwargs = {k: v for k, v in {"cases": cases, "size_um": size_um}.items() if v is not None}
    try:
        spec = DatasetSpec(seed=seed, formats=formats, extra_scanners=extra_scanners, **kwargs)
        with err.status("generating synthetic slides") as status:
            manifest = make_dataset(out_dir, spec, overwrite=overwrite, progress=lambda msg: status.update(msg))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"wrote {manifest}")
    if gallery is not None:
        click.echo(f"wrote {make_gallery(manifest, gallery)}")
