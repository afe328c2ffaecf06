"""`histodg adapt`: a trained model fitted to a new domain from its unlabelled slides."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .config_file import config_option, records_config
from .options import CONTEXT, parse_hp


@click.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--source", multiple=True, required=True, metavar="STORES",
              help="Labelled patch stores the model was trained on (store, folder of stores, CSV; repeatable).")
@click.option("--target", multiple=True, required=True, metavar="STORES_OR_SLIDES",
              help="The new domain, unlabelled: patch stores, or slides/images/folders/manifests, tiled first into "
                   "RUN_DIR/target/ at the model's resolution (repeatable).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--hp", "hp", multiple=True, metavar="KEY=VALUE",
              help="global=true|false, style=reinhard|macenko|fda, global_p, beta, local=true|false, local_weight, "
                   "mask_ratio, bn=true|false (see README).")
@click.option("--steps", type=int, default=200, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Source patches and target patches per step.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--mpp-override", type=float, default=None, help="um/px of target slides or images that record none.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda")
@click.option("--overwrite", is_flag=True, help="Make the adapted model again in a folder that has one.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@config_option
@records_config()
def adapt(checkpoint, source, target, out_dir, hp, steps, batch_size, lr, mpp_override, seed, device, overwrite, as_json):
    """Adapt a trained model to a new scanner or organ without its labels.

    The source patches are re-styled to the target's stain (global alignment) and trained with
    their labels, while the encoder features of source and target are aligned where their gap
    is largest (local alignment); at the end the BatchNorm statistics are re-estimated on the
    target. RUN_DIR gets best.pt (an ordinary checkpoint: `histodg predict RUN_DIR/best.pt`),
    config.json, metrics.jsonl and result.json (written last).
    """
    from ..adaptation.config import AdaptConfig
    from ..adaptation.runner import adapt as run_adapt
    from .views import AdaptView

    try:
        cfg = AdaptConfig(checkpoint=str(checkpoint), source=tuple(map(str, source)), target=tuple(map(str, target)),
                          out_dir=str(out_dir), hparams=parse_hp(hp), steps=steps, batch_size=batch_size, lr=lr,
                          seed=seed, device=device, target_mpp=mpp_override, overwrite=overwrite)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    with AdaptView() as view:
        result = run_adapt(cfg, on_step=view.on_step, on_note=view.on_note)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    gap = result["target_bn_gap"]
    click.echo(f"adapted to {result['target_domain']} in {result['steps']} steps ({result['seconds']:.0f} s); "
               f"BatchNorm statistics against the target's: {gap['before']:.4f} -> {gap['after']:.4f}")
    click.echo(f"checkpoint: {result['checkpoint']}  (histodg predict {result['checkpoint']} SLIDES -o OUT)")
