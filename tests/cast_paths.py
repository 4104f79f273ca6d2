"""How the cast tests reach each path of the project's casts, shared by the CPU and CUDA suites.

A plain ``quantize`` call picks its own path (eager ops or a compiled kernel; a native cast or
bit arithmetic); the tests name each path instead, and compare every one with the independent
references of tests/oracles.py:

- ``run_path``, ``paths_for``: element casts by a named path ("eager-bits", "compiled", ...).
- ``run_block``: block casts by path ("eager", "compiled").
- ``user_compile``: torch.compile as a user would, on a fresh code object.
- ``check_default_nans``: the NaN contract of a block cast, on any device.
"""
import itertools
import math
import types

import torch

from common import blocks, quant
from common.formats import parse_format
from common.quant import _quantize_compiled, _quantize_eager

from oracles import F32_QNAN, NAN_PATTERNS

BF16_QNAN = 0x7FC0  # bfloat16's default quiet NaN


def run_path(path, x, fmt, rounding="nearest", saturate=True, seed=None):
    """quantize by one named implementation path: "eager" or "compiled", optionally with the
    method: "-bits" (integer arithmetic) or "-cast" (torch's native cast); default: quantize's
    choice for that path."""
    mode, _, method = path.partition("-")
    fn = _quantize_compiled if mode == "compiled" else _quantize_eager
    return fn(x, fmt, rounding, saturate, method=method or None, seed=seed)


def paths_for(spec, rounding="nearest", saturate=True):
    """Every path quantize has for this case: each eager method, the compiled bit arithmetic,
    and the compiled default where that may be a cast (it is one where the compiler keeps the
    cast's rounding, else the bit arithmetic: quant._compiled_cast_ok)."""
    fmt = parse_format(spec)
    paths = [f"eager-{m}" for m in quant._methods(fmt, rounding, saturate)] + ["compiled-bits"]
    if "cast" in quant._methods(fmt, rounding, saturate, compiled=True):
        paths.append("compiled")
    return paths


def run_block(path, x, spec, rounding="nearest", seed=None):
    """A block cast by path: "eager" or "compiled" (raises if it cannot compile)."""
    return blocks.quantize_block(x, spec, rounding, path=path, seed=seed)


_FRESH = itertools.count()


def user_compile(fn):
    """torch.compile(fn, fullgraph=True), as a user would, on a fresh code object: dynamo's
    recompile limit counts per code object, and a test past it would run eagerly unnoticed."""
    code = fn.__code__.replace(co_name=f"user_fn_{next(_FRESH)}")
    return torch.compile(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                                            fn.__closure__), fullgraph=True)


def _nan_bits(y):
    """The set of bit patterns of y's NaNs (unsigned)."""
    ints = y[torch.isnan(y)].view(torch.int32 if y.dtype == torch.float32 else torch.int16)
    return {v & (0xFFFFFFFF if y.dtype == torch.float32 else 0xFFFF) for v in ints.tolist()}


def check_default_nans(spec, rounding, path, device="cpu"):
    """NaN patterns, and an inf, through a block cast on ``device``: every NaN out is the
    default quiet NaN of the result's dtype (run on the CPU by test_blocks, on CUDA by
    test_quant_cuda)."""
    pats = torch.tensor(NAN_PATTERNS * 11, dtype=torch.int64)[:64].to(torch.int32)
    with_nan = torch.ones(3, 64)
    with_nan[0] = pats.view(torch.float32)
    with_inf = torch.ones(3, 64)
    with_inf[1, 5] = -math.inf
    seed = torch.tensor([1, 2], dtype=torch.int32, device=device)
    for x in (with_nan, with_inf):
        y = run_block(path, x.to(device), spec, rounding, seed=seed).cpu()
        assert torch.isnan(y[0 if x is with_nan else 1]).any()
        assert _nan_bits(y) == {F32_QNAN}, (spec, [hex(b) for b in _nan_bits(y)])
        if spec != "nvfp4":                 # NVFP4's products of scales need float32
            yb = run_block(path, x.to(device, torch.bfloat16), spec, rounding, seed=seed).cpu()
            assert yb.dtype == torch.bfloat16 and _nan_bits(yb) == {BF16_QNAN}, _nan_bits(yb)
