"""Emulated low-precision accumulation of GEMMs: the sums a matmul or conv forms, rounded to a
narrow accumulator format A after every chunk of k products, as a hardware dot-product unit
with a k-wide adder tree and an A-precision accumulator register does.

Public API::

    acc = Accumulator(fmt, chunk, promote_every=None, rounding="nearest", saturate=False)
    y = acc.matmul(a, b)                       # or matmul(a, b, acc)
    y = acc.conv2d(x, w, stride=1, padding=0)  # or conv2d(x, w, stride, padding, acc)
    dw = acc.conv2d_weight(x, dy, kernel_size, stride=1, padding=0)   # that conv's wgrad

The model (the contract; tests/test_accumulate.py checks it against an oracle in fractions)
-------------------------------------------------------------------------------------------
For one output element with products p_1 .. p_K (the reduction dimension, in the order below):

1. Products are exact: operands are float32 (or float16/bfloat16), and the product of two
   24-bit significands is exact in float64 (no product of float32 values leaves float64's range).
2. The K products are cut into chunks of k consecutive ones (the last chunk may be shorter;
   zeros fill it up, which changes no sum). Each chunk sum c_j is formed exactly (see
   "Exactness of the chunk sums").
3. The accumulator starts at +0 and takes each chunk sum with ONE rounding to A:
   acc = round_A(acc + c_j), by ``common.quant.quantize(.., fmt, rounding, saturate)``.
4. Promotion: with ``promote_every`` P, after every P chunks the accumulator is added into a
   float32 master (one float32 addition, round to nearest even) and restarts at +0; what is left
   after the last chunk is added too. Without promotion the result is float32(acc). k = 1
   without promotion is plain sequential accumulation in A.
5. Specials: a NaN product (a NaN operand, or 0 x inf) makes the output NaN; infinities add as
   in IEEE arithmetic (inf + -inf = NaN). A sum beyond A's range becomes what quantize makes of
   it: with ``saturate=False`` inf for IEEE-like formats (fp16, bf16, e5m7, ...), NaN for e4m3,
   +-max for formats without inf or NaN (e2m1, ...); with ``saturate=True`` +-max, inf included.
   Posits always saturate at maxpos, and an infinite sum gives NaR (NaN).
   Zero has no sign in the model (the exact sum has none): a zero result is +0, also where A
   rounds a tiny negative sum to zero.
6. Stochastic rounding is quantize's: unbiased, with its random bits drawn per quantize call
   (one per step and slice) from ``generator`` (default: torch's global generator). quantize
   sees the float32 rounded to odd of the exact sum (see below), so the probability of rounding
   up is resolved to float32's spacing over A's, 2^-(23 - mantissa bits) (fp16: 2^-13), its
   last step set by the sticky bit.

Reduction orders
----------------
- ``matmul(a, b)``: a [M, K] @ b [K, N] -> [M, N], or batched a [B, M, K] @ b [B, K, N] ->
  [B, M, N], each batch entry its own accumulation. Products in the index order of K: chunk j
  holds K indices j*k .. j*k + k - 1.
- ``conv2d(x, w, stride, padding)``: x [N, C, H, W], w [O, C, kh, kw] -> [N, O, H', W'] (groups
  1, dilation 1, no bias). The reduction index runs over (kh, kw, c), c fastest, as an NHWC
  implicit-GEMM kernel reads it: chunk j holds positions j*k .. j*k + k - 1 of that order.
  Padding supplies zero operands, which take part in the products (0 x inf is NaN).
- ``conv2d_weight(x, dy, kernel_size, stride, padding)``: the weight gradient of that conv,
  x [N, C, H, W], dy [N, O, H', W'] -> dw [O, C, kh, kw]. Split-K over the batch, as a wgrad
  kernel splits it: each image's sum over its output positions (h', w') row-major (chunk j
  holds positions j*k .. j*k + k - 1) is one accumulation; the images' float32 results are
  then added in image order, in float32.

Exactness of the chunk sums
---------------------------
The chunk sums come from batched float64 GEMMs, in whatever order the BLAS adds. Let the
nonzero products of a chunk have their leading bits at most at 2^e_hi and their last nonzero
bits at least at 2^e_lo. Every partial sum of any subset of them is an integer multiple of
2^e_lo below k * 2^(e_hi + 1) in magnitude, so it fits float64's 53-bit significand, and the
GEMM's float64 sum is the exact sum in any order, when

    e_hi - e_lo + 1 + ceil(log2 k) <= 53    (the products span at most 53 - ceil(log2 k) bits).

It holds for k = 1 (a product has at most 48 bits), and for operands on low-precision grids:
e4m3 values are multiples of 2^-9 below 2^9, so their products span at most 36 bits (exact for
any k <= 2^17); bf16 x bf16 products have 16 significant bits (exact while their exponents span
at most 37 - ceil(log2 k) binades: 32 at k = 32); fp16 x fp16 products have 22 (31 - ceil(log2
k) binades). For general float32 operands (48-bit products) it fails: the float64 chunk sum
then differs from the exact one by at most about (k - 1) * 2^-53 * sum|p_i|, and the model's
result differs from the exact model only where acc + c_j lies that close to a rounding boundary
of A (a midpoint between two A values, or the overflow threshold); for stochastic rounding the
probability of rounding up moves by at most that distance over A's spacing.

One rounding to A
-----------------
The exact acc + c_j is held as s = acc + c_j in float64 (rounded to nearest) and its exact
error e (TwoSum). For every format but fp32 it goes to quantize as the float32 rounded to odd:
t = float32(s) where t is exact, else whichever of t and its neighbour toward the exact sum is
odd (the sign of (s - t) + e says which side; beyond float32's range +-max, which is odd).
Rounding a value rounded to odd with 24 bits to nearest in A is the correct rounding of the
exact value when A has at most 22 significant bits (Boldo and Melquiond: two bits to spare),
also in float32's subnormal range for A's with 8 exponent bits, whose smallest spacing 2^-147
is four float32 subnormal steps; hence A's of up to 21 mantissa bits (``MAX_MANTISSA_BITS``).
(quantize narrows a float64 input by round-to-odd as well, and round-to-odd at 53 bits then
at 24 is round-to-odd at 24; forming the float32 here, in the kernel that adds, spares a pass.)
Posits (n <= 16): each decision point between neighbours and each posit value has at most 15
significant bits (an even float32), so the round-to-odd value compares with each as the exact
sum does, and quantize's posit rounding is correct too. fp32 rounds s moved to odd (one unit
toward the exact sum where e != 0 and s is even) to nearest float32, 53 bits >= 24 + 2, and
rounds to nearest only (quantize does not round fp32). Block formats have no single element
grid: refused.

Efficiency
----------
The work runs in slices of images (conv2d), batch entries or rows (matmul) of about
``SLICE_BYTES`` of float64 buffers. Per slice: the operands chunked and zero-padded in float64,
the chunk index first (conv2d builds its im2col matrix directly in (kh, kw, c) order, one
strided copy per kernel tap), one batched float64 GEMM for all chunk sums, which it writes
chunk by chunk, each chunk's sums one contiguous row, then the one sequential loop over those
rows: ceil(K / k) steps (with promotion, each group of P in turn, then one float32 addition per
group), each an elementwise kernel (compiled once for large tensors, by common.dispatch's rule)
and a quantize call. For round-to-nearest into a float format or float32, large tensors take
FUSED_STEPS steps per compiled call instead, and what is left in calls of 4, 2 and 1 steps (sum,
round to odd and round to A, unrolled in one kernel: one pass over memory per call; the same
bits). At k = 1 (conv2d and matmul) the chunk sums are single products, and the fused
kernels form them as they go, from the two factors' rows (a weight value times an im2col row),
instead of a GEMM writing all K products of every output to a buffer that the steps read back:
1.8x faster on ResNet-20's PTQ forward pass (README, "Low-precision accumulation after
training"). conv2d_weight of a stride-1 conv, at k >= STRIDED_WGRAD_MIN_CHUNK (32), copies each
slice's padded input once per kernel column into float64 and reads kernel row i's im2col
columns from it as a strided view, one batched GEMM per chunk and kernel row, instead of
unfolding kh*kw copies (1.14x on a ResNet-20 training step with accumulation at k = 32).
The float64 GEMMs bound the speed from below at k > 1: they cost several float32
training steps. Nothing branches on tensor values, so the
functions also run inside a user's torch.compile. Results are float32 tensors that do not
require grad (training wraps the GEMMs in its own autograd Function).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import _quant_kernels as K
from . import dispatch
from .formats import Format, parse_format
from .quant import POSIT_STOCHASTIC_MAX_ES, ROUNDINGS, quantize

__all__ = ["Accumulator", "matmul", "conv2d", "conv2d_weight", "MAX_MANTISSA_BITS"]

# quantize rounds a float64 input correctly (round-to-odd to float32, then to nearest in A) for
# A's of up to 21 mantissa bits: 24 >= (21 + 1) + 2 (module docstring, "One rounding to A").
MAX_MANTISSA_BITS = 21
# Work buffers (operand chunks, chunk sums) per slice of images or rows: at most 32 MiB, below
# glibc's largest mmap threshold, so that they are reused from the heap instead of being mapped
# (and page-faulted) afresh per call, and large enough that each compiled step runs over many
# elements (README, "GEMM mode, accumulation": 8, 32 and 128 MiB measured).
SLICE_BYTES = 1 << 25
_OPERAND_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Chunk steps per compiled call on the fused path (Accumulator._fused_steps): fixed counts
# (FUSED_STEPS, then 4, 2, 1 for the rest), so a few compiled kernels serve every layer and
# chunk count (each unrolls its loop).
FUSED_STEPS = 8
# conv2d_weight reads a stride-1 conv's columns as strided views, one GEMM call per chunk and
# kernel row, from this chunk size up; below it the many small calls cost more than the
# unfolded copy they spare (README, "GEMM mode, accumulation": faster from k = 32 on).
STRIDED_WGRAD_MIN_CHUNK = 32


def _check_format(fmt: Format, rounding: str) -> None:
    """Refuse formats quantize cannot round a float64 sum to in one correct rounding."""
    accepted = (f"fp32 (rounding 'nearest'), eXmY floats of at most {MAX_MANTISSA_BITS} mantissa "
                f"bits (fp16, bf16, e5m7, e4m3, ...), posits")
    if fmt.is_block:
        raise ValueError(f"accumulator format {fmt} is a block format; accepted: {accepted}")
    if fmt.is_float and fmt.man_bits > MAX_MANTISSA_BITS:
        raise ValueError(f"accumulator format {fmt} has {fmt.man_bits} mantissa bits, too many "
                         f"to round a float64 sum to once; accepted: {accepted}")
    if fmt.is_identity and rounding != "nearest":
        raise ValueError(f"stochastic rounding of an fp32 accumulator is not emulated; "
                         f"accepted: {accepted}")
    if fmt.is_posit and rounding != "nearest" and fmt.es > POSIT_STOCHASTIC_MAX_ES:
        raise ValueError(f"stochastic rounding of {fmt} is refused by quantize; accepted: "
                         f"posits with es <= {POSIT_STOCHASTIC_MAX_ES}, or rounding='nearest'")


def _check_positive_int(value, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        none = "None or " if allow_none else ""
        raise ValueError(f"{name} must be {none}an int >= 1, got {value!r}")


@dataclass(frozen=True)
class Accumulator:
    """An emulated accumulator: format A (``fmt``), chunk width k (``chunk``), promotion to a
    float32 master every ``promote_every`` chunks (None: never), rounding "nearest" (ties to
    even) or "stochastic", overflow to inf (``saturate=False``, as quantize) or to +-max."""

    fmt: Union[str, Format]
    chunk: int
    promote_every: Optional[int] = None
    rounding: str = "nearest"
    saturate: bool = False

    def __post_init__(self):
        fmt = parse_format(self.fmt)
        object.__setattr__(self, "fmt", fmt)
        _check_positive_int(self.chunk, "chunk")
        _check_positive_int(self.promote_every, "promote_every", allow_none=True)
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; accepted: "
                             f"{', '.join(ROUNDINGS)}")
        if not isinstance(self.saturate, bool):
            raise ValueError(f"saturate must be True or False, got {self.saturate!r}")
        _check_format(fmt, self.rounding)

    def to_dict(self) -> dict:
        """JSON-able fields, for run records (``from_dict`` reads them back)."""
        return {"fmt": self.fmt.name, "chunk": self.chunk, "promote_every": self.promote_every,
                "rounding": self.rounding, "saturate": self.saturate}

    @classmethod
    def from_dict(cls, d: dict) -> "Accumulator":
        """Inverse of ``to_dict``."""
        return cls(d["fmt"], d["chunk"], d.get("promote_every"), d.get("rounding", "nearest"),
                   d.get("saturate", False))

    def short(self) -> str:
        """Compact name for run names, e.g. 'fp16-k32-p4', 'bf16-k1-sr-sat'."""
        s = f"{self.fmt.name}-k{self.chunk}"
        if self.promote_every is not None:
            s += f"-p{self.promote_every}"
        if self.rounding == "stochastic":
            s += "-sr"
        if self.saturate:
            s += "-sat"
        return s

    def matmul(self, a: torch.Tensor, b: torch.Tensor,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """a [M, K] @ b [K, N] -> [M, N] float32, or batched [B, M, K] @ [B, K, N] ->
        [B, M, N], accumulated as the module docstring says (K in index order)."""
        _check_operands(a, b)
        if a.dim() != b.dim() or a.dim() not in (2, 3) or a.shape[-1] != b.shape[-2] or (
                a.dim() == 3 and a.shape[0] != b.shape[0]):
            raise ValueError(f"matmul takes [M, K] @ [K, N] or [B, M, K] @ [B, K, N], got "
                             f"{tuple(a.shape)} @ {tuple(b.shape)}")
        nchunks, groups = self._plan(a.shape[-1])
        m, n = a.shape[-2], b.shape[-1]
        if a.dim() == 3 and self.chunk == 1:  # the products formed by the steps
            parts = []
            for lo, hi in _slices(a.shape[0], nchunks * (m + n) * 8 + m * n * 4):
                rows = (self._chunks(a[lo:hi], 2, nchunks).view(nchunks, hi - lo, m),
                        self._chunks(b[lo:hi], 1, nchunks).view(nchunks, hi - lo, n))
                parts.append(self._accumulate(rows, groups, generator).view(hi - lo, m, n))
        elif a.dim() == 3:  # slices of batch entries
            entry_bytes = nchunks * (m * self.chunk + self.chunk * n + m * n) * 8
            parts = []
            for lo, hi in _slices(a.shape[0], entry_bytes):
                sums = _steps_buffer(a, nchunks, (hi - lo, m, n))
                torch.matmul(self._chunks(a[lo:hi], 2, nchunks),            # [J, b, M, k]
                             self._chunks(b[lo:hi], 1, nchunks),            # [J, b, k, N]
                             out=sums.view(nchunks, hi - lo, m, n))
                parts.append(self._accumulate(sums, groups, generator).view(hi - lo, m, n))
        elif self.chunk == 1:  # the products formed by the steps, in slices of rows
            b_rows = self._chunks(b, 0, nchunks).view(nchunks, n)           # [J, N]
            parts = []
            for lo, hi in _slices(m, nchunks * 8 + n * 4):
                a_rows = self._chunks(a[lo:hi], 1, nchunks).view(nchunks, hi - lo)
                parts.append(self._accumulate((a_rows, b_rows), groups, generator)
                             .view(hi - lo, n))
        else:  # slices of rows, one chunked b
            b_chunks = self._chunks(b, 0, nchunks)                          # [J, k, N]
            row_bytes = nchunks * (self.chunk + n) * 8
            parts = []
            for lo, hi in _slices(m, row_bytes):
                sums = _steps_buffer(a, nchunks, (hi - lo, n))
                torch.bmm(self._chunks(a[lo:hi], 1, nchunks), b_chunks,          # [J, m, N]
                          out=sums.view(nchunks, hi - lo, n))
                parts.append(self._accumulate(sums, groups, generator).view(hi - lo, n))
        return _cat(parts)

    def _chunks(self, t: torch.Tensor, dim: int, nchunks: int) -> torch.Tensor:
        """t as float64 [J, ...] with its dim ``dim`` zero-padded to nchunks * k and cut into
        chunks of k, the chunk index first (the order the accumulation steps through), in one
        copy: chunk j holds t's indices j*k .. j*k + k - 1 along dim."""
        k, size = self.chunk, t.shape[dim]
        shape = list(t.shape)
        shape[dim] = k
        out = t.new_empty((nchunks, *shape), dtype=torch.float64)
        full, rest = divmod(size, k)
        if full:
            out[:full].movedim(0, dim).copy_(t.detach().narrow(dim, 0, full * k)
                                             .unflatten(dim, (full, k)))
        if rest:
            out[full].narrow(dim, 0, rest).copy_(t.detach().narrow(dim, full * k, rest))
            out[full].narrow(dim, rest, k - rest).zero_()
        out[full + (rest > 0):].zero_()   # whole chunks of padding (equal promotion groups)
        return out

    def conv2d(self, x: torch.Tensor, w: torch.Tensor, stride: Union[int, Tuple[int, int]] = 1,
               padding: Union[int, Tuple[int, int]] = 0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """conv2d(x [N, C, H, W], w [O, C, kh, kw]) -> [N, O, H', W'] float32 (groups 1, no
        bias; a view of an [O, N, H', W'] tensor), accumulated over (kh, kw, c), c fastest, as
        the module docstring says."""
        _check_operands(x, w)
        if x.dim() != 4 or w.dim() != 4 or x.shape[1] != w.shape[1]:
            raise ValueError(f"conv2d takes x [N, C, H, W] and w [O, C, kh, kw], got "
                             f"{tuple(x.shape)} and {tuple(w.shape)}")
        stride, padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
        n, c, h, wd = x.shape
        o, _, kh, kw = w.shape
        out_h = (h + 2 * padding[0] - kh) // stride[0] + 1
        out_w = (wd + 2 * padding[1] - kw) // stride[1] + 1
        nchunks, groups = self._plan(c * kh * kw)
        w_chunks = self._chunks(w.permute(0, 2, 3, 1).flatten(1), 1, nchunks)   # [J, O, k]
        # images as [C, N, H, W] with their padding: each tap's window is then a strided view
        # in the channel-major order of the im2col rows below
        x_cn = F.pad(x.detach().transpose(0, 1),
                     (padding[1], padding[1], padding[0], padding[0])).contiguous()
        if self.chunk == 1:  # per image: im2col columns (float64), the accumulator (float32)
            image_bytes = (nchunks * 8 + o * 4) * out_h * out_w
        else:                # per image: im2col columns and chunk sums (float64)
            image_bytes = nchunks * (self.chunk + o) * out_h * out_w * 8
        parts = [self._conv_images(x_cn[:, lo:hi], w_chunks, (kh, kw), stride, (out_h, out_w),
                                   groups, generator) for lo, hi in _slices(n, image_bytes)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)               # [O, N, L]
        return out.transpose(0, 1).unflatten(2, (out_h, out_w))

    def _conv_images(self, x_cn: torch.Tensor, w_chunks: torch.Tensor, kernel: Tuple[int, int],
                     stride: Tuple[int, int], out_size: Tuple[int, int], groups: int,
                     generator: Optional[torch.Generator]) -> torch.Tensor:
        """conv2d of padded images x_cn [C, n, Hp, Wp] with the chunked weight [J, O, k] ->
        [O, n, L]: one batched GEMM over the chunks into the order the steps read."""
        c, n = x_cn.shape[:2]
        (out_h, out_w), (sh, sw) = out_size, stride
        nchunks = w_chunks.shape[0]
        # the im2col matrix [K, n, L] with K in (kh, kw, c) order, zero-padded to whole chunks:
        # one strided copy per kernel tap
        cols = x_cn.new_empty((nchunks * self.chunk, n, out_h, out_w), dtype=torch.float64)
        for tap, (i, j) in enumerate(itertools.product(range(kernel[0]), range(kernel[1]))):
            cols[tap * c:(tap + 1) * c] = x_cn[:, :, i:i + sh * (out_h - 1) + 1:sh,
                                               j:j + sw * (out_w - 1) + 1:sw]
        cols[kernel[0] * kernel[1] * c:].zero_()
        if self.chunk == 1:  # the steps form the products: no chunk sums buffer
            rows = (w_chunks.view(nchunks, -1), cols.view(nchunks, -1))     # [J, O], [J, n*L]
            return self._accumulate(rows, groups, generator).view(w_chunks.shape[1], n, -1)
        sums = _steps_buffer(cols, nchunks, (w_chunks.shape[1], n * out_h * out_w))
        torch.bmm(w_chunks, cols.view(nchunks, self.chunk, -1),              # [J, O, n*L]
                  out=sums.view(nchunks, w_chunks.shape[1], -1))
        return self._accumulate(sums, groups, generator).view(w_chunks.shape[1], n, -1)

    def conv2d_weight(self, x: torch.Tensor, dy: torch.Tensor,
                      kernel_size: Union[int, Tuple[int, int]],
                      stride: Union[int, Tuple[int, int]] = 1,
                      padding: Union[int, Tuple[int, int]] = 0,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The weight gradient of conv2d(x [N, C, H, W], w [O, C, kh, kw]) from dy [N, O, H', W']
        -> dw [O, C, kh, kw] float32 (groups 1, dilation 1): the wgrad GEMM, reducing over each
        image's output positions (h', w') row-major, as the module docstring says; the images'
        float32 results are then added in image order (split-K over the batch)."""
        _check_operands(x, dy)
        kernel = _pair(kernel_size, "kernel_size", 1)
        stride, padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
        if x.dim() != 4 or dy.dim() != 4 or x.shape[0] != dy.shape[0] or \
                tuple(dy.shape[2:]) != _conv_out_size(x.shape[2:], kernel, stride, padding):
            raise ValueError(f"conv2d_weight takes x [N, C, H, W] and dy [N, O, H', W'] of that "
                             f"conv's output size, got {tuple(x.shape)} and {tuple(dy.shape)}")
        n, c = x.shape[:2]
        o, (ho, wo), (kh, kw) = dy.shape[1], dy.shape[2:], kernel
        dy_rows = dy.detach().flatten(2).transpose(1, 2)                   # [N, L, O]
        if stride != (1, 1) or self.chunk < STRIDED_WGRAD_MIN_CHUNK:
            # the im2col columns [N, (c, kh, kw), L], one batched matmul over the images
            cols = F.unfold(x.detach(), kernel, padding=padding, stride=stride)
            per_image = self.matmul(cols, dy_rows, generator)             # [N, C*kh*kw, O]
            dw = _sum_in_order(per_image, 0)
            return dw.view(c, kh, kw, o).permute(3, 0, 1, 2)
        # stride 1: the padded input cut per kernel column j, [n, C, kw, Hp, W'] in float64, in
        # which kernel row i's columns [n, (c, j), L] are a strided view (rows i .. i + H' - 1):
        # the chunks' GEMMs read them where they lie, with no unfolded copy
        nchunks, groups = self._plan(ho * wo)
        rows = ho + kh - 1
        item_bytes = (c * kw * rows * wo + nchunks * self.chunk * o + nchunks * c * kw * o) * 8
        totals = [None] * kh
        for lo, hi in _slices(n, item_bytes):
            xp = F.pad(x.detach()[lo:hi], (padding[1], padding[1], padding[0], padding[0]))
            by_column = xp.new_empty((hi - lo, c, kw, rows, wo), dtype=torch.float64)
            for j in range(kw):
                by_column[:, :, j] = xp[:, :, :, j:j + wo]
            dy_chunks = self._chunks(dy_rows[lo:hi], 1, nchunks)           # [J, n, k, O]
            for i in range(kh):
                x_rows = by_column[:, :, :, i:i + ho].reshape(hi - lo, c * kw, ho * wo)
                sums = _steps_buffer(by_column, nchunks, (hi - lo, c * kw, o))
                for step in range(nchunks):
                    first = step * self.chunk
                    width = min(self.chunk, ho * wo - first)
                    if width <= 0:   # whole chunks of padding
                        sums[step:].zero_()
                        break
                    torch.bmm(x_rows[:, :, first:first + width], dy_chunks[step, :, :width],
                              out=sums[step].view(hi - lo, c * kw, o))
                per_image = self._accumulate(sums, groups, generator).view(hi - lo, c * kw, o)
                totals[i] = _sum_in_order(per_image, 0, totals[i])
        return torch.stack(totals).view(kh, c, kw, o).permute(3, 1, 0, 2)

    def _plan(self, k_total: int) -> Tuple[int, int]:
        """(chunks after zero padding, promotion groups): every group holds the same number of
        chunks, so the groups accumulate side by side."""
        nchunks = max(1, -(-k_total // self.chunk))
        per_group = nchunks if self.promote_every is None else min(self.promote_every, nchunks)
        groups = -(-nchunks // per_group)
        return groups * per_group, groups

    def _accumulate(self, rows, groups: int,
                    generator: Optional[torch.Generator]) -> torch.Tensor:
        """Chunk sums -> the float32 results [X]: each group of J / groups consecutive chunks
        accumulates in A, then the groups add into the float32 master in order. ``rows``: the
        float64 chunk sums [J, X] (``_steps_buffer``), or at k = 1 the factors (a [J, M],
        b [J, N]) in float64, whose outer products a[j] b[j]^T, exact in float64, are the
        chunk sums (X = M * N; batched: a [J, B, M], b [J, B, N], X = B * M * N, one outer
        product per entry): the steps form them, so no [J, X] buffer is written and read."""
        per_group = _row_count(rows) // groups
        master = None
        for group in range(groups):
            part = _row_range(rows, group * per_group, (group + 1) * per_group)
            acc = _positive_zero(self._steps(part, generator))
            master = acc if master is None else master + acc   # the first: +0 + acc
        return master

    def _steps(self, rows, generator: Optional[torch.Generator]) -> torch.Tensor:
        """acc = round_A(acc + row) for each row of ``rows`` ([P, X] sums or factors, as in
        ``_accumulate``) in order, from acc = +0: on the fused path in compiled calls of
        FUSED_STEPS rows, then of 4, 2 and 1 for what is left (one kernel per row count); one
        step at a time elsewhere. The same bits."""
        products = isinstance(rows, tuple)
        size = rows[0][0].numel() * rows[1].shape[-1] if products else rows.shape[1]
        acc = rows[0].new_zeros(size, dtype=torch.float32)   # A is in float32
        done, fused = 0, self._fused_kernel(acc, products)
        if fused is not None:
            done, acc = self._fused_steps(acc, rows, *fused)
        for step in range(done, _row_count(rows)):
            row = _outer(rows[0][step], rows[1][step]).view(-1) if products else rows[step]
            acc = self._add_round(acc, row, generator)
        return acc

    def _fused_kernel(self, acc: torch.Tensor, products: bool) -> Optional[tuple]:
        """(name, kernel, extra args, strict) of the fused kernel, which runs several chunk
        steps per call (sum, round to odd, round to A in one pass over memory instead of two
        kernels per step; with ``products``, forming each step's products too), where it
        applies: round-to-nearest into a float format or float32, on tensors the compiled
        kernels serve (common.dispatch's rule). None elsewhere."""
        if self.rounding != "nearest" or self.fmt.is_posit or (
                self.fmt.is_identity and self.saturate):
            return None
        path = dispatch.resolve_path("auto")
        if not dispatch.use_compiled(path, acc.numel(), acc.device, dispatch.EAGER_BITS_BELOW):
            return None
        strict = path == "compiled"
        if self.fmt.is_identity:
            if products:
                return "fused_fp32_products", _k_fused_fp32_products, (), strict
            return "fused_fp32", _k_fused_fp32, (), strict
        params = (dispatch.param_tensor(self.fmt, self.saturate, acc.device, "bits"),)
        if products:
            return "fused_float_products", _k_fused_float_products, params, strict
        return "fused_float", _k_fused_float, params, strict

    @staticmethod
    def _fused_steps(acc: torch.Tensor, rows, name: str, kernel, params: tuple,
                     strict: bool) -> Tuple[int, torch.Tensor]:
        """The rows (sums or factors) added into acc by the compiled kernel: runs of
        FUSED_STEPS rows, then runs of 4, 2 and 1 (each run length its own compiled kernel,
        whose loop dynamo unrolls). Returns (rows done, acc): (0, acc) where the kernel cannot
        compile (the caller then steps through every row, with the same bits)."""
        done, run, count = 0, FUSED_STEPS, _row_count(rows)
        while done < count:
            while done + run > count:
                run //= 2
            block = _row_range(rows, done, done + run)
            block = block if isinstance(block, tuple) else (block,)
            # batched factors (rank 3) trace another graph: their own key
            kind = f"{name}_batched" if block[0].dim() == 3 else name
            key = ("accumulate", kind, f"rows{run}", acc.device.type)
            out = dispatch.run_compiled(key, kernel, (acc, *block, *params), strict=strict)
            if out is None:
                return 0, acc.new_zeros(acc.shape)
            done, acc = done + run, out
        return done, acc

    def _add_round(self, acc: torch.Tensor, chunk_sum: torch.Tensor,
                   generator: Optional[torch.Generator]) -> torch.Tensor:
        """round_A(acc + chunk_sum) with one rounding, as float32 (-0 where A rounds a small
        negative sum to zero: it adds as +0 does, and the end reads it as +0)."""
        if self.fmt.is_identity:  # round the float64 sum rounded to odd: 53 bits >= 24 + 2
            total = _elementwise(_sum_to_nearest32, acc, chunk_sum)
            return torch.clamp(total, -self.fmt.max, self.fmt.max) if self.saturate else total
        # a float32 that rounds to A as the exact sum does: at most 22 significant bits in A,
        # 24 >= 22 + 2 (module docstring)
        total = _elementwise(_sum_to_odd32, acc, chunk_sum)
        return quantize(total, self.fmt, self.rounding, self.saturate, generator)


def _steps_buffer(like: torch.Tensor, nchunks: int, shape: Tuple[int, ...]) -> torch.Tensor:
    """A fresh float64 [J, X] buffer for the chunk sums (X = the product of shape), which the
    GEMM fills through a view: each step reads one contiguous row of this 2-D base, so the
    compiled kernels see one rank and stride pattern whatever the layer's shapes (dynamo
    guards on a view's base too; a kernel that it recompiles per shape runs out of recompiles
    and falls back to eager)."""
    return like.new_empty((nchunks, math.prod(shape)), dtype=torch.float64)


def _sum_in_order(t: torch.Tensor, dim: int,
                  total: Optional[torch.Tensor] = None) -> torch.Tensor:
    """t's slices along dim added one by one in index order onto ``total`` (None: from the
    first slice), in t's dtype (float32: the images' results of a GEMM split over the batch)."""
    for index in range(t.shape[dim]):
        total = t.select(dim, index) if total is None else total + t.select(dim, index)
    return total


def _conv_out_size(size, kernel, stride, padding) -> Tuple[int, int]:
    return tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(size, kernel, stride, padding))


def _row_count(rows) -> int:
    """The number of chunk steps in ``rows``: chunk sums [J, X] or factors ([J, M], [J, N])."""
    return rows[0].shape[0] if isinstance(rows, tuple) else rows.shape[0]


def _row_range(rows, lo: int, hi: int):
    """Steps lo .. hi - 1 of ``rows`` (chunk sums or factors)."""
    return tuple(t[lo:hi] for t in rows) if isinstance(rows, tuple) else rows[lo:hi]


def _positive_zero(t: torch.Tensor) -> torch.Tensor:
    """float32 t with -0 replaced by +0, on the bit pattern: inductor compiles its CPU kernels
    with -fno-signed-zeros, which lets the C++ compiler fold a float test for zero away."""
    bits = t.view(torch.int32)
    return torch.where(bits == K.F32_SIGN_BIT, 0, bits).view(torch.float32)


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s, err): s = a + b rounded to nearest, err = a + b - s exactly (Knuth's TwoSum; finite
    inputs whose sum does not overflow)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _sum_to_odd32(acc: torch.Tensor, chunk_sum: torch.Tensor) -> torch.Tensor:
    """acc (float32) + chunk_sum (float64) rounded to odd at float32's 24 bits: the exact sum
    where float32 holds it, else whichever of its two float32 neighbours is odd (beyond float32's
    range +-max, odd). inf and NaN pass through.

    t = float32(s) is one neighbour (s: the float64 sum), and s lies in the same float32
    interval as the exact sum (float32's grid is part of float64's, and the exact sum is within
    half a float64 unit of s), so (s - t) + err has the sign of exact - t and is 0 only where
    t is exact; adjacent float32 patterns alternate odd and even, so an even inexact t steps one
    pattern toward the exact sum."""
    a = acc.to(torch.float64)
    s, err = _two_sum(a, chunk_sum)
    t = s.to(torch.float32)
    residual = (s - t.to(torch.float64)) + err
    bits = t.view(torch.int32)
    fix = (residual != 0) & ((bits & 1) == 0) & torch.isfinite(s)
    up = (residual > 0) != (bits < 0)  # toward the exact sum = up in magnitude
    return torch.where(fix, torch.where(up, bits + 1, bits - 1), bits).view(torch.float32)


def _sum_to_nearest32(acc: torch.Tensor, chunk_sum: torch.Tensor) -> torch.Tensor:
    """acc + chunk_sum rounded once to nearest float32 (IEEE overflow to inf): the float64 sum
    rounded to odd (the nearest sum s, moved one unit toward the exact sum where TwoSum's error
    is nonzero and s is even), then rounded to float32. inf and NaN pass through."""
    s, err = _two_sum(acc.to(torch.float64), chunk_sum)
    bits = s.view(torch.int64)
    fix = (err != 0) & ((bits & 1) == 0) & torch.isfinite(s)
    up = (err > 0) == (s > 0)  # s != 0 where err != 0
    odd = torch.where(fix, torch.where(up, bits + 1, bits - 1), bits).view(torch.float64)
    return odd.to(torch.float32)


def _k_fused_float(acc: torch.Tensor, block: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """One chunk step per row of block: acc = round_A(acc + block[s]) for s in order, A a
    float format with kernel parameters p (round to nearest even,
    _quant_kernels.float_nearest)."""
    for step in range(block.shape[0]):
        total = _sum_to_odd32(acc, block[step])
        acc = K.float_nearest(total.view(torch.int32), dispatch.unpack(p)).view(torch.float32)
    return acc


def _k_fused_fp32(acc: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """One chunk step per row of block into a float32 accumulator (one rounding each)."""
    for step in range(block.shape[0]):
        acc = _sum_to_nearest32(acc, block[step])
    return acc


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., M] and b [..., N] (float64) -> their products [..., M, N], exact in float64."""
    return a.unsqueeze(-1) * b.unsqueeze(-2)


def _k_fused_float_products(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                           p: torch.Tensor) -> torch.Tensor:
    """_k_fused_float at k = 1 with the chunk sums formed here: step s adds the products
    a[s, .., m] * b[s, .., n] (float64, exact) into acc [(B *) M * N]."""
    acc = acc.view(*a.shape[1:], b.shape[-1])
    for step in range(a.shape[0]):
        total = _sum_to_odd32(acc, _outer(a[step], b[step]))
        acc = K.float_nearest(total.view(torch.int32), dispatch.unpack(p)).view(torch.float32)
    return acc.view(-1)


def _k_fused_fp32_products(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """_k_fused_fp32 at k = 1 with the products formed here (as _k_fused_float_products)."""
    acc = acc.view(*a.shape[1:], b.shape[-1])
    for step in range(a.shape[0]):
        acc = _sum_to_nearest32(acc, _outer(a[step], b[step]))
    return acc.view(-1)


def _elementwise(kernel, acc: torch.Tensor, chunk_sum: torch.Tensor) -> torch.Tensor:
    """kernel(acc, chunk_sum): one compiled kernel for large tensors, by dispatch's rule and
    cache for quantize's bit arithmetic; eager ops for small ones, where compiling fails, and
    inside a user's torch.compile. The same bits either way."""
    path = dispatch.resolve_path("auto")
    if dispatch.use_compiled(path, acc.numel(), acc.device, dispatch.EAGER_BITS_BELOW):
        key = ("accumulate", kernel.__name__.strip("_"), acc.device.type)
        y = dispatch.run_compiled(key, kernel, (acc, chunk_sum), strict=path == "compiled")
        if y is not None:
            return y
    return kernel(acc, chunk_sum)


def _slices(count: int, item_bytes: int) -> list:
    """[(lo, hi)] ranges covering range(count), each holding about SLICE_BYTES of float64 work
    buffers (at least one item): small buffers are reused from the heap and stay in cache."""
    step = max(1, SLICE_BYTES // max(item_bytes, 1))
    return [(lo, min(lo + step, count)) for lo in range(0, max(count, 1), step)]


def _cat(parts: list) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _check_operands(a, b) -> None:
    for t in (a, b):
        if not isinstance(t, torch.Tensor) or t.dtype not in _OPERAND_DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"operands must be float32, float16 or bfloat16 tensors (their "
                             f"products are exact in float64), got {got}")


def _pair(value, name: str, least: int) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < least
                             for v in pair):
        raise ValueError(f"{name} must be an int >= {least} or a pair of them, got {value!r}")
    return pair


def matmul(a: torch.Tensor, b: torch.Tensor, acc: Accumulator,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``acc.matmul(a, b)``."""
    return acc.matmul(a, b, generator)


def conv2d(x: torch.Tensor, w: torch.Tensor, stride: Union[int, Tuple[int, int]],
           padding: Union[int, Tuple[int, int]], acc: Accumulator,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``acc.conv2d(x, w, stride, padding)``."""
    return acc.conv2d(x, w, stride, padding, generator)


def conv2d_weight(x: torch.Tensor, dy: torch.Tensor, kernel_size: Union[int, Tuple[int, int]],
                  stride: Union[int, Tuple[int, int]], padding: Union[int, Tuple[int, int]],
                  acc: Accumulator, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``acc.conv2d_weight(x, dy, kernel_size, stride, padding)``."""
    return acc.conv2d_weight(x, dy, kernel_size, stride, padding, generator)
