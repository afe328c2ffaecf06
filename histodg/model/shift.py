"""The domain-shift score of a slide: how far its features lie from every domain the model was trained on.

What is compared. At the output of every encoder stage (strides 2 to 32; the encoder's input is
left out), each channel's mean and variance over all positions of a set of patches: the statistics
a BatchNorm layer keeps, taken where any encoder (ResNet, timm, MiT) has them. Stain and optics
move the shallow stages' statistics, morphology the deep ones'.

- A training domain is described by these moments pooled over its patches (`Moments`), written
  into the checkpoint at the end of training (`fit_reference`, called by `training.shift_reference`).
- A slide is described by the moments of the windows `predict` runs anyway: `FeatureMeter`
  hooks the encoder, so no extra pass is needed (with `--adapt bn` the slide's adaptation
  windows go once through the unadapted model, since the adapted one no longer shows the shift).
- Distance (`divergence`): per channel the symmetric Kullback-Leibler divergence between the two
  Gaussians N(mean, var), averaged over the channels of a stage, then over stages. The slide's
  raw score is its distance to the nearest training domain.
- Calibration: every training slide (store) is scored against the domains with that slide left
  out, as if it were a new slide of a seen domain. `score` is the raw score divided by the largest
  of those; `percentile` is the share of training slides closer than it. `score > 1` (farther than
  every training slide) is the warning: the slide lies outside what the model was trained on.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

SHIFT_VERSION = 1
WARN_ABOVE = 1.0  # score: the raw distance over the farthest training slide's
EPS = 1e-3  # variance floor, relative to the two sides' mean variance at a stage


@dataclass
class Moments:
    """Per stage: positions counted, per-channel sums and sums of squares (float64)."""

    count: list[float]
    sums: list[np.ndarray]
    squares: list[np.ndarray]

    @classmethod
    def empty(cls) -> Moments:
        return cls([], [], [])

    def __bool__(self) -> bool:
        return bool(self.count) and self.count[0] > 0

    def __add__(self, other: Moments) -> Moments:
        if not self:
            return other
        if not other:
            return self
        return Moments([a + b for a, b in zip(self.count, other.count)], [a + b for a, b in zip(self.sums, other.sums)],
                       [a + b for a, b in zip(self.squares, other.squares)])

    def __sub__(self, other: Moments) -> Moments:
        return Moments([a - b for a, b in zip(self.count, other.count)], [a - b for a, b in zip(self.sums, other.sums)],
                       [a - b for a, b in zip(self.squares, other.squares)])

    def mean_var(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        means = [s / n for s, n in zip(self.sums, self.count)]
        var = [np.maximum(ss / n - m * m, 0.0) for ss, n, m in zip(self.squares, self.count, means)]
        return means, var


def stage_features(features) -> list:
    """The encoder's stage outputs the score describes: every stage but the input (strides 2 to 32)."""
    return [f for f in list(features)[1:] if f.ndim == 4 and f.shape[1] > 0]


def stage_sums(f):
    """A stage output's per-channel sum and sum of squares over batch and positions (float32)."""
    f = f.float()
    return f.sum((0, 2, 3)), (f * f).sum((0, 2, 3))


class FeatureMeter:
    """Accumulates `Moments` of the encoder's stage outputs on every forward while `active`; the
    sums stay on the model's device until `take()`, so measuring adds no synchronisation.

    Who measures what is said through its contexts, never by setting its flags from outside:
    `one_slide()` (a slide's measurement, from nothing; every forward counts until told otherwise),
    `flip(first)` (a flipped copy of windows already counted: measured, its images not counted
    again), and `measured_apart()` (an adapter that measured the unadapted model itself: the
    slide's later forwards, the adapted ones, are not measured), with `measuring()` for that
    adapter's own passes."""

    def __init__(self, model):
        self._sums: list[list] = []  # per stage [positions, sums, squares], torch tensors on the device
        self.images = 0  # images measured since the last take() (while `counting`: flips of one are not more)
        self.active = True
        self.counting = True
        encoder = getattr(getattr(model, "module", model), "encoder", None)
        if encoder is None:
            raise ValueError("the model has no encoder to describe")
        self._handle = encoder.register_forward_hook(self._hook)

    def _hook(self, module, inputs, features) -> None:
        if not self.active:
            return
        import torch

        with torch.no_grad():
            stages = stage_features(features)
            self.add([(float(f.shape[0] * f.shape[2] * f.shape[3]), *stage_sums(f)) for f in stages],
                     int(stages[0].shape[0]) if stages else 0)

    def add(self, stages: list, images: int) -> None:
        """Count one forward of `images` windows: per stage (positions, per-channel sums, sums of
        squares), as the hook measures them or another runtime computed them (`inference.onnx_net`)."""
        if not self.active:
            return
        import torch

        self.images += images if self.counting else 0
        for i, (n, s, ss) in enumerate(stages):
            acc = torch.float32 if s.device.type == "mps" else torch.float64  # MPS has no float64
            s, ss = s.to(acc), ss.to(acc)
            if i == len(self._sums):
                self._sums.append([n, s, ss])
            else:
                self._sums[i][0] += n
                self._sums[i][1] += s
                self._sums[i][2] += ss

    @contextmanager
    def _flags(self, active: bool | None = None, counting: bool | None = None):
        before = self.active, self.counting
        self.active = before[0] if active is None else active
        self.counting = before[1] if counting is None else counting
        try:
            yield self
        finally:
            self.active, self.counting = before

    def one_slide(self):
        """Inside: one slide's forwards measured from nothing (`take()` them before leaving)."""
        self._sums, self.images = [], 0
        return self._flags(active=True, counting=True)

    def flip(self, first: bool):
        """Inside: a pass over flipped windows; only the `first` of the flips counts its images."""
        return self._flags(counting=first)

    def measuring(self):
        """Inside: measured, whatever `measured_apart` said (the adapter's unadapted pass)."""
        return self._flags(active=True)

    def paused(self):
        """Inside: nothing measured (a forward that is not a slide's: an export's trace)."""
        return self._flags(active=False)

    def measured_apart(self) -> None:
        """From now until the slide's end, forwards are not measured (the adapter measured the
        unadapted model on the slide's windows itself)."""
        self.active = False

    def take(self) -> Moments:
        """The moments so far; the meter starts again from nothing."""
        m = Moments([n for n, _, _ in self._sums], [s.double().cpu().numpy() for _, s, _ in self._sums],
                    [ss.double().cpu().numpy() for _, _, ss in self._sums])
        self._sums, self.images = [], 0
        return m

    def remove(self) -> None:
        self._handle.remove()


def channel_kl(m1, v1, m2, v2):
    """Symmetric KL divergence per channel between N(m1, v1) and N(m2, v2) (numpy arrays or torch
    tensors alike)."""
    return 0.25 * (v1 / v2 + v2 / v1 - 2 + (m1 - m2) ** 2 * (1 / v1 + 1 / v2))


def divergence(mean, var, ref_mean, ref_var) -> float:
    """Mean over stages of the channel-mean symmetric KL between N(mean, var) and N(ref_mean, ref_var)."""
    per_stage = []
    for m1, v1, m2, v2 in zip(mean, var, ref_mean, ref_var):
        m1, v1, m2, v2 = (np.asarray(a, dtype=np.float64) for a in (m1, v1, m2, v2))
        floor = EPS * 0.5 * float(v1.mean() + v2.mean()) + 1e-12
        v1, v2 = v1 + floor, v2 + floor
        per_stage.append(float(channel_kl(m1, v1, m2, v2).mean()))
    return float(np.mean(per_stage))


def _nearest(mean, var, domains: dict) -> tuple[float, str | None]:
    best = (float("inf"), None)
    for name, (dm, dv) in domains.items():
        d = divergence(mean, var, dm, dv)
        if d < best[0]:
            best = (d, name)
    return best


def fit_reference(per_store: dict[str, dict[str, Moments]]) -> dict | None:
    """The checkpoint's description of the training domains from each domain's stores' moments,
    with the leave-one-slide-out calibration; None when there is nothing to describe."""
    pooled = {}
    for dom, stores in per_store.items():
        total = Moments.empty()
        for m in stores.values():
            total = total + m
        if total:
            pooled[dom] = total
    if not pooled:
        return None
    domains = {d: m.mean_var() for d, m in pooled.items()}
    calibration = []
    for dom, stores in per_store.items():
        for m in stores.values():
            if not m:
                continue
            rest = {d: dv for d, dv in domains.items() if d != dom}
            if len(stores) > 1:  # its own domain without it
                rest[dom] = (pooled[dom] - m).mean_var()
            if rest:
                calibration.append(_nearest(*m.mean_var(), rest)[0])

    def r(arrays):
        return [[float(f"{v:.6g}") for v in a] for a in arrays]

    return {"version": SHIFT_VERSION, "warn_above": WARN_ABOVE,
            "domains": {d: {"mean": r(mv[0]), "var": r(mv[1]), "slides": len(per_store[d]),
                            "positions": pooled[d].count[0]} for d, mv in domains.items()},
            "calibration": sorted(float(f"{c:.6g}") for c in calibration)}


def slide_shift(reference: dict, moments: Moments, windows: int) -> dict | None:
    """done.json's `shift` of one slide: raw distance, nearest domain, calibrated score, warning."""
    if not reference or not moments:
        return None
    domains = {d: (v["mean"], v["var"]) for d, v in reference["domains"].items()}
    raw, nearest = _nearest(*moments.mean_var(), domains)
    cal = np.asarray(reference.get("calibration") or [], dtype=np.float64)
    top = float(cal.max()) if cal.size else 0.0
    score = raw / top if top > 0 else None
    return {"score": None if score is None else round(score, 4), "raw": round(raw, 6), "nearest": nearest,
            "percentile": None if not cal.size else round(100.0 * float((cal < raw).mean()), 1),
            "warn": bool(score is not None and score > reference.get("warn_above", WARN_ABOVE)),
            "windows": int(windows), "calibration_slides": int(cal.size)}
