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
from pathlib import Path
from typing import Callable


def temporary_name(path: Path) -> Path:
    """Where `atomic_write` writes before renaming: `.NAME.tmp.EXT` beside `path`."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` then rename tmp over `path`; on failure nothing is left under either name."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    """`text` as UTF-8; a file name that was not UTF-8 (held by Python as surrogate escapes,
    `os.fsdecode`) is written back as its original bytes, so the name stays exact."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))


def write_json_atomic(path, data, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, default=str))


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
