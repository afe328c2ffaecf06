"""`histodg tile` and `histodg info` end to end, on the real slides and on small made-up data sets."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import zarr
from PIL import Image

from helpers import openslide_rgb
from histodg.slides.base import resize
from histodg.slides.inputs import SlideJob
from histodg.store import PROGRESS_FILE, StoreError, open_store, store_state
from histodg.tiling import ReadOptions, TileOptions, TileSettings, tile_slide

BAD_FILES = ["corrupt_tiles.svs", "empty.svs", "not_a_slide.svs", "tiny_valid.svs", "unopenable.tiff", "unreadable.svs"]


def _store(path):
    g = zarr.open_group(str(path), mode="r")
    return g, dict(g.attrs)


def test_tile_real_slide_patches_equal_direct_reads(cli, cmu, tmp_path):
    r = cli("tile", cmu, "-o", tmp_path, "--tile-size", "256", "--mpp", "0.5", "--mpp-tolerance", "0",
            "--organ", "skin", "--scanner", "aperio", "--compression", "lz4")
    assert r.exit_code == 0, r.output
    g, a = _store(tmp_path / "cmu_small_region.zarr")
    assert a["complete"] is True and a["format_version"] == 1
    assert a["organ"] == "skin" and a["scanner"] == "aperio" and a["mpp"] == 0.5 and a["tile_size"] == 256
    assert a["level0_size"] == 257 and a["source"]["size"] == cmu.stat().st_size
    assert a["mpp_actual"] == pytest.approx(0.499 * 257 / 256)
    n = g["images"].shape[0]
    assert n == a["n_patches"] > 10 and g["coords"].shape == (n, 2) and g["tissue"].shape == (n,)
    assert "masks" not in g
    coords = g["coords"][:]
    assert (coords >= 0).all() and (coords[:, 0] < 2220).all() and (coords[:, 1] < 2967).all()
    assert (g["tissue"][:] >= 0.25).all()
    osr = openslide.OpenSlide(str(cmu))
    for i in [0, n // 2, n - 1]:  # the last one runs past the bottom edge
        x, y = (int(v) for v in coords[i])
        np.testing.assert_array_equal(g["images"][i], resize(openslide_rgb(osr, x, y, 257), (256, 256)))


@pytest.mark.parametrize("mpp, compression", [("0.499", "lz4"), ("0.5", "none")])  # 0.5 is within the 2% tolerance
def test_tile_at_native_resolution_is_a_plain_crop(cli, cmu, tmp_path, mpp, compression):
    r = cli("tile", cmu, "-o", tmp_path, "--tile-size", "128", "--mpp", mpp, "--backend", "openslide",
            "--compression", compression)
    assert r.exit_code == 0, r.output
    g, a = _store(tmp_path / "cmu_small_region.zarr")
    assert a["level0_size"] == 128 and a["backend"] == "openslide" and a["compression"] == compression
    assert a["mpp"] == float(mpp) and a["mpp_actual"] == pytest.approx(0.499)
    osr = openslide.OpenSlide(str(cmu))
    x, y = (int(v) for v in g["coords"][3])
    np.testing.assert_array_equal(g["images"][3], openslide_rgb(osr, x, y, 128))


def test_glass_windows_are_dropped(cli, cmu, tmp_path):
    cli("tile", cmu, "-o", tmp_path / "all", "--tile-size", "256", "--min-tissue", "0")
    cli("tile", cmu, "-o", tmp_path / "tissue", "--tile-size", "256")
    g_all, _ = _store(tmp_path / "all" / "cmu_small_region.zarr")
    g_t, _ = _store(tmp_path / "tissue" / "cmu_small_region.zarr")
    assert g_all["images"].shape[0] == 9 * 12  # min-tissue 0 keeps the whole grid
    kept = {tuple(c) for c in g_t["coords"][:]}
    tissue_all = g_all["tissue"][:]
    for c, t, img in zip(g_all["coords"][:], tissue_all, g_all["images"]):
        if tuple(c) not in kept:
            assert t < 0.25
    # the emptiest window of the grid is glass: bright and unsaturated
    glass = g_all["images"][int(np.argmin(tissue_all))]
    assert glass.mean() > 225 and (glass.max(2).astype(int) - glass.min(2)).mean() < 12


def test_annotations_are_rasterised_into_masks(cli, cmu, tmp_path):
    fc = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
          "geometry": {"type": "Polygon", "coordinates": [[[600, 800], [1400, 800], [1400, 1600], [600, 1600], [600, 800]],
                                                          [[900, 1100], [1100, 1100], [1100, 1300], [900, 1300], [900, 1100]]]}}]}
    ann = tmp_path / "cmu.geojson"
    ann.write_text(json.dumps(fc))
    r = cli("tile", cmu, "-o", tmp_path / "s", "--tile-size", "128", "--mpp", "0.499", "--min-tissue", "0",
            "--annotations", ann, "--label", "tumor=1")
    assert r.exit_code == 0, r.output
    g, a = _store(tmp_path / "s" / "cmu_small_region.zarr")
    assert a["labels"] == {"0": "background", "1": "tumor"}
    masks, coords = g["masks"][:], g["coords"][:]
    for m, (x, y) in zip(masks, coords):  # native scale: pixel (i, j) covers level-0 (x + j, y + i)
        yy, xx = np.mgrid[y:y + 128, x:x + 128] + 0.5
        inside = (xx >= 600) & (xx < 1400) & (yy >= 800) & (yy < 1600)
        hole = (xx >= 900) & (xx < 1100) & (yy >= 1100) & (yy < 1300)
        np.testing.assert_array_equal(m, (inside & ~hole).astype(np.uint8))
    assert masks.sum() == 800 * 800 - 200 * 200

    # a rerun with another --label map, or after the annotation file was edited, never keeps the old masks
    args = [cmu, "-o", tmp_path / "s", "--tile-size", "128", "--mpp", "0.499", "--min-tissue", "0", "--annotations", ann]
    r = cli("tile", *args, "--label", "tumor=1", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["status"] == "skipped"
    r = cli("tile", *args, "--label", "tumor=2")
    assert r.exit_code == 1 and "the --label map differs" in r.stderr
    fc["features"][0]["geometry"]["coordinates"] = fc["features"][0]["geometry"]["coordinates"][:1]  # the hole removed
    ann.write_text(json.dumps(fc) + " ")
    r = cli("tile", *args, "--label", "tumor=1")
    assert r.exit_code == 1 and "the annotation file cmu.geojson changed" in r.stderr
    r = cli("tile", *args, "--label", "tumor=1", "--overwrite")
    assert r.exit_code == 0 and _store(tmp_path / "s" / "cmu_small_region.zarr")[0]["masks"][:].sum() == 800 * 800


@pytest.mark.parametrize("name", BAD_FILES)
def test_every_bad_file_gives_one_clear_line_and_fails(cli, bad_dir, tmp_path, name):
    r = cli("tile", bad_dir / name, "-o", tmp_path)
    assert r.exit_code == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and name in errors[0], r.stderr
    assert "Traceback" not in r.output
    assert not (tmp_path / f"{Path(name).stem}.zarr").exists()  # nothing that could look finished


def test_a_batch_goes_on_past_bad_files(cli, cmu, bad_dir, tmp_path):
    inputs = [bad_dir / n for n in BAD_FILES[:3]] + [cmu] + [bad_dir / n for n in BAD_FILES[3:]]
    r = cli("tile", *inputs, "-o", tmp_path, "--tile-size", "256", "--json")
    assert r.exit_code == 1
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["cmu_small_region"]["status"] == "done" and rows["cmu_small_region"]["patches"] > 0
    for n in BAD_FILES:
        assert rows[Path(n).stem]["status"] == "failed" and n in rows[Path(n).stem]["error"]
    assert store_state(tmp_path / "cmu_small_region.zarr") == "complete"
    # the rich summary table names every failure too
    r2 = cli("tile", *inputs, "-o", tmp_path, "--tile-size", "256")
    assert "skipped" in r2.stdout and r2.stdout.count("failed") >= len(BAD_FILES)


def _corrupt_tiles(path, tile=240):
    """(tx, ty) of the stored tiles OpenSlide cannot decode (reopening after each failure)."""
    osr = openslide.OpenSlide(str(path))
    w, h = osr.dimensions
    bad = set()
    for ty in range(-(-h // tile)):
        for tx in range(-(-w // tile)):
            try:
                osr.read_region((tx * tile, ty * tile), 0, (min(tile, w - tx * tile), min(tile, h - ty * tile)))
            except openslide.OpenSlideError:
                bad.add((tx, ty))
                osr = openslide.OpenSlide(str(path))
    return bad


def test_corrupt_tiles_are_skipped_and_recorded_or_fail_the_slide(cli, bad_dir, cmu, tmp_path):
    src = bad_dir / "corrupt_tiles.svs"
    # default: too many undecodable windows -> the slide fails, no store left behind
    r = cli("tile", src, "-o", tmp_path / "strict", "--tile-size", "128", "--compression", "lz4")
    assert r.exit_code == 1 and "cannot be decoded" in r.stderr
    assert not (tmp_path / "strict" / "corrupt_tiles.zarr").exists()
    # tolerant: bad windows are skipped, recorded in attrs and the summary; both readers agree
    counts = []
    for backend in ("tiffslide", "openslide"):
        r = cli("tile", src, "-o", tmp_path / backend, "--tile-size", "128", "--max-bad-fraction", "1",
                "--backend", backend, "--workers", "3", "--json", "--compression", "lz4")
        assert r.exit_code == 0, r.output
        counts.append(json.loads(r.stdout)[0]["bad_windows"])
    ga, aa = _store(tmp_path / "tiffslide" / "corrupt_tiles.zarr")
    gb, ab = _store(tmp_path / "openslide" / "corrupt_tiles.zarr")
    bad_a = {(b["x"], b["y"]) for b in aa["bad_windows"]}
    assert counts == [len(bad_a), len(bad_a)] and bad_a == {(b["x"], b["y"]) for b in ab["bad_windows"]}
    np.testing.assert_array_equal(ga["coords"][:], gb["coords"][:])
    np.testing.assert_array_equal(ga["images"][:], gb["images"][:])
    # the bad windows are exactly the planned windows that touch a corrupt tile
    corrupt = _corrupt_tiles(src)
    assert len(corrupt) == 19

    def touches(x, y, size=128, tile=240):
        return any((tx, ty) in corrupt for ty in range(y // tile, (y + size - 1) // tile + 1)
                   for tx in range(x // tile, (x + size - 1) // tile + 1))

    stored = {tuple(int(v) for v in c) for c in ga["coords"][:]}
    assert all(touches(x, y) for x, y in bad_a)
    assert not any(touches(x, y) for x, y in stored)
    assert len(stored) + len(bad_a) + aa["qc_report"]["excluded"] == aa["windows_planned"]  # QC left some out
    # every stored patch equals the intact slide at the same place: no silent grey holes
    good = openslide.OpenSlide(str(cmu))
    for img, (x, y) in zip(ga["images"], ga["coords"][:]):
        np.testing.assert_array_equal(img, openslide_rgb(good, x, y, 128))


def test_cosas_layout_import(cli, tmp_path):
    rng = np.random.default_rng(0)
    task = tmp_path / "task1"
    truth = {}
    for organ in ("colon", "stomach"):
        for d in ("image", "mask"):
            (task / organ / d).mkdir(parents=True)
        for k in range(2):
            img = rng.integers(60, 200, (300, 260, 3), dtype=np.uint8)
            mask = np.zeros((300, 260), np.uint8)
            mask[50 + 20 * k: 200, 30:180] = 255
            Image.fromarray(img).save(task / organ / "image" / f"{k}.png")
            Image.fromarray(np.stack([mask] * 3, -1)).save(task / organ / "mask" / f"{k}.png")  # 3-channel 0/255
            truth[f"{organ}-{k}"] = (img, mask // 255)
    r = cli("tile", task, "-o", tmp_path / "stores", "--mpp-override", "0.5", "--mpp", "0.5", "--tile-size", "128",
            "--min-tissue", "0", "--scanner", "scan-x", "--json")
    assert r.exit_code == 0, r.output
    names = sorted(row["name"] for row in json.loads(r.stdout))
    assert names == ["colon-0", "colon-1", "stomach-0", "stomach-1"]
    for name, (img, mask) in truth.items():
        g, a = _store(tmp_path / "stores" / f"{name}.zarr")
        assert a["organ"] == name.split("-")[0] and a["scanner"] == "scan-x" and a["meta"]["domain_axis"] == "organ"
        assert set(np.unique(g["masks"][:]).tolist()) <= {0, 1}
        for patch, m, (x, y) in zip(g["images"], g["masks"], g["coords"][:]):
            pimg = np.full((128, 128, 3), 255, np.uint8)
            pm = np.zeros((128, 128), np.uint8)
            crop = img[y:y + 128, x:x + 128]
            pimg[: crop.shape[0], : crop.shape[1]] = crop
            pm[: crop.shape[0], : crop.shape[1]] = mask[y:y + 128, x:x + 128]
            np.testing.assert_array_equal(patch, pimg)
            np.testing.assert_array_equal(m, pm)
    # a domain folder that could be either axis needs --domain-axis
    other = tmp_path / "mystery"
    (other / "a" / "image").mkdir(parents=True)
    (other / "a" / "mask").mkdir()
    (other / "b" / "image").mkdir(parents=True)
    (other / "b" / "mask").mkdir()
    r = cli("tile", other, "-o", tmp_path / "x")
    assert r.exit_code == 1 and "--domain-axis" in r.stderr


def test_manifest_input(cli, cmu, data_dir, tmp_path):
    man = tmp_path / "m.csv"
    man.write_text(f"path,organ,scanner,mpp,split\n{cmu},skin,aperio,,train\n{data_dir / 'he_carcinoma_1000.png'},colon,,0.25,test\n")
    r = cli("tile", man, "-o", tmp_path / "s", "--tile-size", "256", "--scanner", "default-scan", "--json")
    assert r.exit_code == 0, r.output
    _, a = _store(tmp_path / "s" / "he_carcinoma_1000.zarr")
    assert a["organ"] == "colon" and a["scanner"] == "default-scan" and a["slide_mpp"] == 0.25
    assert a["meta"] == {"split": "test"}
    _, b = _store(tmp_path / "s" / "cmu_small_region.zarr")
    assert b["organ"] == "skin" and b["scanner"] == "aperio"
    bad = tmp_path / "bad.csv"
    bad.write_text("file,organ\nx.svs,colon\n")
    r = cli("tile", bad, "-o", tmp_path / "s2")
    assert r.exit_code == 1 and "'path' column" in r.stderr


def test_png_without_mpp_needs_an_override(cli, data_dir, tmp_path):
    r = cli("tile", data_dir / "he_carcinoma_1000.png", "-o", tmp_path)
    assert r.exit_code == 1 and "--mpp-override" in r.stderr


def test_rerun_skips_complete_and_refuses_other_settings(cli, cmu, tmp_path):
    assert cli("tile", cmu, "-o", tmp_path, "--tile-size", "256").exit_code == 0
    before = (tmp_path / "cmu_small_region.zarr" / "zarr.json").stat().st_mtime_ns
    r = cli("tile", cmu, "-o", tmp_path, "--tile-size", "256", "--json")
    assert json.loads(r.stdout)[0]["status"] == "skipped"
    assert (tmp_path / "cmu_small_region.zarr" / "zarr.json").stat().st_mtime_ns == before
    r = cli("tile", cmu, "-o", tmp_path, "--tile-size", "128")
    assert r.exit_code == 1 and "other settings" in r.stderr and "tile_size 256 -> 128" in r.stderr
    r = cli("tile", cmu, "-o", tmp_path, "--tile-size", "256", "--compression", "lz4")
    assert r.exit_code == 1 and "compression 'jpeg' -> 'lz4'" in r.stderr
    r = cli("tile", cmu, "-o", tmp_path, "--tile-size", "128", "--overwrite", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["status"] == "done"
    assert _store(tmp_path / "cmu_small_region.zarr")[1]["tile_size"] == 128


@pytest.mark.parametrize("commit_seconds", [0.0, 1e9])
def test_resume_after_an_interrupted_run_equals_an_uninterrupted_one(cmu, tmp_path, monkeypatch, commit_seconds,
                                                                     interrupt_after):
    """Committed every shard (0) or never before the end (1e9): the journal counts only patches
    whose shards, coords and tissue are all on disk, and the resumed store equals the reference."""
    monkeypatch.setattr("histodg.store.writer.SHARD_BYTES", 16 * 64 * 64 * 3)  # 16 patches per shard
    monkeypatch.setattr("histodg.store.writer.COMMIT_SECONDS", commit_seconds)
    opts = TileOptions(TileSettings(tile_size=64, mpp=0.499, min_tissue=0.25), ReadOptions(workers=2))
    job = SlideJob(cmu, "cmu")
    ref = tile_slide(job, tmp_path / "ref", opts)
    assert ref.status == "done" and ref.patches > 100

    with pytest.raises(KeyboardInterrupt):
        tile_slide(job, tmp_path / "cut", opts, progress=interrupt_after(70))
    partial = tmp_path / "cut" / "cmu.zarr"
    assert store_state(partial) == "partial"
    committed = json.loads((partial / PROGRESS_FILE).read_text())["count"]
    assert committed == (64 if commit_seconds == 0 else 0)  # 4 whole shards, or none committed yet
    with pytest.raises(StoreError, match="incomplete"):
        open_store(partial)  # training refuses it
    again = tile_slide(job, tmp_path / "cut", opts)
    assert again.status == "done" and again.resumed and again.patches == ref.patches
    a, b = open_store(tmp_path / "ref" / "cmu.zarr"), open_store(partial)
    np.testing.assert_array_equal(a.images[:], b.images[:])
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.tissue, b.tissue)


# A child that tiles as the CLI does, with every reader task from window STOP on blocked forever, so
# that a SIGKILL lands mid-slide whatever the machine's speed; the journal advances every shard.
KILL_CHILD = """
import sys, threading
from pathlib import Path
import histodg.store.writer as writer
import histodg.tiling.runner as runner
writer.COMMIT_SECONDS = 0.0
flag, stop = Path(sys.argv[1]), int(sys.argv[2])
read = runner.PatchReader.__call__
def blocking(self, i0, i1):
    if i0 >= stop:
        flag.write_text("stopped")
        threading.Event().wait()
    return read(self, i0, i1)
runner.PatchReader.__call__ = blocking
from histodg.cli import main
main(sys.argv[3:], prog_name="histodg")
"""


def test_killed_process_leaves_no_complete_store_and_the_rerun_resumes(cmu, tmp_path):
    """SIGKILL mid-slide: the store must not claim to be complete; the next run resumes it."""
    out = tmp_path / "s"
    args = ["tile", str(cmu), "-o", str(out), "--tile-size", "32", "--mpp", "0.499", "--min-tissue", "0", "--workers", "1",
            "--compression", "lz4"]
    flag, stop = tmp_path / "stopped", 2500  # 32 px patches: 1024 per shard, so 2048 are committed before the stop
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(flag), str(stop), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prog = out / "cmu_small_region.zarr" / PROGRESS_FILE
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if flag.exists() and prog.is_file() and json.loads(prog.read_text() or '{"count": 0}')["count"] == 2048:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the child stopped on its own"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = out / "cmu_small_region.zarr"
    assert store_state(store) == "partial" and json.loads(prog.read_text())["count"] == 2048
    with pytest.raises(StoreError, match="incomplete"):
        open_store(store)
    r = subprocess.run([sys.executable, "-m", "histodg", *args, "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]
    assert row["status"] == "done" and row["resumed"] is True and row["patches"] + row["qc"]["excluded"] == 70 * 93  # QC counts survive the kill
    assert store_state(store) == "complete"
    s = open_store(store)
    osr = openslide.OpenSlide(str(cmu))
    for i in (0, 2047, 2048, 3000, len(s) - 1):  # patches written before and after the kill are right
        x, y = (int(v) for v in s.coords[i])
        np.testing.assert_array_equal(s.images[i], openslide_rgb(osr, x, y, 32))


def test_info_on_slides_and_stores(cli, cmu, bad_dir, tmp_path):
    r = cli("info", cmu, "--json")
    d = json.loads(r.stdout)[0]
    assert d["backend"] == "tiffslide" and d["vendor"] == "aperio" and d["mpp"] == pytest.approx(0.499)
    assert d["dimensions"] == [2220, 2967] and d["level_downsamples"] == [1.0] and d["objective_power"] == 20
    assert set(d["associated_images"]) == {"label", "macro", "thumbnail"}
    cli("tile", cmu, "-o", tmp_path, "--tile-size", "256", "--organ", "skin")
    d = json.loads(cli("info", tmp_path / "cmu_small_region.zarr", "--json").stdout)[0]
    assert d["kind"] == "store" and d["complete"] and d["organ"] == "skin" and d["tile_size"] == 256 and d["patches"] > 0
    r = cli("info", cmu, tmp_path / "cmu_small_region.zarr")
    assert r.exit_code == 0 and "aperio" in r.stdout and "skin" in r.stdout
    r = cli("info", bad_dir / "empty.svs", cmu)
    assert r.exit_code == 1 and "empty.svs: empty file" in r.stderr and "aperio" in r.stdout


def test_tile_an_in_memory_slide_patches_equal_its_pixels(fake_slides, tmp_path):
    """The core of `tile` without any file: a fake 3-level pyramid at 0.5 um/px, tiled at 1 um/px."""
    from helpers import tissue_field
    from histodg.slides.backends import MemorySlide

    rgb = tissue_field(900, 1300)
    job = fake_slides("fake", rgb, mpp=0.5, levels=3, organ="colon", scanner="memory")
    r = tile_slide(job, tmp_path, TileOptions(TileSettings(tile_size=128, mpp=1.0), compression="lz4"))
    assert r.status == "done", r.error
    s = open_store(tmp_path / "fake.zarr")
    a = s.attrs
    assert (a.organ, a.scanner, a.read_level, a.read_size, a.mpp_actual) == ("colon", "memory", 1, 128, 1.0)
    assert a.windows_total == 6 * 4 and 0 < len(s) == a.n_patches < a.windows_total  # glass windows dropped
    assert (s.tissue >= 0.25).all()
    ref = MemorySlide(rgb, 0.5, levels=3)  # the pyramid the fake slide reads from
    level1 = ref.read_region((0, 0), 1, ref.level_dimensions[1])
    for i, (x, y) in enumerate(s.coords):
        crop = np.full((128, 128, 3), 255, np.uint8)
        part = level1[y // 2 : y // 2 + 128, x // 2 : x // 2 + 128]
        crop[: part.shape[0], : part.shape[1]] = part
        np.testing.assert_array_equal(s.images[i], crop)
