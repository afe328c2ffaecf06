"""The training methods: every registry entry learns; SDS's parts do exactly what they claim."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import toy_patch
from histodg.model.build import build_model
from histodg.model.config import IMAGENET_MEAN, IMAGENET_STD
from histodg.model.normalize import Normalizer
from histodg.model.taps import DecoderTap
from histodg.training.augment import hed_jitter
from histodg.training.methods import METHODS, SegTask, parse_hparams
from histodg.training.methods.fishr import head_sample_grads
from histodg.training.methods.ops import class_sums
from histodg.training.stage import plain_logs

NORM = Normalizer(IMAGENET_MEAN, IMAGENET_STD, "cpu")


def toy_batches(n_domains=2, per_domain=4, size=64, seed=0):
    """Per-domain (normalised images, masks): `helpers.toy_patch`, tinted per domain."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(n_domains):
        pairs = [toy_patch(rng, size, centre=(0.3, 0.7), radius=(0.15, 0.3), empty=0, noise=10, tint=(12 * d, -8 * d, 0))
                 for _ in range(per_domain)]
        x = NORM(torch.tensor(np.stack([img.transpose(2, 0, 1) for img, _ in pairs]), dtype=torch.float32))
        out.append((x, torch.tensor(np.stack([disc for _, disc in pairs]), dtype=torch.uint8)))
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
    "sds (deep)": ({"shallow": False, "feat_align": 0.5, "grad_align": 0.5},
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
    return float(loss.detach()), plain_logs(logs), torch.cat([g.flatten() for g in grads])


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
    counts, fsums, gsums, sq, size = class_sums(model, tap.features, tap.head_input, logits, y, 1, [0, 1])
    torch.testing.assert_close(sq, tap.head_input.pow(2).flatten(1).sum(1))
    assert (size == tap.head_input[0].numel()).all()
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
    per_image = head_sample_grads(model, tap.head_input, logits, y, 1)
    bce = F.binary_cross_entropy_with_logits(logits[1, 0], (y[1] == 1).float())
    gw, gb = torch.autograd.grad(bce, [head.weight, head.bias])
    torch.testing.assert_close(per_image[1], torch.cat([gw[0, :, 0, 0], gb]), rtol=1e-4, atol=1e-6)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_a_pooled_step_has_the_gradient_of_one_batch_k_times_larger():
    """SDS's big batch: K micro-batches of one optimizer step give the gradient of the penalty on
    the statistics of all of them, with the current weights (not stale sums of earlier steps)."""
    k = 3
    micro = [toy_batches(seed=s) for s in range(k)]
    big = [(torch.cat([m[d][0] for m in micro]), torch.cat([m[d][1] for m in micro])) for d in range(2)]
    model = tiny("fpn")
    pooled = make("sds", model, shallow=False)
    pooled.train()
    model.eval()  # batch-independent features: BatchNorm's running statistics, no dropout
    pooled.begin_step(micro)
    logs = []
    for batches in micro:  # what the loop does: each micro-batch's loss / K, backward
        loss, log = pooled.loss(batches)
        (loss / k).backward()
        logs.append(plain_logs(log))
    pooled_grads = _grads(model).clone()
    model.zero_grad()
    single = make("sds", model, shallow=False)
    single.train()
    model.eval()
    loss, ref = single.loss(big)
    loss.backward()
    ref = plain_logs(ref)
    for log in logs:  # every micro-batch aligns on the pooled statistics
        assert log["grad_align"] == pytest.approx(ref["grad_align"], rel=1e-4)
        assert log["feat_align"] == pytest.approx(ref["feat_align"], rel=1e-4)
    torch.testing.assert_close(pooled_grads, _grads(model), rtol=1e-3, atol=1e-6)
    # without pooling each micro-batch aligns its own statistics: another gradient
    model.zero_grad()
    alone = make("sds", model, shallow=False, pool=False)
    alone.train()
    model.eval()
    alone.begin_step(micro)
    own = [alone.loss(b)[1]["grad_align"] for b in micro]
    assert all(abs(v - ref["grad_align"]) > 1e-6 for v in own)


def test_the_pass_without_gradients_changes_neither_batchnorm_nor_randomness():
    micro = [toy_batches(seed=s) for s in range(2)]
    model = tiny("fpn")
    sds = make("sds", model, perturb_p=1.0, stain=0.2, stain_p=1.0)  # random draws everywhere
    sds.train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    torch.manual_seed(11)
    sds.begin_step(micro)
    assert all(torch.equal(before[k], v) for k, v in model.named_buffers())  # running stats untouched
    first = float(sds.loss(micro[0])[1]["seg"])
    sds._step = None  # the same micro-batch again, from the same random state, without pooling
    model.load_state_dict({**model.state_dict(), **before})
    torch.manual_seed(11)
    assert float(sds.loss(micro[0])[1]["seg"]) == pytest.approx(first, rel=1e-6)  # the same draws as the pass without gradients
    sds.close()


def test_gradient_alignment_ignores_what_all_domains_share():
    """The variance across domains is unnormalised: a gradient every domain shares, however large,
    costs nothing (the old normalised spread fell as the shared part grew, rewarding a worse fit)."""
    sds = make("sds", tiny("fpn"), shallow=False)
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([[900.0, 300.0], [700.0, 500.0]])  # (domains, classes)
    fsums = torch.randn(2, 2, 16, generator=g)
    grads = torch.randn(2, 2, 1, 17, generator=g)  # per-domain mean gradients (D, C, K, F + 1)
    shared = 25 * torch.randn(1, 2, 1, 17, generator=g)
    _, base = sds.alignment(counts, fsums, grads * counts[..., None, None])
    _, more = sds.alignment(counts, fsums, (grads + shared) * counts[..., None, None])
    assert float(more) == pytest.approx(float(base), rel=1e-5)
    expected = ((grads.flatten(2) - grads.flatten(2).mean(0)) ** 2).sum(2).mean(0).mean()  # variance, by hand
    assert float(base) == pytest.approx(float(expected), rel=1e-5)
    # in units of the features' RMS: features 10x smaller (gradients' feature part 10x smaller) cost the same
    sq, size = torch.tensor([40.0, 60.0]), torch.tensor([20.0, 30.0])
    small = grads.clone()
    small[..., :-1] /= 10
    _, a = sds.alignment(counts, fsums, grads * counts[..., None, None], sq, size)
    _, b = sds.alignment(counts, fsums, small * counts[..., None, None], sq / 100, size)
    assert float(a) == pytest.approx(float(b), rel=1e-5) and float(a) != pytest.approx(float(base), rel=1e-3)


def test_the_tap_separates_the_features_from_what_the_head_sees():
    """FPN drops decoder channels in training: prototypes and CORAL describe the features before
    that dropout, the head's closed-form gradient uses what the head receives after it."""
    model = tiny("fpn")
    tap = DecoderTap(model)
    (x, _), _ = toy_batches()
    model.train()
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model(x)
        runs.append((tap.features.detach().clone(), tap.head_input.detach().clone()))
    torch.testing.assert_close(runs[0][0], runs[1][0])  # features: no dropout noise
    assert not torch.allclose(runs[0][1], runs[1][1])  # the head's input: channels dropped
    zeroed = (runs[0][1].abs().sum((2, 3)) == 0).float().mean()  # (image, channel) pairs dropped
    assert 0.1 < zeroed < 0.3  # Dropout2d, p = 0.2
    tap.remove()


def test_switching_a_part_off_removes_exactly_its_term():
    batches = toy_batches()

    def run(**hp):
        model = tiny("fpn")
        m = make("sds", model, shallow=False, **hp)
        m.train()
        loss, logs = m.loss(batches)
        m.close()
        return float(loss.detach()), plain_logs(logs)

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
    from histodg.training.augment import RGB_FROM_HED

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
    assert {"shallow", "deep", "feat_align", "grad_align", "pool", "stain", "perturb_p"} <= set(sds)
    assert sds["pool"]["default"] is True and sds["feat_align"]["help"]
    text = cli("methods").stdout
    assert "sds" in text and "pool" in text and "fishr" in text
    with pytest.raises(ValueError, match="no hyperparameter"):
        parse_hparams(METHODS["sds"], ["bogus=1"])
    with pytest.raises(ValueError, match="true or false"):
        parse_hparams(METHODS["sds"], ["deep=maybe"])


def test_fishr_follows_domainbed_schedule_and_resumes():
    model = tiny("unet")
    fishr = make("fishr", model)  # defaults: weight 1000 after the first 30% of the stage's steps
    fishr.start_stage(20)
    assert fishr.anneal_at == 6
    fishr.train()
    batches = toy_batches()
    resets = []
    for step in range(10):
        loss, logs = fishr.loss(batches)
        logs = plain_logs(logs)
        expected = logs["seg"] + (1000 * logs["fishr"] if step >= 6 else 0.0)
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-4), step
        resets.append(fishr.end_of_step())
    assert resets == [False] * 5 + [True] + [False] * 4  # the optimizer is reset once, when the penalty starts
    # resume: a new Fishr loads the moving average it saved (its buffers have their shape from the start)
    again = make("fishr", tiny("unet"))
    own = {k: v for k, v in fishr.state_dict().items() if not k.startswith("model.")}
    again.load_state_dict({**{f"model.{k}": v for k, v in again.model.state_dict().items()}, **own})
    assert torch.equal(again.ema_var, fishr.ema_var) and int(again.steps) == 10 and again.ema_var.abs().sum() > 0
    fishr.close()
    again.close()


def test_mixstyle_draws_its_cross_domain_partners_at_random():
    from histodg.training.methods.mixstyle import crossdomain_partners

    torch.manual_seed(0)
    sizes = [4, 4, 3]
    domain = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    draws = torch.stack([crossdomain_partners(sizes) for _ in range(200)])
    assert (domain[draws] != domain).all()  # always a partner of another domain
    assert all(len(set(draws[:, i].tolist())) >= 5 for i in range(11))  # and a different one from call to call
    counts = torch.bincount(domain[draws[:, 0]], minlength=3)
    assert counts[0] == 0 and counts[1] > 60 and counts[2] > 60  # both other domains


def test_dsu_perturbs_after_the_stem_too():
    from histodg.model.taps import stem_modules

    model = tiny("unet")
    dsu = make("dsu", model, p=1.0, stages=0)  # only the stem
    assert {id(m) for m in stem_modules(model)} == {id(model.encoder.relu), id(model.encoder.maxpool)}
    assert len(dsu.hooks.handles) == 2
    assert len(make("dsu", tiny("unet")).hooks.handles) == 6  # stem (2) + four stages, as the official code
    (x, _), _ = toy_batches()
    dsu.train()
    torch.manual_seed(1)
    with torch.no_grad():
        a = model(x)
        dsu.hooks.active = False
        b = model(x)
    assert not torch.allclose(a, b, atol=1e-4)
    dsu.close()
