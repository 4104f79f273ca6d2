"""Training-step time of each seed configuration divided by the FP32 step time, from one run.

    python benchmarks/step_time.py                       # CPU, ResNet-20, batch 128
    python benchmarks/step_time.py --device cuda --steps 50

Each configuration is built by its own script's `plan(argv)` (the exact model, casts, autocast and
master-weight step a real run trains), then timed on one fixed random CIFAR-sized batch: forward,
loss, backward, SGD step (+ after_step), channels-last as the loop does. Configurations are timed in
interleaved rounds (every config once per round) and the median round counts, so a slow spell of a
shared machine hits all of them alike. The first steps of each config (warm-up) also compile the
cast kernels; they are not timed. Targets (issue 4, 2-core CPU): FP8 weights+activations <= 1.3x,
with gradients too <= 1.5x, posit <= 1.5x, BF16 autocast < 1.0x.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import hardware  # noqa: E402
from common.resnet import build_model  # noqa: E402
from common.sweep import CONFIGS as SWEEP_CONFIGS  # noqa: E402
from common.sweep import SweepConfig  # noqa: E402

# Extra configurations beside the sweep's (common/sweep.py): FP8 as the script's defaults, with
# and without gradient casts, for issue 4's "FP8 weights+activations" and "with gradients" targets.
EXTRA = {
    "fp8-wa": SweepConfig("FP8/train_cifar10_fp8.py", ("--g-fmt", "fp32"),
                          "FP8 defaults, weights+activations only"),
    "fp8-wag": SweepConfig("FP8/train_cifar10_fp8.py", (), "FP8 defaults: w, a and g"),
}
# (key, target step-time ratio to FP32 on the 2-core CPU, or None): the seed set and the extras
TARGETS = [("fp32", None), ("bf16", 1.0), ("bf16-emu", None), ("fp8-wa", 1.3), ("fp8-wag", 1.5),
           ("fp8-e5m2w", 1.5), ("fp8-e4m3w", 1.5), ("fp4", None), ("posit4", 1.5),
           ("posit8", 1.5), ("posit16", 1.5)]
CONFIGS = {**SWEEP_CONFIGS, **EXTRA}


def load_plan(script: str):
    """The `plan` function of a format script, imported by path (scripts are not a package)."""
    path = os.path.join(ROOT, script)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.plan


class Stepper:
    """One configuration's model, optimizer and fixed batch; `step()` is one training step."""

    def __init__(self, plan_kwargs: dict, device: torch.device, batch: int, mode: str = "eager"):
        cfg = plan_kwargs["config"]
        self.device = device
        model = build_model(cfg.model, shortcut=cfg.shortcut)
        transform = plan_kwargs.get("model_transform")
        if transform is not None:
            model = transform(model) or model
        fmt = torch.channels_last
        self.model = model.to(device, memory_format=fmt).train()
        # the whole model compiled as `--compile` does (train.py); "graphs": CUDA graphs of the
        # compiled forward and backward (torch.compile mode "reduce-overhead")
        self.forward = self.model if mode == "eager" else torch.compile(
            self.model, mode="reduce-overhead" if mode == "graphs" else None)
        self.after_step = plan_kwargs.get("after_step")
        dtype = plan_kwargs.get("autocast_dtype")
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else \
            contextlib.nullcontext
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, 32, 32, generator=gen).to(device, memory_format=fmt)
        self.y = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def step(self):
        with self.autocast():
            loss = F.cross_entropy(self.forward(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.after_step is not None:
            self.after_step(self.model)

    def time(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        return (time.perf_counter() - t0) / steps


def build_stepper(key: str, args, device, mode: str = "eager", extra=()) -> Stepper:
    """The Stepper of configuration `key` as its script plans it, plus `extra` flags."""
    script, flags = CONFIGS[key].script, CONFIGS[key].flags
    kw = load_plan(script)([*flags, *extra, "--model", args.model, "--device", device.type,
                            "--batch-size", str(args.batch_size), "--synthetic"])
    return Stepper(kw, device, args.batch_size, mode)


def measure(pairs, args, device) -> dict:
    """Median seconds per step of every (config, mode) pair, timed in interleaved rounds here."""
    steppers = {}
    for key, mode in pairs:
        name = key if mode == "eager" else f"{key} ({mode})"
        steppers[name] = build_stepper(key, args, device, mode)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            steppers[name].step()
        print(f"# {name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    times = {k: [] for k in steppers}
    for _ in range(args.rounds):
        for name, stepper in steppers.items():
            times[name].append(stepper.time(args.steps))
    return {k: statistics.median(v) for k, v in times.items()}


def measure_compiled(keys, modes, args, fp32_eager: float) -> dict:
    """Each (config, compiled mode) timed in a process of its own, beside FP32 eager.

    A compiled model shares code objects with every other model in its process (ResNet's blocks,
    the cast kernels): with several, dynamo's guards and recompiles cost more than the model
    (seen: FP32 compiled 0.57x of eager beside three other compiled models, 1.07x alone; eager
    quantized steps 5x slower beside compiled ones). Each row's ratio to FP32 comes from its own
    process and is put onto this process's FP32 eager time."""
    rows = {}
    for mode in modes:
        for key in keys:
            cmd = [sys.executable, os.path.abspath(__file__), "--json", "--configs", key,
                   "--modes", mode, "--device", args.device, "--model", args.model,
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--rounds", str(args.rounds)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            name = f"{key} ({mode})"
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                sys.exit(f"step_time: {name} failed in its own process: {last}")
            med = json.loads(done.stdout.strip().splitlines()[-1])
            rows[name] = med[name] / med["fp32"] * fp32_eager
            print(f"# {name}: own process, {med[name] * 1e3:.1f} ms/step beside FP32 eager "
                  f"{med['fp32'] * 1e3:.1f}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cpu", "cuda"), help="(default: cuda if available, else cpu)")
    p.add_argument("--model", default="resnet20", help="(default: resnet20)")
    p.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (default: 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--configs", default=",".join(k for k, _ in TARGETS),
                   help="comma-separated keys (default: all: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--modes", default="eager",
                   help="comma-separated: eager, compile (the whole model, as --compile), graphs "
                        "(compile with CUDA graphs, CUDA only); every config runs in each; "
                        "with compile or graphs each config is timed in its own process, beside "
                        "FP32 eager (default: eager)")
    p.add_argument("--json", action="store_true",
                   help="print the medians as one JSON line, no table (used for the per-process "
                        "runs of compiled modes) (default: off)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    keys = args.configs.split(",")
    unknown = [k for k in keys if k not in CONFIGS]
    if unknown or ("fp32" not in keys and not args.json):
        p.error(f"--configs: unknown {unknown}; accepted: {', '.join(CONFIGS)} "
                f"(fp32 is needed as the reference)")
    modes = args.modes.split(",")
    if not set(modes) <= {"eager", "compile", "graphs"} or ("eager" not in modes and not args.json):
        p.error(f"--modes {args.modes!r}: give eager plus any of compile, graphs")
    if "graphs" in modes and args.device != "cuda":
        p.error("--modes graphs needs --device cuda (CUDA graphs)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.json:   # one compiled (config, mode) beside FP32 eager, for measure_compiled
        pairs = [("fp32", "eager")] + [(k, m) for k in keys for m in modes]
        print(json.dumps(measure(pairs, args, device)))
        return
    med = measure([(k, "eager") for k in keys], args, device)
    compiled = [m for m in modes if m != "eager"]
    if compiled:
        rows = measure_compiled(keys, compiled, args, med["fp32"])
        order = [n for k in keys for n in [k] + [f"{k} ({m})" for m in compiled]]
        med = {n: {**med, **rows}[n] for n in order}     # each config's rows together
    targets = dict(TARGETS)

    how = "eager rows in one process" + (
        "; each compiled row in its own process, its ratio to FP32 eager from there" if compiled
        else "")
    print(f"\nstep time, {args.model}, batch {args.batch_size}, {hardware.device_name(device)}, "
          f"torch {torch.__version__}; median of {args.rounds} interleaved rounds "
          f"x {args.steps} steps; {how}")
    print(f"CPU instruction set (torch): {torch.backends.cpu.get_cpu_capability()}")
    print("| config | ms/step | x FP32 (eager) | target | met | speed-up over its eager step |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for name, t in med.items():
        key = name.split(" (")[0]
        ratio = t / med["fp32"]
        target = targets.get(key) if name == key else None
        met = "" if target is None else ("yes" if ratio <= target else "NO")
        tgt = "" if target is None else (f"< {target:.1f}" if key == "bf16"
                                         else f"<= {target:.1f}")
        speedup = "" if name == key else f"{med[key] / t:.2f}x"
        print(f"| {name} | {t * 1e3:.1f} | {ratio:.2f} | {tgt} | {met} | {speedup} |")


if __name__ == "__main__":
    main()
