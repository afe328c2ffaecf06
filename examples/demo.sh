#!/usr/bin/env bash
# `make demo`: the whole pipeline on built-in data, on a CPU, in a few minutes.
# Everything it writes goes under demo_out/ (ignored by git).
set -euo pipefail
OUT=${DEMO_OUT:-demo_out}
SHARED_SLIDE="$(cd "$(dirname "$0")/.." && pwd)/../shared/data/cmu_small_region.svs"
mkdir -p "$OUT"

echo "== 1. tile a real whole-slide image"
if [ -f "$SHARED_SLIDE" ]; then
  SLIDE="$SHARED_SLIDE"
else
  echo "(../shared/data not found: using a synthetic slide instead)"
  histodg synth "$OUT/synth_slide" --cases 1 --overwrite >/dev/null
  SLIDE=$(ls "$OUT"/synth_slide/wsi/organ/*/*.tiff | head -n 1)
fi
histodg info "$SLIDE"
histodg tile "$SLIDE" -o "$OUT/stores_real" --tile-size 256 --mpp 0.5 --organ skin --scanner aperio
histodg info "$OUT"/stores_real/*.zarr
