"""Fake quantization: round float32 tensors to the project's number formats, exactly.

Public API (the one place in the project that knows a bit layout):

- ``quantize(x, fmt, rounding="nearest", saturate=True, generator=None)``
- ``quantize_scaled(x, fmt, scaling="none", rounding="nearest", saturate=True, generator=None,
  channel_dim=0)``
- ``representable_values(fmt)``
- ``ROUNDINGS``, ``SCALINGS`` (the strings ``scaling`` takes), ``Scaling`` (the typed form,
  common/scaling.py)

Block-scaled formats (``mxfp8``, ``mxfp4``, ``nvfp4``, ...: a Format with ``is_block``) are
routed to common/blocks.py by ``quantize``; they carry their own scaling, so ``quantize_scaled``
takes them only with scaling "none".

Semantics are those of docs/formats.md (the user-facing reference): round to nearest with ties
to even, or unbiased stochastic rounding; subnormals kept; saturation (default) or the OCP
non-saturating overflow; NaN stays NaN in every format and mode, also in formats without a NaN
code (e2m1, e2m3, e3m2), because a fake-quantized tensor must never hide a divergence; -0.0
stays -0.0 (also for posits, whose single zero it equals); posits never round to 0 nor beyond
maxpos in nearest mode, and ±inf gives NaR (NaN) for posits whatever ``saturate`` says (the
posit standard has no infinity to saturate).
Ties go to the even bit pattern; for formats without mantissa bits (eXm0) that is the even
exponent field (ml_dtypes' float8_e8m0fnu rounds such ties up instead). ``e8m0`` is the eXmY
rule with no mantissa (signed, inf and NaN, values 2^-126 .. 2^127), not OCP MX's unsigned E8M0
scale format (2^-127 .. 2^127, no sign, no inf). Every NaN that comes out is float32's default
quiet NaN 0x7FC00000 (sign and payload dropped), whatever the path or the tensor size.

Stochastic rounding is exact in expectation where the dropped bits are the probability
(floats, posits while no exponent bit is cut); elsewhere the probability is resolved to 2^-30
(floats below their smallest subnormal Q, posits below minpos, where 0 is the lower neighbour:
|x| < minpos gives minpos with probability |x|/minpos, else 0) or 2^-31 (posits across cut
exponent bits). Posits with es >= 5 have gaps beyond 2^31: their stochastic rounding is refused
(ValueError) rather than biased. Without saturation, x above max rounds up to the *virtual*
next value (the one above max if the exponent went on) with its usual probability, and that
rounding up is the overflow: e4m3 at 464 (halfway to a virtual 480) is NaN in half the draws.

How a call runs (users never choose; ``QUANT_PATH=eager|compiled|auto`` overrides for debugging;
every path gives the same bits, and the tests check each against the references). The choice
between eager ops and a compiled kernel, and the cache of compiled kernels, live in
common/dispatch.py, shared with the block casts; this module says which kernel runs:

- fp32/none: ``x`` itself is returned.
- Method "cast", where torch's native cast is exactly the contract: bf16 and fp16 (both overflow
  modes: IEEE overflow to inf is theirs, saturation clamps it after the cast), e4m3 and e5m2 in
  saturating nearest mode (after a clamp to ±max, so the cast never overflows: torch's CPU e4m3
  cast saturates, its e5m2 cast does not, Triton's float8 casts saturate). NaN is reset to the
  default NaN after the cast (torch's casts keep signs and payloads, differently on their vector
  and scalar paths).
- Method "bits", everything else: integer arithmetic on the float32 bit pattern
  (``_quant_kernels``): posits, the MX and other eXmY formats, non-saturating float8,
  stochastic rounding.
- Inside a user's ``torch.compile`` (``torch.compiler.is_compiling()``) the eager ops are traced
  into the user's graph, always with method "bits": inductor (``emulate_precision_casts=False``,
  its default) removes the rounding of x.to(bfloat16).to(float32), so a "cast" there would
  silently not round. The integer arithmetic survives any compiler.
- Eager or compiled: small tensors (below ``dispatch.EAGER_CAST_BELOW`` elements for a cast,
  ``dispatch.EAGER_BITS_BELOW`` for the bit arithmetic), calls made while ``torch.compile``
  traces a user's model, and platforms where compiling fails run eager PyTorch ops. Larger
  tensors run one fused kernel made by ``torch.compile`` (dynamic shapes; compiled once per
  kernel and device, cached in memory and by inductor on disk): the bf16/fp16 casts where a
  probe shows that the compiler keeps their rounding (some torch versions drop it, see
  ``_compiled_cast_ok``), else the bit arithmetic, whose format parameters are runtime inputs
  so that five kernels (float and posit, nearest and stochastic, and a lighter stochastic one
  for 8-exponent-bit floats) serve every format. If compiling raises, the failure is
  remembered and the eager ops are used from then on, with the same bits.

Scaling (``quantize_scaled``): a power-of-two s = 2^k from the tensor's (or channel's) absolute
maximum (floats: amax*s in (max/2, max]) or root mean square (posits: rms*s the power of two
nearest 1); a tensor or channel holding one inf or NaN gets s = 1, i.e. is cast unscaled. Three
named steps: ``_scale_statistic`` (amax or rms over the scale's elements), ``_scale_exponent``
(k from the statistic, by the scaling's rule) and ``_cast_with_scale``.
Floats round x*s and divide by s (exact float32 multiplications); posits pass k to their
kernel, which adds it to the exponent field on the way in and takes it off on the way out: one
pass instead of three, and exact also where x*s would underflow float32 (k is kept in the window
where every posit value / 2^k is a float32 normal, see ``_pow2_exponent``).

Stochastic rounding draws two 32-bit seed words per call from ``generator`` (default: the
global generator of x's device, so ``torch.manual_seed`` makes runs reproducible) and derives
each element's random bits from a counter-based hash of (element index, seed): the same seed gives
the same bits on CPU and CUDA, eager and compiled. The index is the position in memory, so the
same values stored in another layout (channels-last, transposed) draw other bits. Under a user's
``torch.compile`` the seed words come from the compiler's random stream instead (still seeded by
``torch.manual_seed``).

Inputs may be float32, float64, float16 or bfloat16; the result has x's dtype. float64 is
narrowed to float32 by round-to-odd first, so that the format's rounding of it equals the
rounding of the float64 value itself (no double rounding; exact for every format of up to 21
mantissa bits, while those of 22 or 23, e8m22 or e7m23, are limited by float32's own rounding;
stochastic rounding sees the float32 value). float16 and bfloat16 are refused
(one-line ValueError asking for a float32 input) for formats whose values they cannot all hold
(``_fits``: bf16 or posit16es1 in float16, fp16 in bfloat16, ...), and for any scaled cast.
The result never requires grad: training wraps this in a straight-through autograd function.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from . import _quant_kernels as K
from . import blocks, dispatch
from .dispatch import ROUNDINGS, check_rounding, check_tensor, to_input_dtype, unpack
from .formats import Format, parse_format
from .scaling import AMAX_TO_MAX, RMS_TO_ONE, SCALINGS, Scaling

__all__ = ["quantize", "quantize_scaled", "representable_values", "ROUNDINGS", "SCALINGS",
           "Scaling"]

# Native casts that round exactly as the contract says (RNE, subnormals kept, NaN kept).
# fp8 casts are used only in saturating mode, after a clamp: their overflow behaviour differs
# between torch's CPU casts (e4m3 saturates, e5m2 overflows to inf) and Triton's (both saturate).
_CAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16,
                "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_CAST_NONSAT_OK = ("bf16", "fp16")  # IEEE overflow to inf is exactly what these casts do


# ---------------------------------------------------------------------------------------------
# argument checks (the format-independent ones are common/dispatch.py's)
# ---------------------------------------------------------------------------------------------
# Posit stochastic rounding resolves its probability to 2^-31 across gaps of up to 2^16 (es <= 4,
# see _quant_kernels.posit_stochastic); wider gaps would be rounded with a biased probability.
POSIT_STOCHASTIC_MAX_ES = 4


def _check_stochastic(fmt: Format, rounding: str) -> None:
    if rounding == "stochastic" and fmt.is_posit and fmt.es > POSIT_STOCHASTIC_MAX_ES:
        raise ValueError(
            f"stochastic rounding of {fmt} is refused: its values are up to 2^{2 ** fmt.es} "
            f"apart, too far to draw the rounding probability exactly; accepted: posits with "
            f"es <= {POSIT_STOCHASTIC_MAX_ES}, or rounding='nearest'")


# Input dtypes narrower than float32, as the formats whose values they hold.
_DTYPE_FORMATS = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_FITS: dict = {}  # (format name, carrier name) -> bool


def _fits(fmt: Format, carrier: Format) -> bool:
    """Whether every value of `fmt` is a value of the IEEE-like float `carrier` (fp16, bf16).

    It is when fmt's top binade is within carrier's range and, in every binade [2^e, 2^(e+1)),
    fmt's quantum is a multiple of carrier's: with f fraction bits there, f <= M + min(0, e -
    emin) (M, emin: carrier's mantissa bits and smallest normal exponent). Within a run of
    binades with the same f the lowest is the strictest, so it suffices to check those:
    floats: the lowest normal binade (subnormals share its quantum); posits: each regime's
    lowest binade k * 2^es. Pure Python (no tensors): it also runs while torch.compile traces."""
    key = (fmt.name, carrier.name)
    ok = _FITS.get(key)
    if ok is None:
        if fmt.is_posit:
            n, es = fmt.bits, fmt.es
            top = (n - 2) << es
            # regime k takes k + 2 bits (k >= 0) or 1 - k bits (k < 0) after the sign
            runs = [(k << es, max(n - 1 - (k + 2 if k >= 0 else 1 - k) - es, 0))
                    for k in range(2 - n, n - 2)]
        else:
            top, runs = fmt.max_exp, [(fmt.min_exp, fmt.man_bits)]
        ok = top <= carrier.max_exp and all(
            f <= carrier.man_bits + min(0, e - carrier.min_exp) for e, f in runs)
        _FITS[key] = ok
    return ok


def _check_dtype(x: torch.Tensor, fmt: Format, scaling: Scaling = Scaling()) -> None:
    """Refuse a float16/bfloat16 x whose dtype cannot hold every result exactly: the format's
    values (unscaled), or its values divided by a data-dependent power of two (scaled)."""
    carrier = _DTYPE_FORMATS.get(x.dtype)
    if carrier is None or fmt.is_identity:
        return
    if scaling.rescales:
        raise ValueError(f"{scaling} scaling of a {x.dtype} tensor to {fmt}: scaled {fmt} values "
                         f"do not all fit {x.dtype}; pass a float32 tensor (x.float())")
    if not _fits(fmt, parse_format(carrier)):
        raise ValueError(f"quantize to {fmt} of a {x.dtype} tensor: {fmt} values do not all fit "
                         f"{x.dtype}; pass a float32 tensor (x.float())")


# ---------------------------------------------------------------------------------------------
# methods: which kernel computes a (format, rounding, saturate) case
# ---------------------------------------------------------------------------------------------
def _methods(fmt: Format, rounding: str, saturate: bool, compiled: bool = False) -> tuple:
    """Exact methods for this case, the faster first (benchmarks/quant_speed.py compares them):
    "cast" (torch's native RNE cast, after a clamp when saturating) where it is exact, and
    "bits" (integer arithmetic on the float32 pattern) always; each runs eager or compiled.
    Eager, a native cast is one to three passes over memory, the bit arithmetic tens of them.
    Compiled, fused bf16/fp16 casts beat the fused bit arithmetic (when the compiler keeps
    their rounding: see _compiled_cast_ok), while inductor converts float8 one element at a time
    on CPU, so fp8 uses the bits kernel there (one kernel for every float format)."""
    casts = _COMPILED_CASTS if compiled else _CAST_DTYPES
    if fmt.is_float and rounding == "nearest" and fmt.name in casts and (
            saturate or fmt.name in _CAST_NONSAT_OK):
        return ("cast", "bits")
    return ("bits",)


_COMPILED_CASTS = ("bf16", "fp16")
_CAST_PROBE_OK: dict = {}  # (format name, device type) -> does the compiled cast round?


def _compiled_cast_ok(fmt: Format, device: torch.device) -> bool:
    """Whether the compiled cast kernel of `fmt` rounds exactly on this device, probed once.

    inductor may compile x.to(bfloat16).to(float32) to nothing (it keeps the float32 value):
    torch 2.11 does so even with emulate_precision_casts, 2.14 honours that option. The probe
    (random bit patterns: ties, subnormals, overflow) against the eager cast catches that; where
    it fails, the compiled bit-arithmetic kernel serves the format instead, with the same bits.
    """
    key = (fmt.name, device.type)
    ok = _CAST_PROBE_OK.get(key)
    if ok is None:
        gen = torch.Generator().manual_seed(0)
        probe = torch.randint(-2**31, 2**31, (4096,), dtype=torch.int32, generator=gen)
        probe = probe.view(torch.float32).to(device)
        want = K.cast_nearest(probe, _CAST_DTYPES[fmt.name], math.inf)
        try:
            got = _compiled_kernel(probe, fmt, "nearest", False, None, "cast", strict=True)
            ok = bool(((got.view(torch.int32) == want.view(torch.int32))
                       | (torch.isnan(got) & torch.isnan(want))).all())
        except Exception:
            ok = False
        _CAST_PROBE_OK[key] = ok
    return ok


# ---------------------------------------------------------------------------------------------
# kernels on a flat float32 tensor. The bit-arithmetic kernels take and return int32 patterns
# (the float <-> int views happen outside: free here, costly inside an inductor CPU kernel).
# Their format parameters p are a tuple of ints (eager) or a 1-D int32 tensor (compiled: the
# parameters are runtime inputs, so one compiled kernel serves every format).
# ---------------------------------------------------------------------------------------------
def _k_float_nearest(bits, p):
    return K.float_nearest(bits, unpack(p))


def _k_float_stochastic(bits, p, seed, lane=None):
    return K.float_stochastic(bits, unpack(p), K.random_bits(K.element_index(bits, lane), seed))


def _k_posit_nearest(bits, p, shift):
    return K.posit_nearest(bits, unpack(p), shift)


def _k_posit_stochastic(bits, p, shift, seed, lane=None):
    r1, r2 = K.random_bits(K.element_index(bits, lane), seed, words=2)
    return K.posit_stochastic(bits, unpack(p), r1, r2, shift)


def _k_cast_bf16(x, bound):
    return K.cast_nearest_fused(x, torch.bfloat16, bound)


def _k_cast_fp16(x, bound):
    return K.cast_nearest_fused(x, torch.float16, bound)


def _k_float_stochastic_e8(bits, p, seed, lane=None):
    return K.float_stochastic_e8(bits, unpack(p),
                                 K.random_bits(K.element_index(bits, lane), seed))


def _kind(fmt: Format, rounding: str) -> str:
    """Kernel family: posits, floats, and stochastic floats with float32's exponent range."""
    if fmt.is_posit:
        return "posit"
    return "float_e8" if rounding == "stochastic" and fmt.exp_bits == 8 else "float"


_BITS_KERNELS = {("float", "nearest"): _k_float_nearest,
                 ("float", "stochastic"): _k_float_stochastic,
                 ("float_e8", "stochastic"): _k_float_stochastic_e8,
                 ("posit", "nearest"): _k_posit_nearest,
                 ("posit", "stochastic"): _k_posit_stochastic}
_CAST_KERNELS = {"bf16": _k_cast_bf16, "fp16": _k_cast_fp16}

_LANES = 16


def _eager_kernel(flat, fmt, rounding, saturate, seed, method, shift=None):
    if method == "cast":
        return K.cast_nearest(flat, _CAST_DTYPES[fmt.name], fmt.max if saturate else math.inf)
    fn = _BITS_KERNELS[(_kind(fmt, rounding), rounding)]
    args = (flat.view(torch.int32), dispatch.kernel_params(fmt, saturate))
    if fmt.is_posit:
        args += (0 if shift is None else shift,)
    if rounding == "stochastic":
        args += (seed,)
    return fn(*args).view(torch.float32)


# emulate_precision_casts: by default inductor drops the rounding of x.to(bfloat16).to(float32)
# (it keeps the float32 value); the cast kernels exist for exactly that rounding.
_CAST_OPTIONS = {"emulate_precision_casts": True}


def _compiled_kernel(flat, fmt, rounding, saturate, seed, method, strict, shift=None):
    """Run the compiled kernel; None where compiling is not possible (common/dispatch.py)."""
    dev = flat.device
    if method == "cast":
        key = ("cast", fmt.name, dev.type)
        kernel = _CAST_KERNELS[fmt.name]
        args = (flat, dispatch.param_tensor(fmt, saturate, dev, "cast"))
    else:
        key = (_kind(fmt, rounding), rounding, dev.type)
        kernel = _BITS_KERNELS[key[:2]]
        bits = flat.view(torch.int32)
        args = (bits, dispatch.param_tensor(fmt, saturate, dev, "bits"))
        if fmt.is_posit:  # a runtime input, so scaled and unscaled calls share one kernel
            args += (_zero_shift(dev) if shift is None else shift,)
        if rounding == "stochastic":
            args += (seed,)
            if dev.type == "cpu" and bits.numel() % _LANES == 0 and bits.numel() > _LANES:
                # a (rows, 16) view lets the CPU kernel form element indices in two vector ops
                args = (bits.view(-1, _LANES),) + args[1:] + (_lane_tensor(dev),)
    y = dispatch.run_compiled(key, kernel, args, strict,
                              _CAST_OPTIONS if method == "cast" else None)
    if y is None or method == "cast":
        return y
    return y.view(torch.float32).view(-1)


def _zero_shift(device: torch.device) -> torch.Tensor:
    """A 0-d int32 zero: the posit kernels' shift in an unscaled cast."""
    return dispatch.device_constant(("zero shift",), device,
                                    lambda d: torch.zeros((), dtype=torch.int32, device=d))


def _lane_tensor(device: torch.device) -> torch.Tensor:
    """arange(_LANES) as int32: the lane index of a (rows, _LANES) view (K.element_index)."""
    return dispatch.device_constant(("lanes", _LANES), device,
                                    lambda d: torch.arange(_LANES, dtype=torch.int32, device=d))


# ---------------------------------------------------------------------------------------------
# layout: run the element-wise kernels on a flat view in memory order
# ---------------------------------------------------------------------------------------------
def _flatten(x: torch.Tensor):
    """A 1-D view of x in memory order and a function mapping a flat result back to x's
    layout (contiguous or channels-last kept; anything else comes back contiguous)."""
    if x.is_contiguous():
        return x.view(-1), lambda y: y.view(x.shape)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        xp = x.permute(0, 2, 3, 1)
        return xp.reshape(-1), lambda y: y.view(xp.shape).permute(0, 3, 1, 2)
    xc = x.contiguous()
    return xc.view(-1), lambda y: y.view(x.shape)


def _run(x, fmt, rounding, saturate, generator, path, method=None, seed=None, shift=None):
    """quantize(); `shift` (posits only: an int32 0-d tensor k) rounds x * 2^k and divides by
    2^k on the exponent field (quantize_scaled's tensor scaling, one pass)."""
    fmt = parse_format(fmt)
    check_rounding(rounding)
    check_tensor(x)
    if fmt.is_identity:   # nothing to round; detached like every other cast's result
        return x.detach() if x.requires_grad else x
    if fmt.is_block:  # blocks along dim 1 with their own scales
        return blocks.quantize_block(x, fmt, rounding, saturate, generator, path, seed)
    _check_stochastic(fmt, rounding)
    _check_dtype(x, fmt)
    saturate = bool(saturate)
    if path != "auto" and method is not None:
        exact = _methods(fmt, rounding, saturate, compiled=path == "compiled")
        if method not in exact:
            raise ValueError(f"no {path} method {method!r} for {fmt} {rounding} "
                             f"saturate={saturate}; have {exact}")
    # inside a user's torch.compile, the ops below become part of the user's graph: only the
    # bit arithmetic is safe there (inductor drops the rounding of x.to(bfloat16).to(float32))
    tracing = dispatch.tracing()
    x = x.detach()
    if x.dtype == torch.float32:
        x32 = x
    elif x.dtype == torch.float64:  # round-to-odd: no double rounding on the way to the format
        x32 = K.f64_to_f32_round_to_odd(x)
    else:  # float16, bfloat16: exact
        x32 = x.to(torch.float32)
    flat, unflatten = _flatten(x32)
    if shift is not None and shift.dim() > 0:  # per element: same layout as x, same flat order
        shift = _flatten(shift)[0]
    if rounding == "nearest":
        seed = None
    elif seed is None:
        seed = dispatch.draw_seed(generator, flat.device)
    path = dispatch.resolve_path(path)
    eager_cast = method in (None, "cast") and _methods(fmt, rounding, saturate)[0] == "cast"
    compiled = dispatch.use_compiled(path, flat.numel(), flat.device,
                                     dispatch.EAGER_CAST_BELOW if eager_cast
                                     else dispatch.EAGER_BITS_BELOW)
    y = None
    if compiled:
        m = method or _methods(fmt, rounding, saturate, compiled=True)[0]
        if method is None and m == "cast" and not _compiled_cast_ok(fmt, flat.device):
            m = "bits"
        y = _compiled_kernel(flat, fmt, rounding, saturate, seed, m, strict=path == "compiled",
                             shift=shift)
    if y is None:
        m = method or ("bits" if tracing else _methods(fmt, rounding, saturate)[0])
        y = _eager_kernel(flat, fmt, rounding, saturate, seed, m, shift)
    return to_input_dtype(unflatten(y), x.dtype)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def quantize(x: torch.Tensor, fmt: Union[str, Format], rounding: str = "nearest",
             saturate: bool = True, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Round every element of `x` to the nearest value of `fmt` (see the module docstring).

    fmt: a spec string (``"e4m3"``, ``"posit8es1"``, ...) or a parsed Format.
    rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased, reproducible under
    ``torch.manual_seed`` or the given ``generator``).
    saturate: True maps anything beyond ±max (±inf included) to ±max; False follows the OCP
    non-saturating conversion (inf where the format has inf, NaN for e4m3, ±max for e2m1/e2m3/
    e3m2). Posits always saturate finite values and map ±inf to NaR.
    Returns a new tensor of x's shape and dtype (x itself for fp32/none).
    """
    return _run(x, fmt, rounding, saturate, generator, "auto")


def _quantize_eager(x, fmt, rounding="nearest", saturate=True, generator=None, method=None,
                    seed=None):
    """Test hook: the eager ops, with `method` "cast" or "bits" (default: the fastest exact one)
    and optionally fixed seed words (an int32 tensor of 2) for stochastic rounding."""
    return _run(x, fmt, rounding, saturate, generator, "eager", method, seed)


def _quantize_compiled(x, fmt, rounding="nearest", saturate=True, generator=None, method=None,
                       seed=None):
    """Test hook: the compiled kernel, whatever the size; raises if it cannot compile."""
    return _run(x, fmt, rounding, saturate, generator, "compiled", method, seed)


def _pow2_exponent(amax: torch.Tensor, fmt: Format) -> torch.Tensor:
    """k (int32) with amax*2^k in (max/2, max]; k = 0 where amax is 0, inf or NaN.

    k = floor(log2(max/amax)), computed from the exact frexp exponents (a float division could
    round across a power of two): with amax = ma*2^ea, max = mm*2^em (ma, mm in [0.5, 1)),
    k = em-ea if ma <= mm else em-ea-1. k is clamped so that the rescale is exact for every value:
    floats to [max(emax - 127, -126), 127] (emax: the exponent of the format's max): 2^k and
    2^-k are exact, and every format value q < 2^(emax+1) gives q / 2^k < 2^128, a float32 (a
    smaller k would turn values that round up to 2^(128+k) into inf). For bf16 and e8mY, whose
    range reaches float32's top, that is k >= 0, which also keeps x*2^k out of float32's
    subnormals, where it would be rounded once before the format's own rounding. (Formats with
    fewer exponent bits round anything that small to 0 either way.) Posits: [log2(maxpos) - 127,
    126 - log2(maxpos)], where every posit value divided by 2^k is a float32 normal. Only
    tensors with an extreme amax (a subnormal one; above about 2^127 for floats, 1.7e38; for
    posit16es1 below 2^-70 or above 2^99) hit a clamp: amax*2^k then stays below max/2 (or
    above max: it saturates).
    """
    amax = amax.to(torch.float32)
    ma, ea = torch.frexp(amax)
    mm, em = math.frexp(fmt.max)
    exp = em - ea - (ma > mm).to(ea.dtype)
    lo, hi = K.posit_shift_window(fmt) if fmt.is_posit else (max(fmt.max_exp - 127, -126), 127)
    exp = torch.clamp(exp, min=lo, max=hi)
    ok = torch.isfinite(amax) & (amax > 0)
    return torch.where(ok, exp, 0).to(torch.int32)


def _scale_dims(xd: torch.Tensor, scaling: Scaling) -> Optional[list]:
    """Dimensions a scale statistic reduces over: None for tensor scaling (all), every dim but
    the scaling's axis for channel scaling ([] for a 1-D tensor: each element is its own
    channel)."""
    if scaling.granularity == "tensor":
        return None
    if xd.dim() == 0:
        raise ValueError("channel scaling needs a tensor with at least one dimension")
    dim = scaling.axis % xd.dim()
    return [d for d in range(xd.dim()) if d != dim]


def _amax(xd: torch.Tensor, dims: Optional[list]) -> torch.Tensor:
    """Absolute maximum over ``dims`` (keepdim; None: the whole tensor). NaN propagates."""
    if dims is None:
        # max(max, -min) over a flat view in memory order: one pass, no temporary
        # (faster than vector_norm(xd, inf), and than abs().amax(), which writes a temporary)
        lo, hi = torch.aminmax(_flatten(xd)[0])
        return torch.maximum(hi, -lo)
    return xd.abs().amax(dim=dims, keepdim=True) if dims else xd.abs()


def _rms(xd: torch.Tensor, dims: Optional[list]) -> torch.Tensor:
    """Root mean square of ``xd`` (over ``dims``, keepdim; None: all), float32.

    The sum of squares runs in float32 (one fast pass on the CPU) where it neither overflows
    nor underflows, i.e. for rms roughly in [2^-63, 2^63]; a result of 0 or inf (an all-zero or
    extreme tensor, or one holding inf) is redone in float64. On CUDA it always accumulates in
    float64 (still one memory-bound pass there, and no host sync).
    """
    if dims == []:
        return xd.abs().to(torch.float64)
    xd = xd.to(torch.float32)
    count = xd.numel() if dims is None else math.prod([xd.shape[d] for d in dims])

    def norm(dtype: torch.dtype) -> torch.Tensor:
        return torch.linalg.vector_norm(xd, 2, dim=dims, keepdim=dims is not None, dtype=dtype)

    if xd.device.type == "cpu":
        total = norm(torch.float32).double()
        bad = (total == 0) | torch.isinf(total)
        # eager: redo in float64 only when needed (rare: zeros, inf, rms beyond 2^+-63; the test
        # is free on the CPU); under torch.compile always, so the graph has no data-dependent
        # branch: the same values either way
        if torch.compiler.is_compiling() or bool(bad.any()):
            total = torch.where(bad, norm(torch.float64), total)
        return total / math.sqrt(count)
    return norm(torch.float64) / math.sqrt(count)


def _posit_rms_exponent(rms: torch.Tensor, fmt: Format) -> torch.Tensor:
    """k (int32) with rms*2^k the power of two nearest to 1 in the log domain: k = round(-log2
    rms), clamped to the posit shift window; k = 0 where rms is 0, inf or NaN."""
    ok = torch.isfinite(rms) & (rms > 0)
    k = torch.round(-torch.log2(torch.where(ok, rms, 1.0)))
    lo, hi = K.posit_shift_window(fmt)
    return torch.where(ok, torch.clamp(k, lo, hi), 0).to(torch.int32)


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k as float32, exactly (k in [-126, 127])."""
    return ((k + 127) << 23).to(torch.int32).view(torch.float32)


# Each power-of-two rule: the statistic it reads and how it turns it into the exponent k.
_RULES = {AMAX_TO_MAX: (_amax, _pow2_exponent), RMS_TO_ONE: (_rms, _posit_rms_exponent)}


def _scale_statistic(xd: torch.Tensor, scaling: Scaling) -> torch.Tensor:
    """Step 1: the scaling rule's statistic (amax or rms) over each scale's elements (keepdim)."""
    statistic, _ = _RULES[scaling.rule]
    return statistic(xd, _scale_dims(xd, scaling))


def _scale_exponent(stat: torch.Tensor, fmt: Format, scaling: Scaling) -> torch.Tensor:
    """Step 2: the exponent k (int32) of each scale s = 2^k, from the statistic by the rule."""
    _, exponent = _RULES[scaling.rule]
    return exponent(stat, fmt)


def _cast_with_scale(x: torch.Tensor, fmt: Format, k: torch.Tensor, scaling: Scaling,
                     rounding: str, saturate: bool, generator, cast: Callable) -> torch.Tensor:
    """Step 3: cast(x * 2^k) / 2^k, both exact.

    Posits cast by ``quantize`` take k into their kernel, which scales on the exponent field:
    one pass, and exact also where x*s would underflow float32 (a float rescale would then
    round a nonzero x to 0). Otherwise float64 stays float64 (times a power of two: exact), so
    the cast rounds it once, as quantize does; narrower inputs are widened to float32 first,
    where x*s cannot underflow.
    """
    xd = x.detach()
    if fmt.is_posit and cast is quantize:
        if scaling.granularity == "channel":   # one shift per element, in x's memory layout
            k = torch.empty_like(xd, dtype=torch.int32).copy_(k.expand(xd.shape))
        return _run(x, fmt, rounding, saturate, generator, "auto", shift=k)
    s = _pow2(k)
    xs = xd * s if xd.dtype == torch.float64 else xd.to(torch.float32) * s
    y = cast(xs, fmt, rounding, saturate, generator) / s
    return to_input_dtype(y, x.dtype)


def quantize_scaled(x: torch.Tensor, fmt: Union[str, Format],
                    scaling: Union[str, Scaling] = "none",
                    rounding: str = "nearest", saturate: bool = True,
                    generator: Optional[torch.Generator] = None,
                    channel_dim: int = 0, cast: Optional[Callable] = None) -> torch.Tensor:
    """quantize(x * s) / s with a power-of-two scale s (a power of two keeps x*s and /s exact).

    scaling "none": s = 1 (the format's own range). "tensor": one s for the whole tensor.
    "channel": one s per slice along `channel_dim` (per output channel of a weight).
    How s is chosen depends on where the format is precise:
    - floats: from the absolute maximum, s = 2^floor(log2(fmt.max / amax)), so amax*s lies in
      (max/2, max]: the largest element lands within a factor 2 of the format's largest value
      and nothing overflows (a float is equally precise in every binade).
    - posits: from the root mean square, s = 2^round(-log2(rms)), so rms*s is the power of two
      nearest to 1, where a posit has the most fraction bits; values beyond maxpos after
      scaling saturate as usual. (Putting amax at maxpos, the float rule, would leave the bulk of
      the tensor in the tapered range: scaled posit8 lost half its PTQ accuracy that way.)
    A slice whose amax (floats) or rms (posits) is 0 (all zeros) or not finite (one inf or NaN
    in it) uses s = 1, so zeros stay zeros and NaN/inf behave as in plain quantize (NaN stays
    NaN). s stays in the window where the rescale is exact (``_pow2_exponent``): for bf16 and
    e8mY s >= 1, and no float value divided by s leaves float32.
    `cast(x, fmt, rounding, saturate, generator)` replaces `quantize` (the qtorch backend).
    `scaling` may also be a ``Scaling`` (common/scaling.py); a string is parsed into one here.
    """
    requested = Scaling.parse(scaling, channel_dim)
    fmt = parse_format(fmt)
    check_tensor(x)
    plan = requested.for_format(fmt)       # the rule; a block format refuses tensor/channel
    cast = cast or quantize
    if not plan.rescales or x.numel() == 0:
        return cast(x, fmt, rounding, saturate, generator)
    _check_dtype(x, fmt, plan)
    stat = _scale_statistic(x.detach(), plan)
    k = _scale_exponent(stat, fmt, plan)
    return _cast_with_scale(x, fmt, k, plan, rounding, saturate, generator, cast)


def representable_values(fmt: Union[str, Format]) -> torch.Tensor:
    """All finite values of `fmt` (at most 16 bits), sorted ascending, float32, zero once.

    Enumerated from the bit layout: floats from every (exponent, mantissa) field pair the layout
    leaves finite, posits by decoding every pattern except NaR.
    """
    fmt = parse_format(fmt)
    if fmt.is_block:
        raise ValueError(f"{fmt} is a block format: its values depend on each block's scale; "
                         f"see representable_values({fmt.element}) for its elements")
    if fmt.bits > 16:
        raise ValueError(f"representable_values needs a format of at most 16 bits, {fmt} has "
                         f"{fmt.bits}")
    if fmt.is_posit:
        n1 = fmt.bits - 1
        pats = torch.arange(1, 1 << n1, dtype=torch.int32)
        pos = K.posit_decode(pats, n1, fmt.es, 1 << fmt.es).view(torch.float32)
    else:
        m = fmt.man_bits
        top_field = fmt.max_exp + fmt.bias  # largest exponent field holding finite values
        field = torch.arange(0, top_field + 1, dtype=torch.float64).repeat_interleave(1 << m)
        man = torch.arange(0, 1 << m, dtype=torch.float64).repeat(top_field + 1)
        frac = man / 2.0**m
        pos = torch.where(field == 0, frac * 2.0 ** (1 - fmt.bias),
                          (1 + frac) * torch.exp2(field - fmt.bias))
        pos = pos[(pos > 0) & (pos <= fmt.max)].to(torch.float32)
    pos = torch.unique(pos)  # sorted
    return torch.cat([-pos.flip(0), torch.zeros(1), pos])

