"""The zarr patch store: one owner for its format.

- `schema`: the arrays, every attribute with its type (`StoreAttrs`), `FORMAT_VERSION`;
- `writer`: `StoreWriter` creates or resumes a store, writes whole shards in zarr's own bytes
  and decides itself when to flush and journal; `finish` marks the store complete, last;
- `reader`: `open_store`, `store_state`, `find_stores`, `describe_store`: every reader of a
  store goes through here;
- `integrity`: are the shards all there and whole (checked on every open of a complete store);
- `check`: that, and does every chunk decode (`check_store`, `histodg info --check`);
- `codecs` / `jpegcodec`: the compressions (blosc-lz4, none, and the `histodg.jpeg` zarr codec).

May import: the top-level helpers (`histodg`, `constants`, `files`). Knows nothing of slides.
"""
from .check import check_store
from .reader import PatchStore, StoreError, StoreRef, describe_store, find_stores, open_store, read_attrs, store_state
from .schema import FORMAT_VERSION, PROGRESS_FILE, StoreAttrs
from .writer import StoreWriter

__all__ = ["FORMAT_VERSION", "PROGRESS_FILE", "PatchStore", "StoreAttrs", "StoreError", "StoreRef", "StoreWriter",
           "check_store", "describe_store", "find_stores", "open_store", "read_attrs", "store_state"]
