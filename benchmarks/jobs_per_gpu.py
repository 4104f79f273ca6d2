"""Training throughput of N concurrent runs on one GPU, per run and in total (sweep --jobs-per-gpu).

    python benchmarks/jobs_per_gpu.py --jobs 1,2,4,8                 # CUDA, FP32 ResNet-20, graphs
    python benchmarks/jobs_per_gpu.py --device cpu --jobs 1,2 --seconds 5 --mode eager   # a check

For each N, N worker processes (the same as N sweep runs on one GPU) build the configuration's
model as its script does (``step_time.Stepper``), warm up (compiling, capturing CUDA graphs),
wait until all N are ready, then train on a fixed batch for ``--seconds`` and report their images
per second. The table gives per-run and total throughput and the total against one run: ResNet-20
at batch 128 is bound by kernel launches, so one run leaves a large GPU mostly idle and several
runs add up. Target (issue 12, H100-class GPU): 8 runs >= 4x the total throughput of one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def worker(args) -> None:
    """One run: warm up, signal ready, wait for the others, time steps for args.seconds."""
    import torch

    from benchmarks.step_time import CONFIGS, Stepper, load_plan

    script, flags = CONFIGS[args.config].script, CONFIGS[args.config].flags
    kw = load_plan(script)(list(flags) + ["--model", args.model, "--device", args.device,
                                          "--batch-size", str(args.batch_size), "--synthetic"])
    device = torch.device(args.device)
    stepper = Stepper(kw, device, args.batch_size, args.mode)
    for _ in range(args.warmup):
        stepper.step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    open(os.path.join(args.barrier, f"ready{args.rank}"), "w").close()
    while len(os.listdir(args.barrier)) < args.n:          # every run warm before timing
        time.sleep(0.05)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        stepper.step()
        steps += 1
        if steps % 10 == 0:
            sync()
    sync()
    elapsed = time.perf_counter() - t0
    print(json.dumps({"rank": args.rank, "images_per_s": steps * args.batch_size / elapsed}))


def measure(args, n: int) -> list:
    """Images/s of each of n concurrent workers."""
    threads = max(1, (os.cpu_count() or 1) // n)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory() as barrier:
        procs = [subprocess.Popen(
            [sys.executable, __file__, "--worker", "--rank", str(r), "--n", str(n),
             "--barrier", barrier, "--config", args.config, "--model", args.model,
             "--device", args.device, "--batch-size", str(args.batch_size), "--mode", args.mode,
             "--seconds", str(args.seconds), "--warmup", str(args.warmup)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(n)]
        results = []
        for p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"error: a worker failed (exit {p.returncode}): "
                                 f"{(err.strip().splitlines() or ['?'])[-1]}")
            results.append(json.loads(out.strip().splitlines()[-1])["images_per_s"])
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", default="1,2,4,8", help="concurrent runs to try (default: 1,2,4,8)")
    p.add_argument("--config", default="fp32", help="a sweep configuration key (default: fp32)")
    p.add_argument("--model", default="resnet20", help="(default: resnet20)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="(default: cuda)")
    p.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    p.add_argument("--mode", default="graphs", choices=("eager", "compile", "graphs"),
                   help="as step_time.py --modes; graphs = CUDA graphs (default: graphs)")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="timed seconds per run (default: 20)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: 10)")
    for hidden in ("--rank", "--n"):
        p.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--barrier", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (try --device cpu --mode eager)")
    if args.mode == "graphs" and args.device != "cuda":
        p.error("--mode graphs needs --device cuda")
    try:
        jobs = [int(j) for j in args.jobs.split(",")]
        assert jobs and min(jobs) >= 1
    except (ValueError, AssertionError):
        p.error(f"--jobs {args.jobs!r}: give counts like 1,2,4,8")
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else \
        f"CPU ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"
    print(f"{args.config}, {args.model}, batch {args.batch_size}, mode {args.mode}, on {where}, "
          f"torch {torch.__version__}; {args.seconds:g} s timed per run")
    print("| runs | images/s per run (mean) | total images/s | total vs 1 run |")
    print("| ---: | ---: | ---: | ---: |")
    base = None
    for n in jobs:
        ips = measure(args, n)
        total = sum(ips)
        base = base or (total if n == 1 else None)
        vs = f"{total / base:.2f}x" if base else "-"
        print(f"| {n} | {total / n:,.0f} | {total:,.0f} | {vs} |", flush=True)


if __name__ == "__main__":
    main()
