"""`histodg synth`'s arguments, determinism, interruption and command line (the data set's content is
`test_synth.py`'s; the acquisition physics `test_synth_optics.py`'s)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from histodg.synth import DOMAINS, DatasetSpec, make_dataset
from histodg.synth.gallery import read_manifest
from histodg.synth.profiles import SCANNERS


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_different_bytes(tmp_path):
    a = make_dataset(tmp_path / "a", DatasetSpec(seed=7, cases=1, size_um=400, formats=("wsi", "cosas")), workers=2)
    b = make_dataset(tmp_path / "b", DatasetSpec(seed=7, cases=1, size_um=400, formats=("wsi", "cosas")), workers=1)
    c = make_dataset(tmp_path / "c", DatasetSpec(seed=8, cases=1, size_um=400))
    ha, hb, hc = _hashes(a.parent), _hashes(b.parent), _hashes(c.parent)
    assert ha == hb  # also: one worker or two, the same bytes
    tiffs = [k for k in hc if k.endswith(".tiff")]
    assert len(tiffs) == len(DOMAINS)
    assert all(ha[k] != hc[k] for k in tiffs)


def test_bad_arguments_raise_value_error(tmp_path):
    for kwargs in ({"cases": 0}, {"size_um": 10}, {"formats": ("tiff",)}, {"formats": ()}, {"seed": -1}):
        with pytest.raises(ValueError):
            make_dataset(tmp_path / "never", DatasetSpec(**kwargs))
    assert not (tmp_path / "never").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="use --overwrite"):
        make_dataset(full, DatasetSpec(cases=1, size_um=400))
    (full / "wsi").mkdir()
    (full / "wsi" / "stale.tiff").write_bytes(b"old")
    make_dataset(full, DatasetSpec(cases=1, size_um=400), overwrite=True)
    assert not (full / "wsi" / "stale.tiff").exists()
    assert (full / "notes.txt").read_text() == "mine"  # only what synth writes is replaced
    assert (full / "manifest.csv").is_file()


def test_interrupted_run_leaves_no_manifest(tmp_path, monkeypatch):
    import histodg.synth.dataset as synth

    real, made = synth.make_case, []

    def flaky(job):
        if len(made) == 3:
            raise KeyboardInterrupt
        made.append(job.name)
        return real(job)

    monkeypatch.setattr(synth, "make_case", flaky)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(tmp_path / "cut", DatasetSpec(cases=1, size_um=400), workers=1)
    assert not (tmp_path / "cut" / "manifest.csv").exists()
    assert len(list((tmp_path / "cut").rglob("*.tiff"))) == 3
    assert not list((tmp_path / "cut").rglob("*.tmp*"))  # no temporary file left behind


def test_cli_synth_wsi_and_errors(cli, tmp_path):
    out = tmp_path / "cli"
    res = cli("synth", out, "--cases", 1, "--size-um", 400, "--seed", 1)
    assert res.exit_code == 0, res.output
    assert (out / "manifest.csv").is_file() and "manifest.csv" in res.output
    assert len(read_manifest(out / "manifest.csv")) == len(DOMAINS)
    res = cli("synth", out, "--cases", 1, "--size-um", 400)
    assert res.exit_code == 2 and "use --overwrite" in res.output
    res = cli("synth", tmp_path / "bad", "--cases", 0)
    assert res.exit_code == 2 and "cases" in res.output


def test_cli_synth_cosas_format_and_import(cli, tmp_path):
    out = tmp_path / "cosas-only"
    res = cli("synth", out, "--cases", 1, "--size-um", 400, "--format", "cosas")
    assert res.exit_code == 0, res.output
    assert not (out / "wsi").exists()
    rows = read_manifest(out / "manifest.csv")
    from PIL import Image

    for r in rows:
        assert r["path"].startswith("cosas/") and "/image/" in r["path"] and "/mask/" in r["annotation"]
        with Image.open(out / r["path"]) as im, Image.open(out / r["annotation"]) as mk:
            assert im.mode == "RGB" and mk.mode == "L" and im.size == mk.size
            values = set(np.unique(np.asarray(mk)).tolist())
        assert values == {0, 255}
    for task in ("organ", "scanner"):
        domains = sorted(p.name for p in (out / "cosas" / task).iterdir())
        assert len(domains) == 4
    mpp = {r["mpp"] for r in rows if r["task"] == "organ"}
    assert mpp == {"0.5"}
    stores = tmp_path / "stores"
    res = cli("tile", out / "cosas" / "organ", "-o", stores, "--mpp-override", "0.5", "--mpp", "1.0",
               "--tile-size", 64, "--min-tissue", 0)
    assert res.exit_code == 0, res.output
    import zarr

    found = {}
    for p in sorted(stores.glob("*.zarr")):
        g = zarr.open_group(str(p), mode="r")
        found[g.attrs["organ"]] = (g.attrs["scanner"], int(g["masks"][:].max()))
    assert found == {o: ("unknown", 1) for o in ("colon", "lung", "pancreas", "stomach")}


def test_profiles_are_distinct_domains():
    assert len({(d.task, d.name) for d in DOMAINS}) == len(DOMAINS)
    assert {SCANNERS[d.scanner].mpp for d in DOMAINS if d.task == "scanner"} == {0.25, 0.5}


def test_an_extra_scanner_is_a_held_out_domain_of_its_own(tmp_path):
    from histodg.synth.profiles import SCANNERS, random_scanner, scanner_profile

    a, b = random_scanner(7), random_scanner(8)
    assert a == scanner_profile("scanner-x7") and a != b  # the seed is the acquisition
    assert all(a.stain_e != s.stain_e and a.white != s.white for s in SCANNERS.values())
    manifest = make_dataset(tmp_path / "x", DatasetSpec(cases=1, size_um=400, extra_scanners=(7,)))
    rows = read_manifest(manifest)
    extra = [r for r in rows if r["scanner"] == "scanner-x7"]
    assert len(rows) == len(DOMAINS) + 1 and len(extra) == 1
    assert extra[0]["split"] == "heldout" and extra[0]["task"] == "scanner" and float(extra[0]["mpp"]) == a.mpp
    assert (tmp_path / "x" / extra[0]["path"]).is_file()
