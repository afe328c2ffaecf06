"""The deep check of a store (`histodg info --check`): its shards (`integrity`), then every patch of
every array decoded, as zarr would read it."""
from __future__ import annotations

from pathlib import Path

from .. import exc_line
from .integrity import SHARDED, shard_problems
from .metadata import read_metadata
from .reader import StoreError, open_store


def check_store(path) -> tuple[int, list[str]]:
    """(patches, problems) of a complete store: its shards, then every chunk decoded."""
    path = Path(path)
    try:
        store = open_store(path, require_complete=True, verify=False)
    except StoreError as exc:
        return 0, [exc.reason]
    problems = list(shard_problems(path, read_metadata(path)))
    if not problems:
        problems = chunk_problems(store)
    return len(store), problems


def chunk_problems(store, limit: int = 20) -> list[str]:
    """Decode every patch of every array of an open store; what fails (at most `limit` lines)."""
    problems = []
    for name in ("images", "masks", "coords", "tissue"):
        if name not in store.group:
            continue
        arr = store.group[name]
        step = 16 if name in SHARDED else arr.shape[0]  # 16 patches at a time: bounded memory
        for a in range(0, arr.shape[0], max(step, 1)):
            if _decodes(arr, a, a + step):
                continue
            for i in range(a, min(arr.shape[0], a + step)):  # name each patch that fails
                why = _decode_error(arr, i)
                if why:
                    problems.append(f"{name} patch {i}: cannot be decoded ({why})")
                    if len(problems) >= limit:
                        return problems
    return problems


def _decodes(arr, a: int, b: int) -> bool:
    try:
        arr[a:b]
        return True
    except Exception:  # whatever the codecs raise
        return False


def _decode_error(arr, i: int) -> str | None:
    try:
        arr[i:i + 1]
        return None
    except Exception as exc:
        return exc_line(exc, 120)
