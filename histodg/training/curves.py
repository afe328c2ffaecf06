"""curves.png: training loss and Dice per domain over epochs, one panel each, stages marked."""
from __future__ import annotations

from pathlib import Path

from ..files import atomic_write


def plot_curves(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = list(range(1, len(history) + 1))
    ax_loss.plot(x, [r.get("train_loss") for r in history], marker="o", color="black")
    ax_loss.set(xlabel="epoch (all stages)", ylabel="training loss", title="loss")
    series: dict[tuple[str, str, str], list] = {}
    for i, r in enumerate(history):
        for kind, style in (("val", "-"), ("heldout", "--")):
            for d, sc in (r.get(kind) or {}).get("domains", {}).items():
                series.setdefault((kind, d, style), [None] * len(history))[i] = sc["dice_pixels"]
    for (kind, d, style), ys in sorted(series.items()):
        ax_dice.plot(x, ys, style, marker=".", label=f"{d} ({'held out' if kind == 'heldout' else 'val'})")
    ax_dice.set(xlabel="epoch (all stages)", ylabel="Dice (pixels)", title="Dice per domain", ylim=(0, 1))
    if series:
        ax_dice.legend(fontsize=7, loc="lower right")
    stages = [r["stage"] for r in history]
    for ax in (ax_loss, ax_dice):
        for i in range(1, len(stages)):
            if stages[i] != stages[i - 1]:
                ax.axvline(i + 0.5, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return path
