"""The patch store: shards written by histodg are byte-identical to zarr's, validation errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from histodg.store import (
    FORMAT_VERSION,
    PROGRESS_FILE,
    StoreAttrs,
    StoreError,
    StoreWriter,
    check_store,
    describe_store,
    find_stores,
    open_store,
    store_state,
)
from histodg.store.codecs import zarr_compressor, zarr_serializer
from histodg.store.writer import shard_patches


def _patches(n, s, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    img[:, : s // 2] //= 16  # partly compressible
    mask = (rng.random((n, s, s)) > 0.7).astype(np.uint8)
    return img, mask


@pytest.mark.parametrize("compression", ["lz4", "none", "jpeg"])
def test_shards_are_byte_identical_to_zarr(tmp_path, compression):
    s, n = 32, 40
    img, mask = _patches(n, s)
    w = StoreWriter(tmp_path / "ours.zarr", StoreAttrs(tile_size=s, mpp=1.0, compression=compression,
                                                       jpeg_quality=90 if compression == "jpeg" else None), n, True).create()
    k = w.shard
    assert k == shard_patches(s) and n < k  # one partial shard
    for i in range(n):
        w.append(w.encode(img[i], mask[i]), (i, 2 * i), 0.5)
    w.finish()
    ref = zarr.open_group(str(tmp_path / "ref.zarr"), mode="w")
    ref.create_array("images", shape=(n, s, s, 3), chunks=(1, s, s, 3), shards=(k, s, s, 3), dtype="uint8",
                     compressors=zarr_compressor(compression), serializer=zarr_serializer(compression, 90))
    ref.create_array("masks", shape=(n, s, s), chunks=(1, s, s), shards=(k, s, s), dtype="uint8", compressors=zarr_compressor())
    ref["images"][:] = img
    ref["masks"][:] = mask
    for name in ("images", "masks"):
        ours = (tmp_path / "ours.zarr" / name / "c" / "0").rglob("*")
        ours = sorted(p for p in ours if p.is_file())
        theirs = sorted(p for p in (tmp_path / "ref.zarr" / name / "c" / "0").rglob("*") if p.is_file())
        assert [p.relative_to(tmp_path / "ours.zarr") for p in ours] == [p.relative_to(tmp_path / "ref.zarr") for p in theirs]
        for a, b in zip(ours, theirs):
            assert a.read_bytes() == b.read_bytes(), name
    st = open_store(tmp_path / "ours.zarr")
    if compression == "jpeg":  # lossy: what zarr reads back from its own store
        np.testing.assert_array_equal(st.images[:], ref["images"][:])
    else:
        np.testing.assert_array_equal(st.images[:], img)
    np.testing.assert_array_equal(st.masks[:], mask)
    np.testing.assert_array_equal(st.coords, np.stack([np.arange(n), 2 * np.arange(n)], 1))


def test_many_shards_and_random_access(tmp_path, monkeypatch):
    monkeypatch.setattr("histodg.store.writer.SHARD_BYTES", 8 * 16 * 16 * 3)  # 8 patches per shard
    monkeypatch.setattr("histodg.store.writer.COMMIT_SECONDS", 0.0)  # journal every shard
    img, _ = _patches(30, 16, seed=1)
    w = StoreWriter(tmp_path / "s.zarr", StoreAttrs(tile_size=16, mpp=1.0), 35, False).create()
    committed = []
    for i in range(30):
        w.append(w.encode(img[i], None), (0, 0), 1.0, plan_done=i + 1)
        committed.append(json.loads((w.path / PROGRESS_FILE).read_text())["count"])
    assert committed[6] == 0 and committed[7] == 8 and committed[29] == 24  # the writer flushes whole shards itself
    w.finish()
    st = open_store(tmp_path / "s.zarr")
    assert len(st) == 30 and st.masks is None  # trimmed from the planned 35
    for i in np.random.default_rng(0).permutation(30):
        np.testing.assert_array_equal(st.images[int(i)], img[i])


def _complete_store(path, **attrs):
    img, mask = _patches(3, 16)
    w = StoreWriter(path, StoreAttrs(tile_size=16, mpp=0.5, organ="colon", **attrs), 3, True).create()
    for i in range(3):
        w.append(w.encode(img[i], mask[i]), (0, 0), 1.0)
    w.finish()
    return path


def test_validation_errors(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a histodg patch store"):
        open_store(tmp_path / "plain.zarr")
    p = _complete_store(tmp_path / "old.zarr")
    zarr.open_group(str(p), mode="r+").attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(StoreError, match="format version"):
        open_store(p)
    p = _complete_store(tmp_path / "half.zarr")
    zarr.open_group(str(p), mode="r+").attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        open_store(p)
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "zarr.json").write_text("{trunc")
    assert store_state(tmp_path / "junk.zarr") == "broken"
    with pytest.raises(StoreError):
        open_store(tmp_path / "junk.zarr")


def test_state_describe_and_find(tmp_path):
    p = _complete_store(tmp_path / "a" / "x.zarr")
    assert store_state(p) == "complete" and store_state(tmp_path / "nope.zarr") == "missing"
    d = describe_store(p)
    assert d["patches"] == 3 and d["complete"] and d["organ"] == "colon" and d["has_masks"]
    w = StoreWriter(tmp_path / "b" / "y.zarr", StoreAttrs(tile_size=16, mpp=1.0), 5, False).create()
    assert store_state(w.path) == "partial" and json.loads((w.path / PROGRESS_FILE).read_text())["count"] == 0
    assert describe_store(w.path)["complete"] is False
    assert find_stores([tmp_path]) == [p, w.path]
    with pytest.raises(StoreError):
        find_stores([tmp_path / "nothing-here"])


def test_the_schema_owns_every_attribute(tmp_path):
    a = StoreAttrs(tile_size=64, mpp=0.5, organ="colon", labels={"0": "background", "1": "tumor"}, meta={"split": "train"})
    d = a.to_attrs()
    assert "source_tiles_copied" not in d and d["jpeg_quality"] is None and d["format_version"] == FORMAT_VERSION
    assert StoreAttrs.from_attrs({**d, "some_future_key": 1}) == a  # unknown keys are ignored
    with pytest.raises(ValueError, match="tile_size"):
        StoreAttrs.from_attrs({"mpp": 0.5})
    with pytest.raises(ValueError, match="compression"):
        StoreAttrs(tile_size=64, mpp=0.5, compression="zip")
    # a store written by the writer reads back with exactly the attributes it was given, plus the final ones
    p = _complete_store(tmp_path / "x.zarr", scanner="s1", meta={"split": "test"})
    st = open_store(p)
    assert (st.attrs.organ, st.attrs.scanner, st.attrs.meta, st.attrs.n_patches) == ("colon", "s1", {"split": "test"}, 3)
    assert st.attrs.complete is True and st.attrs.bad_windows == []
    zarr.open_group(str(p), mode="r+").attrs["tile_size"] = "big"
    with pytest.raises(StoreError, match="malformed store attributes"):
        open_store(p)


@pytest.fixture
def sharded(tmp_path, monkeypatch):
    """A complete store of 20 patches with masks, 8 patches per shard (3 shards per array)."""
    monkeypatch.setattr("histodg.store.writer.SHARD_BYTES", 8 * 16 * 16 * 3)
    img, mask = _patches(20, 16, seed=2)
    w = StoreWriter(tmp_path / "s.zarr", StoreAttrs(tile_size=16, mpp=1.0, organ="colon"), 20, True).create()
    for i in range(20):
        w.append(w.encode(img[i], mask[i]), (0, 0), 1.0)
    w.finish()
    return tmp_path / "s.zarr"


def test_a_deleted_shard_is_never_read_as_black_patches(sharded, cli):
    assert check_store(sharded) == (20, [])
    (sharded / "images" / "c" / "1" / "0" / "0" / "0").unlink()
    with pytest.raises(StoreError, match=r"damaged: images shard images/c/1/0/0/0 \(patches 8-15\) is missing"):
        open_store(sharded)
    r = cli("info", "--check", sharded)
    assert r.exit_code == 1 and "damaged: images shard images/c/1/0/0/0 (patches 8-15) is missing" in r.stderr
    r = cli("train", sharded, "-o", sharded.parent / "run", "--steps", "1")
    assert r.exit_code == 1 and r.stderr.count("error") == 1 and "damaged" in r.stderr  # refused before training


def test_a_truncated_mask_shard_is_an_error_naming_the_store(sharded):
    f = sharded / "masks" / "c" / "2" / "0" / "0"
    f.write_bytes(f.read_bytes()[:-30])
    with pytest.raises(StoreError, match=r"s.zarr: damaged: masks shard masks/c/2/0/0 \(patches 16-19\) is truncated"):
        open_store(sharded)


def test_check_decodes_every_chunk(sharded):
    """A chunk whose bytes were overwritten (the shard index intact) passes the cheap check on
    open but not `check_store`, which decodes everything."""
    from histodg.store.integrity import read_index, shard_file

    f = shard_file(sharded / "images", 0)
    offset, nbytes = (int(v) for v in read_index(f, 8)[3])
    data = bytearray(f.read_bytes())
    data[offset:offset + 16] = bytes(16)  # the chunk's blosc header
    f.write_bytes(bytes(data))
    open_store(sharded)  # the index still holds
    n, problems = check_store(sharded)
    assert n == 20 and len(problems) == 1 and problems[0].startswith("images patch 3: cannot be decoded")
