"""GEMM mode's training-step time against the tensor-role mode, and the cost of emulated
accumulation, from one run (docs/gemm.md).

    python benchmarks/gemm_speed.py                  # CPU, ResNet-20, batch 128
    python benchmarks/gemm_speed.py --chunks 8,32,128 --steps 1

Every configuration is built by its script's `plan(argv)`, as benchmarks/step_time.py does,
and timed on one fixed random batch (forward, loss, backward, SGD step), in interleaved rounds;
the median round counts. Two tables:

1. each GEMM-mode recipe against the tensor-role configuration it is compared with in training
   (target: at most 1.3x without accumulation);
2. the TransformerEngine FP8 recipe with fp16 accumulation in all three GEMMs at several chunk
   sizes k, against the same recipe without accumulation (target: at most 4x at k = 32).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
from step_time import Stepper, build_stepper  # noqa: E402

from common import hardware  # noqa: E402

# (GEMM-mode configuration, the tensor-role configuration it is compared with)
PAIRS = [("fp8-te-gemm", "fp8-e4m3w"), ("fp4-nv-gemm-fl", "fp4-nv-fl"),
         ("fp4-nv-gemm", "fp4-nv"), ("fp4-mx-gemm", "fp4-mx")]
GEMM_TARGET = 1.3
ACC_TARGET = (32, 4.0)    # (chunk, at most this many times the step without accumulation)
ACC_BASE = "fp8-te-gemm"


def build(key: str, extra, args) -> Stepper:
    return build_stepper(key, args, torch.device("cpu"), extra=extra)


def timed(steppers: dict, args) -> dict:
    """Median seconds per step of each stepper, in interleaved rounds after a warm-up."""
    for name, stepper in steppers.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            stepper.step()
        print(f"# {name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    times = {name: [] for name in steppers}
    for _ in range(args.rounds):
        for name, stepper in steppers.items():
            times[name].append(stepper.time(args.steps))
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20", help="(default: resnet20)")
    p.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round (default: 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--chunks", default="1,8,32,128",
                   help="accumulation chunk sizes k, comma-separated (default: %(default)s)")
    p.add_argument("--acc", default="fp16", help="accumulator format (default: fp16)")
    p.add_argument("--skip-pairs", action="store_true",
                   help="time the accumulation table only (default: off)")
    args = p.parse_args(argv)
    chunks = [int(k) for k in args.chunks.split(",") if k]
    steppers = {}
    if not args.skip_pairs:
        for gemm_key, tensor_key in PAIRS:
            steppers[tensor_key] = build(tensor_key, (), args)
            steppers[gemm_key] = build(gemm_key, (), args)
    steppers.setdefault(ACC_BASE, build(ACC_BASE, (), args))
    for k in chunks:
        steppers[f"{ACC_BASE} acc {args.acc} k={k}"] = build(
            ACC_BASE, ("--acc", args.acc, "--acc-chunk", str(k)), args)
    med = timed(steppers, args)

    print(f"\nstep time, {args.model}, batch {args.batch_size}, "
          f"{hardware.device_name(torch.device('cpu'))}, torch {torch.__version__}, "
          f"CPU instruction set (torch): {torch.backends.cpu.get_cpu_capability()}; median of "
          f"{args.rounds} interleaved rounds x {args.steps} steps")
    if not args.skip_pairs:
        print("\n| GEMM mode | ms/step | tensor-role mode | ms/step | ratio | target | met |")
        print("| --- | ---: | --- | ---: | ---: | ---: | --- |")
        for gemm_key, tensor_key in PAIRS:
            r = med[gemm_key] / med[tensor_key]
            print(f"| {gemm_key} | {med[gemm_key] * 1e3:.0f} | {tensor_key} | "
                  f"{med[tensor_key] * 1e3:.0f} | {r:.2f} | <= {GEMM_TARGET} | "
                  f"{'yes' if r <= GEMM_TARGET else 'NO'} |")
    base = med[ACC_BASE]
    print(f"\n| {ACC_BASE} + accumulation in {args.acc}, all three GEMMs | ms/step | "
          f"x without accumulation | target | met |")
    print("| --- | ---: | ---: | ---: | --- |")
    print(f"| none (float32 GEMMs) | {base * 1e3:.0f} | 1.00 | | |")
    for k in chunks:
        t = med[f"{ACC_BASE} acc {args.acc} k={k}"]
        target = ACC_TARGET[1] if k == ACC_TARGET[0] else None
        met = "" if target is None else ("yes" if t / base <= target else "NO")
        print(f"| k = {k} | {t * 1e3:.0f} | {t / base:.2f} | "
              f"{'' if target is None else f'<= {target:g}'} | {met} |")


if __name__ == "__main__":
    main()
