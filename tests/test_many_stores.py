"""Data sets of many small stores (issue 30 §3): opening a store costs no zarr round trip until an
array is read, and the end-of-training description of the domains samples at most MAX_STORES
stores per domain instead of running every store of a COSAS-sized set through the model."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import make_store
from histodg.store import open_store
from histodg.store import reader as store_reader
from histodg.training import shift_reference
from histodg.training.data import load_stores


def test_opening_a_store_reads_its_metadata_without_zarr(tmp_path, monkeypatch):
    made = make_store(tmp_path / "a.zarr", 20, organ="colon")
    calls = []

    def no_zarr():
        calls.append(1)
        raise AssertionError("zarr opened")

    monkeypatch.setattr(store_reader, "registered_zarr", no_zarr)
    store = open_store(made)  # checked: version, completeness, arrays, rows, every shard's index
    assert len(store) == 20 and store.ref().n == 20 and store.attrs.organ == "colon" and not calls
    assert [r.n for r in load_stores([tmp_path])] == [20] and not calls
    with pytest.raises(AssertionError, match="zarr opened"):
        store.images  # the arrays are zarr's, opened when first read
    monkeypatch.undo()
    assert np.asarray(open_store(made).images[3]).shape == (64, 64, 3)


@pytest.mark.parametrize("text, reason", [("{", "is not JSON"), ('{"zarr_format": 2}', "is not zarr v3 metadata"),
                                          ('{"zarr_format": 3, "node_type": "array"}', "is not a group's")])
def test_a_broken_group_metadata_is_one_line(tmp_path, text, reason):
    made = make_store(tmp_path / "a.zarr", 4)
    (made / "zarr.json").write_text(text)
    with pytest.raises(store_reader.StoreError, match=f"not a zarr v3 patch store .*{reason}"):
        open_store(made)


def test_a_row_count_that_disagrees_is_still_found(tmp_path):
    import json

    made = make_store(tmp_path / "a.zarr", 4)
    meta = json.loads((made / "coords" / "zarr.json").read_text())
    meta["shape"][0] = 5
    (made / "coords" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(store_reader.StoreError, match="'coords' has 5 rows but 'images' has 4"):
        open_store(made)


def _work(domains: dict[str, int]) -> list:
    items = []
    for d, n in domains.items():
        for i in range(n):
            items.append((d, SimpleNamespace(store=SimpleNamespace(path=Path(f"/{d}/{i}.zarr")))))
    return items


def test_the_domain_description_samples_at_most_max_stores_per_domain():
    work = _work({"colon": 10, "lung": 3})
    work.append(work[0])  # a store in two stages: still one store, both of its parts kept
    kept = shift_reference.sampled(work, most=4)
    stores = {d: sorted({int(p.store.path.stem) for dd, p in kept if dd == d}) for d in ("colon", "lung")}
    assert stores == {"colon": [0, 3, 6, 9], "lung": [0, 1, 2]}  # evenly spaced; a small domain whole
    assert sum(1 for d, p in kept if p.store.path == Path("/colon/0.zarr")) == 2
    assert shift_reference.sampled(work, most=100) == work  # under the cap: unchanged, in order


@pytest.mark.slow
def test_a_reference_of_many_stores_describes_the_sampled_ones(tmp_path, monkeypatch, one_torch_thread):
    from histodg.training.config import TrainConfig
    from histodg.training.trainer import Trainer

    for i in range(6):
        make_store(tmp_path / "s" / f"colon-{i}.zarr", 4, organ="colon", seed=i)
        make_store(tmp_path / "s" / f"lung-{i}.zarr", 4, organ="lung", seed=10 + i, tint=(0, 20, 0))
    monkeypatch.setattr(shift_reference, "MAX_STORES", 3)
    cfg = TrainConfig(stores=(str(tmp_path / "s"),), out_dir=str(tmp_path / "run"), arch="unet", encoder="resnet18",
                      encoder_weights="none", method="erm", domains="organ", steps=2, batch_size=2, workers=0,
                      val_fraction=0.0, device="cpu")
    Trainer(cfg).run()
    from histodg.model.checkpoint import load_checkpoint

    ref = load_checkpoint(tmp_path / "run" / "best.pt")["model_config"]["shift"]
    assert {d: v["slides"] for d, v in ref["domains"].items()} == {"colon": 3, "lung": 3}
    assert len(ref["calibration"]) == 6
