#!/bin/bash
# Every GPU check in one call of a lent device machine (no network there; its python3 holds
# CUDA torch, transformers and CuPy): install bitsack without dependencies, run the GPU model
# tests, bench/kernels_gpu.py and bench/gpu_model.py. Each step is bounded; logs and reports
# land in $OUT (default ./gpu-out).
#
# Prepare here first (what travels must be inside the checkout and under 64 MiB in all):
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/data
#   bitsack run --method uniform --avg-bits 3.25 --quantizer rtn --eval-windows 1 --out /tmp/u
#   cp -r /tmp/u/model .gpu/model                        # SmolLM2 at 3.23 bits: 59 MB
#   cp ../shared/data/wikitext2_raw_test_rows.json .gpu/data/
# then run `bash bench/gpu_check.sh` there, carrying .gpu.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
MODEL=${GPU_CHECK_MODEL:-.gpu/model}
export PYTHONUNBUFFERED=1 BITSACK_DATA=${BITSACK_DATA:-$PWD/.gpu/data} MPLBACKEND=Agg HF_HUB_OFFLINE=1
T0=$(date +%s); el() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; head -15 "$OUT/nvidia-smi.txt"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 \
  || { echo "pip -e failed; a tree of links instead"; tail -5 "$OUT/install.log"
       mkdir -p /tmp/site/bitsack
       for f in bitsack/*; do ln -sf "$PWD/$f" /tmp/site/bitsack/; done
       for p in solver profiling kernels; do ln -sfn "$PWD/$p" "/tmp/site/bitsack/$p"; done
       export PYTHONPATH=/tmp/site; }
python3 -c "import torch, transformers, cupy; from bitsack.kernels.backends import get_backend; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cupy', cupy.__version__, 'cupy backend', get_backend('cupy').is_available())" 2>&1 | tee -a "$OUT/install.log"
el "GPU model tests"
timeout 120 python3 -m pytest -q -m gpu tests/test_gpu_model.py -p no:cacheprovider -x 2>&1 \
  | tee "$OUT/gpu_model_tests.log" | tail -25
el "bench/kernels_gpu.py"
timeout 270 python3 bench/kernels_gpu.py --out "$OUT/kernels_gpu.md" > "$OUT/kernels_gpu.log" 2>&1
echo "rc $?"; tail -30 "$OUT/kernels_gpu.log"
el "bench/gpu_model.py"
if [ -d "$MODEL" ]; then
  timeout 170 python3 bench/gpu_model.py "$MODEL" --windows 8 --out "$OUT/gpu_model.md" \
    --json "$OUT/gpu_model.json" 2>&1 | tail -30
else
  echo "no model folder at $MODEL: bench/gpu_model.py skipped"
fi
el done
