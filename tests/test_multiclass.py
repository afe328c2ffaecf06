"""Multi-class models (issue 29 §2): predict keeps every class (classes.zarr, the OME-TIFF label mask,
one polygon set per class with its name and colour, per-class areas in done.json and the summary)
and evaluate scores each class. A pointwise model that names each pixel by its colour makes every
expected output exact."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image
from test_outputs import iou, rasterise_geojson, shapes_mask
from test_viewer_outputs import check_qupath_geojson

from helpers import RAW_RGB
from histodg.evaluation.predictions import evaluate_predictions
from histodg.inference import PredictOptions, Predictor, predict_slide
from histodg.inference.outputs import PALETTE
from histodg.inference.polygons import mask_polygons, polygons_to_geojson, write_geojson
from histodg.model.config import ModelConfig
from histodg.slides.inputs import SlideJob
from histodg.slides.reading import ReadOptions

LABELS = {"0": "background", "1": "tumor", "2": "stroma"}
COLOURS = np.array([(235, 230, 235), (70, 20, 110), (230, 120, 150)], np.float32)  # background, tumor, stroma


class ColourClasses(torch.nn.Module):
    """Each pixel's class is the nearest of `COLOURS` (input RGB / 255): a pointwise model."""

    def forward(self, x):
        ref = torch.from_numpy(COLOURS / 255).view(1, 3, 3, 1, 1)
        return -200 * ((x[:, None] - ref) ** 2).sum(2)  # (N, 3 classes, H, W)


def drawn(h: int = 420, w: int = 640) -> np.ndarray:
    """The label image: the shapes of test_outputs as tumour, a band and a box of stroma."""
    labels = np.zeros((h, w), np.uint8)
    labels[shapes_mask(h, w)] = 1
    labels[300:380, 380:620] = 2
    labels[40:120, 420:520] = 2
    return labels


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiclass")
    labels = drawn()
    Image.fromarray(COLOURS[labels].astype(np.uint8)).save(root / "img.png")
    config = ModelConfig(arch="fake", encoder="fake", mpp=1.0, tile_size=64, classes=3, labels=LABELS, normalization=RAW_RGB)
    pred = Predictor(ColourClasses(), config, PredictOptions(read=ReadOptions(qc="off")))
    r = predict_slide(pred, SlideJob(root / "img.png", "img", mpp=0.5), root / "out")  # 2 level-0 px per map px
    assert r.status == "done", r.error
    return root, labels, r


def test_every_class_is_kept_in_the_label_map_and_the_ome_tiff(predicted):
    root, labels, _ = predicted
    out = root / "out" / "img"
    classes = zarr.open_array(str(out / "classes.zarr"), mode="r")[:]
    expected = labels[1::2, 1::2]  # map pixel centres fall on the odd level-0 pixels
    assert classes.shape == expected.shape and (classes == expected).mean() > 0.99
    assert set(np.unique(classes)) == {0, 1, 2}
    with tifffile.TiffFile(out / "mask.ome.tiff") as tf:
        level0 = tf.series[0].levels[0].asarray()
    assert level0.shape == labels.shape and set(np.unique(level0)) == {0, 1, 2}
    assert (level0 == labels).mean() > 0.99  # each class where it was drawn, at the slide's size
    prob = zarr.open_array(str(out / "prob.zarr"), mode="r")[:]
    assert ((prob >= 128) == (classes > 0)).all()  # prob.zarr stays the tumour-or-any-class probability


def test_one_polygon_set_per_class_with_its_name_and_colour(predicted):
    root, labels, r = predicted
    out = root / "out" / "img"
    features = check_qupath_geojson(out / "tumor.geojson", labels.shape[::-1])
    classes = {f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"] for f in features}
    assert classes == {"tumor": [200, 0, 0], "stroma": PALETTE[0]}
    cls = zarr.open_array(str(out / "classes.zarr"), mode="r")[:]
    for k, name in ((1, "tumor"), (2, "stroma")):  # each class's polygons rasterise back to its pixels
        only = {"type": "FeatureCollection",
                "features": [f for f in features if f["properties"]["classification"]["name"] == name]}
        write_geojson(root / f"{name}.geojson", only)
        back = rasterise_geojson(root / f"{name}.geojson", labels.shape[::-1], 2.0, cls.shape)
        assert iou(back > 0, cls == k) > 0.99, name
    done = json.loads((out / "done.json").read_text())
    for k, name in ((1, "tumor"), (2, "stroma")):
        c = done["classes"][str(k)]
        assert c["name"] == name and c["pixels"] == int((cls == k).sum())
        assert c["area_mm2"] == pytest.approx(c["pixels"] * 1.0**2 / 1e6)
    assert done["tumor_pixels"] == done["classes"]["1"]["pixels"] + done["classes"]["2"]["pixels"]
    assert r.class_areas_mm2 == {"tumor": done["classes"]["1"]["area_mm2"], "stroma": done["classes"]["2"]["area_mm2"]}


def _truth(path, labels: np.ndarray, names: dict) -> None:
    features = []
    for k, name in names.items():
        polygons = mask_polygons(labels == k, epsilon_px=0)
        features += polygons_to_geojson(polygons, 1.0, labels.shape[::-1],
                                        {"classification": {"name": name, "color": [0, 0, 0]}})["features"]
    write_geojson(path, {"type": "FeatureCollection", "features": features})


def test_evaluate_scores_each_class(predicted, tmp_path):
    root, labels, _ = predicted
    _truth(tmp_path / "img.geojson", labels, {1: "tumor", 2: "stroma"})
    table = evaluate_predictions([root / "out"], tmp_path).table()
    per_image = table["images"][0]["classes"]
    # boundaries blur at half resolution: a few per cent of each class, against under 10% when the classes are wrong
    assert set(per_image) == {"tumor", "stroma"} and min(v["dice"] for v in per_image.values()) > 0.95
    assert table["classes"] == {k: pytest.approx(v["dice"]) for k, v in per_image.items()}
    _truth(tmp_path / "img.geojson", labels, {1: "stroma", 2: "tumor"})  # the classes swapped: each class is wrong
    swapped = evaluate_predictions([root / "out"], tmp_path).table()
    assert max(v["dice"] for v in swapped["images"][0]["classes"].values()) < 0.1
    assert swapped["images"][0]["dice"] > 0.95  # tumour-or-any-class is as right as before


@pytest.mark.slow
def test_the_cli_writes_the_class_areas_to_the_summary(tmp_path, cli):
    from histodg.model.build import build_model
    from histodg.model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("unet", "resnet18", "none", 3)
    mc = ModelConfig(arch="unet", encoder="resnet18", mpp=1.0, tile_size=64, classes=3, labels=LABELS)
    save_checkpoint(tmp_path / "ck.pt", {"model_state": model.state_dict(), "model_config": mc})
    Image.fromarray(COLOURS[drawn()].astype(np.uint8)).save(tmp_path / "img.png")
    r = cli("predict", tmp_path / "ck.pt", tmp_path / "img.png", "-o", tmp_path / "out", "--mpp-override", "0.5",
            "--tta", "none", "--qc", "off")
    assert r.exit_code == 0, r.output
    done = json.loads((tmp_path / "out" / "img" / "done.json").read_text())
    row = json.loads((tmp_path / "out" / "summary.json").read_text())[0]
    assert row["area_mm2_tumor"] == pytest.approx(done["classes"]["1"]["area_mm2"])
    assert row["area_mm2_stroma"] == pytest.approx(done["classes"]["2"]["area_mm2"])
    assert "area_mm2_stroma" in (tmp_path / "out" / "summary.csv").read_text().splitlines()[0]


def test_prob_tiff_writes_each_class_probability(predicted, tmp_path):
    from histodg.inference.options import WriteOptions

    root, labels, _ = predicted
    config = ModelConfig(arch="fake", encoder="fake", mpp=1.0, tile_size=64, classes=3, labels=LABELS, normalization=RAW_RGB)
    opts = PredictOptions(read=ReadOptions(qc="off"), write=WriteOptions(outputs=("prob-tiff",), layout="flat"))
    r = predict_slide(Predictor(ColourClasses(), config, opts), SlideJob(root / "img.png", "img", mpp=0.5), tmp_path)
    assert r.status == "done", r.error
    done = json.loads((tmp_path / "img" / "done.json").read_text())
    assert {"../img.prob-1-tumor.ome.tiff", "../img.prob-2-stroma.ome.tiff", "../img.prob.ome.tiff"} <= set(done["files"])
    for k, name in ((1, "tumor"), (2, "stroma")):
        with tifffile.TiffFile(tmp_path / f"img.prob-{k}-{name}.ome.tiff") as tf:
            level0 = tf.series[0].levels[0].asarray()
        assert level0.shape == labels.shape
        # the class's own pixels near 255, the other class's near 0 (boundaries aside)
        assert np.median(level0[labels == k]) >= 250 and np.median(level0[labels == 3 - k]) <= 5, name
