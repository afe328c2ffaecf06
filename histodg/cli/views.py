"""Every rich view of the CLI: batch progress and summaries, `info`, training, methods, evaluation.

Progress and per-item lines go to stderr; the summary (table or JSON) goes to stdout, so
`histodg tile ... --json > summary.json` stays machine-readable.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def _width(stream) -> int | None:
    """Full width on a terminal; 160 columns in logs (rich would use 80 and wrap the tables)."""
    return None if stream.isatty() else int(os.environ.get("COLUMNS", 160))


err = Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))
out = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))


def error_markup(message: str) -> str:
    """The one line an error gives, as rich markup: `error: <path>: <reason>`."""
    return f"[bold red]error[/]: {escape(message)}"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


class BatchView:
    """Progress of a batch (`batch.run_jobs`'s view): a bar for the batch and one for the input
    running, one line per finished input, then the summary table (or JSON with `as_json`)."""

    def __init__(self, verb: str, spec: SummarySpec, as_json: bool = False, summary=None):
        self.verb, self.spec, self.as_json = verb, spec, as_json
        self.summary = summary  # a summary.BatchSummary: told of each finished input
        self.bar = _progress()
        self.overall = self.item = None
        self.items = {}  # job name -> its bar (several run at once with predict --devices)
        self.results = []

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)
        if exc[0] is None:
            if self.as_json:
                click.echo(json.dumps([asdict(r) for r in self.results], indent=2, default=str))
            else:
                print_summary(self.results, self.verb, self.spec)

    def start(self, job, total_jobs: int) -> None:
        if self.overall is None:
            self.overall = self.bar.add_task(f"{self.verb} {total_jobs} input(s)", total=total_jobs)
        self.item = self.items[job.name] = self.bar.add_task(f"  {escape(job.name)}", total=None)

    def progress(self, total=None, done=None, advance=None) -> None:
        if total is not None:
            self.bar.update(self.item, total=total, completed=done or 0)
        if advance:
            self.bar.advance(self.item, advance)

    def finish(self, job, res) -> None:
        self.results.append(res)
        if self.summary is not None:
            try:
                self.summary.add(res)
            except OSError as exc:  # the batch goes on; the summary says it could not be written, once
                self.bar.console.print(error_markup(f"{self.summary.out_dir}: summary not written ({exc.strerror or exc})"))
                self.summary = None
        if self.overall is None:  # finished without a start (a device worker that died first)
            self.overall = self.bar.add_task(f"{self.verb} input(s)", total=None)
        task = self.items.pop(job.name, None)
        if task is not None:
            self.bar.remove_task(task)
        self.bar.advance(self.overall)
        if res.status == "failed":
            self.bar.console.print(error_markup(res.error or "failed"))
        else:
            self.bar.console.print(f"[green]{res.status}[/] {escape(job.name)} {_brief(res, self.spec)}")


@dataclass(frozen=True)
class SummarySpec:
    """How a command's summary names its columns: the count and area fields of its results."""

    count: tuple[str, str]  # (result attribute, column label)
    area: tuple[str, str, str]  # (result attribute, column label, word in the caption)
    bad_note: str
    resumed_note: str


TILE_SUMMARY = SummarySpec(("patches", "patches"), ("tissue_area_mm2", "tissue mm²", "tissue"),
                           "undecodable windows skipped (see the store's bad_windows)", "resumed")
PREDICT_SUMMARY = SummarySpec(("windows", "windows"), ("tumor_area_mm2", "tumour mm²", "tumour"),
                              "unreadable windows skipped (see done.json)", "redone (was unfinished)")


def _brief(res, spec: SummarySpec) -> str:
    parts = []
    count_attr, count_label = spec.count
    if getattr(res, count_attr, None) is not None:
        parts.append(f"{getattr(res, count_attr)} {count_label}")
    if getattr(res, "bad_windows", 0):
        parts.append(f"[yellow]{res.bad_windows} bad windows skipped[/]")
    qc = getattr(res, "qc", None) or {}
    artefacts = {k: v for k, v in (qc.get("counts") or {}).items() if v and k != "glass"}  # glass: mostly empty windows
    if artefacts:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(artefacts.items()))
        parts.append(f"[yellow]QC: {qc.get('excluded', 0)} windows excluded ({counts})[/]")
    shift = getattr(res, "shift", None) or {}
    if shift.get("warn"):
        parts.append(f"[bold yellow]domain shift {shift['score']:.1f}[/]")
    if getattr(res, "resumed", False):
        parts.append("resumed")
    if getattr(res, "note", None):
        parts.append(escape(res.note))
    return ", ".join(parts)


def print_summary(results, verb: str, spec: SummarySpec) -> None:
    count_attr, count_label = spec.count
    area_attr, area_label, area_word = spec.area
    table = Table(title=f"histodg {verb}: {len(results)} input(s)", title_justify="left")
    for col, kw in [("input", {}), ("status", {}), (count_label, {"justify": "right"}), (area_label, {"justify": "right"}),
                    ("bad windows", {"justify": "right"}), ("seconds", {"justify": "right"}), ("note", {"overflow": "fold"})]:
        table.add_column(col, **kw)
    shifts = any(getattr(r, "shift", None) for r in results)
    if shifts:
        table.add_column("shift", justify="right")
    style = {"done": "green", "skipped": "cyan", "failed": "bold red"}
    for r in results:
        area = "" if getattr(r, area_attr) is None else f"{getattr(r, area_attr):.1f}"
        note = r.error or r.note or (spec.resumed_note if r.resumed else "")
        if r.bad_windows and not r.error:
            note = f"{r.bad_windows} {spec.bad_note}"
        cells = [escape(r.name), f"[{style.get(r.status, '')}]{r.status}[/]", str(getattr(r, count_attr)), area,
                 str(r.bad_windows or ""), f"{r.seconds:.1f}", escape(note)]
        if shifts:
            cells.append(_shift_cell(getattr(r, "shift", None) or {}))
        table.add_row(*cells)
    n = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    total = sum(getattr(r, count_attr) for r in results)
    area = sum(getattr(r, area_attr) or 0 for r in results)
    bad = sum(r.bad_windows for r in results)
    table.caption = (f"{n['done']} done, {n['skipped']} skipped, {n['failed']} failed; "
                     f"{total} {count_label}, {area:.1f} mm² {area_word}, {bad} bad windows")
    table.caption_justify = "left"
    out.print(table)
    for r in results:  # the domain-shift warning (predict): one line per slide outside what the model was trained on
        _warn_shift(r.name, getattr(r, "shift", None) or {})


def _shift_cell(shift: dict) -> str:
    score = shift.get("score")
    return "" if score is None else (f"[bold yellow]{score:.2f} ⚠[/]" if shift.get("warn") else f"{score:.2f}")


def _warn_shift(name: str, shift: dict) -> None:
    """One line for an input whose domain-shift score is above every training slide's."""
    if shift.get("warn"):
        out.print(f"[bold yellow]warning:[/] {escape(name)}: domain shift {shift['score']:.1f}x the farthest training "
                  f"slide (nearest training domain {escape(str(shift['nearest']))}): outside what the model was trained "
                  f"on; check its result before trusting it")


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """A model card's rows: nested sections as `section.key`."""
    rows: list[tuple[str, object]] = []
    for k, v in d.items():
        if k in ("kind", "path", "model_config"):  # the whole config is in --json
            continue
        if isinstance(v, dict) and v and k not in ("labels", "hparams", "augmentation", "normalization", "val", "heldout"):
            rows += _flat(v, f"{prefix}{k}.")
        else:
            rows.append((prefix + k, v))
    return rows


def print_info(items: list[dict]) -> None:
    for d in items:
        table = Table(title=escape(d["path"]), show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        if d.get("kind") in ("model", "exported"):  # a model card, or the record an exported model carries
            for k, v in _flat(d):
                table.add_row(k, escape("not recorded" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)))
            out.print(table)
            continue
        if d.get("kind") == "store":
            keys = ["complete", "patches", "tile_size", "mpp", "overlap", "organ", "scanner", "labels", "has_masks",
                    "bad_windows", "qc", "format_version", "histodg_version"]
        else:
            keys = ["backend", "vendor", "dimensions", "level_count", "level_dimensions", "level_downsamples", "mpp",
                    "mpp_source", "objective_power", "associated_images"]
        if "check" in d:
            keys.append("check")
        for k in keys:
            v = d.get(k)
            table.add_row(k, escape(json.dumps(v) if isinstance(v, (list, dict)) else str(v)))
        out.print(table)


class _ProgressView:
    """A live view of one long command: its rich `progress` shown while inside, notes printed above it."""

    progress: Progress

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def on_note(self, line: str) -> None:
        self.progress.console.print(f"note: {escape(line)}")


class TrainView(_ProgressView):
    """Live view of a training run: a bar per stage with loss, lr and throughput; a line per epoch
    with Dice per domain (seen domains' validation, and held-out domains in brackets)."""

    def __init__(self):
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.1f} img/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=err,
        )
        self.task = None
        self._t = None
        self._done = 0

    def on_stage_start(self, stage, model, total_steps):
        import time

        if self.task is not None:
            self.progress.remove_task(self.task)
        doms = ", ".join(stage.domain_names)
        self.progress.console.print(f"[bold]stage {stage.index + 1}[/] ({stage.axis}): {escape(doms)}"
                                    + (f"; held out: {escape(', '.join(stage.heldout))}" if stage.heldout else ""))
        self.task = self.progress.add_task(f"stage {stage.index + 1}", total=total_steps, loss=float("nan"), lr=0.0, ips=0.0)
        self._t, self._done = time.perf_counter(), 0

    def on_step(self, info):
        import time

        self._done += 1
        ips = info.get("images", 0)
        dt = time.perf_counter() - self._t
        self.progress.update(self.task, advance=1, loss=info["loss"], lr=info["lr"],
                             ips=(self._done * ips / dt) if dt > 0 and ips else 0.0)

    def on_epoch(self, r):
        def fmt(block):
            doms = (block or {}).get("domains", {})
            return " ".join(f"{escape(d)} {s['dice_pixels']:.3f}" for d, s in doms.items())

        held = fmt(r.get("heldout"))
        self.progress.console.print(
            f"stage {r['stage']} epoch {r['epoch']}/{r['epochs']}  loss {r['train_loss']:.4f}  Dice {fmt(r.get('val')) or '-'}"
            + (f"  \\[held out: {held}]" if held else "") + ("  [green]best[/]" if r.get("best") else ""))


class AdaptView(_ProgressView):
    """Live view of `histodg adapt`: one bar, the segmentation and alignment losses."""

    def __init__(self):
        self.progress = Progress(TextColumn("adapt"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("seg {task.fields[seg]:.4f}  align {task.fields[local]:.4f}"),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err)
        self.task = None

    def on_step(self, logs: dict, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task("adapt", total=total, seg=float("nan"), local=float("nan"))
        self.progress.update(self.task, completed=logs["step"], seg=logs["seg_loss"], local=logs.get("local_loss", float("nan")))


def print_cv(summary: dict) -> None:
    table = Table(title=f"leave-one-{summary['axis']}-out cross-validation", title_justify="left")
    for c in ("held-out domain", "Dice", "IoU"):
        table.add_column(c, justify="right" if c != "held-out domain" else "left")
    for d, f in summary["folds"].items():
        table.add_row(escape(d), f"{f['dice']:.4f}", f"{f['iou']:.4f}")
    table.caption = f"Dice {summary['dice_mean']:.4f} ± {summary['dice_std']:.4f}   IoU {summary['iou_mean']:.4f} ± {summary['iou_std']:.4f}"
    table.caption_justify = "left"
    out.print(table)


def print_methods(rows: list[dict]) -> None:
    for m in rows:
        name = f"{m['name']} (the default)" if m.get("default") else m["name"]
        if not m["hparams"]:
            out.print(f"[bold]{name}[/]: {escape(m['doc'])} (no hyperparameters)")
            continue
        table = Table(title=f"{name}: {escape(m['doc'])}", title_justify="left", show_header=bool(m["hparams"]))
        table.add_column("--hp")
        table.add_column("default")
        table.add_column("meaning", overflow="fold")
        for h in m["hparams"]:
            table.add_row(h["name"], str(h["default"]), escape(h["help"]))
        out.print(table)


def print_train_result(result: dict) -> None:
    """The final epoch's Dice/IoU per domain: seen domains' validation and held-out domains."""
    final = result.get("final") or {}
    table = Table(title=f"histodg train: {result['run_dir']}", title_justify="left")
    for c, kw in (("domain", {}), ("kind", {}), ("Dice", {"justify": "right"}), ("IoU", {"justify": "right"}),
                  ("patches", {"justify": "right"})):
        table.add_column(c, **kw)
    for kind, label in (("val", "validation"), ("heldout", "held out")):
        for d, s in ((final.get(kind) or {}).get("domains") or {}).items():
            table.add_row(escape(d), label, f"{s['dice_pixels']:.4f}", f"{s['iou_pixels']:.4f}", str(s["images"]))
    best = result.get("best_val_dice")
    table.caption = (f"{result['epochs_run']} epochs, {result['global_step']} steps; Dice pooled over each domain's pixels"
                     + (f"; best validation Dice {best:.4f} (best.pt)" if best is not None else "; best.pt = last epoch"))
    table.caption_justify = "left"
    out.print(table)


def print_evaluation(table: dict, title: str = "histodg evaluate") -> None:
    """Per-image, per-domain and overall tables (rich, on stdout)."""
    from rich.markup import escape
    from rich.table import Table

    def f(v):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    images = Table(title=f"{title}: {len(table['images'])} image(s)", title_justify="left")
    shifts = any(r.get("shift") for r in table["images"])  # stores scored by a checkpoint with a shift reference
    for c in ("image", "domain", "Dice", "IoU", "predicted px", "true px", *(("shift",) if shifts else ())):
        images.add_column(c, justify="left" if c in ("image", "domain") else "right")
    for r in table["images"]:
        cells = [escape(r["name"]), escape(r["domain"]), f(r["dice"]), f(r["iou"]), str(r["predicted_px"]), str(r["true_px"])]
        if shifts:
            cells.append(_shift_cell(r.get("shift") or {}))
        images.add_row(*cells)
    out.print(images)
    for r in table["images"]:  # as predict warns: one line per image outside what the model was trained on
        _warn_shift(r["name"], r.get("shift") or {})
    doms = Table(title="per domain (mean over images)", title_justify="left")
    for c in ("domain", "images", "Dice", "IoU", "Dice (pixels)", "IoU (pixels)"):
        doms.add_column(c, justify="left" if c == "domain" else "right")
    for name, s in table["domains"].items():
        doms.add_row(escape(name), str(s["images"]), f(s["dice"]), f(s["iou"]), f(s["dice_pixels"]), f(s["iou_pixels"]))
    o = table["overall"]
    doms.add_row("[bold]overall[/]", str(o["images"]), f(o["dice"]), f(o["iou"]), f(o["dice_pixels"]), f(o["iou_pixels"]),
                 style="bold")
    classes = table.get("classes") or {}  # a multi-class model's predictions: each class's mean Dice over images
    per_class = "; per class: " + ", ".join(f"{escape(k)} {f(v)}" for k, v in classes.items()) if classes else ""
    doms.caption = f"mean over domains: Dice {f(table['mean_domain_dice'])}{per_class}"
    doms.caption_justify = "left"
    out.print(doms)
