#!/usr/bin/env bash
# `make demo`: the whole pipeline on built-in data, on a CPU, in a few minutes.
#   synth -> tile -> train (organs, then both tasks together, a BatchNorm per domain) -> predict on held-out slides -> evaluate
# Everything it writes goes under demo_out/ (ignored by git); a rerun reuses what is finished.
set -euo pipefail
OUT=${DEMO_OUT:-demo_out}
STEPS=${DEMO_STEPS:-60}
SHARED_SLIDE="$(cd "$(dirname "$0")/.." && pwd)/../shared/data/cmu_small_region.svs"
CONFIGS="$(cd "$(dirname "$0")" && pwd)/configs"   # one YAML per step (`--config`); the command line wins
mkdir -p "$OUT"

echo "== 1. a real whole-slide image: what is in it, and its tissue tiled into a patch store"
if [ -f "$SHARED_SLIDE" ]; then
  histodg info "$SHARED_SLIDE"
  # --overwrite: a second `make demo` after the shared slide was replaced makes its store again (a second
  # of work) instead of refusing a store made from other pixels
  histodg tile "$SHARED_SLIDE" -o "$OUT/stores_real" --tile-size 256 --mpp 0.5 --organ skin --scanner aperio --overwrite
else
  echo "(../shared/data not found: skipping the real slide)"
fi

echo "== 2. a built-in COSAS-shaped data set: 4 organs from one scanner, 4 scanners of one organ"
[ -f "$OUT/synth/manifest.csv" ] || histodg synth "$OUT/synth" --seed 0
# The held-out cases (unseen organ lung, unseen scanner scanner-d) get their own manifest.
awk -F, 'NR == 1 || $5 == "heldout"' "$OUT/synth/manifest.csv" > "$OUT/synth/heldout.csv"

echo "== 3. tile every case at 1 um/px into 128 px patches, tissue only, organ and scanner recorded"
# the settings are in examples/configs/tile.yaml (paths on the command line win, so DEMO_OUT works)
histodg tile --config "$CONFIGS"/tile.yaml "$OUT/synth/manifest.csv" -o "$OUT/stores"

echo "== 4. train by organ, then on both tasks together (histodg's default for a COSAS layout), at its default"
echo "   method: one BatchNorm per training organ and scanner (lung and scanner-d are held out; FPN with an"
echo "   ImageNet EfficientNet-Lite0 that needs no download, $STEPS + $STEPS steps)"
REPREDICT=""
if [ -f "$OUT/run/result.json" ]; then
  echo "   (finished earlier: $OUT/run)"
elif [ -f "$OUT/run/last.pt" ]; then
  histodg train -o "$OUT/run" --resume          # an interrupted demo continues where it stopped
  REPREDICT="--overwrite"
else
  histodg train "$OUT/stores" -o "$OUT/run" \
    --val-domain lung --val-domain scanner-d \
    --arch fpn --encoder tu-efficientnet_lite0 --encoder-weights imagenet \
    --steps "$STEPS" --batch-size 2 --accumulate 1 --lr 1e-3 --val-fraction 0 --val-max-patches 64 --workers 1
  REPREDICT="--overwrite"                       # a new model: predictions of an older one are redone
fi

echo "== 5. predict whole-slide masks on the held-out slides"
histodg predict --config "$CONFIGS"/predict.yaml "$OUT/run/best.pt" "$OUT/synth/heldout.csv" -o "$OUT/predictions" $REPREDICT

echo "== 6. evaluate the predictions against the pathologist-style GeoJSON annotations"
histodg evaluate --config "$CONFIGS"/evaluate.yaml "$OUT/predictions" --truth "$OUT/synth/heldout.csv"

echo
echo "Outputs:"
echo "  training run          $OUT/run (metrics.jsonl, curves.png, best.pt)"
echo "  batch report          $OUT/predictions/report.html (open it in a browser), summary.csv"
echo "  settings of each step $OUT/stores/config.yaml, $OUT/run/config.yaml, $OUT/predictions/config.yaml (rerun: --config FILE)"
for d in "$OUT"/predictions/*/; do
  echo "  $(basename "$d")  overlay: ${d}overlay.png  QuPath: ${d}mask.ome.tiff, ${d}tumor.geojson"
done
