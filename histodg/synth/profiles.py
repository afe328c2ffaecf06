"""The built-in organs and scanners of `histodg synth`, and which domains use them."""
from __future__ import annotations

from .scanner import ScannerProfile
from .tissue import OrganProfile

ORGANS = {
    o.name: o
    for o in (
        # colon: round crypts, tall columnar nuclei, many goblet cells, lymphocyte-rich lamina propria;
        # tumour: large fused and cribriform glands with dirty necrosis
        OrganProfile("colon", gland_radius_um=27, gland_aspect=1.15, gland_aligned=False, gland_gap_um=12,
                     gland_irregularity=0.05, lumen_fraction=0.3, nucleus_um=9.0, nucleus_elongation=2.5,
                     nucleus_radial=True, nucleus_spacing_um=4.5, goblet=0.55, apical_mucin=0.0,
                     cytoplasm_eosin=0.36, stroma_eosin=0.5, fibre_um=10, fibre_contrast=0.35,
                     fibroblasts_per_mm2=1500, lymphocytes_per_mm2=4500, tumour_radius_um=42, tumour_gap_um=14,
                     tumour_lumen_fraction=0.45, tumour_nucleus_scale=1.4, cribriform=0.3, necrosis=0.5),
        # stomach: small tubular foveolar glands cut lengthwise, apical mucin caps, small round nuclei
        OrganProfile("stomach", gland_radius_um=17, gland_aspect=2.6, gland_aligned=True, gland_gap_um=14,
                     gland_irregularity=0.06, lumen_fraction=0.32, nucleus_um=7.0, nucleus_elongation=1.3,
                     nucleus_radial=True, nucleus_spacing_um=5.5, goblet=0.0, apical_mucin=0.45,
                     cytoplasm_eosin=0.38, stroma_eosin=0.4, fibre_um=8, fibre_contrast=0.3,
                     fibroblasts_per_mm2=1800, lymphocytes_per_mm2=3000, tumour_radius_um=30, tumour_gap_um=18,
                     tumour_lumen_fraction=0.4, tumour_nucleus_scale=1.6, cribriform=0.1, necrosis=0.15),
        # pancreas: dense lobules of small acini with tiny lumens, granular eosinophilic cytoplasm;
        # tumour: sparse angulated ducts in abundant desmoplastic stroma
        OrganProfile("pancreas", gland_radius_um=13, gland_aspect=1.1, gland_aligned=False, gland_gap_um=5,
                     gland_irregularity=0.08, lumen_fraction=0.15, nucleus_um=7.5, nucleus_elongation=1.1,
                     nucleus_radial=True, nucleus_spacing_um=7.0, goblet=0.0, apical_mucin=0.0,
                     cytoplasm_eosin=0.55, stroma_eosin=0.5, fibre_um=18, fibre_contrast=0.55,
                     fibroblasts_per_mm2=1200, lymphocytes_per_mm2=800, tumour_radius_um=32, tumour_gap_um=45,
                     tumour_lumen_fraction=0.55, tumour_nucleus_scale=1.4, cribriform=0.05, necrosis=0.1),
        # lung (held out): large alveoli lined by sparse flat nuclei, thin septa; acinar adenocarcinoma
        OrganProfile("lung", gland_radius_um=32, gland_aspect=1.0, gland_aligned=False, gland_gap_um=12,
                     gland_irregularity=0.06, lumen_fraction=0.9, nucleus_um=7.0, nucleus_elongation=2.6,
                     nucleus_radial=False, nucleus_spacing_um=20, goblet=0.0, apical_mucin=0.0,
                     cytoplasm_eosin=0.3, stroma_eosin=0.45, fibre_um=14, fibre_contrast=0.45,
                     fibroblasts_per_mm2=1500, lymphocytes_per_mm2=1500, tumour_radius_um=36, tumour_gap_um=20,
                     tumour_lumen_fraction=0.45, tumour_nucleus_scale=1.6, cribriform=0.15, necrosis=0.1,
                     alveolar=True),
    )
}

SCANNERS = {
    s.name: s
    for s in (
        # the scanner of the organ task: reference H&E vectors, a good camera
        ScannerProfile("scanner-o", mpp=0.5, stain_h=(0.56, 0.72, 0.41), stain_e=(0.22, 0.80, 0.56), stain_scale=1.0,
                       white=(243, 242, 245), vignetting=0.03, field_um=500, gradient=0.02, blur_um=0.4, gamma=1.0,
                       noise=1.5, jpeg_quality=85),
        ScannerProfile("scanner-a", mpp=0.5, stain_h=(0.60, 0.74, 0.31), stain_e=(0.18, 0.88, 0.44), stain_scale=1.05,
                       white=(244, 243, 247), vignetting=0.02, field_um=450, gradient=0.02, blur_um=0.35, gamma=1.0,
                       noise=1.5, jpeg_quality=90),
        # finer resolution, lighter and bluer staining, warm white, more noise
        ScannerProfile("scanner-b", mpp=0.25, stain_h=(0.52, 0.74, 0.43), stain_e=(0.12, 0.90, 0.42), stain_scale=0.85,
                       white=(250, 247, 240), vignetting=0.05, field_um=300, gradient=0.03, blur_um=0.3, gamma=1.0,
                       noise=2.5, jpeg_quality=80),
        # darker, redder, cool white, softer optics
        ScannerProfile("scanner-c", mpp=0.5, stain_h=(0.66, 0.70, 0.27), stain_e=(0.25, 0.92, 0.30), stain_scale=1.15,
                       white=(236, 240, 248), vignetting=0.04, field_um=600, gradient=0.04, blur_um=0.6, gamma=1.1,
                       noise=1.0, jpeg_quality=75),
        # held out: orange-red eosin, brown-black haematoxylin, yellowish white, blurry, noisy, low JPEG quality
        ScannerProfile("scanner-d", mpp=0.25, stain_h=(0.72, 0.64, 0.27), stain_e=(0.05, 0.72, 0.69), stain_scale=1.25,
                       white=(247, 242, 232), vignetting=0.08, field_um=350, gradient=0.06, blur_um=0.9, gamma=0.9,
                       noise=3.5, jpeg_quality=60),
        # held out, opt-in (`--extra-scanner scanner-f`): scanner-a's stain and white (within the training
        # scanners'), but its optics and resolution differ: soft, astigmatic, defocused towards each
        # field's corners, a 15% calibration error (tissue drawn at 0.575 um/px, stated 0.5), seams
        ScannerProfile("scanner-f", mpp=0.5, stain_h=(0.60, 0.74, 0.31), stain_e=(0.18, 0.88, 0.44), stain_scale=1.05,
                       white=(244, 243, 247), vignetting=0.03, field_um=400, gradient=0.02, blur_um=0.7, gamma=1.0,
                       noise=2.0, jpeg_quality=70, defocus_um=0.8, astigmatism=0.3, mpp_error=0.15, seams=0.03),
        # held out, opt-in (`--extra-scanner scanner-j`): scanner-a in all but its codec, JPEG 2000 at 33 dB
        ScannerProfile("scanner-j", mpp=0.5, stain_h=(0.60, 0.74, 0.31), stain_e=(0.18, 0.88, 0.44), stain_scale=1.05,
                       white=(244, 243, 247), vignetting=0.02, field_um=450, gradient=0.02, blur_um=0.35, gamma=1.0,
                       noise=1.5, jpeg_quality=90, jpeg2000_psnr=33.0),
    )
}


EXTRA_PREFIX = "scanner-x"  # scanner-x<SEED>: an extra held-out scanner, its acquisition drawn from SEED


def random_scanner(seed: int) -> ScannerProfile:
    """A scanner none of the built-in ones resembles on purpose: every acquisition setting drawn at
    random (from `seed`) within what slide scanners do: stain vectors and amount, white balance,
    illumination, optics, tone curve, noise, JPEG quality and resolution."""
    import numpy as np

    rng = np.random.default_rng([int(seed), 1009])

    def vector(base, spread):
        return tuple(float(v) for v in np.clip(np.asarray(base) + rng.normal(0, spread, 3), 0.02, None))

    return ScannerProfile(
        f"{EXTRA_PREFIX}{seed}", mpp=float(rng.choice([0.25, 0.5])),
        stain_h=vector((0.60, 0.72, 0.34), 0.08), stain_e=vector((0.16, 0.84, 0.50), 0.12),
        stain_scale=float(rng.uniform(0.8, 1.3)), white=tuple(float(v) for v in rng.uniform(228, 252, 3)),
        vignetting=float(rng.uniform(0.01, 0.08)), field_um=float(rng.uniform(300, 700)), gradient=float(rng.uniform(0.01, 0.06)),
        blur_um=float(rng.uniform(0.3, 1.0)), gamma=float(rng.uniform(0.85, 1.15)), noise=float(rng.uniform(1.0, 4.0)),
        jpeg_quality=int(rng.integers(55, 93)))


def scanner_profile(name: str) -> ScannerProfile:
    """A built-in scanner, or an extra one (scanner-x<SEED>)."""
    if name in SCANNERS:
        return SCANNERS[name]
    if name.startswith(EXTRA_PREFIX) and name[len(EXTRA_PREFIX):].isdigit():
        return random_scanner(int(name[len(EXTRA_PREFIX):]))
    raise KeyError(name)
