"""GEMM operand casts: how hardware GEMMs quantize their operands (used by GEMM mode).

A layer's three GEMMs each read two operands and reduce over one dimension:

    forward  y  = x · w     reduction: in (c, and the kernel taps of a conv)
    dgrad    dx = dy · wᵀ   reduction: out (o, and the kernel taps)
    wgrad    dw = xᵀ · dy   reduction: the positions (batch, and h, w of a conv)

A block format (MX, NVFP4) scales blocks of k elements along the reduction dimension of the
GEMM that reads the operand, so the same tensor cast for two GEMMs has its blocks along two
different dims. This module gives those casts:

- ``cast_along(x, fmt, axis)``: any format, with a block format's blocks along ``axis``
  instead of dim 1 (common/blocks.py's convention, the forward GEMM's reduction dim).
- ``quantize_weight_2d(w, fmt)``: 2D block scaling of a weight, one scale per k x k tile over
  (out, in) at each kernel tap, so that forward (blocks along in) and dgrad (blocks along out)
  read one quantized weight with one scale per block of either GEMM.
- ``hadamard_matrix(seed, block)``, ``hadamard_transform(x, axis, seed, block)``: a random
  Hadamard transform along a reduction axis (the wgrad operands of the NVFP4 training recipe),
  which spreads outliers over a block before the cast and cancels in the GEMM.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import blocks, dispatch
from .formats import NVFP4_BLOCK_SIZE, Format, parse_format
from .quant import quantize_scaled
from .scaling import Scaling

__all__ = ["cast_along", "quantize_weight_2d", "hadamard_matrix", "hadamard_transform",
           "HADAMARD_BLOCK"]

HADAMARD_BLOCK = NVFP4_BLOCK_SIZE  # the NVFP4 recipe: 16 x 16, entries +-1/4, R Rᵀ = I exactly
SEED_LIMIT = 2**64   # torch.Generator.manual_seed takes seeds below 2^64


# ---------------------------------------------------------------------------------------------
# argument checks and layout
# ---------------------------------------------------------------------------------------------
def _check_axis(x: torch.Tensor, axis) -> int:
    """`axis` as a dim of x in [0, x.dim()); ValueError naming the accepted range otherwise."""
    dispatch.check_tensor(x)
    n = x.dim()
    if isinstance(axis, bool) or not isinstance(axis, int) or not -n <= axis < n:
        accepted = f"an int in [{-n}, {n - 1}]" if n else "none (a 0-d tensor has no axis)"
        raise ValueError(f"axis {axis!r} for a {n}-d tensor; accepted: {accepted}")
    return axis % n


def _in_layout_of(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y (x's shape) in x's memory layout where x's is dense (contiguous, channels-last,
    permuted), else contiguous: a copy only where the strides differ."""
    if y.stride() == x.stride():
        return y
    return torch.empty_like(x, dtype=y.dtype).copy_(y)


# ---------------------------------------------------------------------------------------------
# casts along a GEMM's reduction axis
# ---------------------------------------------------------------------------------------------
def cast_along(x: torch.Tensor, fmt: Union[str, Format], axis: int, rounding: str = "nearest",
               scaling: Union[str, Scaling] = "none",
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``quantize_scaled(x, fmt, scaling, rounding)`` with a block format's blocks along `axis`
    (negative counts from the end) instead of dim 1; a 1-D tensor is blocked along its only dim.

    Block formats: `axis` is moved to dim 1, the tensor cast, and the axis moved back. The
    result has x's shape and dtype and, where x is dense, its memory layout. Stochastic
    rounding draws each element's random bits from its position in the moved layout (a
    contiguous copy, unless the move lands on a channels-last tensor).
    Other formats have no blocks, so `axis` does not matter: x itself is cast, and "none" and
    "tensor" scaling give the same result for every axis ("channel": one scale per slice along
    dim 0, quantize_scaled's default, or a ``Scaling`` with its own axis).
    """
    fmt = parse_format(fmt)
    dim = _check_axis(x, axis)
    if not fmt.is_block or x.dim() == 1 or dim == 1:
        return quantize_scaled(x, fmt, scaling, rounding, generator=generator)
    y = quantize_scaled(x.movedim(dim, 1), fmt, scaling, rounding, generator=generator)
    return _in_layout_of(y.movedim(1, dim), x)


def quantize_weight_2d(w: torch.Tensor, fmt: Union[str, Format], rounding: str = "nearest",
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """2D block scaling of a weight [O, C, *taps] (Linear [O, K], conv [O, C, kh, kw]) to the
    block format `fmt`: one scale per k x k tile over (O, C) at each kernel tap (k =
    fmt.block_size), from the tile's absolute maximum by fmt's own rule (MX: the E8M0 scale;
    NVFP4: the e4m3 block scale on the float32 tensor scale of the whole weight).

    The forward GEMM reads w's blocks along C (k consecutive c of one o at one tap), dgrad
    along O (k consecutive o of one c at one tap); each lies inside one tile, so both read the
    same values with one scale per block, and one quantized weight serves both. A dim shorter
    than k makes tiles of its length; a longer one that k does not divide ends in shorter edge
    tiles (cast on a zero-padded copy: zeros change no amax; the padding is cut off).

    Stochastic rounding draws each element's random bits from its position in the tiled
    layout [tiles, ko * kc, taps] (``blocks.quantize_tiles``). Returns a tensor of w's shape
    and layout (float32 w only).
    """
    fmt = parse_format(fmt)
    if not fmt.is_block:
        raise ValueError(f"2D weight blocks of {fmt}: accepted: a block format (mxfp8, mxfp6, "
                         f"mxfp4, mx<k>-eXmY, nvfp4)")
    dispatch.check_tensor(w)
    if w.dim() < 2 or w.dtype != torch.float32:
        raise ValueError(f"2D weight blocks of a {w.dtype} tensor of shape {list(w.shape)}: "
                         f"accepted: a float32 weight [O, C, *taps]")
    w = w.detach()
    if w.numel() == 0:
        return w.clone()
    o, c = w.shape[0], w.shape[1]
    w3 = w.reshape(o, c, -1)
    taps = w3.shape[2]
    ko, kc = min(o, fmt.block_size), min(c, fmt.block_size)   # tile extents along O and C
    no, nc = -(-o // ko), -(-c // kc)                          # tiles along O and C
    padded = F.pad(w3, (0, 0, 0, nc * kc - c, 0, no * ko - o))
    tiles = padded.view(no, ko, nc, kc, taps).transpose(1, 2).reshape(no * nc, ko * kc, taps)
    q = blocks.quantize_tiles(tiles, fmt, rounding, generator)
    back = q.view(no, nc, ko, kc, taps).transpose(1, 2).reshape(no * ko, nc * kc, taps)
    return _in_layout_of(back[:o, :c].reshape(w.shape), w)


# ---------------------------------------------------------------------------------------------
# random Hadamard transform
# ---------------------------------------------------------------------------------------------
def _check_rotation(seed, block) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or block & (block - 1):
        raise ValueError(f"Hadamard block {block!r}; accepted: a power of two (1, 2, 4, ..., 16)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"Hadamard seed {seed!r}; accepted: an int in [0, 2**64)")


_ROTATIONS: dict = {}  # (seed, block) -> R's entries as nested tuples of Python floats


@torch.compiler.assume_constant_result
def _rotation(seed: int, block: int) -> tuple:
    """R = diag(signs) · H / sqrt(block) as nested tuples of floats, made once per (seed,
    block). H: the Sylvester Hadamard matrix (H_1 = [1], H_2n = [[H, H], [H, -H]]); signs:
    +-1 from torch.Generator().manual_seed(seed). A constant to torch.compile, which runs this
    while tracing (a graph cannot create a torch.Generator)."""
    key = (seed, block)
    if key not in _ROTATIONS:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < block:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        bits = torch.randint(0, 2, (block,), generator=torch.Generator().manual_seed(seed))
        signs = (1 - 2 * bits).to(torch.float64)
        rot = signs[:, None] * h / math.sqrt(block)
        _ROTATIONS[key] = tuple(tuple(row) for row in rot.tolist())
    return _ROTATIONS[key]


def hadamard_matrix(seed: int, block: int = HADAMARD_BLOCK) -> torch.Tensor:
    """The random Hadamard rotation R = diag(signs) · H / sqrt(block), float32 [block, block].

    H is the Sylvester Hadamard matrix (H[i, j] = (-1)^popcount(i & j)), signs are +-1 drawn
    from a torch.Generator seeded with `seed` (a fixed, recorded int in [0, 2**64)), block a
    power of two. R is orthogonal: R Rᵀ = D H Hᵀ D / block = I. A row vector v becomes v R =
    (v * signs) H / sqrt(block): random signs, then the Hadamard mix. Where block is a power
    of 4 (16: entries +-1/4) every entry is exact in float32 and R Rᵀ = I holds exactly (sums
    of +-1/block); otherwise 1/sqrt(block) is rounded to float32.
    """
    _check_rotation(seed, block)
    return torch.tensor(_rotation(seed, block), dtype=torch.float32)


def hadamard_transform(x: torch.Tensor, axis: int, seed: int, block: int = HADAMARD_BLOCK,
                       inverse: bool = False) -> torch.Tensor:
    """x with `axis` zero-padded to a multiple of `block` and every run of `block` consecutive
    elements along it, as a row vector v, replaced by v R (``hadamard_matrix(seed, block)``),
    or by v Rᵀ with inverse=True, which undoes it. Computed in x's dtype.

    For a GEMM a · bᵀ reducing over `axis`, the caller transforms both operands the same way
    (same axis, seed and block): since R Rᵀ = I, (a R)(b R)ᵀ = a bᵀ in exact arithmetic, and
    the zero padding adds nothing to the sums. Casting the transformed operands spreads a
    block's outliers over all of it. The result keeps the padded length (the inverse too:
    ``.narrow(axis, 0, n)`` gives x's length back); it is exact where the arithmetic is (R's
    entries +-1/4 for block 16 and few significant bits in x), within float32 rounding
    elsewhere. Under torch.compile, seed and block must be constants of the traced code (a
    module attribute, a closure): R is made while tracing.
    """
    _check_rotation(seed, block)
    dim = _check_axis(x, axis)
    rot = torch.tensor(_rotation(seed, block), dtype=x.dtype, device=x.device)
    if inverse:
        rot = rot.T
    moved = x.movedim(dim, -1)
    n_blocks = -(-moved.shape[-1] // block)
    moved = F.pad(moved, (0, n_blocks * block - moved.shape[-1]))
    lead = moved.shape[:-1]
    y = moved.reshape(*lead, n_blocks, block) @ rot
    return y.reshape(*lead, n_blocks * block).movedim(-1, dim)
