"""Shapes for the synthetic tissue of `histodg synth`: noise fields, polygons, drawing.

- `smooth_noise`: Gaussian-filtered noise with unit variance at a given scale;
- `star_ring`, `case_geometry`, `rasterize_polygons`: the section outline and the tumour regions
  as polygons in level-0 pixels, and their label raster, sampled at pixel centres with
  `annotations.fill_rings` exactly as `histodg tile` rasterises the GeoJSON;
- `Canvas`: the structure-code map and nucleus maps of a case, drawn with OpenCV in fixed point;
- `lattice` and `Glands`: jittered gland centres and wobbly elliptical gland outlines.
"""
from __future__ import annotations

import cv2
import numpy as np

from ..slides.annotations import fill_rings

SHIFT = 4  # sub-pixel bits for OpenCV drawing
ONE = 1 << SHIFT


# -- noise ---------------------------------------------------------------------------------------
def smooth_noise(rng, shape, sigma_px: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (float32)."""
    h, w = shape
    f = max(1.0, sigma_px / 2.0)  # big-sigma noise is made on a coarse grid, then upsampled
    hs, ws = int(np.ceil(h / f)) + 2, int(np.ceil(w / f)) + 2
    n = cv2.GaussianBlur(rng.standard_normal((hs, ws), dtype=np.float32), (0, 0), sigma_px / f,
                         borderType=cv2.BORDER_REFLECT)
    if f > 1:
        n = cv2.resize(n, (int(ws * f), int(hs * f)), interpolation=cv2.INTER_LINEAR)
    n = n[:h, :w]
    probe = n[::7, ::7]
    return (n - probe.mean()) / (probe.std() + 1e-6)


# -- geometry -------------------------------------------------------------------------------------
def star_ring(rng, centre, radii, irregularity, *, n=180, angle=0.0, harmonics=range(2, 9), decay=1.0):
    """A closed star-shaped ring (n, 2) around `centre` (x, y): an ellipse of `radii` (x, y) with
    random harmonic wobble."""
    (cx, cy), (rx, ry) = centre, radii
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rho = np.ones(n)
    for k in harmonics:
        rho += irregularity * rng.normal(0, 1.0 / k**decay) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    rho = np.clip(rho, 0.35, None)
    x, y = rx * rho * np.cos(t), ry * rho * np.sin(t)
    ca, sa = np.cos(angle), np.sin(angle)
    return np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], 1)


def case_geometry(rng, width: int, height: int) -> tuple[np.ndarray, list]:
    """The section outline and the tumour polygons (rings rounded to 0.01 px) in level-0 px.

    One or two lobulated tumour regions cover about a fifth to a third of the section, so every
    case has tumour and normal tissue; a third of them spare an island of normal tissue (a hole).
    """
    cx, cy = width / 2 + rng.normal(0, width * 0.02), height / 2 + rng.normal(0, height * 0.02)
    section = star_ring(rng, (cx, cy), (width * 0.44, height * 0.44), 0.1, n=720, angle=rng.uniform(0, np.pi),
                        harmonics=range(2, 60), decay=1.1)
    polygons = []
    n_tumours = 1 + int(rng.random() < 0.5)
    fraction = rng.uniform(0.22, 0.32) / n_tumours  # of the section's area, per tumour
    for i in range(n_tumours):
        r = np.sqrt(fraction * 0.44**2 * width * height)
        ang = rng.uniform(0, 2 * np.pi) + i * np.pi
        off = rng.uniform(0.05, 0.2) if n_tumours == 1 else rng.uniform(0.16, 0.24)
        tx, ty = cx + off * width * np.cos(ang), cy + off * height * np.sin(ang)
        aspect = rng.uniform(0.8, 1.25)
        exterior = star_ring(rng, (tx, ty), (r * aspect, r / aspect), 0.35, n=200, angle=rng.uniform(0, np.pi),
                             harmonics=range(2, 24), decay=1.2)
        # keep the region on the canvas: shrink it towards its centre where it would leave it
        d = exterior - (tx, ty)
        lo, hi = np.array([4.0, 4.0]) - (tx, ty), np.array([width - 4.0, height - 4.0]) - (tx, ty)
        with np.errstate(divide="ignore", invalid="ignore"):
            room = np.where(d > 0, hi / d, np.where(d < 0, lo / d, np.inf))
        exterior = (tx, ty) + d * min(1.0, float(room.min()))
        for _ in range(20):  # and inside the section
            if inside_ring(section, exterior).all():
                break
            exterior = (tx, ty) + (exterior - (tx, ty)) * 0.93
        rings = [exterior]
        if rng.random() < 0.35:  # a spared island of normal tissue inside the tumour
            rmin = np.hypot(*(exterior - (tx, ty)).T).min()
            rings.append(star_ring(rng, (tx, ty), (0.45 * rmin, 0.35 * rmin), 0.1, n=64, angle=rng.uniform(0, np.pi)))
        polygons.append([orient_ring(np.round(ring, 2), hole=k > 0) for k, ring in enumerate(rings)])
    return np.round(section, 2), polygons


def inside_ring(ring: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of points (N, 2) against a closed ring (K, 2)."""
    x, y = points[:, 0:1], points[:, 1:2]
    x1, y1 = ring[:, 0], ring[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    crosses = (y1 <= y) != (y2 <= y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    return (crosses & (x < xc)).sum(1) % 2 == 1


def orient_ring(ring: np.ndarray, hole: bool) -> np.ndarray:
    """Exterior rings counter-clockwise (positive shoelace area in x, y), holes clockwise."""
    x, y = ring[:, 0], ring[:, 1]
    area = np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))
    return ring[::-1].copy() if (area > 0) == hole else ring


def rasterize_polygons(polygons, height: int, width: int) -> np.ndarray:
    """uint8 label (H, W): 1 inside any polygon, sampled at pixel centres as `histodg tile` does.

    Each polygon is filled within its bounding box (a shift by whole pixels, exact in floating point).
    """
    out = np.zeros((height, width), np.uint8)
    for rings in polygons:
        lo = np.floor(np.min([r.min(0) for r in rings], 0)).astype(int) - 1
        hi = np.ceil(np.max([r.max(0) for r in rings], 0)).astype(int) + 1
        (x0, y0), (x1, y1) = np.maximum(lo, 0), np.minimum(hi, (width, height))
        if x1 > x0 and y1 > y0:
            inside = fill_rings([r - (x0, y0) - 0.5 for r in rings], y1 - y0, x1 - x0)
            out[y0:y1, x0:x1][inside] = 1
    return out


# -- drawing --------------------------------------------------------------------------------------
def fixed(v) -> np.ndarray:
    """Pixel coordinates -> OpenCV fixed point (SHIFT fractional bits)."""
    return np.round(np.asarray(v, np.float64) * ONE).astype(np.int64)


class Canvas:
    """Structure codes and nuclei of one case (or of a window of it, at offset x0, y0)."""

    def __init__(self, rng, height, width, mpp, x0=0, y0=0):
        self.rng, self.h, self.w, self.mpp, self.x0, self.y0 = rng, height, width, mpp, x0, y0
        self.kind = np.zeros((height, width), np.uint8)
        # per nucleus: haematoxylin level, chromatin texture amplitude, vesicular weight
        self.nuc = np.zeros((height, width, 3), np.float32)
        self.nucleoli = np.zeros((height, width), np.uint8)
        self.table: list[np.ndarray] = []  # per nucleus: cell type, long and short axis (um)

    def px(self, um):
        return np.asarray(um, np.float64) / self.mpp

    def fill(self, xs, ys, code, target=None):
        """Fill polygons (rows of xs, ys in canvas px) with a structure code."""
        target = self.kind if target is None else target
        for x, y in zip(fixed(np.asarray(xs) - self.x0), fixed(np.asarray(ys) - self.y0)):
            cv2.fillPoly(target, [np.stack([x, y], 1).astype(np.int32)], int(code), cv2.LINE_8, SHIFT)

    def discs(self, x, y, r, code, target=None):
        target = self.kind if target is None else target
        xs, ys, rs = fixed(np.asarray(x) - self.x0), fixed(np.asarray(y) - self.y0), fixed(np.maximum(r, 0.5))
        for i in range(len(xs)):
            cv2.circle(target, (int(xs[i]), int(ys[i])), int(rs[i]), int(code), -1, cv2.LINE_8, SHIFT)

    def nuclei(self, cell, centres, axes, angle_rad, level, texture, vesicular):
        """Filled ellipses (`centres` (x, y) and semi-`axes` (a, b) in px), one OpenCV call each;
        later ones on top."""
        (x, y), (a, b) = centres, axes
        xs, ys = fixed(np.asarray(x) - self.x0), fixed(np.asarray(y) - self.y0)
        a, b = np.maximum(a, 1.0), np.maximum(b, 0.5)
        aa, bb = fixed(a), fixed(b)
        deg = np.degrees(np.asarray(angle_rad, np.float64))
        n = len(xs)
        self.table.append(np.stack([np.full(n, cell), 2 * a * self.mpp, 2 * b * self.mpp], 1).astype(np.float32))
        level, texture, vesicular = (np.broadcast_to(np.asarray(v, np.float64), (n,)) for v in (level, texture, vesicular))
        for i in range(n):
            cv2.ellipse(self.nuc, (int(xs[i]), int(ys[i])), (int(aa[i]), int(bb[i])), float(deg[i]), 0, 360,
                        (float(level[i]), float(texture[i]), float(vesicular[i])), -1, cv2.LINE_8, SHIFT)

    def sample(self, mask: np.ndarray, count: int):
        """`count` uniform random points (x, y in canvas px) inside a boolean mask of this canvas."""
        idx = np.flatnonzero(mask)
        if count <= 0 or not len(idx):
            return np.zeros(0), np.zeros(0)
        y, x = np.divmod(idx[self.rng.integers(0, len(idx), count)], mask.shape[1])
        return x + self.rng.random(count) + self.x0, y + self.rng.random(count) + self.y0


def lattice(rng, width, height, spacing_x, spacing_y, angle, jitter):
    """Jittered hexagonal lattice of points (px) covering the canvas, in a rotated frame."""
    half = np.hypot(width, height) / 2 + max(spacing_x, spacing_y)
    u = np.arange(-half, half, spacing_x)
    v = np.arange(-half, half, spacing_y * np.sqrt(3) / 2)
    uu, vv = np.meshgrid(u, v)
    uu = uu + (np.arange(len(v))[:, None] % 2) * spacing_x / 2
    uu = uu.ravel() + rng.uniform(-jitter, jitter, uu.size) * spacing_x
    vv = vv.ravel() + rng.uniform(-jitter, jitter, vv.size) * spacing_y
    ca, sa = np.cos(angle), np.sin(angle)
    x, y = width / 2 + ca * uu - sa * vv, height / 2 + sa * uu + ca * vv
    keep = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    return x[keep], y[keep]


class Glands:
    """G glands as wobbly ellipses: centres, semi-axes, orientation and an outline factor rho(t)."""

    def __init__(self, rng, cx, cy, a, b, angle, irregularity, n=36):
        self.cx, self.cy, self.a, self.b, self.angle = cx, cy, a, b, angle
        self.t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        self.rho = self.wobble(rng, irregularity)

    def __len__(self):
        return len(self.cx)

    def subset(self, keep):
        out = object.__new__(Glands)
        out.cx, out.cy, out.a, out.b, out.angle = self.cx[keep], self.cy[keep], self.a[keep], self.b[keep], self.angle[keep]
        out.t, out.rho = self.t, self.rho[keep]
        return out

    def wobble(self, rng, irregularity):
        rho = np.ones((len(self.cx), len(self.t)))
        for k in range(2, 7):
            amp = irregularity * rng.normal(0, 1.0 / k, (len(self.cx), 1))
            rho += amp * np.cos(k * self.t + rng.uniform(0, 2 * np.pi, (len(self.cx), 1)))
        return np.clip(rho, 0.45, 1.7)

    def ring(self, scale, rho=None, sel=slice(None)):
        """Outline points (G, n) of the glands scaled by `scale` (scalar or (G, 1))."""
        rho = self.rho[sel] if rho is None else rho[sel]
        scale = scale[sel] if np.ndim(scale) else scale
        return self.point(sel, np.broadcast_to(self.t, rho.shape), rho * scale)

    def point(self, g, t, r):
        """Points at angle t and radial factor r of glands g (arrays broadcast together)."""
        a, b, ang = self.a[g], self.b[g], self.angle[g]
        if np.ndim(a) == 1 and np.ndim(t) == 2:
            a, b, ang = a[:, None], b[:, None], ang[:, None]
        x, y = a * r * np.cos(t), b * r * np.sin(t)
        cx, cy = self.cx[g], self.cy[g]
        if np.ndim(cx) == 1 and np.ndim(t) == 2:
            cx, cy = cx[:, None], cy[:, None]
        return cx + np.cos(ang) * x - np.sin(ang) * y, cy + np.sin(ang) * x + np.cos(ang) * y

    def rho_at(self, g, tt):
        """The outline factor of glands g at angles tt (linear interpolation)."""
        n = len(self.t)
        pos = np.mod(tt, 2 * np.pi) / (2 * np.pi) * n
        i0 = np.floor(pos).astype(int) % n
        f = pos - np.floor(pos)
        return self.rho[g, i0] * (1 - f) + self.rho[g, (i0 + 1) % n] * f
