"""`histodg predict`: the sliding window, stitching, the pipeline with fake models, resume, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from helpers import DarkModel, encode_position, outputs, position_value, raw_config, tiny_checkpoint
from histodg.inference import PredictOptions, Predictor, ReadOptions, WriteOptions, predict_slide
from histodg.inference.rasters import threshold_u8
from histodg.inference.stitching import ChunkAccumulator, gaussian_map
from histodg.slides.inputs import SlideJob
from histodg.slides.plan import window_starts

BAD_FILES = ["corrupt_tiles.svs", "empty.svs", "not_a_slide.svs", "tiny_valid.svs", "unopenable.tiff", "unreadable.svs"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def write_png(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).save(path)
    return path


# -- fake models -------------------------------------------------------------------------------------
class PositionModel(torch.nn.Module):
    """Reads each pixel's position from its colour and outputs logit(position_value / 255)."""

    def forward(self, x):
        v = torch.round(x * 255).to(torch.int64)
        X = v[:, 0] + 256 * (v[:, 2] % 16)
        Y = v[:, 1] + 256 * (v[:, 2] // 16)
        p = position_value(Y, X).double() / 255
        return torch.log(p / (1 - p)).float()[:, None]


def predictor(model, mpp=1.0, tile=64, **opts) -> Predictor:
    return Predictor(model, raw_config(mpp, tile), PredictOptions(**opts))


# -- the pure sliding window -------------------------------------------------------------------------
@pytest.mark.parametrize("length, tile, stride", [(1000, 256, 128), (1000, 256, 256), (257, 256, 128), (256, 256, 128),
                                                  (100, 256, 128), (5000, 512, 256), (513, 64, 48), (64, 64, 1)])
def test_window_steps_cover_the_axis_exactly_and_end_flush(length, tile, stride):
    xs = window_starts(length, tile, stride)
    assert xs.dtype == np.int64 and xs[0] == 0
    if length <= tile:
        assert list(xs) == [0]  # one window, padded by the reader
        return
    assert xs[-1] == length - tile  # the last window is flush with the edge
    steps = np.diff(xs)
    assert (steps > 0).all() and (steps <= stride).all()  # no gaps, no duplicates
    assert len(xs) == int(np.ceil((length - tile) / stride)) + 1  # and no more windows than needed
    covered = np.zeros(length, bool)
    for s in xs:
        covered[s : s + tile] = True
    assert covered.all()


def test_gaussian_map_is_finite_positive_and_centred():
    for tile in (1, 7, 64, 512):
        g = gaussian_map(tile)
        assert g.shape == (tile, tile) and g.dtype == np.float32
        assert np.isfinite(g).all() and (g > 0).all()
        assert g.max() == pytest.approx(1.0)
        np.testing.assert_allclose(g, g[::-1, ::-1])
        np.testing.assert_allclose(g, g.T)
    g = gaussian_map(64)
    assert g[32, 32] > g[32, 48] > g[32, 63] and g[0, 0] == pytest.approx(1e-3)


def _stitch(shape, windows, values, chunk, cache, scratch=None):
    out = np.full(shape, -1.0, np.float32)

    def on_final(cy, cx, p):
        block = out[cy * chunk : (cy + 1) * chunk, cx * chunk : (cx + 1) * chunk]
        assert (block == -1).all()  # each chunk is finalised exactly once
        block[...] = p

    acc = ChunkAccumulator(shape, chunk, on_final, cache_chunks=cache, scratch=scratch)
    t = values[0].shape[0]
    acc.expect(windows, (t, t))
    g = gaussian_map(t)
    for (x, y), v in zip(windows, values):
        acc.add(int(x), int(y), v * g, g)
    acc.close()
    out[out == -1] = 0  # chunks no window touched
    return out, acc


def test_stitching_equals_the_gaussian_weighted_mean_and_chunks_equal_memory(tmp_path):
    rng = np.random.default_rng(0)
    H, W, T, S = 150, 230, 64, 24
    ys, xs = window_starts(H, T, S), window_starts(W, T, S)
    windows = [(x, y) for y in ys for x in xs]
    rng.shuffle(windows)
    windows = windows[: len(windows) * 3 // 4]  # some windows missing, as off tissue
    values = [rng.random((T, T), dtype=np.float32) for _ in windows]
    # the reference: full-size arrays, straight from the definition
    num, den = np.zeros((H, W)), np.zeros((H, W))
    g = gaussian_map(T).astype(np.float64)
    for (x, y), v in zip(windows, values):
        num[y : y + T, x : x + T] += v * g
        den[y : y + T, x : x + T] += g
    ref = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    whole, _ = _stitch((H, W), windows, values, chunk=4096, cache=1)
    small, acc = _stitch((H, W), windows, values, chunk=16, cache=3, scratch=tmp_path / "spill")
    assert acc.spills > 0 and acc.reloads > 0 and acc.max_alive <= 3
    np.testing.assert_allclose(whole, ref, atol=1e-6)
    np.testing.assert_array_equal(small, whole)  # chunked with spills == in memory, bit for bit
    assert not list((tmp_path / "spill").iterdir())  # spill files are consumed


# -- the whole pipeline with fake models ------------------------------------------------------------
@pytest.mark.parametrize("h, w", [(150, 200), (40, 150)])
def test_a_known_function_of_position_is_stitched_exactly(tmp_path, h, w):
    img = write_png(tmp_path / "pos.png", encode_position(h, w))
    pred = predictor(PositionModel(), overlap=0.5, batch_size=3, tissue_method="none", read=ReadOptions(workers=2, qc="off"))  # not tissue
    r = predict_slide(pred, SlideJob(img, "pos", mpp=1.0), tmp_path / "out")
    assert r.status == "done", r.error
    prob = zarr.open_array(str(tmp_path / "out" / "pos" / "prob.zarr"), mode="r")[:]
    yy, xx = np.mgrid[:h, :w]
    np.testing.assert_array_equal(prob, position_value(yy, xx))  # every pixel, overlaps and edges included
    done = json.loads((tmp_path / "out" / "pos" / "done.json").read_text())
    n_expected = len(window_starts(h, 64, 32)) * len(window_starts(w, 64, 32))
    assert done["windows"]["run"] == r.windows == n_expected


def test_stitching_a_slide_in_chunks_equals_stitching_it_in_memory(cmu, tmp_path):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 1, 7, padding=3)  # output depends on context: overlapping windows disagree
    results = {}
    for name, chunk, cache in (("memory", 4096, 1), ("chunks", 32, 4)):
        pred = Predictor(conv, raw_config(4.0, 64), PredictOptions(overlap=0.5, batch_size=5,
                                                                   write=WriteOptions(chunk_px=chunk, cache_chunks=cache)))
        r = predict_slide(pred, SlideJob(cmu, name), tmp_path)
        assert r.status == "done", r.error
        results[name] = zarr.open_array(str(tmp_path / name / "prob.zarr"), mode="r")[:]
        done = json.loads((tmp_path / name / "done.json").read_text())
        assert not (tmp_path / name / ".scratch").exists()
        results[name + "_stats"] = done["stitching"]
    assert results["chunks_stats"]["spilled"] > 0 and results["chunks_stats"]["max_alive"] <= 4
    assert results["memory_stats"]["spilled"] == 0
    np.testing.assert_array_equal(results["chunks"], results["memory"])
    assert 0 < (results["memory"] > 0).mean() < 1  # windows only over tissue


def test_real_slide_outputs_and_windows_only_over_tissue(ckpt, cmu, tmp_path):
    pred = Predictor.from_checkpoint(ckpt, PredictOptions(batch_size=8))
    r = predict_slide(pred, SlideJob(cmu, "cmu", organ="skin", scanner="aperio"), tmp_path)
    assert r.status == "done", r.error
    out = tmp_path / "cmu"
    assert sorted(p.name for p in out.iterdir()) == ["done.json", "mask.ome.tiff", "overlay.png", "prob.zarr", "qc.geojson",
                                                    "tumor.geojson"]
    done = json.loads((out / "done.json").read_text())
    assert done["windows"]["tissue"] < done["windows"]["grid"] and done["windows"]["run"] == r.windows > 0
    assert done["organ"] == "skin" and done["settings"]["tile_size"] == 64 and done["settings"]["overlap_px"] == 32
    assert done["slide"]["dimensions"] == [2220, 2967] and done["output"]["mpp"] == pytest.approx(4.0, rel=0.02)
    for k in ("planning", "reading", "model", "stitching", "writing", "total"):
        assert done["timings"][k] >= 0
    prob = zarr.open_array(str(out / "prob.zarr"), mode="r")
    assert prob.shape == tuple(done["output"]["shape"])
    px = (prob[:] >= threshold_u8(0.5)).sum()
    assert done["tumor_pixels"] == px
    assert done["tumor_area_mm2"] == pytest.approx(px * done["output"]["mpp"] ** 2 / 1e6)
    overlay = np.asarray(Image.open(out / "overlay.png"))
    assert max(overlay.shape[:2]) >= 700 and overlay.shape[2] == 3


def test_flip_tta_undoes_its_flips(tmp_path):
    img = write_png(tmp_path / "pos.png", encode_position(90, 120))
    pred = predictor(PositionModel(), overlap=0.25, tta="flip", tissue_method="none", read=ReadOptions(qc="off"))  # not tissue
    assert predict_slide(pred, SlideJob(img, "pos", mpp=1.0), tmp_path).status == "done"
    yy, xx = np.mgrid[:90, :120]
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "pos" / "prob.zarr"))[:], position_value(yy, xx))


def test_options_are_validated():
    with pytest.raises(ValueError, match="threshold"):
        PredictOptions(threshold=1.5)
    with pytest.raises(ValueError, match="tta"):
        PredictOptions(tta="rotate")
    with pytest.raises(ValueError, match="stride"):
        PredictOptions(overlap=64).overlap_px(64)
    assert PredictOptions(overlap=0.5).overlap_px(512) == 256 and PredictOptions(overlap=100).overlap_px(512) == 100


# -- resume -------------------------------------------------------------------------------------------
def test_resume_skips_done_slides_and_redoes_half_done_ones(tmp_path):
    rgb = np.full((120, 160, 3), (230, 180, 210), np.uint8)
    rgb[30:90, 40:120] = (80, 30, 120)
    img = write_png(tmp_path / "img.png", rgb)
    job = SlideJob(img, "img", mpp=1.0)
    out = tmp_path / "out"
    pred = predictor(DarkModel())
    first = predict_slide(pred, job, out)
    assert first.status == "done" and not first.resumed
    stamp = (out / "img" / "done.json").stat().st_mtime_ns
    again = predict_slide(pred, job, out)
    assert again.status == "skipped" and again.windows == first.windows
    assert again.tumor_area_mm2 == pytest.approx(first.tumor_area_mm2)
    assert (out / "img" / "done.json").stat().st_mtime_ns == stamp
    # half done: no done.json (killed while writing) -> redone from scratch
    (out / "img" / "done.json").unlink()
    (out / "img" / "stale.tmp").write_text("left by a killed run")
    redo = predict_slide(pred, job, out)
    assert redo.status == "done" and redo.resumed and not (out / "img" / "stale.tmp").exists()
    assert (out / "img" / "done.json").is_file()
    # other settings: refuse rather than mix, unless --overwrite
    other = predictor(DarkModel(), threshold=0.3)
    refused = predict_slide(other, job, out)
    assert refused.status == "failed" and "other settings" in refused.error and "threshold" in refused.error
    assert (out / "img" / "done.json").is_file()  # the finished output is untouched
    tta = predict_slide(predictor(DarkModel(), tta="none"), job, out)  # made at the default, --tta flip
    assert tta.status == "failed" and "tta 'flip' -> 'none'" in tta.error
    forced = predict_slide(predictor(DarkModel(), threshold=0.3, write=WriteOptions(overwrite=True)), job, out)
    assert forced.status == "done" and not forced.resumed
    assert json.loads((out / "img" / "done.json").read_text())["settings"]["threshold"] == 0.3


# -- the CLI ----------------------------------------------------------------------------------------
def test_help(cli):
    for cmd in ("predict", "evaluate"):
        r = cli(cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output


def test_cli_batch_goes_on_past_every_bad_file(cli, ckpt, cmu, bad_dir, tmp_path):
    inputs = [bad_dir / n for n in BAD_FILES[:3]] + [cmu] + [bad_dir / n for n in BAD_FILES[3:]]
    r = cli("predict", ckpt, *inputs, "-o", tmp_path, "--json")
    assert r.exit_code == 1
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["cmu_small_region"]["status"] == "done"
    for n in BAD_FILES:
        row = rows[Path(n).stem]
        assert row["status"] == "failed" and n in row["error"], row
        assert f"error: {bad_dir / n}" in r.stderr  # one clear line naming the file
        assert not (tmp_path / Path(n).stem).exists()  # nothing half-written left behind
    assert (tmp_path / "cmu_small_region" / "done.json").is_file()
    # rerun: the good slide is skipped, the bad ones fail again; --overwrite redoes it
    r2 = cli("predict", ckpt, *inputs, "-o", tmp_path)
    assert r2.exit_code == 1 and "skipped" in r2.stdout and r2.stdout.count("failed") >= len(BAD_FILES)
    r3 = cli("predict", ckpt, cmu, "-o", tmp_path, "--overwrite", "--json")
    assert r3.exit_code == 0 and json.loads(r3.stdout)[0]["status"] == "done"


def test_cli_retrained_checkpoint_at_the_same_path_is_not_skipped(cli, cmu, tmp_path):
    """A batch rerun after retraining into the same run folder must not keep the old masks."""
    ck = tiny_checkpoint(tmp_path / "best.pt", seed=0)
    r = cli("predict", ck, cmu, "-o", tmp_path / "p", "--json")
    assert r.exit_code == 0, r.output
    done = json.loads((tmp_path / "p" / "cmu_small_region" / "done.json").read_text())
    assert len(done["settings"]["checkpoint_sha256"]) == 64
    assert json.loads(cli("predict", ck, cmu, "-o", tmp_path / "p", "--json").stdout)[0]["status"] == "skipped"
    tiny_checkpoint(ck, seed=1)  # retrained: same path, other weights
    r = cli("predict", ck, cmu, "-o", tmp_path / "p")
    assert r.exit_code == 1 and "checkpoint file's contents differ" in r.stderr and "--overwrite" in r.stderr
    r = cli("predict", ck, cmu, "-o", tmp_path / "p", "--overwrite", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["status"] == "done"
    again = json.loads((tmp_path / "p" / "cmu_small_region" / "done.json").read_text())
    assert again["settings"]["checkpoint_sha256"] != done["settings"]["checkpoint_sha256"]


def test_cli_plain_image_gives_a_same_size_mask_png(cli, ckpt, data_dir, tmp_path):
    png = data_dir / "he_carcinoma_1000.png"
    r = cli("predict", ckpt, png, "-o", tmp_path)
    assert r.exit_code == 1 and "mpp" in r.output  # no resolution in a PNG: say how to give it
    r = cli("predict", ckpt, png, "-o", tmp_path, "--mpp-override", "1.0", "--overlap", "16", "--json")
    assert r.exit_code == 0, r.output
    out = tmp_path / "he_carcinoma_1000"
    mask = np.asarray(Image.open(out / "mask.png"))
    assert mask.shape == (1000, 1000) and set(np.unique(mask)) <= {0, 255}
    prob = zarr.open_array(str(out / "prob.zarr"), mode="r")[:]
    assert prob.shape == (250, 250)  # 1 um/px image, 4 um/px model
    expected = np.repeat(np.repeat(prob >= 128, 4, 0), 4, 1) * 255
    np.testing.assert_array_equal(mask, expected)
    assert json.loads((out / "done.json").read_text())["settings"]["overlap_px"] == 16


def test_cli_shard_and_usage_errors(cli, ckpt, cmu, data_dir, tmp_path):
    r = cli("predict", ckpt, cmu, data_dir / "he_carcinoma_1000.png", "-o", tmp_path, "--shard", "2/2",
            "--mpp-override", "0.5", "--json")
    assert r.exit_code == 0 and [row["name"] for row in json.loads(r.stdout)] == ["he_carcinoma_1000"]
    assert cli("predict", ckpt, cmu, "-o", tmp_path, "--threshold", "2").exit_code == 2
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_text("not a checkpoint")
    r = cli("predict", bad_ckpt, cmu, "-o", tmp_path)
    assert r.exit_code == 1 and "not a readable checkpoint" in r.output


def test_predict_an_in_memory_slide(fake_slides, tmp_path):
    """The core of `predict` without any file: a pointwise model on a fake pyramid, tissue windows only."""
    from helpers import tissue_field
    from histodg.slides.backends import MemorySlide

    rgb = tissue_field(600, 800)
    job = fake_slides("fake", rgb, mpp=0.5, levels=2)
    r = predict_slide(predictor(DarkModel(), mpp=1.0, tile=64, overlap=0.25), job, tmp_path)
    assert r.status == "done", r.error
    done = json.loads((tmp_path / "fake" / "done.json").read_text())
    assert done["slide"]["read_level"] == 1 and done["output"]["shape"] == [300, 400]
    assert 0 < done["windows"]["run"] < done["windows"]["grid"]  # windows on glass are not run
    prob = zarr.open_array(str(tmp_path / "fake" / "prob.zarr"), mode="r")[:]
    ref = MemorySlide(rgb, 0.5, levels=2)
    level1 = ref.read_region((0, 0), 1, ref.level_dimensions[1]).astype(np.float32) / 255
    brightness = level1.mean(2)
    ran = prob > 0
    clear = np.abs(brightness - 0.5) > 0.02  # leave out pixels too close to the model's own threshold
    np.testing.assert_array_equal((prob >= threshold_u8(0.5))[ran & clear], (brightness <= 0.5)[ran & clear])
    dark = brightness < 0.4
    assert ran[dark].mean() > 0.99  # every dark (tissue) pixel was predicted


def test_done_json_only_after_every_output_reads_back(tmp_path, monkeypatch):
    """An output that was written but does not open (here: a GeoJSON cut short) fails the slide
    with one line naming the file; no done.json, so a rerun redoes it instead of skipping it."""
    rgb = np.full((120, 160, 3), (230, 180, 210), np.uint8)
    rgb[30:90, 40:120] = (80, 30, 120)
    job = SlideJob(write_png(tmp_path / "img.png", rgb), "img", mpp=1.0)
    import histodg.inference.outputs as outputs

    real = outputs.write_geojson

    def cut_short(path, data):
        real(path, data)
        path.write_text(path.read_text()[:-5])

    monkeypatch.setattr(outputs, "write_geojson", cut_short)
    r = predict_slide(predictor(DarkModel()), job, tmp_path / "out")
    assert r.status == "failed" and r.error.startswith(str(tmp_path / "out" / "img" / "tumor.geojson"))
    assert "cannot be read back" in r.error and not (tmp_path / "out" / "img").exists()
    monkeypatch.setattr(outputs, "write_geojson", real)
    assert predict_slide(predictor(DarkModel()), job, tmp_path / "out").status == "done"


def test_a_full_disk_names_the_output_and_leaves_nothing(cmu, tmp_path):
    """A file-size limit (EFBIG, as a full disk gives ENOSPC) while writing the outputs: one line
    naming the output folder, not the slide, and nothing left that a rerun would skip."""
    import resource
    import subprocess
    import sys

    ck = tiny_checkpoint(tmp_path / "ck.pt")

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    out = tmp_path / "p"
    r = subprocess.run([sys.executable, "-m", "histodg", "predict", str(ck), str(cmu), "-o", str(out)], capture_output=True,
                       text=True, preexec_fn=small_disk)
    err = [x for x in r.stderr.splitlines() if x.startswith("error")]
    assert r.returncode == 1 and err == [f"error: {out / 'cmu_small_region'}: File too large (writing the output of {cmu})"]
    assert outputs(out) == []  # the batch report says what failed; no output of the slide
