"""Block-scaled formats: OCP MX (mxfp8, mxfp6, mxfp4, mx<k>-<elem>) and NVFP4.

``quantize(x, "mxfp4")`` lands here (common/quant.py routes every block Format to
``quantize_block``); which path a call takes, eager ops or a compiled kernel, is decided by
common/dispatch.py, as for every other format. A block format stores small elements plus one
shared scale per block of k consecutive elements; emulated like every other format, the result
is float32 (x's dtype), every element exactly element_value * block_scale (* tensor_scale for
NVFP4). The rules are the
project's number-format contract ("Block-scaled formats"), written up for users in
docs/block-formats.md.

Blocks run along dim 1 (conv weight [C_out, C_in, kh, kw]: C_in; activation [N, C, H, W]: C;
Linear weight [out, in]: in; input [N, features]: features), the reduction dimension of the
forward GEMM. A 1-D tensor is blocked along its only dim; a 0-d tensor is refused (it has no
dim 1 and no block). When dim 1 is not a multiple of k the last block is shorter: it holds its
own elements only (computed on a zero-padded copy: zeros change no block's absolute maximum;
traced into a user's torch.compile, the full blocks and the short one are cast apart instead,
with the same bits, see ``_split_cast``: inductor miscompiles the pad-then-slice form).
``quantize_tiles`` casts a layout its caller has made, one scale per n elements along its
dim 1 (2D k x k weight blocks, common/operands.py), with the same kernels.

Each cast is three small steps, as in torchao's float8 utilities (amax -> scale -> cast):
1. the block's absolute maximum (``_block_amax``);
2. its scale: MX ``mx_scale_exponent`` (E8M0: 2^(floor(log2 amax) - emax_elem), clamped to
   [-127, 127]), NVFP4 ``nvfp4_tensor_scale`` and ``nvfp4_block_scale``;
3. the element cast, with the exact float kernels of common/_quant_kernels.py (round to nearest
   even or stochastic, saturating at the element's max), then the scale put back.

MX casts on float32 bit patterns with integer arithmetic, like the other kernels of this
project: dividing by a power of two is a subtraction on the exponent field (``mx_scale_down``),
multiplying back an addition (``mx_scale_up``), both exact also where a float32 subnormal comes
in or goes out. Its only float operations are the block maximum (a comparison) and one product
of normals with a normal result, so no flush-to-zero mode of any back-end can change a bit.
NVFP4's scales are not powers of two: it follows the contract's float32 formula in its exact
order, which is torchao's (``nvfp4_quantize`` with a per-tensor scale), so it is bit-for-bit
testable.

Special values. MX: a block holding NaN or inf becomes NaN as a whole (its E8M0 scale is the NaN
code 0xFF). NVFP4: NaN or inf anywhere makes the per-tensor scale g non-finite, and the formula
then gives NaN for the whole tensor (torchao computes the same). A zero element gives 0 even
where a tiny tensor amax makes (1/g) / s overflow to inf (0 * inf would be NaN). The NaN is
float32's default quiet NaN. -0.0 stays -0.0.

Rounding ("nearest" or "stochastic") applies to the elements; the scales are always computed
deterministically. Stochastic rounding draws its random bits from the element's position in
memory in the layout the blocks are computed in (x's own layout; a zero-padded copy when dim 1
is not a multiple of k and longer than k), like quantize's other formats.

Where torchao differs (the contract is followed; tests/test_blocks.py checks both sides):
- MX blocks whose scale exponent is -127 (an all-zero block, or amax below 2^(emax-126), e.g.
  2^-118 for e4m3): torchao divides by 2^-126 (it clamps the float32 scale to the smallest
  normal) but multiplies back by the stored 2^-127, so it returns about half of each value;
  here x / 2^-127 is rounded and multiplied by 2^-127, as the OCP spec defines the value.
- MX blocks holding inf: torchao computes a finite scale from inf's exponent field; the inf
  element comes back inf and the block's finite values 0. The contract makes the block NaN
  (a fake-quantized tensor never hides a divergence).
- NVFP4 all-zero tensor: torchao's g = 0 gives 0/0 = NaN everywhere; the contract uses g = 1
  (zeros stay zeros).

Inputs: float32; float16 and bfloat16 for MX (every MX result of such a tensor fits its dtype
exactly: at most 7 significant bits, within the block's binade, on the input's own grid at the
small end), not for NVFP4 (its float32 products do not fit them: refused, asking for float32);
float64 is narrowed to float32 by round-to-odd first, as quantize does for every format.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _quant_kernels as K
from . import dispatch
from .dispatch import unpack
from .formats import E2M1_MAX, E4M3_MAX, E8M0_MAX_EXP, E8M0_MIN_EXP, Format, parse_format

__all__ = ["quantize_block", "quantize_tiles", "mx_scale_exponent", "mx_scale_down",
           "mx_scale_up", "nvfp4_tensor_scale", "nvfp4_block_scale", "F4_E2M1_MAX",
           "E4M3_MIN_NORMAL", "NVFP4_TENSOR_DIVISOR"]

F4_E2M1_MAX = E2M1_MAX  # 6.0, NVFP4's element max (torchao: F4_E2M1_MAX)
E4M3_MIN_NORMAL = 2.0**-6  # NVFP4 block scales are clamped to [2^-6, 448]: no e4m3 subnormals
NVFP4_TENSOR_DIVISOR = E4M3_MAX * F4_E2M1_MAX  # g = amax / 2688 maps amax to 448 * 6
_E4M3 = parse_format("e4m3")
_E2M1 = parse_format("e2m1")


# ---------------------------------------------------------------------------------------------
# layout: a [M, kk, R] view whose middle dim is one block
# ---------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor):
    """x (float32, at least 1-D) as [A, C, R], x's memory in order with C = x's dim 1, and a
    function that maps a contiguous result of that shape back to x's shape and memory format.

    Contiguous x: A = dim 0, R = the product of the dims after 1; channels-last 4-D x:
    A = N*H*W, R = 1 (a view, no copy); 1-D x: A = R = 1; any other layout is copied
    contiguous first.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        n, c, h, w = x.shape
        x3 = x.permute(0, 2, 3, 1).reshape(n * h * w, c, 1)  # a view: memory is NHWC

        def to_x(y3):
            return y3.view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        x = x.contiguous()
        shape = x.shape
        if x.dim() == 1:
            x3 = x.view(1, shape[0], 1)
        else:
            x3 = x.view(shape[0], shape[1], -1)

        def to_x(y3):
            return y3.view(shape)
    return x3, to_x


def _ragged(c: int, k: int) -> bool:
    """Whether rows of c elements end in a short block after at least one full one."""
    return c > k and c % k != 0


def _block_layout(x: torch.Tensor, k: int):
    """x (float32, at least 1-D) as a contiguous [M, kk, R] tensor whose dim 1 runs along one
    block (kk = k, or dim 1's whole length when that is at most k), and a function that maps a
    result of that shape back to x's shape and memory format.

    x's rows [A, C, R] (``_rows``) with C cut into blocks of k; a C above k that k does not
    divide is zero-padded to the next multiple (a copy), and the padding is cut off the result.
    """
    x3, to_x = _rows(x)
    a, c, r = x3.shape
    if c <= k:
        return x3, to_x
    nb = -(-c // k)
    if nb * k != c:
        x3 = F.pad(x3, (0, 0, 0, nb * k - c))  # zeros: no block's amax changes

        def to_x_cut(y3, to_x=to_x):
            return to_x(y3.view(a, nb * k, r)[:, :c, :].contiguous())
        return x3.view(a * nb, k, r), to_x_cut
    return x3.view(a * nb, k, r), lambda y3: to_x(y3.view(a, c, r))


# ---------------------------------------------------------------------------------------------
# step 1: the block's absolute maximum
# ---------------------------------------------------------------------------------------------
def _block_amax(x: torch.Tensor) -> torch.Tensor:
    """|x|'s maximum over each block (dim -2: [M, kk, R], or [A, nb, k, R] in ``_split_cast``),
    keepdim, float32; NaN propagates. (A float reduction: inductor's CPU code for an int32
    maximum over a short inner dim is much slower.)"""
    return x.abs().amax(dim=-2, keepdim=True)


# ---------------------------------------------------------------------------------------------
# MX: E8M0 scale, element cast on the exponent field
# ---------------------------------------------------------------------------------------------
def mx_scale_exponent(amax_bits: torch.Tensor, emax) -> torch.Tensor:
    """E8M0 exponent e of each block's scale X = 2^e: floor(log2 amax) - emax (OCP MX v1.0,
    section 6.3; emax = exponent of the element's largest normal), clamped to [-127, 127].

    From amax's float32 exponent field, which is floor(log2 amax) + 127 for a normal amax. A
    zero or subnormal amax (field 0) gives -127 - emax < -127 and clamps to -127: the all-zero
    block's X = 2^-127 of the contract, and below 2^-126 floor(log2 amax) - emax < -127 anyway.
    Every element has emax >= 1, so no finite amax reaches the upper clamp (inf/NaN blocks
    become NaN elsewhere).
    """
    return torch.clamp((amax_bits >> K.F32_MAN_BITS) - K.F32_BIAS - emax, E8M0_MIN_EXP,
                       E8M0_MAX_EXP)


def _pow2_bits(k: torch.Tensor) -> torch.Tensor:
    """The float32 pattern of 2^k for k in [-126, 127]."""
    return (k + K.F32_BIAS) << K.F32_MAN_BITS


def mx_scale_down(mag: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """|x| / 2^e as a float32 pattern (mag: |x|'s pattern): exact where the quotient is a
    float32 normal, which covers every quotient that can round to a nonzero element.

    Normal x: subtract e from the exponent field. A quotient below 2^-126 becomes 0: it rounds
    to 0 in every element format of at most 8 bits (their smallest subnormal is 2^-62 or more;
    stochastic rounding resolves probabilities to 2^-30 of it, see float_stochastic).
    Subnormal x = m * 2^-149: m * 2^(-149 - e) is a normal when e <= -24 (m converted to float32
    exactly and scaled by a normal power of two, no subnormal operand), and below 2^-103 (so 0)
    otherwise.
    """
    field = mag >> K.F32_MAN_BITS
    normal = torch.where(field > e, mag - (e << K.F32_MAN_BITS), 0)
    m = (mag & K.F32_MAN_MASK).to(torch.float32)
    scale = _pow2_bits(torch.clamp(-149 - e, min=-126, max=127)).view(torch.float32)
    sub = torch.where(e <= -24, (m * scale).view(torch.int32), 0)
    return torch.where(field > 0, normal, sub)


def mx_scale_up(q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """q * 2^e as a float32 pattern (q: an element value's pattern, sign included), exactly.

    Element values are 0 or float32 normals (at least 2^-62). A product of at least 2^-126 is
    an addition to the exponent field; a smaller one is the significand shifted into a
    subnormal pattern, and the bits shifted out are 0: q was rounded from x / 2^e with x on
    float32's grid (multiples of 2^-149), so q is either x / 2^e itself or a multiple of an
    element quantum coarser than 2^(-149 - e), and q * 2^e lies on float32's grid either way.
    """
    mag = q & K.F32_ABS_MASK
    field = mag >> K.F32_MAN_BITS
    out_field = field + e
    normal = mag + (e << K.F32_MAN_BITS)
    sig = (mag & K.F32_MAN_MASK) | (1 << K.F32_MAN_BITS)
    sub = sig >> torch.clamp(1 - out_field, min=0, max=31)
    out = torch.where(mag == 0, 0, torch.where(out_field > 0, normal, sub))
    return out | (q ^ mag)


def _mx_round(x, bits, p, emax, rand=None):
    """MX cast of float32 [M, kk, R] (blocks along dim -2; `bits`: the same memory as int32)
    to int32 patterns: amax -> E8M0 scale -> element cast of x / X (nearest, or stochastic with
    `rand`) -> times X, on the bit patterns. A block holding NaN or inf: NaN.
    (x and its patterns come in as two views: a bitcast inside an inductor CPU kernel made
    the whole kernel much slower, depending on what surrounded it.)"""
    amax = _block_amax(x).view(torch.int32) & K.F32_ABS_MASK
    e = mx_scale_exponent(amax, emax)
    mag = bits & K.F32_ABS_MASK
    y = mx_scale_down(mag, e) | (bits ^ mag)
    q = K.float_nearest(y, p) if rand is None else K.float_stochastic(y, p, rand)
    out = mx_scale_up(q, e)
    return torch.where(amax >= K.F32_INF_BITS, K.F32_QNAN_BITS, out)


# ---------------------------------------------------------------------------------------------
# NVFP4: float32 tensor scale, e4m3 block scale, e2m1 elements (the contract's formula)
# ---------------------------------------------------------------------------------------------
def nvfp4_tensor_scale(amax_tensor: torch.Tensor) -> torch.Tensor:
    """g = amax / (448 * 6) in float32 (torchao's per_tensor_amax_to_scale); 1 for an all-zero
    tensor (the contract: torchao's 0 would make every value 0/0 = NaN). NaN/inf stay."""
    g = amax_tensor / NVFP4_TENSOR_DIVISOR
    return torch.where(amax_tensor == 0, 1.0, g)


def nvfp4_block_scale(amax_block: torch.Tensor, g: torch.Tensor, p_e4m3) -> torch.Tensor:
    """s = e4m3(clamp((amax_block / 6) / g, 2^-6, 448)), rounded to nearest even, float32."""
    s = torch.clamp((amax_block / F4_E2M1_MAX) / g, E4M3_MIN_NORMAL, E4M3_MAX)
    return K.float_nearest(s.view(torch.int32), p_e4m3).view(torch.float32)


def _nvfp4_round(x, p_e2m1, p_e4m3, rand=None, g=None):
    """NVFP4 cast of float32 [M, 16, R] (blocks along dim -2): q = e2m1(clamp(x * ((1/g) / s),
    -6, 6)) (nearest, or stochastic with `rand`), value = q * (g * s), all in float32. g: the
    tensor scale, from x when not given (``_split_cast`` casts a tensor in two pieces).

    A zero element gives q = 0 (its sign kept): where the tensor's amax is tiny, (1/g) / s
    overflows to inf, and 0 * inf would make every zero of such a block NaN."""
    if g is None:
        g = nvfp4_tensor_scale(x.abs().amax())
    s = nvfp4_block_scale(_block_amax(x), g, p_e4m3)
    y = torch.clamp(x * ((1.0 / g) / s), -F4_E2M1_MAX, F4_E2M1_MAX)
    y = torch.where(x == 0, x, y)
    yb = y.view(torch.int32)
    q = K.float_nearest(yb, p_e2m1) if rand is None else K.float_stochastic(yb, p_e2m1, rand)
    out = (q.view(torch.float32) * (g * s)).view(torch.int32)
    # a tensor holding inf makes g inf, and 0 * inf is the CPU's NaN, sign bit set: the contract's
    # NaN is float32's default quiet NaN
    return torch.where((out & K.F32_ABS_MASK) > K.F32_INF_BITS, K.F32_QNAN_BITS, out).view(
        torch.float32)


# ---------------------------------------------------------------------------------------------
# kernels: the same functions run eagerly (params as ints) or compiled (params as tensors)
# ---------------------------------------------------------------------------------------------
def _index(t: torch.Tensor, lane: Optional[torch.Tensor] = None,
           static_sizes: bool = False) -> torch.Tensor:
    """int32 position of every element of the contiguous [M, kk, R] `t` in memory, in t's
    shape. For R == 1 pass `lane` = arange(kk) as [1, kk, 1]: row * kk + lane vectorises on
    the CPU, where inductor builds an in-kernel arange over a short inner dim one lane at a time
    (MX stochastic rounding was several times slower). The values are the same.

    static_sizes: take the sizes as Python ints (the eager ops, also when a user's torch.compile
    traces them). With symbolic sizes, torch 2.11's Triton code computed size * row in int64
    and the int32 hash built on it failed to compile (README, Speed: GPU); literal sizes keep
    every product int32. Our own compiled kernel keeps symbolic sizes (one kernel for
    every shape).
    """
    if static_sizes:
        m, kk, r = (int(s) for s in t.shape)
        return torch.arange(m * kk * r, device=t.device, dtype=torch.int32).view(m, kk, r)
    if lane is None:
        return torch.arange(t.numel(), device=t.device, dtype=torch.int32).view(t.shape)
    rows = torch.arange(t.shape[0], device=t.device, dtype=torch.int32).view(-1, 1, 1)
    # the row stride kk read from lane's last value (kk - 1), not taken from lane.shape: a
    # symbolic size made the product int64 in torch 2.11's Triton code, as above
    return rows * (lane[:, -1:] + 1) + lane


def _k_mx_nearest(x, bits, p, emax):
    return _mx_round(x, bits, unpack(p), emax)


def _k_mx_stochastic(x, bits, p, emax, seed, lane=None, static_sizes=False):
    return _mx_round(x, bits, unpack(p), emax,
                     K.random_bits(_index(x, lane, static_sizes), seed))


def _k_nvfp4_nearest(x, p, p_scale):
    return _nvfp4_round(x, unpack(p), unpack(p_scale))


def _k_nvfp4_stochastic(x, p, p_scale, seed, lane=None, static_sizes=False):
    return _nvfp4_round(x, unpack(p), unpack(p_scale),
                        K.random_bits(_index(x, lane, static_sizes), seed))


_KERNELS = {("mx", "nearest"): _k_mx_nearest, ("mx", "stochastic"): _k_mx_stochastic,
            ("nvfp4", "nearest"): _k_nvfp4_nearest, ("nvfp4", "stochastic"): _k_nvfp4_stochastic}


def _lane(kk: int, device: torch.device) -> torch.Tensor:
    """arange(kk) as an int32 [1, kk, 1] tensor on `device`, made once (see _index)."""
    return dispatch.device_constant(
        ("block lane", kk), device,
        lambda d: torch.arange(kk, dtype=torch.int32, device=d).view(1, kk, 1))


def _int_tensor(value: int, device: torch.device) -> torch.Tensor:
    """A 0-d int32 tensor on `device`, made once (a runtime input of the compiled kernels)."""
    return dispatch.device_constant(("int", value), device,
                                    lambda d: torch.tensor(value, dtype=torch.int32, device=d))


def _family(fmt: Format) -> str:
    return "nvfp4" if fmt.tensor_scale else "mx"


def _kernel_args(v3, fmt: Format, seed, compiled: bool) -> tuple:
    """Arguments of the kernel after its data: the data's int32 patterns (MX, a free view),
    element params, then emax (MX) or the e4m3 scale params (NVFP4), then the seed words when
    stochastic. Compiled: all tensors, so one compiled kernel serves every element format and
    block size."""
    elem, dev = fmt.element, v3.device
    head = () if fmt.tensor_scale else (_alias(v3.view(torch.int32)),)
    if compiled:
        args = (dispatch.param_tensor(elem, True, dev, "bits"),)
        args += ((dispatch.param_tensor(_E4M3, True, dev, "bits"),) if fmt.tensor_scale
                 else (_int_tensor(elem.max_exp, dev),))
    else:
        args = (K.float_params(elem, True),)
        args += (K.float_params(_E4M3, True),) if fmt.tensor_scale else (elem.max_exp,)
    if seed is not None:
        args += (seed,)
        if compiled and v3.shape[2] == 1:
            args += (_lane(v3.shape[1], dev),)
    return head + args


def _alias(t: torch.Tensor) -> torch.Tensor:
    """t's memory as a tensor that is not a view. dynamo guards a view input on its base's
    sizes, so views of 2-D and 4-D tensors (weights, activations) would each compile the kernel
    again; an alias of the storage (no copy) has no base."""
    if t._base is None:
        return t
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


# inductor options per kernel family. MX: inline every intermediate (no "realized" buffers):
# with inductor's defaults (torch 2.14, CPU) the long integer chains were realized into
# per-row local buffers, which slowed stochastic rounding over contiguous blocks severalfold;
# NVFP4 is faster with the defaults (its per-block scales are then computed once per block,
# not per element).
_INLINE_ALL = {"realize_opcount_threshold": 1 << 20, "realize_reads_threshold": 1 << 20,
               "realize_acc_reads_threshold": 1 << 20}
_OPTIONS = {"mx": _INLINE_ALL, "nvfp4": None}


def _compiled_call(v3, fmt, rounding, seed, strict):
    """The compiled kernel's result, or None where compiling is not possible
    (common/dispatch.py)."""
    family = _family(fmt)
    # R == 1 (blocks contiguous in memory) and R > 1 are different loop nests: separate caches
    key = ("block", family, rounding, v3.device.type, "r1" if v3.shape[2] == 1 else "r")
    v3 = _alias(v3)
    args = (v3,) + _kernel_args(v3, fmt, seed, compiled=True)
    return dispatch.run_compiled(key, _KERNELS[(family, rounding)], args, strict,
                                 _OPTIONS[family])


def _split_cast(x3: torch.Tensor, fmt: Format, seed) -> torch.Tensor:
    """The cast of rows [A, C, R] whose C (> k) k does not divide, as the eager ops traced into
    a user's torch.compile run it: the full blocks (an [A, C // k, k, R] view) and the short
    last block (an [A, C % k, R] view) are cast apart and joined by torch.cat. The same bits
    as the eager ops on the zero-padded copy: the same block maxima, NVFP4's tensor scale
    from the whole tensor, and each element's random bits from its position in that copy.

    Why not the padded copy and a slice, as eager: inductor's CPU code (torch 2.14) miscompiles
    that pattern. A pointwise loop over C that reads a per-block value at index c // k (k > 8)
    is split at k without checking that k divides C, so the slice that drops the padding never
    writes the last C % k elements of each row (uninitialized memory comes out). Here no loop
    that reads a per-block value runs over a ragged C (docs/block-formats.md).
    """
    a, c, r = x3.shape
    k = fmt.block_size
    nf = c // k
    pieces = (x3[:, :nf * k].view(a, nf, k, r), x3[:, nf * k:])
    rands = (None, None)
    if seed is not None:  # positions in the zero-padded [A, (nf + 1) * k, R] copy, as _index
        idx = torch.arange(int(a) * (int(nf) + 1) * k * int(r), dtype=torch.int32,
                           device=x3.device).view(a, (nf + 1) * k, r)
        rands = (K.random_bits(idx[:, :nf * k].view(a, nf, k, r), seed),
                 K.random_bits(idx[:, nf * k:c], seed))
    p = K.float_params(fmt.element, True)
    if fmt.tensor_scale:
        g = nvfp4_tensor_scale(x3.abs().amax())
        p_scale = K.float_params(_E4M3, True)
        ys = [_nvfp4_round(v, p, p_scale, rand, g) for v, rand in zip(pieces, rands)]
    else:
        ys = [_mx_round(v, v.view(torch.int32), p, fmt.element.max_exp, rand).view(torch.float32)
              for v, rand in zip(pieces, rands)]
    return torch.cat([ys[0].reshape(a, nf * k, r), ys[1]], dim=1)


def _narrow(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """x as float32 (see the module docstring for which dtypes are accepted and why)."""
    if x.dtype == torch.float32:
        return x
    if x.dtype == torch.float64:
        return K.f64_to_f32_round_to_odd(x)
    if fmt.tensor_scale:
        raise ValueError(f"quantize to {fmt} of a {x.dtype} tensor: {fmt} values (float32 "
                         f"products of the scales) do not all fit {x.dtype}; pass a float32 "
                         f"tensor (x.float())")
    return x.to(torch.float32)  # float16, bfloat16: exact


def quantize_block(x: torch.Tensor, fmt, rounding: str = "nearest", saturate: bool = True,
                   generator: Optional[torch.Generator] = None, path: str = "auto",
                   seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cast x to the block format `fmt`, blocks along dim 1 (see the module docstring).

    rounding: the elements' ("nearest" or "stochastic"); scales are always deterministic.
    saturate: must be True: block elements always saturate at the element's max (the contract;
    OCP MX does the same), a non-saturating block cast is refused. path: "auto" (small tensors
    and calls inside a user's torch.compile run eager ops, larger ones the compiled kernel;
    QUANT_PATH overrides), "eager" or "compiled" (test hooks; compiled raises if it cannot
    compile). seed: fixed int32 seed words for stochastic rounding (test hook).
    """
    fmt = parse_format(fmt)
    if not fmt.is_block:
        raise ValueError(f"quantize_block needs a block format, got {fmt}")
    dispatch.check_rounding(rounding)
    dispatch.check_tensor(x)
    if not saturate:
        raise ValueError(f"{fmt}: block formats always saturate their elements (saturate=False "
                         f"is refused); accepted: saturate=True")
    if x.dim() == 0:
        raise ValueError(f"{fmt}: a block format needs a tensor with at least one dimension "
                         f"(blocks run along dim 1, or dim 0 of a 1-D tensor); got a 0-d tensor")
    x = x.detach()
    x32 = _narrow(x, fmt)
    if x.numel() == 0:
        return x.clone()
    seed = _element_seed(rounding, seed, generator, x32.device)
    path = dispatch.resolve_path(path)
    if dispatch.tracing() and path != "compiled":  # the eager ops, traced into a user's graph
        x3, to_x = _rows(x32)
        if _ragged(x3.shape[1], fmt.block_size):  # no pad-then-slice there: see _split_cast
            return dispatch.to_input_dtype(to_x(_split_cast(x3, fmt, seed)), x.dtype)
    v3, to_x = _block_layout(x32, fmt.block_size)
    return dispatch.to_input_dtype(to_x(_cast_layout(v3, fmt, rounding, seed, path)), x.dtype)


def _element_seed(rounding: str, seed, generator, device: torch.device):
    """The seed words of the elements' stochastic rounding (None for nearest): the given test
    seed, else a draw from `generator` (or torch's default generator)."""
    if rounding == "nearest":
        return None
    return dispatch.draw_seed(generator, device) if seed is None else seed


def _cast_layout(v3: torch.Tensor, fmt: Format, rounding: str, seed, path: str) -> torch.Tensor:
    """The cast of a contiguous float32 [M, kk, R] layout (one block per [m, :, r]), float32:
    the compiled kernel where `path` (resolved) and the size call for it, else the eager ops."""
    compiled = dispatch.use_compiled(path, v3.numel(), v3.device, dispatch.EAGER_BITS_BELOW)
    y = _compiled_call(v3, fmt, rounding, seed, strict=path == "compiled") if compiled else None
    if y is None:
        static = {"static_sizes": True} if seed is not None else {}  # see _index
        y = _KERNELS[(_family(fmt), rounding)](v3, *_kernel_args(v3, fmt, seed, compiled=False),
                                               **static)
    return y.view(torch.float32)


def quantize_tiles(tiles: torch.Tensor, fmt, rounding: str = "nearest",
                   generator: Optional[torch.Generator] = None, path: str = "auto",
                   seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cast float32 `tiles` [M, n, R] to the block format `fmt` with one scale per
    tiles[m, :, r]: its n elements share it, whatever fmt.block_size says (2D block scaling
    of weights, common/operands.py, casts a k x k tile as one block of k * k elements).

    The scale and element rules are fmt's (docs/block-formats.md, "Scale rules"); NVFP4's
    tensor scale g comes from all of `tiles` (zero padding changes no amax). Stochastic
    rounding draws each element's random bits from its position in `tiles` (contiguous).
    rounding, generator, path, seed: as quantize_block's. Returns a contiguous float32 tensor
    of tiles' shape."""
    fmt = parse_format(fmt)
    if not fmt.is_block:
        raise ValueError(f"quantize_tiles to {fmt}; accepted: a block format (mxfp8, mxfp4, "
                         f"nvfp4, ...)")
    dispatch.check_rounding(rounding)
    dispatch.check_tensor(tiles)
    if tiles.dim() != 3 or tiles.dtype != torch.float32:
        raise ValueError(f"quantize_tiles of a {tiles.dtype} tensor of shape "
                         f"{list(tiles.shape)}; accepted: a float32 [M, n, R] tensor")
    v3 = tiles.detach().contiguous()
    if v3.numel() == 0:
        return v3.clone()
    seed = _element_seed(rounding, seed, generator, v3.device)
    return _cast_layout(v3, fmt, rounding, seed, dispatch.resolve_path(path))
