"""The bf16 autocast probe (common.hardware): slow where oneDNN has no bf16 hardware path."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import hardware

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import torch, time; from common import hardware; t = time.perf_counter(); "
         "fast, ratio = hardware.bf16_autocast_speed(torch.device('cpu')); "
         "print(fast, ratio, time.perf_counter() - t)")


def probe_with(env_extra):
    env = dict(os.environ, **env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    fast, ratio, seconds = out.stdout.split()
    return fast == "True", float(ratio), float(seconds)


@pytest.mark.slow
def test_probe_calls_bf16_slow_without_bf16_hardware():
    """oneDNN limited to AVX2 has no bf16 arithmetic (as on an AVX2-only AMD EPYC): the probe
    must find bf16 convolutions slower than float32 there."""
    fast, ratio, _ = probe_with({"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert not fast and ratio > hardware.BF16_FAST_RATIO


def test_probe_leaves_the_random_stream_alone():
    torch.manual_seed(5)
    want = torch.rand(3)
    hardware._CACHE.clear()
    torch.manual_seed(5)
    hardware.bf16_autocast_speed(torch.device("cpu"))
    assert torch.equal(torch.rand(3), want)
    assert hardware.bf16_autocast_speed(torch.device("cuda")) == (True, 0.0)   # not probed
