#!/usr/bin/env bash
# Every GPU check in one run, at most 10 minutes, for a machine that has torch, ml_dtypes and
# pytest but none of this repo's other test references:
#   1. CUDA parity tests of the casts (eager, compiled, block formats where present),
#   2. quantizer throughput at 64M elements,
#   3. training step per configuration: eager against CUDA graphs (torch.compile reduce-overhead),
#   4. FP32 ResNet-20 epoch time of the real loop with --compile (CUDA graphs), random CIFAR-sized data,
#   5. N concurrent runs on one GPU (sweep --jobs-per-gpu): throughput per run and in total.
# Targets (issue 12, H100-class GPU): FP32 epoch <= 1.5 s; 8 runs >= 4x the total throughput of one.
# Usage: OUT=/some/dir bash benchmarks/gpu_checks.sh        (logs go to $OUT, default ./gpu_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

step() { echo "=== $1"; shift; "$@" 2>&1 | tee -a "$OUT/$LOG"; }
tests="tests/test_quant_cuda.py tests/test_qat.py tests/test_formats.py"
for t in tests/test_blocks.py tests/test_oracle.py; do [ -f "$t" ] && tests="$tests $t"; done
LOG=tests.log step "CUDA parity tests" \
  timeout 120 python3 -m pytest -q -x -k "cuda or compile" $tests
LOG=quant_speed.log step "quantizer throughput, 64M elements" \
  timeout 80 python3 benchmarks/quant_speed.py --device cuda --numel 64M --no-references
LOG=step_time.log step "training step per configuration, eager vs CUDA graphs" \
  timeout 190 python3 benchmarks/step_time.py --device cuda --steps 20 --rounds 3 --modes eager,graphs \
    --configs fp32,fp8-e4m3w,posit8
LOG=epoch.log step "FP32 loop epoch time with --compile (CUDA graphs), random CIFAR-sized data" \
  timeout 90 python3 benchmarks/pipeline_speed.py --device cuda --fake-data --compile --epochs 2
LOG=jobs.log step "concurrent runs on one GPU" \
  timeout 110 python3 benchmarks/jobs_per_gpu.py --jobs 1,8 --seconds 15
