"""`--config FILE`: a command's options from YAML, and the settings a run used written back.

    histodg predict --config run.yaml                 # every option from the file
    histodg predict --config run.yaml --tta none      # a flag on the command line wins over the file
    histodg predict --config preds/config.yaml        # what the last run into preds/ used, again

Keys are the option names (`mpp-tolerance` or `mpp_tolerance`; `out` for `-o/--out`) and the
arguments' names (`slides`, `stores`, `checkpoint`, `sources`); a repeatable option or an
argument that takes several values is a list. The file becomes the command's defaults
(Click's `default_map`), so the command line wins and Click converts and checks the values as it
does typed ones. Relative paths are relative to the working directory, as on the command line.
An unknown key, a value of the wrong kind, or a file that is not a YAML mapping is one line naming
the file and the key.

After a command that writes into a folder (`tile`, `train`, `predict`, `adapt`), that folder's
`config.yaml` is the settings it ran with: every option and argument, defaults included, paths
absolute; not the flags about what to do with existing outputs (`--overwrite`, `--resume`) or
how to print (`--json`). The last command run into a folder writes it.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from .. import HistodgError

CONFIG_NAME = "config.yaml"
MAX_BYTES = 1 << 20  # a config is a page of settings; anything larger is not one
NOT_RECORDED = ("overwrite", "resume", "as_json")
OUTPUTS_MADE = "histodg.outputs_made"


def config_option(f):
    return click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), is_eager=True,
                        expose_value=False, callback=_read,
                        help="Read the options from a YAML file (keys: the option names, lists for repeatable ones); "
                             "the command line wins. The settings a run used are written to config.yaml in its output folder.")(f)


def key_of(p: click.Parameter) -> str:
    """The name a parameter has in a config file: its long option without dashes, or the argument's name."""
    longs = [o[2:] for o in getattr(p, "opts", ()) if o.startswith("--")]
    return longs[0] if longs and isinstance(p, click.Option) else str(p.name)


def _keys(command: click.Command) -> dict[str, click.Parameter]:
    keys: dict[str, click.Parameter] = {}
    for p in command.params:
        if p.name in ("config_file", "help") or not p.expose_value:
            continue
        for name in (str(p.name), key_of(p)):
            keys[name.replace("-", "_")] = p
    return keys


def _load(path: Path):
    import yaml

    try:
        if path.stat().st_size > MAX_BYTES:
            raise HistodgError(path, f"larger than {MAX_BYTES >> 20} MB: not a config file")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HistodgError(path, exc.strerror or str(exc)) from None
    except UnicodeDecodeError:
        raise HistodgError(path, "not a text file (a YAML config is UTF-8 text)") from None
    try:
        data = yaml.safe_load(text)  # plain data only: no tags that build objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise HistodgError(path, f"not valid YAML{where} ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HistodgError(path, "must be a mapping of option names to values (`tta: none`)")
    return data


def _value(ctx: click.Context, p: click.Parameter, key: str, value, path: Path):
    """The file's value for `p`, checked as Click will convert it (the converted value is Click's own job)."""
    several = getattr(p, "multiple", False) or p.nargs == -1
    items = value if isinstance(value, list) else [value]
    if not several and isinstance(value, list):
        raise HistodgError(path, f"{key}: one value expected, got a list")
    if any(isinstance(v, (dict, list)) for v in items):
        raise HistodgError(path, f"{key}: a value must be a number, a string or a boolean, not a mapping or a nested list")
    try:
        for v in items:
            if v is not None:
                p.type.convert(v, p, ctx)
    except click.BadParameter as exc:
        raise HistodgError(path, f"{key}: {exc.message}") from None
    return items if several else value


def _read(ctx: click.Context, param: click.Parameter, value) -> None:
    if value is None:
        return
    path = Path(value)
    keys = _keys(ctx.command)
    defaults = {}
    for key, v in _load(path).items():
        p = keys.get(str(key).replace("-", "_"))
        if p is None:
            known = ", ".join(sorted({key_of(q) for q in keys.values()}))
            raise HistodgError(path, f"unknown key {key!r} for `histodg {ctx.command.name}` (its keys: {known})")
        defaults[str(p.name)] = _value(ctx, p, str(key), v, path)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def _plain(value):
    if isinstance(value, Path):
        return str(value.absolute())
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def resolved(ctx: click.Context) -> dict:
    """The command's settings as a config file holds them (every option, defaults included)."""
    return {key_of(p): _plain(ctx.params[p.name]) for p in ctx.command.params
            if p.expose_value and p.name in ctx.params and p.name not in NOT_RECORDED}


def write_config(ctx: click.Context, folder: Path) -> Path:
    import yaml

    from ..files import atomic_write

    header = f"# histodg {ctx.command.name}: the settings of the last run into this folder; rerun: histodg {ctx.command.name} --config {(folder / CONFIG_NAME).absolute()}\n"
    text = header + yaml.safe_dump(resolved(ctx), sort_keys=False, allow_unicode=True)
    return atomic_write(folder / CONFIG_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def note_outputs(results) -> None:
    """A batch that failed on some inputs (exit status 1) still records its settings when others
    are done or were already done with these settings (`BatchResult.status`)."""
    click.get_current_context().meta[OUTPUTS_MADE] = any(r.status in ("done", "skipped") for r in results)


def records_config(folder_param: str = "out_dir", skip_when: str | None = None):
    """Write `config.yaml` into the command's output folder once the command has run, or when a
    batch failed on some inputs but others have outputs of these settings (`note_outputs`); not
    when it was refused (a setting that does not match what is there, a run that exists), was
    interrupted, or `skip_when` names a flag that is on (`train --resume`); under torchrun only
    rank 0 writes."""
    def decorate(f):
        @functools.wraps(f)
        def run(*args, **kwargs):
            ctx = click.get_current_context()

            def record():
                folder = Path(ctx.params[folder_param])
                if folder.is_dir() and not (skip_when and ctx.params.get(skip_when)) and os.environ.get("RANK", "0") == "0":
                    write_config(ctx, folder)

            try:
                result = f(*args, **kwargs)
            except SystemExit as exc:
                if exc.code in (0, None) or (exc.code == 1 and ctx.meta.get(OUTPUTS_MADE)):
                    record()
                raise
            record()
            return result
        return run
    return decorate
