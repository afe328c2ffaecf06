"""One writer per output: `<out>.lock` beside a store, a prediction folder or a run folder.

    with output_lock(out) as stale:      # Locked while another live process holds it
        ...                              # stale: the dead holder taken over from, or None

A lock names its holder: host, pid, the process's start time and the machine's boot id, so a pid
that a reboot or a long uptime gave to another process is not mistaken for the holder. It
appears whole or not at all (written to a temporary, then hard-linked into place, which fails
if the name exists), so a crash can never leave an empty or half-written lock. A lock whose
holder is dead is taken over; one that cannot be read (left by histodg before 0.2, or damaged)
is taken over once it is older than `UNREADABLE_GRACE_S`. Another host's holder is assumed alive.

`run_lock(folder, error)` is the form the one-folder commands use (`train`, `train --cv`, `adapt`,
`synth`; `evaluate` writes no files): a held lock is refused with one line naming the holder.
The commands release their locks on SIGTERM too (`cli.stop_cleanly_on_sigterm`); a lock left on
another host by a process killed outright stays until deleted by hand (histodg cannot see
whether that process still runs).
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from . import HistodgError
from .files import NO_FOLLOW, new_temporary, read_json

UNREADABLE_GRACE_S = 10.0  # an unreadable lock younger than this may be one being written by older histodg


class Locked(Exception):
    """Another live process holds the lock of an output."""

    def __init__(self, out, holder: dict):
        self.out, self.holder = out, holder
        super().__init__(f"{out}: {held_by(holder)}; skipped")


def held_by(holder: dict) -> str:
    if not holder:
        return "being written by another process (its lock is unreadable and recent)"
    return f"being written by another process (host {holder.get('host')}, pid {holder.get('pid')})"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks after boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    return stat[stat.rindex(")") + 2:].split()[19]  # field 22; the name in brackets may hold spaces


def me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid), "boot": _boot_id(),
            "since": round(time.time(), 1)}


def alive(holder: dict) -> bool:
    """Whether a lock's holder may still run: a process on another host is assumed to."""
    if holder.get("host") != socket.gethostname():
        return True
    if holder.get("boot") and _boot_id() and holder["boot"] != _boot_id():
        return False  # written before this machine last started
    try:
        pid = int(holder.get("pid", -1))
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    now = _start_time(pid)
    return not (holder.get("start") and now and holder["start"] != now)  # the pid is another process's now


def read_lock(lock: Path) -> dict | None:
    try:
        holder = read_json(lock)  # nesting too deep is a ValueError there
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _age(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0


def create(lock: Path, holder: dict) -> bool:
    """Put `holder` at `lock` whole, or return False when the name is taken. Where the filesystem
    has no hard links (exFAT drives, object-store mounts) the lock is created exclusively and then
    written: a crash in between leaves it unreadable, which heals after `UNREADABLE_GRACE_S`."""
    tmp = new_temporary(lock)
    try:
        tmp.write_text(json.dumps(holder))
        os.link(tmp, lock)
    except FileExistsError:
        return False
    except OSError:  # EPERM / ENOTSUP / EOPNOTSUPP: no hard links here
        return _create_in_place(lock, holder)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _create_in_place(lock: Path, holder: dict) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY | NO_FOLLOW, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(holder))
    return True


def _guard(guard: Path, holder: dict) -> bool:
    """The right to take over a lock, one process at a time; a guard left by a crash heals too."""
    if create(guard, holder):
        return True
    other = read_lock(guard)
    if (other is None and _age(guard) > UNREADABLE_GRACE_S) or (other is not None and not alive(other)):
        guard.unlink(missing_ok=True)
        return create(guard, holder)
    return False


def _take_over(out: Path, lock: Path, mine: dict) -> dict:
    """Replace a stale lock by `mine`; returns what was there; Locked if it is not stale."""
    holder = read_lock(lock)
    if holder is not None and alive(holder):
        raise Locked(out, holder)
    if holder is None and _age(lock) <= UNREADABLE_GRACE_S:
        raise Locked(out, {})
    guard = lock.with_name(lock.name + ".takeover")
    if not _guard(guard, mine):
        raise Locked(out, holder or {})
    try:
        if read_lock(lock) == holder:  # still the stale one: nobody took it over meanwhile
            lock.unlink(missing_ok=True)
        if not create(lock, mine):
            raise Locked(out, read_lock(lock) or {})
    finally:
        guard.unlink(missing_ok=True)
    return holder or {"unreadable": True}


def lock_path(out: Path) -> Path:
    """`<out>.lock` beside the output, named from its resolved path: `-o .` or `-o runs/../a` name the
    same lock as its plain spelling; the filesystem's root has its lock inside."""
    where = Path(out).resolve()
    return where.with_name(where.name + ".lock") if where.name else where / ".histodg.lock"


@contextmanager
def output_lock(out):
    """Hold `<out>.lock` while this process writes `out`, so that two processes (an overlapping
    shard, a resubmitted task, two people) never write the same output at once. Yields the stale
    holder taken over from (`{"unreadable": True}` for a damaged lock), or None. Removed at the
    end if still this process's."""
    out = Path(out)
    lock = lock_path(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    mine = me()
    stale = None if create(lock, mine) else _take_over(out, lock, mine)
    try:
        yield stale
    finally:
        if read_lock(lock) == mine:
            lock.unlink(missing_ok=True)


def stale_note(stale: dict | None) -> str | None:
    """The one line that says a stale lock was taken over (None when there was none)."""
    if not stale:
        return None
    if stale.get("unreadable"):
        return "took over a lock left unreadable by a crash"
    return f"took over the lock of a process that died (host {stale.get('host')}, pid {stale.get('pid')})"


@contextmanager
def run_lock(folder, error: type[HistodgError] = HistodgError, on_note=None):
    """`output_lock(folder)` for a command that writes one folder: another live writer is refused
    with `error(folder, ...)`; `on_note(line)` is told when a stale lock was taken over."""
    with ExitStack() as stack:
        try:
            stale = stack.enter_context(output_lock(folder))
        except Locked as exc:
            raise error(folder, f"{held_by(exc.holder)}: wait for it to finish, or write elsewhere") from None
        if on_note and stale:
            on_note(stale_note(stale))
        yield
