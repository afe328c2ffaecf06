"""Files a hostile user (or a careless share) hands histodg: model files that would run code,
links planted where histodg writes, spreadsheet formulas in names, old checkpoints and fold folders.
Folders two runs write at once and locks a crash left behind are `test_run_locks.py`'s. Each case
failed before histodg guarded against it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY_TRAIN as TRAIN
from helpers import make_domains, make_store, tiny_checkpoint, tissue_field
from histodg.model.checkpoint import FORMAT, VERSION, load_checkpoint


class Planted:
    """Unpickling this object opens (so creates) the marker file: what a crafted model file could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted(path: Path, marker: Path, like: Path | None = None) -> Path:
    """A model file that would run code when unpickled: a real checkpoint (or a plain state dict)
    with the planted object inside."""
    payload = torch.load(like, weights_only=True) if like else {"format": FORMAT, "version": VERSION}
    payload["note"] = Planted(marker)
    torch.save(payload, path)
    return path


def refused(result, path: Path) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if str(path) in ln]
    assert lines and "refused" in lines[0] and "(io.open)" in lines[0], result.output


# -- 1. a model file is data, never code --------------------------------------------------------------
def test_a_crafted_checkpoint_runs_no_code_in_the_library(tmp_path):
    marker = tmp_path / "pwned"
    ck = crafted(tmp_path / "best.pt", marker, tiny_checkpoint(tmp_path / "real.pt"))
    from histodg.model.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(ck)
    assert not marker.exists()


def test_predict_refuses_a_crafted_checkpoint(cli, tmp_path):
    marker = tmp_path / "pwned"
    ck = crafted(tmp_path / "best.pt", marker, tiny_checkpoint(tmp_path / "real.pt"))
    Image.fromarray(tissue_field(128, 128)).save(tmp_path / "slide.png")
    r = cli("predict", ck, tmp_path / "slide.png", "--mpp-override", "4", "-o", tmp_path / "pred", "--device", "cpu")
    refused(r, ck)
    assert not marker.exists()


def test_evaluate_refuses_a_crafted_checkpoint(cli, tmp_path):
    marker = tmp_path / "pwned"
    ck = crafted(tmp_path / "best.pt", marker, tiny_checkpoint(tmp_path / "real.pt", mpp=1.0))
    store = make_store(tmp_path / "s.zarr", n=2)
    refused(cli("evaluate", ck, store, "--device", "cpu"), ck)
    assert not marker.exists()


def test_adapt_refuses_a_crafted_checkpoint(cli, tmp_path):
    marker = tmp_path / "pwned"
    ck = crafted(tmp_path / "best.pt", marker, tiny_checkpoint(tmp_path / "real.pt", mpp=1.0))
    make_store(tmp_path / "src" / "a.zarr", n=2)
    make_store(tmp_path / "tgt" / "b.zarr", n=2, masks=False)
    r = cli("adapt", ck, "--source", tmp_path / "src", "--target", tmp_path / "tgt", "-o", tmp_path / "run",
            "--steps", "1", "--device", "cpu")
    refused(r, ck)
    assert not marker.exists() and not (tmp_path / "run" / "best.pt").exists()


def test_train_refuses_crafted_encoder_weights(cli, tmp_path):
    marker = tmp_path / "pwned"
    weights = crafted(tmp_path / "w.pt", marker)
    stores = make_domains(tmp_path / "stores", organs=("colon",), scanners=("s1", "s2"), stores_per_domain=1, n=4)
    r = cli("train", stores, "-o", tmp_path / "run", *TRAIN, "--encoder-weights", weights, "--domains", "scanner")
    refused(r, weights)
    assert not marker.exists()


def test_train_resume_refuses_a_crafted_last_pt(cli, tmp_path, one_torch_thread):
    stores = make_domains(tmp_path / "stores", organs=("colon",), scanners=("s1", "s2"), stores_per_domain=1, n=4)
    run = tmp_path / "run"
    r = cli("train", stores, "-o", run, *TRAIN, "--domains", "scanner", "--steps-per-epoch", "1")
    assert r.exit_code == 0, r.output
    payload = torch.load(run / "last.pt", weights_only=True)
    payload["done"] = False  # an unfinished run, as a crash leaves it
    torch.save(payload, run / "last.pt")
    marker = tmp_path / "pwned"
    crafted(run / "last.pt", marker, run / "last.pt")
    refused(cli("train", "-o", run, "--resume"), run / "last.pt")
    assert not marker.exists()


def test_checkpoints_hold_only_data_and_resume_exactly(tmp_path, one_torch_thread):
    """What histodg writes reads back without any global beyond tensors and plain data, RNG states included."""
    stores = make_domains(tmp_path / "stores", organs=("colon",), scanners=("s1", "s2"), stores_per_domain=1, n=4)
    from histodg.training.config import TrainConfig
    from histodg.training.trainer import Trainer

    cfg = TrainConfig(stores=(str(stores),), out_dir=str(tmp_path / "run"), arch="unet", encoder="resnet18",
                      encoder_weights="none", steps=2, steps_per_epoch=1, batch_size=2, method="sds", domains="scanner",
                      device="cpu", workers=0, val_fraction=0.0)
    Trainer(cfg).run()
    for name in ("last.pt", "best.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "run" / name) == []
    rng = load_checkpoint(tmp_path / "run" / "last.pt")["rng"]["ranks"][0]
    from histodg.training.state import set_rng_state

    set_rng_state(rng)
    first = (np.random.rand(), torch.rand(1).item())
    set_rng_state(rng)
    assert (np.random.rand(), torch.rand(1).item()) == first


def test_checkpoints_written_before_hold_numpy_values_and_still_load(tmp_path):
    ck = tiny_checkpoint(tmp_path / "ck.pt")
    payload = torch.load(ck, weights_only=True)
    payload["best"] = np.float64(0.5)  # what the trainer wrote before: numpy scalars and the numpy RNG state
    payload["rng"] = {"numpy": np.random.get_state()}
    torch.save(payload, ck)
    back = load_checkpoint(ck)
    assert back["best"] == 0.5 and back["rng"]["numpy"][1].shape == (624,)


# -- 2. outputs stay where they belong --------------------------------------------------------------
def test_cv_fold_folders_stay_in_the_run_folder_whatever_the_domain_names(cli, tmp_path, one_torch_thread):
    outside = tmp_path / "outside"
    names = ["../../escaped", str(outside)]
    for i, organ in enumerate(names):
        make_store(tmp_path / "stores" / f"s{i}.zarr", n=4, organ=organ, seed=i)
    run = tmp_path / "sub" / "run"
    r = cli("train", tmp_path / "stores", "-o", run, *TRAIN, "--domains", "organ", "--cv", "--json")
    assert r.exit_code == 0, r.output
    assert not outside.exists() and not (tmp_path / "escaped").exists()
    assert sorted(p.name for p in (run / "cv").iterdir()) == sorted(["escaped", safe(outside)])
    summary = json.loads((run / "cv_summary.json").read_text())
    assert set(summary["folds"]) == set(names)  # the domains keep their names; only the folders are made safe


def safe(path: Path) -> str:
    from histodg.files import safe_name

    return safe_name(str(path))


def test_fold_folders_that_clash_are_numbered():
    from histodg.training.crossval import fold_folders

    assert fold_folders(["a/b", "a b", "..", "lung"]) == {"a/b": "a_b", "a b": "a_b-2", "..": "domain", "lung": "lung"}


VICTIM_TEXT = "a file of someone else's\n"


def plant_links(folder: Path, names, victim: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(victim)


def test_no_write_goes_through_a_link_planted_at_a_temporary_name(cli, tmp_path, one_torch_thread):
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    stores = make_domains(tmp_path / "stores", organs=("colon",), scanners=("s1", "s2"), stores_per_domain=1, n=4)
    run, pred = tmp_path / "run", tmp_path / "pred"
    plant_links(run, [".last.tmp.pt", ".best.tmp.pt", ".config.tmp.json", ".result.tmp.json", ".metrics.tmp.jsonl"], victim)
    plant_links(pred, [".summary.tmp.json", ".summary.tmp.csv", ".report.tmp.html"], victim)
    r = cli("train", stores, "-o", run, *TRAIN, "--domains", "scanner")
    assert r.exit_code == 0, r.output
    Image.fromarray(tissue_field(96, 96)).save(tmp_path / "slide.png")
    r = cli("predict", run / "best.pt", tmp_path / "slide.png", "--mpp-override", "1", "-o", pred, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert victim.read_text() == VICTIM_TEXT
    for name in ("best.pt", "last.pt", "config.json", "result.json"):
        assert not (run / name).is_symlink() and (run / name).stat().st_size > 0
    for name in ("summary.json", "summary.csv", "report.html"):
        assert not (pred / name).is_symlink() and (pred / name).stat().st_size > 0


def test_a_link_at_a_final_name_is_replaced_not_written_through(tmp_path):
    from histodg.files import append_text, write_json_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    plant_links(tmp_path / "out", ["done.json", "metrics.jsonl"], victim)
    write_json_atomic(tmp_path / "out" / "done.json", {"a": 1})
    with pytest.raises(OSError):  # appending refuses the link (ELOOP) rather than write into its target
        append_text(tmp_path / "out" / "metrics.jsonl", "{}\n")
    assert victim.read_text() == VICTIM_TEXT and json.loads((tmp_path / "out" / "done.json").read_text()) == {"a": 1}


def test_a_link_planted_at_the_summary_lock_is_refused_in_one_line(cli, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    plant_links(tmp_path / "out", [".summary.lock"], victim)
    r = cli("tile", tmp_path / "missing.svs", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip() == f"error: {tmp_path / 'out' / '.summary.lock'}: is a link; histodg never writes through one: remove it"
    assert victim.read_text() == VICTIM_TEXT


def test_summary_csv_cells_that_look_like_formulas_are_neutralised(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["=1+1.svs", "+SUM(A1).svs", "-2+3.svs", "@cmd.svs"]
    r = cli("tile", "-o", "out", "--", *names)  # missing files: each a failed row whose source and error start with its name
    assert r.exit_code == 1
    import csv

    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cells = [v for row in rows for v in row.values() if v]
    assert len(rows) == 4 and not [c for c in cells if c.startswith(("=", "+", "-", "@"))]
    assert sorted(row["source"] for row in rows) == sorted("'" + n for n in names)
    from histodg.summary import read_rows  # summary.json keeps the names as they are

    assert sorted(row["source"] for row in read_rows(tmp_path / "out")) == sorted(names)


def test_csv_cell_keeps_numbers():
    from histodg.files import csv_cell

    assert csv_cell(-0.5) == -0.5 and csv_cell("-0.5") == "'-0.5" and csv_cell("slide") == "slide"


# -- 3. one writer per run folder, and locks that heal ------------------------------------------------
def test_a_file_that_is_no_pickle_is_unreadable_not_refused(tmp_path):
    from histodg.model.checkpoint import CheckpointError

    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_a_checkpoint_pickled_under_numpy_1_still_loads(tmp_path):
    """numpy 1 names its constructors `numpy.core.multiarray.*`, numpy 2 `numpy._core...`: a file keeps the writer's."""
    import zipfile

    ck = tiny_checkpoint(tmp_path / "ck.pt")
    payload = torch.load(ck, weights_only=True)
    payload["best"] = np.float64(0.5)
    payload["rng"] = {"numpy": np.random.get_state()}
    torch.save(payload, ck)
    old = tmp_path / "numpy1.pt"
    with zipfile.ZipFile(ck) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(item, data)
    back = load_checkpoint(old)
    assert back["best"] == 0.5 and back["rng"]["numpy"][1].shape == (624,)


def test_fold_folders_an_earlier_histodg_made_under_the_plain_name_are_kept(tmp_path):
    from histodg.training.crossval import fold_folders

    (tmp_path / "cv" / "Aperio GT450").mkdir(parents=True)  # made by histodg before fold names were made safe
    assert fold_folders(["Aperio GT450", "Zürich", ".."], tmp_path / "cv") == {
        "Aperio GT450": "Aperio GT450", "Zürich": "Z_rich", "..": "domain"}


def test_temporaries_killed_writers_left_are_swept_by_the_next_write(tmp_path):
    import os
    import time

    from histodg.files import write_json_atomic

    old, fresh = tmp_path / ".done.tmp-dead0001.json", tmp_path / ".done.tmp-live0001.json"
    old.write_text("{")
    fresh.write_text("{")  # a write still going on in another process: kept
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    write_json_atomic(tmp_path / "done.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".done.tmp-live0001.json", "done.json"]
