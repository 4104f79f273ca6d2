"""How a cast call runs: what the element casts (common/quant.py) and the block casts
(common/blocks.py) share, below both of them.

Every cast checks its arguments, draws seed words when it rounds stochastically, runs one kernel
and hands back a tensor of the input's dtype. The kernel runs as eager PyTorch ops or as a kernel
compiled once by ``torch.compile``, with the same bits either way. This module makes that
choice and keeps the compiled kernels; a cast only says which kernel runs, on what arguments.

The choice (``resolve_path``, ``use_compiled``):
- ``QUANT_PATH=eager|compiled|auto`` in the environment overrides a plain call's "auto", for
  debugging. The test hooks pass "eager" or "compiled" directly.
- "auto" runs eager ops below a size threshold per device (``EAGER_CAST_BELOW`` for a native
  cast, ``EAGER_BITS_BELOW`` for the bit arithmetic): there the fixed Python and guard cost of a
  compiled call outweighs what the fused kernel saves. The thresholds come from
  ``benchmarks/quant_speed.py --sizes`` and also keep the compiled kernels away from the size-0/1
  specialisation of dynamic shapes.
- While ``torch.compile`` traces a user's model (``tracing``), "auto" runs the eager ops: they
  become part of the user's graph.

The cache (``run_compiled``): one compiled callable per kernel key (family, rounding, device
type, ...), each made from a fresh copy of the kernel's code object, because dynamo keeps its
cache and recompile limit per code object: kernels never evict one another. Dynamic shapes, one
graph per kernel. Where compiling or running the compiled kernel raises (no compiler, an
unsupported platform), the key is remembered as unavailable, one line is logged and the caller
runs the eager ops from then on, with the same bits; ``strict`` (the compiled test hook)
raises instead.

Kernel parameters are Python ints for the eager ops and 0-d or 1-D int32 tensors for the
compiled kernels (runtime inputs, so that one compiled kernel serves every format):
``kernel_params``, ``param_tensor``, ``unpack``.
"""
from __future__ import annotations

import logging
import math
import os
import types
from typing import Callable, Optional

import torch

from . import _quant_kernels as K
from .formats import Format

__all__ = ["ROUNDINGS", "PATHS", "EAGER_CAST_BELOW", "EAGER_BITS_BELOW", "check_rounding",
           "check_tensor", "draw_seed", "to_input_dtype", "resolve_path", "tracing",
           "use_compiled", "run_compiled", "kernel_params", "param_tensor", "device_constant",
           "unpack"]

ROUNDINGS = ("nearest", "stochastic")
PATHS = ("auto", "eager", "compiled")

# Elements from which "auto" runs the compiled kernel, by device type (others use the CPU's;
# the measurements: README, Speed, "Eager or compiled"). CPU: the eager native cast (one to
# three passes over memory) beats a compiled call up to medium tensors, the eager bit
# arithmetic (tens of passes) only on small ones. CUDA: the eager cast is launch-bound and wins
# until three passes over memory cost more than one; the eager bit arithmetic never wins there,
# and its threshold only keeps tiny tensors eager.
EAGER_CAST_BELOW = {"cpu": 1 << 18, "cuda": 1 << 24}
EAGER_BITS_BELOW = {"cpu": 1 << 12, "cuda": 1 << 12}

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# arguments and results
# ---------------------------------------------------------------------------------------------
def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; accepted: {', '.join(ROUNDINGS)}")
    return rounding


def check_tensor(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"quantize expects float32/float16/bfloat16/float64, got {x.dtype}")


def draw_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """Two int32 seed words for one stochastic call, from `generator` or x's device default."""
    if generator is not None:
        seed = torch.randint(-2**31, 2**31, (2,), dtype=torch.int32, generator=generator,
                             device=generator.device)
        return seed.to(device)
    return torch.randint(-2**31, 2**31, (2,), dtype=torch.int32, device=device)


def to_input_dtype(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 result, whose values ``dtype`` holds exactly (the casts check that first), as
    ``dtype``, NaN as that dtype's default NaN: bfloat16 takes the top half of the float32
    pattern, because torch's and inductor's float32 -> bfloat16 casts turn NaN into 0xFFFF."""
    if y.dtype == dtype:
        return y
    if dtype == torch.bfloat16:
        return (y.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    return y.to(dtype)


# ---------------------------------------------------------------------------------------------
# the choice: eager ops or the compiled kernel
# ---------------------------------------------------------------------------------------------
def resolve_path(path: str) -> str:
    """The path a call takes: "eager" and "compiled" as given; "auto" as QUANT_PATH says when
    it is set (checked), else "auto"."""
    if path == "auto":
        path = os.environ.get("QUANT_PATH", "auto")
        if path not in PATHS:
            raise ValueError(f"QUANT_PATH={path!r}; accepted: {', '.join(PATHS)}")
    return path


def tracing() -> bool:
    """Whether torch.compile is tracing this call into a user's graph."""
    return torch.compiler.is_compiling()


def use_compiled(path: str, numel: int, device: torch.device, eager_below: dict) -> bool:
    """Whether a call on `path` (resolved) runs the compiled kernel: always on "compiled",
    never on "eager"; on "auto" from ``eager_below[device type]`` elements on, unless a user's
    torch.compile is tracing the call."""
    if path != "auto":
        return path == "compiled"
    return numel >= eager_below.get(device.type, eager_below["cpu"]) and not tracing()


# ---------------------------------------------------------------------------------------------
# the compiled kernels
# ---------------------------------------------------------------------------------------------
_COMPILED: dict = {}  # kernel key -> compiled callable, or None once compiling failed there


def _compile(fn: Callable, tag: str, options: Optional[dict]) -> Callable:
    """torch.compile of a fresh copy of `fn` named after `tag`: dynamo's cache and recompile
    limit are per code object, so each kernel key gets its own."""
    code = fn.__code__.replace(co_name=f"_quantize_{tag}")
    clone = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                               fn.__closure__)
    if not torch.cuda.is_available():
        # a CUDA build of torch on a machine without CUDA warns "No CUDA runtime is found" each
        # time inductor builds a CPU kernel: noise in every training log, nothing to act on
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # dynamic_threads: the CPU kernel always opens an OpenMP region and lets the runtime pick
    # the threads. Otherwise inductor decides serial or parallel once, from the size of the
    # call it compiles for, and its disk cache hands that decision to later processes: a
    # kernel first compiled on a small tensor (a test's) ran single-threaded on every tensor.
    options = {"cpp.dynamic_threads": True, **(options or {})}
    return torch.compile(clone, dynamic=True, fullgraph=True, options=options)


def run_compiled(key: tuple, kernel: Callable, args: tuple, strict: bool = False,
                 options: Optional[dict] = None):
    """kernel(*args) through its compiled version, compiled at first use for `key` (a tuple of
    strings naming the kernel and device type) with inductor `options`.

    Returns None where compiling is not possible: remembered for `key` and logged once; the
    caller then runs the eager ops. strict: raise instead, and retry a key that failed before.
    """
    fn = _COMPILED.get(key, False)
    if fn is None and not strict:
        return None
    try:
        if not fn:
            fn = _COMPILED[key] = _compile(kernel, "_".join(key), options)
        return fn(*args)
    except Exception as err:  # no compiler, unsupported platform, ...: eager is exact too
        if strict:
            raise
        _COMPILED[key] = None
        _log.info("quantize: compiled kernel %s unavailable (%s: %s); using eager ops", key,
                  type(err).__name__, (str(err).splitlines() or [""])[0])
        return None


# ---------------------------------------------------------------------------------------------
# kernel parameters and other constant inputs
# ---------------------------------------------------------------------------------------------
def kernel_params(fmt: Format, saturate: bool) -> tuple:
    """The format's kernel parameters as Python ints (see _quant_kernels)."""
    return K.posit_params(fmt) if fmt.is_posit else K.float_params(fmt, saturate)


def unpack(p):
    """Kernel parameters as a sequence: ints as they are, a 1-D tensor as its 0-d elements."""
    return p.unbind(0) if isinstance(p, torch.Tensor) else p


_CONSTANTS: dict = {}  # (key, device) -> tensor


def device_constant(key: tuple, device: torch.device, make: Callable) -> torch.Tensor:
    """The tensor ``make(device)``, made once per (key, device): inputs of the compiled kernels
    that do not change between calls, without a host-to-device copy per call (which would
    synchronise a CUDA stream). Keyed by the device itself: hashing it is cheaper than its
    name, and these lookups run on every compiled call."""
    t = _CONSTANTS.get((key, device))
    if t is None:
        t = _CONSTANTS[(key, device)] = make(device)
    return t


def param_tensor(fmt: Format, saturate: bool, device: torch.device, method: str):
    """Kernel parameters as a tensor on `device`: for method "bits" the int32 parameters of
    _quant_kernels, for "cast" the float32 clamp bound (inf: no clamp)."""
    key = (method, fmt.name, bool(saturate))
    t = _CONSTANTS.get((key, device))
    if t is None:
        if method == "cast":
            t = torch.tensor(fmt.max if saturate else math.inf, dtype=torch.float32,
                             device=device)
        else:
            t = torch.tensor(kernel_params(fmt, saturate), dtype=torch.int32, device=device)
        _CONSTANTS[(key, device)] = t
    return t
