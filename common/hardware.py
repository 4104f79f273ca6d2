"""What the training device runs fast: a one-time micro-probe of bf16 autocast convolutions.

torch.autocast(bfloat16) is real mixed precision only where the hardware has bf16 arithmetic: CUDA
GPUs, and CPUs with AMX or AVX512-BF16 (oneDNN's bf16 kernels). Elsewhere (a CPU with AVX2 only)
oneDNN converts every operand and runs bf16 convolutions many times slower than float32 (README,
Speed), so a "BF16" run would train far slower than FP32 without saying why.

A flag list cannot tell: oneDNN may be limited (``ONEDNN_MAX_CPU_ISA``), a hypervisor may hide
flags, and which kernels win depends on oneDNN's version. So the probe times what training does:
one ResNet-sized convolution's forward and backward, float32 against bf16 autocast, on the device,
alternating and keeping each one's best time. It runs on one thread (a busy machine disturbs one
thread far less than a team of spinning OpenMP threads), stops after one round when bf16 is
clearly slow, takes a fraction of a second, and is made once per process and device.
"""
from __future__ import annotations

import platform
import time
from typing import Dict, Tuple

import torch
import torch.nn as nn

# bf16 autocast counts as fast where one conv step takes less time than in float32 (the rule:
# use autocast unless it would be slower than FP32). The ratio lies well below 1 with bf16
# hardware and an order of magnitude above it without, even on a busy machine, so the choice
# is stable under load.
BF16_FAST_RATIO = 1.0
PROBE_SHAPE = (16, 16, 32, 32)          # batch, channels, height, width: ResNet-20's first stage
PROBE_ROUNDS = 5                         # alternating rounds; each times one call per dtype
CLEARLY_SLOW = 4.0                       # bf16/fp32 ratio that ends the probe after one round

_CACHE: Dict[str, Tuple[bool, float]] = {}


def _conv_step_seconds(conv: nn.Module, x: torch.Tensor, bf16: bool) -> float:
    xi = x.detach().requires_grad_()
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = conv(xi)
    y.float().sum().backward()
    return time.perf_counter() - t


def bf16_autocast_speed(device: torch.device) -> Tuple[bool, float]:
    """(fast, ratio): whether bf16 autocast runs convolutions fast on ``device``, and the probe's
    bf16/float32 time ratio (0.0 on CUDA, where it is not probed: every CUDA GPU this project
    targets has bf16 tensor cores or at least native bf16 conversion)."""
    if device.type == "cuda":
        return True, 0.0
    key = str(device)
    if key not in _CACHE:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)                     # see the module docstring
        with torch.random.fork_rng(devices=[]):      # the probe must not move a run's RNG
            torch.manual_seed(0)
            x = torch.randn(*PROBE_SHAPE).to(memory_format=torch.channels_last)
            conv = nn.Conv2d(PROBE_SHAPE[1], PROBE_SHAPE[1], 3, padding=1, bias=False)
            conv = conv.to(memory_format=torch.channels_last)
            best = {False: float("inf"), True: float("inf")}
            for bf16 in (False, True):                # first calls build oneDNN's kernels
                _conv_step_seconds(conv, x, bf16)
            for _ in range(PROBE_ROUNDS):
                for bf16 in (False, True):
                    best[bf16] = min(best[bf16], _conv_step_seconds(conv, x, bf16))
                if best[True] > CLEARLY_SLOW * best[False]:
                    break                              # no need to time a slow path again
        torch.set_num_threads(threads)
        ratio = best[True] / best[False]
        _CACHE[key] = (ratio <= BF16_FAST_RATIO, ratio)
    return _CACHE[key]


def cpu_name() -> str:
    """The CPU's model name and the instruction set torch's kernels use, e.g. 'AMD EPYC, AVX512'.

    Runs and benchmarks name their CPU because the machines a project runs on change, and
    speed differs several-fold between CPUs (instruction sets, bf16 and AMX units)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):   # not Linux, or no model line: keep platform's name
        pass
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def device_name(device: torch.device) -> str:
    """What a run or benchmark ran on: the GPU's name, or the CPU's with torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"
