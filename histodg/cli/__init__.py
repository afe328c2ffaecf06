"""histodg command line: thin Click commands over the library (parse, call, print with rich).

- `options`: the option blocks `tile` and `predict` share, small parsers;
- `tiling` (`info`, `tile`), `training` (`train`, `methods`), `adapting` (`adapt`), `inference`
  (`predict`, `evaluate`), `models` (`export`), `synthetic` (`synth`): the commands;
- `views`: every rich table, progress bar and live view.

Heavy modules (torch, smp, zarr, openslide) are imported inside command bodies so that
`histodg --help` stays instant. Library errors (`HistodgError`) become one line on stderr and
exit status 1; usage errors exit 2; never a traceback for bad input.

May import: everything.
"""
from __future__ import annotations

import sys

import click

from .. import HistodgError, __version__
from .options import CONTEXT, fail_line


class Terminated(BaseException):
    """SIGTERM (Slurm's time limit, `scancel`, torchrun stopping its ranks): unwind like Ctrl-C. A
    BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way turns it into
    an ordinary error."""


def _terminated(signum, frame):
    raise Terminated


class Group(click.Group):
    """Turn library errors into one line and exit 1; never a traceback for bad input."""

    def parse_args(self, ctx, args):
        ctx.meta["histodg.argv"] = list(args)  # the command as typed, for the record (`train`'s model card)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Terminated:  # locks released and temporaries removed on the way out (their `finally`s ran)
            fail_line("stopped (SIGTERM); rerun the same command to resume")
            sys.exit(143)
        except HistodgError as exc:
            fail_line(str(exc))
            sys.exit(1)
        except OSError as exc:  # the environment (disk full, permissions): one line naming the file
            where = exc.filename or "histodg"
            fail_line(f"{where}: {exc.strerror or exc}")
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
    quiet_readers()
    names_as_bytes()
    stop_cleanly_on_sigterm()


def stop_cleanly_on_sigterm() -> None:
    """SIGTERM ends the command as Ctrl-C does, through every `finally`: a batch job stopped by
    its time limit leaves no lock behind that would hold up the requeued job on another node."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def names_as_bytes() -> None:
    """A file name that is not UTF-8 (Python holds it with surrogate escapes) is printed as its own
    bytes, as `ls` does; a strict stdout (a UTF-8 locale) would stop the command at the first one."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")


def quiet_readers() -> None:
    """Damaged files are reported once, as histodg's own line: the readers' own warnings about
    them (tifffile's log, Pillow's EXIF warnings) would only repeat it, in their terms."""
    import logging
    import warnings

    logging.getLogger("tifffile").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


from .adapting import adapt  # noqa: E402
from .inference import evaluate, predict  # noqa: E402
from .models import export  # noqa: E402
from .synthetic import synth  # noqa: E402
from .tiling import info, tile  # noqa: E402
from .training import methods, train  # noqa: E402

for command in (info, tile, train, methods, adapt, synth, predict, evaluate, export):
    main.add_command(command)

__all__ = ["main"]
