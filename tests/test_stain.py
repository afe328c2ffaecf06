"""--stain-norm macenko|reinhard: torchstain's arithmetic on whole batches, fitted once, carried by the checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_domains
from histodg.model.stain import StainNormalizer, fit_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def he(data_dir) -> np.ndarray:
    return np.asarray(Image.open(data_dir / "he_carcinoma_1000.png").convert("RGB"))


def _batch(patches) -> torch.Tensor:
    return torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).float()


def _restained(rgb: np.ndarray, h_amount: float, e_amount: float) -> np.ndarray:
    """The same tissue with more or less of each stain (a scanner/lab shift): scaled in HED space."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    hed[..., 0] *= h_amount
    hed[..., 1] *= e_amount
    return (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_batched_normalisation_agrees_with_torchstain(he, method):
    import torchstain

    ref = fit_reference(method, [he[:256, :256], he[256:512, :256]])
    patches = [he[500:628, 500:628], he[700:828, 100:228], _restained(he[100:228, 700:828], 1.4, 0.7)]
    ours = StainNormalizer(ref)(_batch(patches))
    if method == "macenko":
        lib = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        lib.HERef, lib.maxCRef = torch.tensor(ref["he"]), torch.tensor(ref["max_c"])
        theirs = [lib.normalize(I=torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1), stains=False)[0] for p in patches]
    else:
        lib = torchstain.normalizers.ReinhardNormalizer(backend="torch")
        lib.target_means, lib.target_stds = torch.tensor(ref["means"]), torch.tensor(ref["stds"])
        theirs = [lib.normalize(torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1)) for p in patches]
    theirs = torch.stack([t.float() for t in theirs]).permute(0, 3, 1, 2)
    diff = (ours - theirs).abs()
    assert diff.max() <= 1 and diff.mean() < 0.01


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_restained_patch_comes_back_to_the_reference(he, method):
    patch = he[300:556, 300:556]
    ref = fit_reference(method, [patch])
    shifted = _restained(patch, 1.5, 0.6)
    norm = StainNormalizer(ref)(_batch([shifted]))[0].permute(1, 2, 0).numpy()
    before = np.abs(shifted.astype(float) - patch).mean()
    after = np.abs(norm - patch).mean()
    assert before > 10 and after < before / 3, (before, after)


def test_glass_and_empty_patches_are_left_alone_and_counted(he):
    ref = fit_reference("macenko", [he[:256, :256]])
    white = np.full((64, 64, 3), 243, np.uint8)
    speck = white.copy()
    speck[30:33, 30:33] = (120, 60, 150)  # a few stained pixels: too little to estimate stains
    tissue = he[400:464, 400:464]
    for method in ("macenko", "reinhard"):
        sn = StainNormalizer(fit_reference(method, [he[:256, :256]]) if method == "reinhard" else ref)
        out = sn(_batch([white, speck, tissue]))
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], _batch([white])[0]) and torch.equal(out[1], _batch([speck])[0])
        assert not torch.equal(out[2], _batch([tissue])[0])
        assert (sn.fallbacks, sn.seen) == (2, 3)
    with pytest.raises(ValueError, match="too little tissue"):
        fit_reference("macenko", [white])


def test_train_fits_the_reference_and_predict_applies_it(cli, cmu, tmp_path):
    stores = make_domains(tmp_path / "stores", organs=("colon", "stomach"), scanners=("s1",), stores_per_domain=1, n=8)
    r = cli("train", stores, "-o", tmp_path / "run", "--arch", "unet", "--encoder", "resnet18", "--encoder-weights",
            "none", "--domains", "organ", "--steps", "1", "--batch-size", "2", "--workers", "0", "--stain-norm", "macenko")
    assert r.exit_code == 0, r.output
    ckpt = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=False)
    stain = ckpt["model_config"]["normalization"]["stain"]
    assert stain["method"] == "macenko" and np.asarray(stain["he"]).shape == (3, 2) and len(stain["max_c"]) == 2
    args = ["predict", tmp_path / "run" / "best.pt", cmu, "-o", tmp_path / "p", "--mpp", "4", "--tile-size", "64"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    done = json.loads((tmp_path / "p" / "cmu_small_region" / "done.json").read_text())
    assert done["settings"]["stain"] == stain  # exactly what training used
    counts = done["stain_unnormalised"]
    assert counts["of"] >= done["windows"]["run"] and 0 <= counts["patches"] <= counts["of"]
    r = cli(*args, "--stain-norm", "none")
    assert r.exit_code == 1 and "the stain normalisation differs" in r.stderr
    r = cli(*args, "--stain-norm", "reinhard", "-o", tmp_path / "p2")
    assert r.exit_code == 1 and "--stain-norm reinhard needs --stain-ref IMAGE" in r.stderr
    r = cli("train", stores, "-o", tmp_path / "run2", "--stain-ref", cmu)
    assert r.exit_code == 2 and "--stain-ref needs --stain-norm" in r.stderr


def test_a_bad_stain_reference_is_one_line_and_writes_nothing(cli, tmp_path):
    stores = make_domains(tmp_path / "stores", organs=("colon", "stomach"), scanners=("s1",), stores_per_domain=1, n=8)
    bad = tmp_path / "ref.png"
    bad.write_text("not an image")
    r = cli("train", stores, "-o", tmp_path / "run", "--domains", "organ", "--steps", "1", "--workers", "0",
            "--stain-norm", "macenko", "--stain-ref", bad)
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [f"error: {bad}: cannot fit a macenko stain reference (not a readable image "
                                             f"(cannot identify image file '{bad}'))"]
    assert not (tmp_path / "run").exists()
