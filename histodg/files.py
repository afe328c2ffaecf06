"""File helpers shared by every writer: atomic replacement, source fingerprints, hashes.

Nothing histodg writes under its final name is ever half-written: `atomic_write` writes to a
temporary name beside the target and renames it over the target in one step (the temporary
keeps the target's extension, so writers that pick a format from it still work), and removes
the temporary if writing fails.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Callable


def safe_name(text: str, fallback: str = "slide") -> str:
    """`text` as one harmless path component: letters, digits and `._+-` kept, every other run of
    characters (a `/`, `..`, spaces, non-ASCII) one `_`, no leading dot; the one rule for every name
    that becomes a file or folder name (slide names, cross-validation fold folders)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._") or fallback


NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


def new_temporary(path, tag: str = "tmp") -> Path:
    """A new, empty file of this process beside `path`: `.NAME.<tag>-<random>.EXT` (the target's
    extension kept, so writers that pick a format from it still work), created with O_EXCL and
    O_NOFOLLOW, so a file or link planted at a guessable name is never written through: whatever
    is found there, a new random name is tried."""
    path = Path(path)
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}.{tag}-{secrets.token_hex(4)}{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` then rename tmp over `path`; on failure nothing is left under either name.
    `tmp` is `new_temporary(path)`: a file of this process, never a planted link; the rename
    replaces a link at `path` itself, never its target."""
    path = Path(path)
    _sweep(path)
    tmp = new_temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


STALE_TEMPORARY_S = 3600  # a temporary of `atomic_write` this old was left by a killed process


def _sweep(path: Path) -> None:
    """Remove what killed writers of `path` left (`.NAME.tmp-*.EXT` older than an hour), so that a
    folder written again and again after interruptions does not fill with model-sized temporaries."""
    import glob
    import time

    pattern = f".{glob.escape(path.stem)}.tmp-*{glob.escape(path.suffix)}"
    for old in path.parent.glob(pattern):
        try:
            if time.time() - old.lstat().st_mtime > STALE_TEMPORARY_S:
                old.unlink()
        except OSError:
            pass


def append_text(path, text: str) -> None:
    """Append `text` to `path` (created if missing), never through a link planted there."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW, 0o666)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(text)


def write_text_atomic(path, text: str) -> Path:
    """`text` as UTF-8; a file name that was not UTF-8 (held by Python as surrogate escapes,
    `os.fsdecode`) is written back as its original bytes, so the name stays exact."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))


def write_json_atomic(path, data, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, default=str))


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets run as a formula (OWASP: CSV injection)


def csv_cell(value):
    """A value as a CSV cell a spreadsheet shows and never runs: text that starts like a formula
    gets a leading `'` (OWASP's advice); numbers, negative ones too, stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def parse_json(text: str):
    """`json.loads`, but JSON nested deeper than Python's parser can follow (a hostile or broken
    file: thousands of `[`) is a ValueError like any other malformed JSON, not a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path):
    """The JSON of the UTF-8 file at `path` (`parse_json`'s errors; OSError when it cannot be read)."""
    return parse_json(Path(path).read_text(encoding="utf-8"))


def read_csv_rows(path) -> list[dict]:
    """The rows of a CSV file with a header (a byte-order mark is allowed), as dicts."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def source_fingerprint(path) -> dict:
    """What identifies an input file between runs: resolved path, size and mtime."""
    path = Path(path)
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime": round(st.st_mtime, 3)}


def source_changed(recorded: dict | None, path) -> bool:
    """Whether the file at `path` differs (size or mtime) from a recorded `source_fingerprint`."""
    recorded, now = recorded or {}, source_fingerprint(path)
    return recorded.get("size") != now["size"] or abs(float(recorded.get("mtime", 0)) - now["mtime"]) > 1e-3


def setting_diffs(have: dict, wanted: dict, source: dict | None, path, messages: dict | None = None) -> str | None:
    """Why an existing output cannot be reused: each setting that differs (`key old -> new`, or
    `messages[key]`), and whether the input file changed since `source` was recorded; None if
    nothing did."""
    messages = messages or {}
    diffs = [messages.get(k) or f"{k} {have.get(k)!r} -> {v!r}" for k, v in wanted.items() if have.get(k) != v]
    if source_changed(source, path):
        diffs.append("the source file changed")
    return "; ".join(diffs) or None


def file_sha256(path, block: int = 2**22) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
