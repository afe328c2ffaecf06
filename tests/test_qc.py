"""Artefact QC: pen, blur and a fold drawn onto the real slide are flagged where drawn and nowhere
else; `histodg tile --qc` keeps or leaves them out and counts them; `histodg predict` skips them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr

from helpers import tiny_checkpoint
from histodg.constants import QC_EXCLUDED
from histodg.slides.backends import MemorySlide
from histodg.slides.opening import open_slide
from histodg.slides.plan import plan_windows, resolve, resolve_target
from histodg.slides.qc import FLAGS, WindowQC, block_variances, counts, ink
from histodg.store import open_store
from histodg.synth.artefacts import BLUR, draw_artefacts

pytestmark = pytest.mark.usefixtures("one_torch_thread")
T = 256  # windows of 256 px at the slide's 0.5 um/px


@pytest.fixture(scope="module")
def slide_pixels(cmu):
    with open_slide(cmu) as s:
        return s.read_region((0, 0), 0, s.dimensions)


@pytest.fixture(scope="module")
def artefact_png(slide_pixels, tmp_path_factory) -> Path:
    art, _ = draw_artefacts(slide_pixels)
    path = tmp_path_factory.mktemp("qc") / "artefacts.png"
    cv2.imwrite(str(path), cv2.cvtColor(art, cv2.COLOR_RGB2BGR))
    return path


def window_flags(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The level-0 origin and the QC flags of each window `histodg tile` plans on `rgb` (0.5 um/px)."""
    slide = MemorySlide(rgb, 0.499)
    target, scale = resolve_target(slide, 0.5, None)
    plan = plan_windows(slide, resolve(slide, target, scale, T, 0.02), T, "pad", "otsu", 0.25)
    qc = WindowQC.from_plan(slide, plan)
    flags = np.array([qc(plan.resolution.read(slide, xy)) for xy in plan.level0_xy])
    return plan.level0_xy, flags


def coverage(xy: np.ndarray, where: np.ndarray) -> np.ndarray:
    padded = np.pad(where, ((0, T), (0, T)))
    return np.array([padded[y:y + T, x:x + T].mean() for x, y in xy])


def test_the_clean_slide_has_no_flag(slide_pixels):
    xy, flags = window_flags(slide_pixels)
    assert len(flags) > 40
    assert counts(flags) == {"pen": 0, "blur": 0, "dark": 0, "glass": 0}  # the false-positive rate: 0 of 48


def test_drawn_artefacts_are_flagged_where_drawn_and_nowhere_else(slide_pixels):
    art, where = draw_artefacts(slide_pixels)
    xy, flags = window_flags(art)
    # caught: every window mostly under the pen or the blur; a third of those under the fold (the fold
    # darkens the slide's own reference density too; BENCHMARKS.md, "Artefact QC")
    for name, mostly, caught in (("pen", 0.25, 1.0), ("blur", 0.5, 1.0), ("dark", 0.5, 1 / 3)):
        cov, bit = coverage(xy, where[name]), FLAGS[name]
        assert (cov >= mostly).sum() >= 2, name
        assert np.mean((flags[cov >= mostly] & bit) > 0) >= caught, f"{name}: windows mostly under it not flagged"
        assert not np.any(flags[cov == 0] & bit), f"{name}: flagged where nothing was drawn"
    untouched = sum(coverage(xy, w) for w in where.values()) == 0
    assert untouched.sum() >= 20 and not flags[untouched].any()


def test_each_rule_measures_what_it_says():
    rng = np.random.default_rng(0)
    sharp = np.repeat(rng.integers(60, 200, (128, 128, 1), dtype=np.uint8), 3, axis=2)  # grey: no ink
    sharp_var, blurred_var = (np.median(block_variances(im)) for im in (sharp, cv2.GaussianBlur(sharp, (0, 0), 2)))
    assert sharp_var > 10 * blurred_var
    qc = WindowQC(reference_od=None, reference_focus=sharp_var)  # the slide's sharpness: the sharp image's
    assert qc(sharp) == 0 and qc(cv2.GaussianBlur(sharp, (0, 0), 2)) == FLAGS["blur"]
    patch = np.full((64, 64, 3), (200, 120, 180), np.uint8)  # eosin pink: not ink
    patch[:16] = (40, 70, 170)  # blue marker
    patch[16:24] = (30, 30, 30)  # black marker
    patch[24:32] = (60, 150, 90)  # green marker
    patch[32:40] = (90, 50, 150)  # haematoxylin violet: not ink
    assert ink(patch)[:32].all() and not ink(patch)[32:].any()
    assert WindowQC()(np.full((64, 64, 3), 245, np.uint8)) == FLAGS["glass"]


COMMON = ["--tile-size", str(T), "--mpp-override", "0.499", "--mpp", "0.5"]


def _cli(*args):
    from click.testing import CliRunner

    from histodg.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiled(artefact_png, tmp_path_factory) -> Path:
    """The artefact slide tiled with `--qc flag` (OUT/flag) and with the default `--qc exclude` (OUT/excl)."""
    out = tmp_path_factory.mktemp("tiled")
    for mode, folder in (("flag", "flag"), ("exclude", "excl")):
        r = _cli("tile", artefact_png, "-o", out / folder, "--qc", mode, *COMMON)
        assert r.exit_code == 0, r.output
    return out


def test_tile_qc_flag_keeps_every_window_and_counts_its_flags(tiled):
    flagged = open_store(tiled / "flag" / "artefacts.zarr")
    report = flagged.attrs.qc_report
    assert flagged.attrs.qc == "flag" and report["flagged"] == int((flagged.qc > 0).sum()) > 6
    assert report["counts"] == counts(flagged.qc) and min(report["counts"][k] for k in ("pen", "blur", "dark")) >= 2
    assert report["excluded"] == 0 and report["windows"] == len(flagged)


def test_tile_qc_exclude_leaves_out_exactly_the_pen_blur_and_dark_windows(tiled):
    flagged, excluded = open_store(tiled / "flag" / "artefacts.zarr"), open_store(tiled / "excl" / "artefacts.zarr")
    left_out = (flagged.qc & QC_EXCLUDED) > 0  # glass is only recorded
    assert left_out.sum() >= 6 and len(excluded) == len(flagged) - left_out.sum()
    assert not np.any(excluded.qc & QC_EXCLUDED)
    assert {tuple(c) for c in excluded.coords} == {tuple(c) for c in flagged.coords[~left_out]}
    assert excluded.attrs.qc_report["excluded"] == left_out.sum()


def test_the_qc_counts_reach_the_batch_summary_and_info(tiled):
    flagged = open_store(tiled / "flag" / "artefacts.zarr")
    left_out = int(((flagged.qc & QC_EXCLUDED) > 0).sum())
    row = json.loads((tiled / "excl" / "summary.json").read_text())[0]
    assert row["qc_excluded"] == left_out and row["qc_pen"] == flagged.attrs.qc_report["counts"]["pen"]
    info = _cli("info", tiled / "excl" / "artefacts.zarr", "--json")
    assert json.loads(info.output)[0]["qc"]["excluded"] == left_out


def test_a_rerun_with_other_qc_is_refused_and_a_store_made_before_qc_is_reused(tiled, artefact_png, tmp_path):
    out = tmp_path / "excl"
    shutil.copytree(tiled / "excl", out)
    again = _cli("tile", artefact_png, "-o", out, "--qc", "off", *COMMON)
    assert again.exit_code == 1 and "qc" in again.output  # other settings: refused, not mixed
    meta = out / "artefacts.zarr" / "zarr.json"  # a store made before QC: no qc attributes
    doc = json.loads(meta.read_text())
    for key in ("qc", "qc_report"):
        doc["attributes"].pop(key)
    meta.write_text(json.dumps(doc))
    again = _cli("tile", artefact_png, "-o", out, "--json", *COMMON)
    assert again.exit_code == 0 and json.loads(again.stdout)[0]["status"] == "skipped"  # reused as it is


def test_predict_skips_excluded_windows_and_reports_their_area(cli, artefact_png, tmp_path):
    ck = tiny_checkpoint(tmp_path / "ck.pt", mpp=0.5, tile=128, head_logit=4.0)  # tumour everywhere it runs
    probs, done = {}, {}
    for mode in ("exclude", "off"):
        r = cli("predict", ck, artefact_png, "-o", tmp_path / mode, "--mpp-override", "0.499", "--overlap", "0",
                "--qc", mode, "--batch-size", "16", "--tta", "none")
        assert r.exit_code == 0, r.output
        probs[mode] = zarr.open_array(str(tmp_path / mode / "artefacts" / "prob.zarr"), mode="r")[:]
        done[mode] = json.loads((tmp_path / mode / "artefacts" / "done.json").read_text())
    qc = done["exclude"]["qc"]
    assert qc["excluded"] > 10 and min(qc["counts"][k] for k in ("pen", "blur", "dark")) >= 1
    assert done["off"]["qc"] is None and done["off"]["windows"]["excluded"] == 0
    assert done["exclude"]["windows"]["run"] == done["off"]["windows"]["run"] - qc["excluded"]
    x0, y0, x1, y1 = BLUR  # the model resolution is the slide's: prob pixels are level-0 pixels
    listed = qc["excluded_list"]
    assert len(listed) == qc["excluded"]
    assert any("blur" in w["flags"] and x0 <= w["x"] and w["x"] + 128 <= x1 and y0 <= w["y"] and w["y"] + 128 <= y1
               for w in listed)
    for w in listed:  # flush windows overlap their neighbours by a few pixels: those parts were predicted
        win = np.s_[w["y"]:w["y"] + 128, w["x"]:w["x"] + 128]
        assert (probs["exclude"][win] == 0).mean() > 0.75 and (probs["off"][win] > 200).mean() > 0.9, w
    same = probs["exclude"] == probs["off"]
    assert same.mean() > 0.8  # everything but the excluded windows is as before
    mm2_per_px = 0.499**2 / 1e6
    lost = np.count_nonzero(probs["off"] > 127) - np.count_nonzero(probs["exclude"] > 127)
    assert 0 < qc["area_mm2"] <= lost * mm2_per_px * 1.05  # tissue only: at most the area the skipped windows covered
    row = json.loads((tmp_path / "exclude" / "summary.json").read_text())[0]
    assert row["qc_excluded"] == qc["excluded"] and row["qc_area_mm2"] == pytest.approx(qc["area_mm2"])
    assert "QC excluded" in (tmp_path / "exclude" / "report.html").read_text()


def test_the_window_reader_tile_and_predict_share_flags_excludes_and_keeps_a_read_error(slide_pixels):
    from histodg import SlideError
    from histodg.slides.window_reader import WindowReader

    art, _ = draw_artefacts(slide_pixels)
    slide = MemorySlide(art, 0.499)
    target, scale = resolve_target(slide, 0.5, None)
    plan = plan_windows(slide, resolve(slide, target, scale, T, 0.02), T, "pad", "otsu", 0.25)
    xy, flags = window_flags(art)
    qc = WindowQC.from_plan(slide, plan)
    kept, left_out = WindowReader(slide, plan, qc, exclude=False), WindowReader(slide, plan, qc, exclude=True)
    reads = [kept.read(i) for i in range(len(plan))]
    assert [r.flags for r in reads] == list(flags) and not any(r.excluded for r in reads)
    assert [left_out.read(i).excluded for i in range(len(plan))] == [bool(f & QC_EXCLUDED) for f in flags]
    assert sum(bool(f & QC_EXCLUDED) for f in flags) >= 6

    class Broken(MemorySlide):
        def read_region(self, xy0, level, size):
            raise SlideError("broken.svs", "tile 3 cannot be decoded")

    bad = WindowReader(Broken(art, 0.499), plan, qc).read(0)
    assert bad.image is None and bad.error == "tile 3 cannot be decoded" and bad.flags == 0


def test_a_qc_report_counts_windows_and_reads_back_a_journal_of_an_earlier_histodg():
    from histodg.qc_report import QCReport

    r = QCReport()
    for flags, kept in ((0, True), (FLAGS["pen"] | FLAGS["blur"], False), (FLAGS["glass"], True)):
        r.add(flags, kept)
    assert (r.windows, r.flagged, r.excluded) == (3, 2, 1)
    assert r.counts == {"pen": 1, "blur": 1, "dark": 0, "glass": 1}
    assert QCReport.from_dict(r.to_dict()) == r
    old = {"windows": 3, "flagged": 1, "excluded": 0, "counts": {"pen": 1}}  # a journal without thresholds
    assert QCReport.from_dict(old).counts == {"pen": 1, "blur": 0, "dark": 0, "glass": 0}
    assert QCReport.of_windows(10, [(FLAGS["dark"], False)]).to_dict()["windows"] == 10
