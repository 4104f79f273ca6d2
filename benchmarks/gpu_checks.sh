#!/usr/bin/env bash
# Every GPU check in one run (about 5 minutes on an H100 without the sweep), for a machine that has
# torch, ml_dtypes and pytest but none of this repo's other test references:
#   CUDA parity tests of the casts, quantizer throughput at 64M elements, step time per format,
#   FP32/BF16 epoch time of the loop, then (only if CIFAR-10 is there) a short seed-set sweep.
# Usage: OUT=/some/dir bash benchmarks/gpu_checks.sh   [SWEEP_EPOCHS=5 CIFAR10_DIR=...]
# Logs go to $OUT (default ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

step() { echo "=== $1"; shift; "$@" 2>&1 | tee -a "$OUT/$LOG"; }
LOG=tests.log step "CUDA parity tests" \
  timeout 300 python3 -m pytest -q -x tests/test_quant_cuda.py tests/test_qat.py tests/test_formats.py
LOG=quant_speed.log step "quantizer throughput, 64M elements" \
  timeout 300 python3 benchmarks/quant_speed.py --device cuda --numel 64M --no-references
LOG=step_time.log step "training step per format" \
  timeout 300 python3 benchmarks/step_time.py --device cuda --steps 20 --rounds 3
LOG=pipeline.log step "loop epoch time, FP32 and BF16 (random CIFAR-sized data)" \
  timeout 300 python3 benchmarks/pipeline_speed.py --device cuda --fake-data --autocast none bf16
if [ -n "${CIFAR10_DIR:-}" ] && [ -d "$CIFAR10_DIR" ]; then
  LOG=sweep.log step "seed set, ${SWEEP_EPOCHS:-5} epochs" \
    python3 sweep.py --seeds 1 --epochs "${SWEEP_EPOCHS:-5}" --runs-dir "$OUT/runs"
  LOG=report.log step "report" python3 report.py --runs-dir "$OUT/runs" --out "$OUT/results"
fi
