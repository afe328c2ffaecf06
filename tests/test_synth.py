"""The synthetic data set: readable slides, exact annotations, real domain shifts, determinism.

One small data set (2 cases per domain, 600 um sections, WSI format) is generated
once for the module; the statistics re-render its cases with `render_job`, which is what the
writers wrote (checked in `test_written_pixels_are_the_render`).
"""
from __future__ import annotations

import csv
import json
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
import pytest

from histodg.synth import DOMAINS, DatasetSpec, make_dataset, make_gallery
from histodg.synth.dataset import plan, render_job
from histodg.synth.gallery import read_manifest
from histodg.synth.tissue import EPITHELIUM, TUMOUR

SIZE_UM = 600.0
CASES = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    make_dataset(out, DatasetSpec(cases=CASES, size_um=SIZE_UM, formats=("wsi",), seed=0))
    return out


@pytest.fixture(scope="module")
def rows(dataset) -> list[dict]:
    return read_manifest(dataset / "manifest.csv")


@pytest.fixture(scope="module")
def renders(dataset) -> dict:
    """job name -> (job, Case): the generator's own ground truth for every case of the set."""
    return {job.name: (job, render_job(job)) for job in plan(dataset, DatasetSpec(cases=CASES, size_um=SIZE_UM))}


def _row(rows, name):
    return next(r for r in rows if Path(r["path"]).stem == name)


def _level0(path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        return tf.pages[0].asarray()


def _to_mpp(img: np.ndarray, mpp: float, target: float, interpolation=cv2.INTER_AREA) -> np.ndarray:
    f = mpp / target
    return cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)), interpolation=interpolation)


# -- files --------------------------------------------------------------------------------------
def test_the_manifest_has_its_columns_and_a_row_per_case(dataset, rows):
    with open(dataset / "manifest.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["path", "annotation", "organ", "scanner", "split", "task", "mpp", "true_organ", "true_scanner"]
    assert len(rows) == CASES * len(DOMAINS)


def test_as_in_cosas_only_the_tasks_own_axis_is_known(rows):
    organ_rows = [r for r in rows if r["task"] == "organ"]
    scanner_rows = [r for r in rows if r["task"] == "scanner"]
    assert {r["scanner"] for r in organ_rows} == {"unknown"} and len({r["true_scanner"] for r in organ_rows}) == 1
    assert {r["organ"] for r in scanner_rows} == {"unknown"} and len({r["true_organ"] for r in scanner_rows}) == 1


def test_lung_and_scanner_d_are_held_out_beside_three_training_domains_each(rows):
    organ_rows = [r for r in rows if r["task"] == "organ"]
    scanner_rows = [r for r in rows if r["task"] == "scanner"]
    assert {r["split"] for r in rows} == {"train", "heldout"}
    assert {r["organ"] for r in organ_rows if r["split"] == "train"} >= {"colon", "stomach", "pancreas"}
    assert {r["organ"] for r in organ_rows if r["split"] == "heldout"} == {"lung"}
    assert len({r["scanner"] for r in scanner_rows if r["split"] == "train"}) >= 3
    assert {r["scanner"] for r in scanner_rows if r["split"] == "heldout"} == {"scanner-d"}


def test_each_slide_and_its_annotation_lie_in_their_domains_folder_and_nothing_temporary_is_left(dataset, rows):
    for r in rows:
        domain = r["organ"] if r["task"] == "organ" else r["scanner"]
        assert r["path"] == f"wsi/{r['task']}/{domain}/{Path(r['path']).stem}.tiff"
        assert r["annotation"] == r["path"][: -len(".tiff")] + ".geojson"
        assert (dataset / r["path"]).is_file() and (dataset / r["annotation"]).is_file()
    assert not list(dataset.rglob("*.tmp*")), "temporary files left behind"


def test_slides_open_with_openslide_and_tiffslide_with_their_mpp(dataset, rows):
    import openslide
    import tiffslide

    assert {float(r["mpp"]) for r in rows} == {0.25, 0.5}  # at least one scanner at another resolution
    for r in rows:
        path = str(dataset / r["path"])
        mpp = float(r["mpp"])
        osr, ts = openslide.OpenSlide(path), tiffslide.TiffSlide(path)
        try:
            assert osr.properties["openslide.vendor"] == "generic-tiff"
            assert abs(float(osr.properties["openslide.mpp-x"]) - mpp) < 1e-3
            assert abs(float(osr.properties["openslide.mpp-y"]) - mpp) < 1e-3
            assert abs(float(ts.properties["tiffslide.mpp-x"]) - mpp) < 1e-3
            assert abs(float(ts.properties["tiffslide.mpp-y"]) - mpp) < 1e-3
            assert osr.level_count > 1 and ts.level_count == osr.level_count
            assert min(osr.level_dimensions[-1]) <= 512
            assert [tuple(d) for d in ts.level_dimensions] == [tuple(d) for d in osr.level_dimensions]
            assert osr.level_downsamples[1] == pytest.approx(2, rel=1e-3)
            w, h = osr.level_dimensions[1]
            a = np.asarray(osr.read_region((0, 0), 1, (w, h)))[..., :3]
            b = np.asarray(ts.read_region((0, 0), 1, (w, h)))[..., :3]
            assert np.array_equal(a, b)
        finally:
            osr.close()
            ts.close()


def test_written_pixels_are_the_render(dataset, rows, renders):
    for name, (_, case) in renders.items():
        pixels = _level0(dataset / _row(rows, name)["path"])
        assert pixels.shape == case.rgb.shape
        err = np.abs(pixels.astype(np.int16) - case.rgb).mean()
        assert err < 5, f"{name}: level 0 differs from the render by {err:.1f} grey levels on average"


def test_geojson_is_qupath_shaped(dataset, rows):
    data = json.loads((dataset / rows[0]["annotation"]).read_text())
    assert data["type"] == "FeatureCollection" and data["features"]
    for feat in data["features"]:
        assert feat["properties"] == {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}
        assert feat["geometry"]["type"] in ("Polygon", "MultiPolygon")
        for ring in feat["geometry"]["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) > 3


def _tile_one(cli, dataset, row, out, mpp, tile=128):
    res = cli("tile", dataset / row["path"], "-o", out, "--tile-size", tile, "--mpp", mpp, "--min-tissue", 0,
               "--annotations", dataset / row["annotation"])
    assert res.exit_code == 0, res.output
    import zarr

    return zarr.open_group(str(out / f"{Path(row['path']).stem}.zarr"), mode="r")


@pytest.mark.parametrize("name", ["colon-01", "scanner-b-01"])
def test_geojson_round_trip_is_exact_at_native_mpp(cli, dataset, rows, renders, tmp_path, name):
    row = _row(rows, name)
    _, case = renders[name]
    g = _tile_one(cli, dataset, row, tmp_path, float(row["mpp"]))
    masks, coords = g["masks"][:], g["coords"][:]
    h, w = case.label.shape
    padded = np.zeros((h + 128, w + 128), np.uint8)
    padded[:h, :w] = case.label
    assert len(coords) and masks.any()
    for (x, y), m in zip(coords, masks):
        assert np.array_equal(m, padded[y : y + 128, x : x + 128]), f"window at {x}, {y}"
    assert sum(int(m.sum()) for m in masks) == int(case.label.sum())  # every tumour pixel, once


def test_geojson_round_trip_at_coarser_mpp(cli, dataset, rows, renders, tmp_path):
    row = _row(rows, "scanner-d-01")
    _, case = renders["scanner-d-01"]
    g = _tile_one(cli, dataset, row, tmp_path, 1.0, tile=64)
    masks, coords = g["masks"][:], g["coords"][:]
    scale = 1.0 / case.mpp  # level-0 px per patch px
    coarse = _to_mpp(case.label.astype(np.float32), case.mpp, 1.0) > 0.5
    inter = union = 0
    for (x, y), m in zip(coords, masks):
        i0, j0 = round(y / scale), round(x / scale)
        expect = np.zeros((64, 64), bool)
        part = coarse[i0 : i0 + 64, j0 : j0 + 64]
        expect[: part.shape[0], : part.shape[1]] = part
        inter += (expect & (m > 0)).sum()
        union += (expect | (m > 0)).sum()
    assert union > 0 and inter / union > 0.95


# -- the domains ------------------------------------------------------------------------------------
def _lumen_stats(case):
    """Lumen size and elongation in the normal tissue, from the generator's own structure map.

    Size: the area-weighted median lumen area (um^2), i.e. the size of the lumen a lumen pixel
    sits in; elongation: the median ratio of principal axes.
    """
    from scipy import ndimage as ndi

    lab, n = ndi.label(case.lumen & (case.label == 0) & case.tissue)
    areas = np.bincount(lab.ravel())[1:] * case.mpp**2
    by_size = np.sort(areas)
    weighted_median = by_size[np.searchsorted(np.cumsum(by_size), by_size.sum() / 2)]
    elong = []
    for i, sl in enumerate(ndi.find_objects(lab)):
        ys, xs = np.nonzero(lab[sl] == i + 1)
        if areas[i] >= 20 and len(xs) > 3:
            ev = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)))
            elong.append(np.sqrt(ev[1] / max(ev[0], 1e-9)))
    return float(weighted_median), float(np.median(elong)) if elong else 1.0


def _nucleus_area(case, cell):
    t = case.nucleus_table
    t = t[t[:, 0] == cell]
    return float(np.mean(np.pi / 4 * t[:, 1] * t[:, 2]))


def test_organs_differ_in_morphology_not_in_stain(dataset, rows, renders):
    stats = {}
    for name, (job, case) in renders.items():
        if job.domain.task != "organ":
            continue
        lumen_area, lumen_elong = _lumen_stats(case)
        stats.setdefault(job.domain.organ, []).append(
            {"lumen_um2": lumen_area, "lumen_elong": lumen_elong, "nucleus_um2": _nucleus_area(case, EPITHELIUM),
             "tumour_nucleus_um2": _nucleus_area(case, TUMOUR),
             "white": np.median(_level0(dataset / _row(rows, name)["path"])[case.kind == 0], axis=0)})
    mean = {o: {k: np.mean([s[k] for s in v], axis=0) for k in v[0]} for o, v in stats.items()}
    train = [d.organ for d in DOMAINS if d.task == "organ" and d.split == "train"]
    for a, b in combinations(train, 2):  # every pair of training organs differs in a morphology statistic
        ratios = [max(mean[a][k], mean[b][k]) / min(mean[a][k], mean[b][k]) for k in ("lumen_um2", "lumen_elong", "nucleus_um2")]
        assert max(ratios) > 1.3, (a, b, ratios)
    for organ, m in mean.items():  # adenocarcinoma: enlarged nuclei in every organ
        assert m["tumour_nucleus_um2"] > 1.5 * m["nucleus_um2"], organ
    # the held-out organ lies outside the training organs: alveoli are far larger than glands
    lung = [s["lumen_um2"] for s in stats["lung"]]
    assert min(lung) > 4 * max(s["lumen_um2"] for o in train for s in stats[o])
    # one scanner: the colour balance of the glass is the same in every organ domain
    whites = np.array([s["white"] / s["white"].mean() for v in stats.values() for s in v])
    assert np.ptp(whites, axis=0).max() < 0.01


def _scanner_stats(case, pixels):
    """White point of the glass, mean optical-density direction of the tissue, sharpness at 0.5 um/px."""
    glass = case.kind == 0
    white = np.median(pixels[glass], axis=0).astype(float)
    tissue = (case.kind == 1) | (case.kind == 2)  # stroma and cytoplasm, away from the section edge
    tissue &= cv2.erode(case.tissue.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    od = -np.log(np.clip(pixels[tissue].astype(float), 1, None) / white).mean(0)
    grey = _to_mpp(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY).astype(np.float32), case.mpp, 0.5)
    inner = _to_mpp(tissue.astype(np.uint8), case.mpp, 0.5, cv2.INTER_NEAREST) > 0
    lap = cv2.Laplacian(grey, cv2.CV_32F)
    sharp = float(np.sqrt((lap[inner] ** 2).mean()) / grey[inner].mean())
    return {"white": white, "od": od / np.linalg.norm(od), "sharp": sharp}


def test_scanners_differ_in_acquisition_and_the_heldout_one_is_shifted(dataset, rows, renders):
    stats = {}
    for name, (job, case) in renders.items():
        if job.domain.task == "scanner":
            pixels = _level0(dataset / _row(rows, name)["path"])
            stats.setdefault(job.domain.scanner, []).append(_scanner_stats(case, pixels))
    names = sorted(stats)
    assert len(names) >= 4
    mean = {s: {k: np.mean([c[k] for c in v], axis=0) for k in v[0]} for s, v in stats.items()}
    for a, b in combinations(names, 2):  # colour: stain vectors and white balance
        od_dist = np.linalg.norm(mean[a]["od"] - mean[b]["od"])
        white_dist = np.abs(mean[a]["white"] - mean[b]["white"]).max()
        assert od_dist > 0.05 or white_dist > 5, (a, b, od_dist, white_dist)
    sharp = [mean[s]["sharp"] for s in names]
    assert max(sharp) > 1.5 * min(sharp), dict(zip(names, sharp))  # optics
    # the held-out scanner's stain lies away from every training scanner's, beyond case-to-case spread
    held = [s for s in names if any(d.scanner == s and d.split == "heldout" for d in DOMAINS)]
    assert held == ["scanner-d"]
    within = max(np.linalg.norm(x["od"] - y["od"]) for v in stats.values() for x, y in combinations(v, 2))
    gap = min(np.linalg.norm(h["od"] - t["od"]) for h in stats["scanner-d"] for s in names if s != "scanner-d"
              for t in stats[s])
    assert gap > 0.05 and gap > 2 * within, (gap, within)
    # and its white point is the least blue of all (a yellowish lamp)
    blue_minus_red = {s: mean[s]["white"][2] - mean[s]["white"][0] for s in names}
    assert min(blue_minus_red, key=blue_minus_red.get) == "scanner-d", blue_minus_red


def test_colour_alone_cannot_find_the_tumour(dataset, rows, renders):
    """A per-pixel colour classifier (3-D colour histogram, Bayes, best threshold chosen on its own
    training pixels) fitted on the training domains scores far below the ground truth's Dice of 1."""
    bins = 16

    def pixels(name):
        job, case = renders[name]
        rgb = _to_mpp(_level0(dataset / _row(rows, name)["path"]), case.mpp, 1.0)
        label = _to_mpp(case.label.astype(np.float32), case.mpp, 1.0) > 0.5
        q = (rgb // (256 // bins)).astype(np.int64)
        return (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2], label

    def dice(pred, truth):
        return 2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1)

    results = {}
    for task in ("organ", "scanner"):
        data = {job.name: pixels(job.name) for job, _ in renders.values() if job.domain.task == task}
        train = [n for n, (job, _) in renders.items() if job.domain.task == task and job.domain.split == "train"]
        tumour = sum(np.bincount(data[n][0][data[n][1]], minlength=bins**3) for n in train)
        normal = sum(np.bincount(data[n][0][~data[n][1]], minlength=bins**3) for n in train)
        posterior = (tumour + 0.5) / (tumour + normal + 1.0)
        idx = np.concatenate([data[n][0].ravel() for n in train])
        truth = np.concatenate([data[n][1].ravel() for n in train])
        best = max(np.linspace(0.05, 0.95, 19), key=lambda t: dice(posterior[idx] > t, truth))
        results[task, "train"] = dice(posterior[idx] > best, truth)
        for n, (job, _) in renders.items():
            if job.domain.task == task and job.domain.split == "heldout":
                results[task, n] = dice(posterior[data[n][0]] > best, data[n][1])
        assert dice(truth, truth) == 1.0
    print({k: round(float(v), 3) for k, v in results.items()})
    assert max(results.values()) < 0.6, results


# -- determinism, arguments, CLI -----------------------------------------------------------------------
def test_more_cases_keep_the_first_ones(tmp_path, dataset):
    one = make_dataset(tmp_path / "one", DatasetSpec(seed=0, cases=1, size_um=SIZE_UM))
    for row in read_manifest(one):
        if row["path"].endswith("-01.tiff"):
            assert (one.parent / row["path"]).read_bytes() == (dataset / row["path"]).read_bytes()


def test_manifest_tiles_into_stores_with_the_known_axis(cli, dataset, tmp_path):
    res = cli("tile", dataset / "manifest.csv", "-o", tmp_path, "--mpp", 1.0, "--tile-size", 128)
    assert res.exit_code == 0, res.output
    import zarr

    for p in sorted(tmp_path.glob("*.zarr")):
        g = zarr.open_group(str(p), mode="r")
        if p.name.startswith("scanner-"):
            assert g.attrs["organ"] == "unknown" and g.attrs["scanner"] == p.name[:9]
        else:
            assert g.attrs["scanner"] == "unknown" and g.attrs["organ"] == p.name.split("-")[0]
        assert g.attrs["n_patches"] > 0 and g["masks"][:].max() == 1


def test_gallery(dataset, tmp_path):
    png = make_gallery(dataset / "manifest.csv", tmp_path / "g.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 600 and im.size[1] > 300
    assert png.stat().st_size < 1.5 * 2**20
