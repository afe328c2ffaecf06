"""Synthetic H&E tissue for `histodg synth`: morphology per organ, then a scanner's view of it.

A case (`render_case`) is rendered in three steps, all at the scanner's native resolution (`mpp`):

1. Geometry (`shapes.case_geometry`): an irregular section outline on glass and one or two
   tumour regions, as polygons in level-0 pixels. The tumour label raster is derived from those
   polygons with `slides.annotations.fill_rings` (pixel centres, even-odd), so it is exactly what
   `histodg tile` rasterises from the QuPath GeoJSON written next to the slide.
2. Morphology (`paint_tissue`, this module): per-pixel haematoxylin and eosin concentrations.
   Stroma is eosin with oriented collagen-fibre texture, spindle fibroblasts and lymphocytes;
   normal glands are a lumen ringed by one orderly layer of small uniform nuclei (or, in an
   alveolar organ, packed air spaces with thin septa); adenocarcinoma is irregular, fused or
   cribriform glands lined by crowded, enlarged, pleomorphic, hyperchromatic nuclei with
   polarity partly lost, sometimes with luminal necrosis. Tumour and normal tissue use the same
   concentrations for the same structures: what differs is the arrangement. An `OrganProfile`
   sets the morphology (gland size, shape and density, nucleus size, stroma texture).
3. Acquisition (`scanner.scan`): Beer-Lambert with the scanner's stain vectors,
   white point, field vignetting and gradient, optical blur, tone curve and sensor noise; JPEG
   quality and mpp are applied by the writers. A `ScannerProfile` sets all of these.

Everything is vectorised (numpy, OpenCV); the only Python loops run over glands and nuclei,
each one OpenCV drawing call. Deterministic for a seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial import cKDTree

from .scanner import ScannerProfile, scan
from .shapes import Canvas, Glands, case_geometry, lattice, rasterize_polygons, smooth_noise

# structure codes, in painting precedence: where drawn structures overlap, the higher code wins
GLASS, STROMA, CYTOPLASM, MUCIN, LUMEN, NECROSIS, BLOOD = range(7)
# cell types of the nucleus table
EPITHELIUM, TUMOUR, FIBROBLAST, LYMPHOCYTE, ENDOTHELIUM = range(5)


@dataclass(frozen=True)
class OrganProfile:
    """Morphology of one organ (lengths in microns, densities per mm^2 of stroma)."""

    name: str
    gland_radius_um: float  # short semi-axis of a normal gland
    gland_aspect: float  # long / short axis of normal glands
    gland_aligned: bool  # tubular glands share one direction (cut lengthwise)
    gland_gap_um: float  # stroma between neighbouring normal glands
    gland_irregularity: float  # outline wobble of normal glands (0 = ellipse)
    lumen_fraction: float  # lumen radius / gland radius
    nucleus_um: float  # long axis of a normal epithelial nucleus
    nucleus_elongation: float  # long / short axis of normal epithelial nuclei
    nucleus_radial: bool  # columnar cells (long axis across the layer) or flat lining cells
    nucleus_spacing_um: float  # distance between neighbouring nuclei along the layer
    goblet: float  # probability of a mucin vacuole between neighbouring nuclei
    apical_mucin: float  # fraction of the epithelium (lumen side) that is pale mucin
    cytoplasm_eosin: float
    stroma_eosin: float
    fibre_um: float  # length of the collagen fibre texture
    fibre_contrast: float
    fibroblasts_per_mm2: float
    lymphocytes_per_mm2: float
    tumour_radius_um: float  # typical tumour gland radius
    tumour_gap_um: float  # stroma between tumour glands (small = crowded, fused)
    tumour_lumen_fraction: float
    tumour_nucleus_scale: float  # tumour nucleus size / normal nucleus size
    cribriform: float  # probability that a tumour gland is cribriform
    necrosis: float  # probability of luminal ("dirty") necrosis in a large tumour gland
    alveolar: bool = False  # normal tissue is packed air spaces (gland radius) with thin septa (gland gap)

    def __post_init__(self):
        if not 0 < self.lumen_fraction < 1 or not 0 < self.tumour_lumen_fraction < 1:
            raise ValueError(f"{self.name}: lumen fractions must be between 0 and 1")
        if min(self.gland_radius_um, self.tumour_radius_um, self.nucleus_um, self.nucleus_spacing_um) <= 0:
            raise ValueError(f"{self.name}: sizes must be positive")


@dataclass
class Case:
    """One rendered case at its native resolution, with the generator's own ground truth."""

    rgb: np.ndarray  # (H, W, 3) uint8 as scanned (JPEG is applied by the writers)
    label: np.ndarray  # (H, W) uint8, 1 = tumour, rasterised from `polygons`
    polygons: list  # tumour regions: each a list of rings (K, 2) float64 level-0 (x, y), exterior first
    kind: np.ndarray  # (H, W) uint8 structure codes: GLASS, STROMA, CYTOPLASM, MUCIN, LUMEN, NECROSIS, BLOOD
    nuclei: np.ndarray  # (H, W) bool, every nucleus
    nucleus_table: np.ndarray  # (N, 3) float32 per nucleus: cell type (EPITHELIUM ...), long, short axis (um)
    mpp: float

    @property
    def tissue(self) -> np.ndarray:
        """The section (tumour included), air spaces and lumens too."""
        return self.kind != GLASS

    @property
    def lumen(self) -> np.ndarray:
        """Gland lumens, air spaces and vessels (with their contents)."""
        return self.kind >= LUMEN


# -- morphology -----------------------------------------------------------------------------------
def _normal_glands(cv: Canvas, o: OrganProfile, free_um: np.ndarray, coarse: int) -> None:
    """Orderly glands away from the tumour: a lumen ringed by one layer of polarised, uniform nuclei."""
    rng = cv.rng
    if o.alveolar:
        return _alveoli(cv, o)
    b0, a0 = cv.px(o.gland_radius_um), cv.px(o.gland_radius_um * o.gland_aspect)
    gap = cv.px(o.gland_gap_um)
    angle0 = rng.uniform(0, np.pi)
    sx, sy = (2 * a0 + gap, 2 * b0 + gap) if o.gland_aligned else (2 * a0 + gap, 2 * a0 + gap)
    cx, cy = lattice(rng, cv.w, cv.h, sx, sy, angle0, 0.1)
    n = len(cx)
    angle = angle0 + rng.normal(0, 0.1, n) if o.gland_aligned else rng.uniform(0, np.pi, n)
    gl = Glands(rng, cx, cy, np.full(n, a0), np.full(n, b0), angle, o.gland_irregularity)
    # sizes vary, but a gland never touches its neighbours: shrink it to fit (in lattice units)
    u = (np.cos(angle0) * (cx - cv.w / 2) + np.sin(angle0) * (cy - cv.h / 2)) / a0
    v = (-np.sin(angle0) * (cx - cv.w / 2) + np.cos(angle0) * (cy - cv.h / 2)) / (b0 if o.gland_aligned else a0)
    size = rng.lognormal(0, 0.12, n) * np.where(rng.random(n) < 0.5, 1.0, 1.1)
    if n > 1:
        nearest = cKDTree(np.stack([u, v], 1)).query(np.stack([u, v], 1), k=2)[0][:, 1]
        size = np.minimum(size, (nearest - gap / a0) / (2 * gl.rho.max(1)))
    gl.a, gl.b = a0 * size, b0 * size
    room = free_um[(cy // coarse).astype(int), (cx // coarse).astype(int)]
    keep = (room > cv.mpp * gl.a * 0.5) & (size > 0.4)  # glands at the border are cut by it
    gl = gl.subset(keep)
    lam = o.lumen_fraction * rng.uniform(0.85, 1.15, (len(gl), 1))
    cv.fill(*gl.ring(1.0), CYTOPLASM)
    if o.apical_mucin > 0:  # foveolar cells: a pale mucin cap on the lumen side of every cell
        cv.fill(*gl.ring(lam + (1 - lam) * o.apical_mucin), MUCIN)
    cv.fill(*gl.ring(lam), LUMEN)
    # nuclei: evenly spaced along the basal part of the layer, long axis across it when columnar
    basal = (lam + (1 - lam) * (0.7 if o.nucleus_radial else 0.5))[:, 0]
    perimeter = np.pi * (gl.a + gl.b) * basal
    count = np.maximum(3, np.round(perimeter / cv.px(o.nucleus_spacing_um))).astype(int)
    g = np.repeat(np.arange(len(gl)), count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    tt = rng.uniform(0, 2 * np.pi, len(gl))[g] + 2 * np.pi * (k + rng.normal(0, 0.05, len(k))) / count[g]
    nx, ny = gl.point(g, tt, gl.rho_at(g, tt) * basal[g])
    across = np.arctan2(ny - gl.cy[g], nx - gl.cx[g])
    half = cv.px(o.nucleus_um / 2) * rng.normal(1, 0.05, len(k))
    axis = across if o.nucleus_radial else across + np.pi / 2
    cv.nuclei(EPITHELIUM, (nx, ny), (half, half / o.nucleus_elongation), axis + rng.normal(0, 0.08, len(k)),
              rng.normal(0.95, 0.04, len(k)), 0.15, 0.0)
    if o.goblet > 0:  # goblet cells: round mucin vacuoles between nuclei, on the lumen side
        pick = rng.random(len(k)) < o.goblet
        gp, tg = g[pick], tt[pick] + np.pi / count[g[pick]]
        mid = (lam[gp, 0] + basal[gp]) / 2 - 0.03
        gx, gy = gl.point(gp, tg, gl.rho_at(gp, tg) * mid)
        r = np.minimum(cv.px(o.nucleus_spacing_um) * 0.75, (basal[gp] - lam[gp, 0]) * gl.b[gp] * 0.5)
        cv.discs(gx, gy, r, MUCIN)


def _alveoli(cv: Canvas, o: OrganProfile) -> None:
    """Packed polygonal air spaces (a jittered Voronoi tessellation) with thin septa and flat nuclei."""
    rng = cv.rng
    grid = max(1, int(round(1.0 / cv.mpp)))  # tessellate on a ~1 um grid
    hs, ws = -(-cv.h // grid), -(-cv.w // grid)
    spacing = 2 * o.gland_radius_um / (cv.mpp * grid)
    sx, sy = lattice(rng, ws, hs, spacing, spacing, rng.uniform(0, np.pi), 0.3)
    seeds = np.ones((hs, ws), np.uint8)
    seeds[sy.astype(int), sx.astype(int)] = 0
    _, cells = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    edge = np.zeros((hs, ws), np.uint8)
    edge[:, 1:] |= cells[:, 1:] != cells[:, :-1]
    edge[1:, :] |= cells[1:, :] != cells[:-1, :]
    to_edge = cv2.distanceTransform(1 - edge, cv2.DIST_L2, 5) * (cv.mpp * grid)
    to_edge = cv2.resize(to_edge, (ws * grid, hs * grid), interpolation=cv2.INTER_LINEAR)[: cv.h, : cv.w]
    half_septum = o.gland_gap_um / 2 * np.clip(1 + 0.35 * smooth_noise(rng, (cv.h, cv.w), cv.px(40)), 0.5, 2.5)
    air = to_edge > half_septum
    air &= smooth_noise(rng, (cv.h, cv.w), cv.px(60)) < 0.45  # collapsed, airless patches
    cv.kind[air & (cv.kind == STROMA)] = LUMEN
    rim = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * int(cv.px(2)) + 1,) * 2)
    lining = (cv2.dilate(air.astype(np.uint8), rim) > 0) & ~air & (cv.kind == STROMA)
    cv.kind[lining] = CYTOPLASM
    lining_um = lining.sum() * cv.mpp**2 / 2.0  # length of the 2-um lining
    x, y = cv.sample(lining, int(lining_um / o.nucleus_spacing_um))
    xi, yi = np.clip(x.astype(int), 1, cv.w - 2), np.clip(y.astype(int), 1, cv.h - 2)
    across = np.arctan2(to_edge[yi + 1, xi] - to_edge[yi - 1, xi], to_edge[yi, xi + 1] - to_edge[yi, xi - 1])
    half = cv.px(o.nucleus_um / 2) * rng.normal(1, 0.08, len(x))
    cv.nuclei(EPITHELIUM, (x, y), (half, half / o.nucleus_elongation), across + np.pi / 2 + rng.normal(0, 0.1, len(x)),
              rng.normal(0.95, 0.04, len(x)), 0.15, 0.0)


def _tumour_glands(cv: Canvas, o: OrganProfile, label: np.ndarray, tumour_um: np.ndarray, coarse: int) -> None:
    """Irregular, fused and cribriform glands; crowded, enlarged, pleomorphic nuclei, polarity lost."""
    rng = cv.rng
    ys, xs = np.nonzero(label)
    if not len(xs):
        return
    pad = int(cv.px(2 * o.tumour_radius_um))
    x0, y0 = max(0, xs.min() - pad), max(0, ys.min() - pad)
    x1, y1 = min(cv.w, xs.max() + pad + 1), min(cv.h, ys.max() + pad + 1)
    sub = Canvas(rng, y1 - y0, x1 - x0, cv.mpp, x0, y0)  # the tumour's bounding box
    r0, gap = cv.px(o.tumour_radius_um), cv.px(o.tumour_gap_um)
    cx, cy = lattice(rng, cv.w, cv.h, 1.6 * r0 + gap, 1.6 * r0 + gap, rng.uniform(0, np.pi), 0.3)
    inside = tumour_um[(cy // coarse).astype(int), (cx // coarse).astype(int)] > 0.25 * o.tumour_radius_um
    cx, cy = cx[inside], cy[inside]
    n = len(cx)
    crib = rng.random(n) < o.cribriform
    solid = ~crib & (rng.random(n) < 0.08)
    simple = ~crib & ~solid
    size = rng.lognormal(0, 0.3, n) * np.where(crib, 1.5, 1.0)
    a, b = r0 * size * rng.uniform(0.9, 1.3, n), r0 * size * rng.uniform(0.55, 0.85, n)
    gl = Glands(rng, cx, cy, a, b, rng.uniform(0, np.pi, n), 0.5, n=40)
    sub.fill(*gl.ring(1.0), CYTOPLASM)
    lam = o.tumour_lumen_fraction * rng.uniform(0.6, 1.2, (n, 1))
    rho_lumen = np.clip(gl.rho * gl.wobble(rng, 0.35), 0.3, None)  # uneven, stratified lining
    sub.fill(*gl.ring(lam, rho_lumen, simple), LUMEN)
    for i in np.flatnonzero(crib):  # cribriform: many small punched-out lumens in one large gland
        m = int(np.clip(a[i] * b[i] / cv.px(13) ** 2, 4, 60))
        qx, qy = gl.point(np.full(m, i), rng.uniform(0, 2 * np.pi, m), np.sqrt(rng.random(m)) * 0.72)
        sub.discs(qx, qy, cv.px(rng.uniform(3.0, 7.5, m)), LUMEN)
    necro = simple & (lam[:, 0] * b > cv.px(12)) & (rng.random(n) < o.necrosis)
    sub.fill(*gl.ring(lam * 0.75, rho_lumen, necro), NECROSIS)
    local_label = label[y0:y1, x0:x1]
    sub.kind[local_label == 0] = 0  # the tumour is exactly the annotated region
    region = cv.kind[y0:y1, x0:x1]
    np.maximum(region, sub.kind, out=region)
    # nuclei: crowded and stratified, densest along the basement membrane, none in an apical rim;
    # long axis roughly across the layer, but polarity is partly lost
    cells = sub.kind == CYTOPLASM
    apical = cv2.dilate((sub.kind >= LUMEN).astype(np.uint8), cv2.getStructuringElement(
        cv2.MORPH_ELLIPSE, (2 * int(cv.px(2.5)) + 1,) * 2)) > 0
    zone = cells & ~apical
    half = o.nucleus_um / 2 * o.tumour_nucleus_scale
    elong = max(1.1, o.nucleus_elongation * 0.8)
    n_nuc = int(zone.sum() * cv.mpp**2 * 0.5 / (np.pi * half * half / elong))
    x, y = sub.sample(zone, 2 * n_nuc)
    xi = np.clip(x.astype(int) - x0, 1, sub.w - 2)
    yi = np.clip(y.astype(int) - y0, 1, sub.h - 2)
    to_stroma = cv2.distanceTransform((sub.kind > 0).astype(np.uint8), cv2.DIST_L2, 3) * cv.mpp
    keep = rng.random(len(x)) < np.clip(1.3 - to_stroma[yi, xi] / (4 * half / elong), 0.5, 1)
    x, y, xi, yi = x[keep][:n_nuc], y[keep][:n_nuc], xi[keep][:n_nuc], yi[keep][:n_nuc]
    n_nuc = len(x)
    depth = cv2.distanceTransform(cells.astype(np.uint8), cv2.DIST_L2, 3)
    across = np.arctan2(depth[yi + 1, xi] - depth[yi - 1, xi], depth[yi, xi + 1] - depth[yi, xi - 1])
    ha = cv.px(half) * rng.lognormal(0, 0.2, n_nuc)
    cv.nuclei(TUMOUR, (x, y), (ha, ha / (elong * rng.uniform(0.75, 1.25, n_nuc))), across + rng.normal(0, 0.6, n_nuc),
              rng.normal(1.12, 0.12, n_nuc), 0.3, rng.uniform(0.2, 0.9, n_nuc))
    pick = rng.random(n_nuc) < 0.45  # prominent nucleoli
    cv.discs(x[pick], y[pick], ha[pick] * 0.2, 255, target=cv.nucleoli)


def _stroma_cells(cv: Canvas, o: OrganProfile, label: np.ndarray, orient: np.ndarray) -> None:
    """Spindle fibroblasts along the fibres, lymphocytes in loose clusters (mostly in normal tissue)."""
    rng = cv.rng
    stroma = cv.kind == STROMA
    area_mm2 = stroma.sum() * cv.mpp**2 / 1e6
    n = int(o.fibroblasts_per_mm2 * area_mm2)
    x, y = cv.sample(stroma, n)
    xi, yi = x.astype(int), y.astype(int)
    plump = np.where(label[yi, xi] > 0, 1.5, 1.0)  # activated fibroblasts of desmoplastic stroma
    cv.nuclei(FIBROBLAST, (x, y), (cv.px(rng.uniform(4.5, 7.0, n)), cv.px(rng.uniform(0.9, 1.3, n)) * plump),
              orient[yi, xi] + rng.normal(0, 0.15, n), rng.normal(0.9, 0.05, n), 0.12, 0.0)
    n = int(o.lymphocytes_per_mm2 * area_mm2)
    hx, hy = cv.sample(stroma & (label == 0), max(1, n // 20))  # cluster centres in normal stroma
    x, y = np.zeros(0), np.zeros(0)
    if len(hx):
        k = rng.integers(0, len(hx), n)
        spread = cv.px(rng.uniform(8, 35, len(hx)))[k]
        x, y = hx[k] + rng.normal(0, 1, n) * spread, hy[k] + rng.normal(0, 1, n) * spread
        ok = (x >= 0) & (x < cv.w) & (y >= 0) & (y < cv.h)
        x, y = x[ok], y[ok]
        ok = stroma[y.astype(int), x.astype(int)]
        x, y = x[ok], y[ok]
    ex, ey = cv.sample(stroma & (label > 0), n // 20)  # a few among the tumour, too
    x, y = np.concatenate([x, ex]), np.concatenate([y, ey])
    r = cv.px(rng.uniform(2.6, 3.4, len(x)))
    cv.nuclei(LYMPHOCYTE, (x, y), (r, r * rng.uniform(0.85, 1.0, len(x))), rng.uniform(0, np.pi, len(x)),
              rng.normal(1.35, 0.05, len(x)), 0.05, 0.0)


def _vessels(cv: Canvas, room_um: np.ndarray, coarse: int) -> None:
    """Small vessels in the stroma: a lumen lined by flat endothelial nuclei, some red blood cells."""
    rng = cv.rng
    area_mm2 = (room_um > 0).sum() * (coarse * cv.mpp) ** 2 / 1e6
    x, y = cv.sample(room_um > 20, int(10 * area_mm2))
    x, y = x * coarse, y * coarse
    n = len(x)
    r = rng.uniform(5, 14, n)
    gl = Glands(rng, x, y, cv.px(r), cv.px(r * rng.uniform(0.45, 1.0, n)), rng.uniform(0, np.pi, n), 0.1, n=24)
    cv.fill(*gl.ring(1.0), LUMEN)
    m = rng.integers(3, 6, n)
    g = np.repeat(np.arange(n), m)
    k = np.arange(m.sum()) - np.repeat(np.cumsum(m) - m, m)
    tt = rng.uniform(0, 2 * np.pi, n)[g] + 2 * np.pi * k / m[g]
    nx, ny = gl.point(g, tt, gl.rho_at(g, tt) * 1.08)
    cv.nuclei(ENDOTHELIUM, (nx, ny), (np.full(len(g), cv.px(4.5)), np.full(len(g), cv.px(1.1))),
              np.arctan2(ny - gl.cy[g], nx - gl.cx[g]) + np.pi / 2, 0.95, 0.1, 0.0)
    cells = rng.integers(0, 1 + (r * r / 20).astype(int))
    g = np.repeat(np.arange(n), cells)
    bx, by = gl.point(g, rng.uniform(0, 2 * np.pi, len(g)), np.sqrt(rng.random(len(g))) * 0.75)
    cv.discs(bx, by, np.full(len(g), cv.px(3.5)), BLOOD)


def _stroma_eosin(rng, height, width, mpp, o: OrganProfile, orient: np.ndarray) -> np.ndarray:
    """Eosin factor of the stroma (~1): collagen fibres along a smoothly varying direction, looser
    and paler patches. Noise smeared by oriented line kernels, made on a 1-um grid, then upsampled."""
    f = 1.0 / mpp  # canvas px per grid px
    hs, ws = int(np.ceil(height / f)), int(np.ceil(width / f))
    noise = rng.standard_normal((hs, ws), dtype=np.float32)
    theta = cv2.resize(orient, (ws, hs), interpolation=cv2.INTER_LINEAR)
    length = o.fibre_um
    fibre = np.zeros((hs, ws), np.float32)
    weight_sum = np.zeros((hs, ws), np.float32)
    half = int(np.ceil(length * 1.2))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    for k in range(6):
        th = k * np.pi / 6
        along, across = xx * np.cos(th) + yy * np.sin(th), -xx * np.sin(th) + yy * np.cos(th)
        kern = np.exp(-0.5 * (along / (length / 2)) ** 2 - 0.5 * (across / 0.7) ** 2)
        resp = cv2.filter2D(noise, -1, kern / np.sqrt((kern**2).sum()), borderType=cv2.BORDER_REFLECT)
        w = np.exp(3.0 * np.cos(2 * (theta - th))).astype(np.float32)
        fibre += w * resp
        weight_sum += w
    fibre /= weight_sum
    fibre = (fibre - fibre.mean()) / (fibre.std() + 1e-6)
    loose = np.clip(1 + 0.3 * np.minimum(smooth_noise(rng, (hs, ws), 25.0) + 0.7, 0), 0.4, 1)
    factor = np.maximum(1 + o.fibre_contrast * np.tanh(fibre), 0.15) * loose
    return cv2.resize(factor.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def paint_tissue(rng, o: OrganProfile, width: int, height: int, mpp: float):
    """Haematoxylin and eosin concentration maps of one case, with its label and structure maps.

    Returns (c_h, c_e, label, polygons, kind, nuclei, table): float32 concentrations, the uint8
    tumour label, the tumour polygons, the structure codes (GLASS ... BLOOD), the nucleus mask and
    the nucleus table (cell type, long and short axis in um).
    """
    section, polygons = case_geometry(rng, width, height)
    label = rasterize_polygons(polygons, height, width)
    cv = Canvas(rng, height, width, mpp)
    cv.fill(section[None, :, 0], section[None, :, 1], STROMA)
    np.maximum(cv.kind, label * STROMA, out=cv.kind)
    # room (um) around each point on a coarse grid, for placing whole glands and vessels
    coarse = max(1, int(round(2.0 / mpp)))

    def small(mask):
        return np.pad(mask[::coarse, ::coarse].astype(np.uint8), ((0, 2), (0, 2)))

    free_um = cv2.distanceTransform(small((cv.kind > 0) & (label == 0)), cv2.DIST_L2, 5) * coarse * mpp
    tumour_um = cv2.distanceTransform(small(label > 0), cv2.DIST_L2, 5) * coarse * mpp
    section_kind = cv.kind.copy()
    _normal_glands(cv, o, free_um, coarse)
    cut = (label > 0) | (section_kind == GLASS)  # normal glands end where the tumour or the section does
    cv.kind[cut] = section_kind[cut]
    cv.nuc[cut] = 0
    _tumour_glands(cv, o, label, tumour_um, coarse)
    stroma_um = cv2.distanceTransform(small(cv.kind == STROMA), cv2.DIST_L2, 3) * coarse * mpp
    _vessels(cv, stroma_um, coarse)
    orient = smooth_noise(rng, (height, width), cv.px(60)) * np.float32(0.9) + np.float32(rng.uniform(0, np.pi))
    _stroma_cells(cv, o, label, orient)
    # base concentrations per structure, modulated by texture
    kind = cv.kind
    base_h = np.array([0, 0.05, 0.17, 0.2, 0.0, 0.22, 0.03], np.float32)
    base_e = np.array([0, o.stroma_eosin, o.cytoplasm_eosin, 0.07, 0.015, 0.42, 1.0], np.float32)
    c_h, c_e = base_h[kind], base_e[kind]
    fine = smooth_noise(rng, (height, width), cv.px(0.45))
    stroma = kind == STROMA
    c_e *= np.where(stroma, _stroma_eosin(rng, height, width, mpp, o, orient), 1 + 0.15 * fine)
    c_h = np.where((kind == NECROSIS) & (fine > 1.6), np.float32(0.9), c_h)  # nuclear dust in necrosis
    # nuclei: level x chromatin texture; vesicular nuclei have a pale centre and a dark membrane
    level = cv.nuc[..., 0]
    nuclei = level > 0
    rim = cv2.morphologyEx(level, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    ves = cv.nuc[..., 2]
    hn = level * np.where(rim, 1 + 0.25 * ves, 1 - 0.35 * ves) * np.maximum(1 + cv.nuc[..., 1] * fine, 0.3)
    c_h = np.where(nuclei, hn, c_h)
    c_e = np.where(nuclei, np.float32(0.1), c_e)
    nucleoli = (cv.nucleoli > 0) & nuclei
    c_h[nucleoli] += 0.3
    c_e[nucleoli] += 0.35
    thickness = 1 + 0.08 * smooth_noise(rng, (height, width), cv.px(150))
    tissue = kind > 0
    c_h = np.where(tissue, c_h * thickness, 0).astype(np.float32)
    c_e = np.where(tissue, c_e * thickness, 0).astype(np.float32)
    table = np.concatenate(cv.table) if cv.table else np.zeros((0, 3), np.float32)
    return c_h, c_e, label, polygons, kind, nuclei & tissue, table


def render_case(organ: OrganProfile, scanner: ScannerProfile, width_um: float, height_um: float, seed) -> Case:
    """One case of `organ` scanned by `scanner`: a section of width_um x height_um, at the scanner's
    true pixel size (`true_mpp`), recorded with its stated `mpp`."""
    rng = np.random.default_rng(seed)
    mpp = scanner.true_mpp
    width, height = int(round(width_um / mpp)), int(round(height_um / mpp))
    c_h, c_e, label, polygons, kind, nuclei, table = paint_tissue(rng, organ, width, height, mpp)
    rgb = scan(rng, c_h, c_e, scanner)
    return Case(rgb, label, polygons, kind, nuclei, table, scanner.mpp)
