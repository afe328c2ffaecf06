"""The training methods: every registry entry learns; SDS's parts do exactly what they claim."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histodg.model.build import build_model
from histodg.model.config import IMAGENET_MEAN, IMAGENET_STD
from histodg.model.normalize import Normalizer
from histodg.model.taps import DecoderTap
from histodg.training.methods import METHODS, SegTask, parse_hparams
from histodg.training.methods.fishr import head_sample_grads
from histodg.training.methods.ops import class_sums, hed_jitter

NORM = Normalizer(IMAGENET_MEAN, IMAGENET_STD, "cpu")


def toy_batches(n_domains=2, per_domain=4, size=64, seed=0):
    """Per-domain (normalised images, masks): a striped purple disc (tumour) on pink, tinted per domain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for d in range(n_domains):
        imgs, masks = [], []
        for _ in range(per_domain):
            cx, cy = rng.uniform(0.3, 0.7, 2) * size
            r = rng.uniform(0.15, 0.3) * size
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            img = np.where(disc[..., None], np.array([120, 60, 150]) + 25 * (np.sin(xx / 2 + yy / 3) > 0)[..., None],
                           np.array([225, 160, 190])) + rng.normal(0, 10, (size, size, 1)) + np.array([12 * d, -8 * d, 0])
            imgs.append(np.clip(img, 0, 255).transpose(2, 0, 1))
            masks.append(disc)
        x = NORM(torch.tensor(np.stack(imgs), dtype=torch.float32))
        out.append((x, torch.tensor(np.stack(masks), dtype=torch.uint8)))
    return out


def tiny(arch="unet", encoder="resnet18", seed=0):
    torch.manual_seed(seed)
    return build_model(arch, encoder, "none", 1)


def make(name, model, **hp):
    cls = METHODS[name]
    return cls(model, 2, parse_hparams(cls, hp), task=SegTask(), normalizer=NORM)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_learns_the_toy_task(name):
    model = tiny()
    method = make(name, model)
    train = [toy_batches(seed=s) for s in range(4)]
    test = toy_batches(seed=99)

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            x = torch.cat([b[0] for b in test])
            y = torch.cat([b[1] for b in test])
            return F.binary_cross_entropy_with_logits(model(x)[:, 0], y.float()).item()

    before = held_out_loss()
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    method.train()
    for step in range(24):
        loss, logs = method.loss(train[step % 4])
        assert torch.isfinite(loss) and "loss" in logs and len(logs["domain_losses"]) == 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.end_of_step()
        method.train()
    after = held_out_loss()
    method.close()
    assert after < 0.75 * before, (name, before, after)


# Each method's own term, switched on (strongly, every image) and off; the rest is the ERM step.
# Penalties: {logged name: weight}, the loss being the ERM loss plus their weighted sum.
OWN_TERM = {
    "stain": ({"p": 1.0, "sigma": 0.2, "bias": 0.2}, {"sigma": 0.0, "bias": 0.0}, {}),
    "mixstyle": ({"p": 1.0, "alpha": 0.5}, {"p": 0.0}, {}),
    "dsu": ({"p": 1.0}, {"p": 0.0}, {}),
    "coral": ({"weight": 1.0}, {"weight": 0.0}, {"coral": 1.0}),
    "fishr": ({"weight": 1000.0, "anneal_steps": 0}, {"weight": 0.0, "anneal_steps": 0}, {"fishr": 1000.0}),
    "sds (shallow)": ({"deep": False, "stain": 0.2, "stain_p": 1.0, "perturb_p": 1.0}, {"deep": False, "shallow": False}, {}),
    "sds (deep)": ({"shallow": False, "big_batch": 1, "feat_align": 0.5, "grad_align": 0.5},
                   {"shallow": False, "deep": False}, {"feat_align": 0.5, "grad_align": 0.5}),
}


def _loss_and_grads(name, hp, batches, seed=5):
    model = tiny("unet")  # no dropout: with the term off, the step is deterministic
    method = make(name.split(" ")[0], model, **hp)
    method.train()
    torch.manual_seed(seed)
    loss, logs = method.loss(batches)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    method.close()
    return float(loss.detach()), logs, torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("name", sorted(OWN_TERM))
def test_every_method_term_is_non_zero_and_changes_the_gradients(name):
    """A method whose own term were silently zero (or never applied) would give ERM's gradients."""
    on, off, penalties = OWN_TERM[name]
    batches = toy_batches()
    loss_on, logs_on, g_on = _loss_and_grads(name, on, batches)
    loss_off, _, g_off = _loss_and_grads(name, off, batches)
    _, _, g_off_again = _loss_and_grads(name, off, batches, seed=6)
    torch.testing.assert_close(g_off, g_off_again)  # off is deterministic: a difference is the term's
    assert (g_on - g_off).norm() / g_off.norm() > 1e-3
    for key in penalties:
        assert logs_on[key] > 0, key
    if penalties:
        expected = sum(w * logs_on[k] for k, w in penalties.items())
        assert loss_on - loss_off == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_coral_penalty_is_the_squared_difference_of_means_and_covariances():
    from histodg.training.methods.coral import coral_penalty

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    assert float(coral_penalty(x, x)) == 0.0
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert float(coral_penalty(x, x + shift)) == pytest.approx(float((shift**2).mean()), rel=1e-9)  # covariances equal
    cov = x.T @ x / (len(x) - 1)
    assert float(coral_penalty(x, 2 * x)) == pytest.approx(float(((3 * cov) ** 2).mean()), rel=1e-9)  # means equal (0)


@pytest.mark.parametrize("arch", ["unet", "fpn"])
def test_closed_form_head_gradient_equals_autograd(arch):
    """gsum[n, c] is the gradient of the summed class-c pixel loss of image n w.r.t. the 1x1 head."""
    model = tiny(arch)
    model.eval()
    tap = DecoderTap(model)
    (x, y), _ = toy_batches()
    y = y.clone()
    y[0, :5] = 255  # ignored pixels
    logits = model(x)
    counts, fsums, gsums = class_sums(model, tap.features, logits, y, 1, [0, 1])
    head = model.segmentation_head[0]
    for n in range(2):
        for c in (0, 1):
            m = (y[n] == c)
            bce = F.binary_cross_entropy_with_logits(logits[n, 0], (y[n] == 1).float(), reduction="none")
            gw, gb = torch.autograd.grad((bce * m).sum(), [head.weight, head.bias], retain_graph=True)
            torch.testing.assert_close(gsums[n, c, 0, :-1], gw[0, :, 0, 0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gsums[n, c, 0, -1], gb[0], rtol=1e-4, atol=1e-5)
            assert counts[n, c] == m.sum()
    # Fishr's per-image head gradients are the same closed form (mean over the valid pixels)
    per_image = head_sample_grads(model, tap.features, logits, y, 1)
    bce = F.binary_cross_entropy_with_logits(logits[1, 0], (y[1] == 1).float())
    gw, gb = torch.autograd.grad(bce, [head.weight, head.bias])
    torch.testing.assert_close(per_image[1], torch.cat([gw[0, :, 0, 0], gb]), rtol=1e-4, atol=1e-6)


def test_big_batch_statistics_equal_one_batch_k_times_larger():
    k = 3
    model = tiny("fpn")
    micro = [toy_batches(seed=s) for s in range(k)]
    pooled = make("sds", model, big_batch=k, shallow=False)
    pooled.train()
    model.eval()  # batch-independent features: BatchNorm uses running statistics
    for batches in micro:
        x, y, sizes = pooled.concat(batches)
        logits = pooled.net(x)
        totals = pooled.pooled_stats(pooled.tap.features, logits, y, sizes)
    big = [(torch.cat([m[d][0] for m in micro]), torch.cat([m[d][1] for m in micro])) for d in range(2)]
    single = make("sds", model, big_batch=1, shallow=False)
    single.train()
    model.eval()
    x, y, sizes = single.concat(big)
    logits = single.net(x)
    ref = single.pooled_stats(single.tap.features, logits, y, sizes)
    for a, b in zip(totals, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # and the alignment terms computed from them agree too
    for a, b in zip(pooled.alignment(*totals), single.alignment(*ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the memory kept is k - 1 micro-batches of per-domain, per-class sums: tiny and independent of images
    assert len(pooled.past) == k - 1
    kept = sum(t.numel() for entry in pooled.past for t in entry)
    assert kept == (k - 1) * sum(t.numel() for t in ref)


def test_switching_a_part_off_removes_exactly_its_term():
    batches = toy_batches()

    def run(**hp):
        model = tiny("fpn")
        m = make("sds", model, shallow=False, big_batch=1, **hp)
        m.train()
        loss, logs = m.loss(batches)
        m.close()
        return float(loss.detach()), logs

    full, logs = run(feat_align=0.7, grad_align=0.3)
    no_feat, _ = run(feat_align=0.0, grad_align=0.3)
    no_grad, _ = run(feat_align=0.7, grad_align=0.0)
    no_deep, deep_logs = run(deep=False)
    assert logs["feat_align"] > 0 and logs["grad_align"] > 0
    assert full - no_feat == pytest.approx(0.7 * logs["feat_align"], rel=1e-4, abs=1e-7)
    assert full - no_grad == pytest.approx(0.3 * logs["grad_align"], rel=1e-4, abs=1e-7)
    assert no_deep == pytest.approx(logs["seg"], rel=1e-6) and "feat_align" not in deep_logs


@pytest.mark.parametrize("name, hp", [("sds", {"perturb_p": 1.0, "stain": 0.0}), ("mixstyle", {"p": 1.0}), ("dsu", {"p": 1.0})])
def test_shallow_perturbation_in_training_only(name, hp):
    model = tiny()
    method = make(name, model, **hp)
    (x, _), _ = toy_batches()
    for mode in ("train", "eval"):
        getattr(method, mode)()
        torch.manual_seed(1)
        with torch.no_grad():
            hooked = model(x)
            method.hooks.active = False
            plain = model(x)
            method.hooks.active = True
        if mode == "train":
            assert not torch.allclose(hooked, plain, atol=1e-4)
        else:
            torch.testing.assert_close(hooked, plain)
    method.close()
    model.train()  # close() leaves the model as it was: no perturbation left, whatever the random state
    with torch.no_grad():
        torch.manual_seed(2)
        a = model(x)
        torch.manual_seed(3)
        b = model(x)
    torch.testing.assert_close(a, b)


def test_sds_stain_jitter_is_training_only():
    model = tiny()
    m = make("sds", model, stain=0.2, stain_p=1.0, perturb_p=0.0)
    (x, _), _ = toy_batches()
    m.train()
    assert not torch.allclose(m.shallow_input(x), x)
    m.eval()
    assert torch.equal(m.shallow_input(x), x)
    m.close()


def test_hed_jitter_round_trip_and_range():
    rgb = torch.tensor(np.random.default_rng(0).uniform(20, 250, (2, 3, 16, 16)), dtype=torch.float32)
    same = hed_jitter(rgb, 1e-9, 1e-9)
    assert (same - rgb).abs().max() < 0.05  # RGB -> HED -> RGB is the identity
    out = hed_jitter(rgb, 0.5, 0.5)
    assert out.min() >= 0 and out.max() <= 255 and not torch.allclose(out, rgb)
    part = hed_jitter(rgb, 0.5, 0.5, p=0.0)
    assert (part - rgb).abs().max() < 0.05  # p = 0 changes nothing


def test_hed_jitter_shifts_optical_density_by_at_most_bias():
    """The bias is in optical-density units (Tellez et al.): with no scale jitter every pixel's OD
    moves by the same b @ stain-vectors, |b| <= bias, so a 0.05 shift is a light change."""
    from histodg.training.methods.ops import RGB_FROM_HED

    rgb = torch.tensor(np.random.default_rng(1).uniform(60, 230, (4, 3, 32, 32)), dtype=torch.float32)
    bias = 0.05
    out = hed_jitter(rgb, 0.0, bias)
    d_od = -torch.log(out / 255) + torch.log(rgb / 255)  # (N, 3, H, W)
    per_image = d_od.flatten(2)
    assert per_image.std(dim=2).max() < 1e-3  # a pure shift: the same for every pixel of an image
    bound = bias * RGB_FROM_HED.abs().sum(0)  # |sum_s b_s m_sc| <= bias * sum_s |m_sc|
    assert (per_image.mean(2).abs() <= bound + 1e-4).all()
    assert per_image.mean(2).abs().max() > 0.1 * bias  # and it does move
    assert (out - rgb).abs().mean() < 15  # a light change of an H&E-range image (was ~40 in the wrong units)


def test_methods_command_lists_every_method_and_its_settings(cli):
    rows = {m["name"]: m for m in json.loads(cli("methods", "--json").stdout)}
    assert set(rows) == set(METHODS)
    sds = {h["name"]: h for h in rows["sds"]["hparams"]}
    assert {"shallow", "deep", "feat_align", "grad_align", "big_batch", "stain", "perturb_p"} <= set(sds)
    assert sds["big_batch"]["default"] == 4 and sds["feat_align"]["help"]
    text = cli("methods").stdout
    assert "sds" in text and "big_batch" in text and "fishr" in text
    with pytest.raises(ValueError, match="no hyperparameter"):
        parse_hparams(METHODS["sds"], ["bogus=1"])
    with pytest.raises(ValueError, match="true or false"):
        parse_hparams(METHODS["sds"], ["deep=maybe"])
