"""The sliding window on an array (`inference.sliding`), and that it is the engine `predict_slide` runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from helpers import encode_position, position_value, raw_config
from histodg.inference import PredictOptions, Predictor, ReadOptions, predict_slide
from histodg.inference.sliding import sliding_window
from histodg.slides.inputs import SlideJob

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _decode_position_value(crops: np.ndarray) -> np.ndarray:
    """What each pixel of the windows says about where it is, as position_value / 255."""
    c = crops.astype(np.int64)
    x, y = c[..., 0] + 256 * (c[..., 2] % 16), c[..., 1] + 256 * (c[..., 2] // 16)
    return position_value(y, x) / 255


@pytest.mark.parametrize("h, w, tile, stride", [(150, 200, 64, 32), (40, 150, 64, 48), (700, 530, 128, 100)])
def test_a_known_function_of_position_is_stitched_exactly_on_an_array(h, w, tile, stride):
    prob = sliding_window(encode_position(h, w), _decode_position_value, tile, stride, batch_size=5)
    yy, xx = np.mgrid[:h, :w]
    np.testing.assert_allclose(prob, position_value(yy, xx) / 255, rtol=1e-6)  # overlaps, chunk seams and edges


def test_an_image_smaller_than_a_window_is_padded_white():
    seen = []

    def predict(crops):
        seen.append(crops.copy())
        return np.full(crops.shape[:3], 0.25, np.float32)

    prob = sliding_window(np.zeros((20, 30, 3), np.uint8), predict, 64, 32)
    assert prob.shape == (20, 30) and np.allclose(prob, 0.25)
    assert len(seen) == 1 and (seen[0][0, 20:] == 255).all() and (seen[0][0, :20, :30] == 0).all()


def test_a_wrong_shaped_answer_is_refused():
    with pytest.raises(ValueError, match="predict returned"):
        sliding_window(np.zeros((64, 64, 3), np.uint8), lambda c: np.zeros((len(c), 32, 32)), 64, 32)


def test_predict_slide_stitches_what_the_array_function_stitches(tmp_path):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 1, 7, padding=3)  # its output depends on context: overlapping windows disagree
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    pred = Predictor(conv, raw_config(4.0, 64), PredictOptions(overlap=0.5, tta="none", tissue_method="none",
                                                               read=ReadOptions(qc="off")))
    r = predict_slide(pred, SlideJob(tmp_path / "img.png", "img", mpp=4.0), tmp_path / "out")
    assert r.status == "done", r.error
    slide = zarr.open_array(str(tmp_path / "out" / "img" / "prob.zarr"), mode="r")[:]
    array = sliding_window(rgb, lambda c: pred.probabilities(torch.from_numpy(c)).cpu().numpy(), 64, pred.stride)
    assert np.abs(np.round(array * 255).astype(int) - slide.astype(int)).max() <= 1  # prob.zarr is 0-255
