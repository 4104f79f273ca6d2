"""Element-wise rounding kernels on float32 bit patterns (used by common/quant.py,
common/blocks.py and common/dispatch.py; no public API of its own).

Every function here is a straight sequence of element-wise PyTorch ops on int32 tensors holding
float32 bit patterns, with format parameters passed either as Python ints (eager mode) or as 0-d
int32 tensors (compiled mode: one compiled kernel then serves every format, so training with many
formats compiles once per kernel, not once per format). No data-dependent Python control flow, so
the same code runs eagerly, under ``torch.compile`` (C++/OpenMP on CPU, Triton on CUDA) and
inside a user's compiled model, with the same bits everywhere.

Why integers and not float arithmetic: the float tricks (add a magic number, subtract it) depend
on the rounding mode, on flush-to-zero of subnormals (GPU kernels, fast-math CPU flags) and on
fused multiply-add contraction, all of which differ between back-ends. Integer add, shift, and,
or, compare and multiply (wrapping in two's complement) are the same on every back-end; no
kernel here does float arithmetic.

Shift amounts are kept in [0, 31] everywhere: shifting an int32 by 32 or more is undefined in
C++ and differs between CPU and GPU.
"""
from __future__ import annotations

import math

import torch

# float32 layout (IEEE 754 binary32)
F32_ABS_MASK = 0x7FFFFFFF
F32_MAN_BITS = 23
F32_MAN_MASK = 0x007FFFFF
F32_INF_BITS = 0x7F800000
F32_QNAN_BITS = 0x7FC00000
F32_BIAS = 127
F32_MAX_BITS = 0x7F7FFFFF
F32_SIGN_BIT = -(1 << 31)  # 0x80000000 as an int32

# float64 layout (IEEE 754 binary64), for the round-to-odd narrowing of float64 inputs
F64_ABS_MASK = 0x7FFFFFFFFFFFFFFF
F64_MAN_BITS = 52
F64_MAN_MASK = (1 << 52) - 1
F64_EXP_ALL_ONES = 0x7FF
F64_BIAS = 1023

# lowbias32 (C. Wellons' integer hash: xorshift-multiply twice then xorshift, a bijection).
# Multipliers above 2^31 are written as their wrapped int32 value: int32 products wrap the same
# way on every back-end (two's complement), which is what the hash relies on.
_HASH_M1 = 0x7FEB352D
_HASH_M2 = 0x846CA68B - (1 << 32)
_GOLDEN = 0x9E3779B9 - (1 << 32)  # 2^32 / golden ratio: spreads consecutive indices


def f32_bits(value: float) -> int:
    """The float32 bit pattern of a value >= 0 that float32 holds exactly (the kernels' format
    constants), as a non-negative int. Plain arithmetic, not struct: torch.compile also traces
    this when a user's compiled model casts a format for the first time."""
    mant, exp = math.frexp(value)  # value = mant * 2^exp, 0.5 <= mant < 1
    field = max(exp - 1 + F32_BIAS, 0) if value else 0  # 0: subnormal or zero
    man = value * 2.0 ** (F32_MAN_BITS - max(exp - 1, 1 - F32_BIAS)) - (field > 0) * 2**F32_MAN_BITS
    if not (value >= 0 and field < 255 and man == int(man)):
        raise ValueError(f"{value!r} is no float32 value >= 0")
    return (field << F32_MAN_BITS) | int(man)


def _lsr(h: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int32 (torch's >> is arithmetic for signed types)."""
    return (h >> k) & ((1 << (32 - k)) - 1)


def _mix(h: torch.Tensor) -> torch.Tensor:
    h = h ^ _lsr(h, 16)
    h = h * _HASH_M1
    h = h ^ _lsr(h, 15)
    h = h * _HASH_M2
    return h ^ _lsr(h, 16)


def element_index(bits: torch.Tensor, lane: torch.Tensor = None) -> torch.Tensor:
    """int32 index of every element of `bits` in memory order.

    For a (rows, 16) view, pass `lane` = arange(16): row * 16 + lane vectorises to two ops on
    CPU, while inductor's CPU code builds an in-kernel arange one lane at a time (it cost more
    than the whole rounding). The values are the same either way.
    """
    if lane is None:
        return torch.arange(bits.numel(), device=bits.device, dtype=torch.int32)
    rows = torch.arange(bits.shape[0], device=bits.device, dtype=torch.int32).view(-1, 1)
    return rows * lane.numel() + lane


def random_bits(idx: torch.Tensor, seed: torch.Tensor, words: int = 1):
    """`words` int32 tensors of pseudo-random bits, one per element index in `idx`, a pure
    function of (index, two seed words).

    Counter-based (no state besides ``seed``), so one fused kernel generates them in registers,
    the same bits come out on CPU and CUDA, eager and compiled, and torch's generator is only
    touched once per call (to draw ``seed``). One lowbias32 round per word keeps the generator
    cheaper than the rounding it feeds (ample for rounding: every output bit is fair and
    neighbouring elements are decorrelated, see the tests). The second word hashes another
    counter value, so it is not a function of the first word. Tensors up to 2^31 elements.
    """
    # (idx + seed) * golden, not idx * golden + seed: inductor's CPU code turns arange * constant
    # into Vectorized::arange(base, golden), whose lanes overflow int32 (undefined behaviour in
    # C++; with a static size the compiled loop stopped after 16 elements and left garbage).
    # The same family of streams: seed s here is seed s * golden there.
    c = (idx + seed[0]) * _GOLDEN
    first = _mix(c) ^ seed[1]
    if words == 1:
        return first
    return first, _mix(c ^ _HASH_M1) ^ seed[1]


# ----------------------------------------------------------------------------------------------
# Floats. Every kernel takes and returns int32 float32 bit patterns: the float <-> int bitcasts
# happen outside (free views), because inductor's CPU code for an in-kernel bitcast goes through
# memory and costs more than the whole rounding.
#
# A float32 magnitude 2^e * (1 + f) of the format's normal range keeps man_bits mantissa bits:
# round its pattern to a multiple of 2^s0, s0 = 23 - man_bits (a carry out of the mantissa bumps
# the exponent, exactly the next value). Below the smallest normal 2^emin the quantum is fixed,
# 2^(emin - man_bits); in binade e that is 2^s pattern units with s = s0 + (emin - e), so the
# same pattern rounding works with a per-element shift while s <= 23. s == 24 is the binade just
# below the smallest subnormal Q (rounds to 0 or Q), s > 24 rounds to 0. Formats with 8 exponent
# bits share float32's emin, so s == s0 throughout and float32 subnormals round natively.
#
# Parameters (see float_params): s0, s_top = s0 + (float32 exponent field of the smallest normal),
# so that s = max(s_top - field, s0); clamp_pat = bits(max + ulp(max)) (the first pattern that
# always overflows), max_pat = bits(max), ovf_pat = what an overflow becomes, q_pat /
# half_q_pat = bits of the smallest subnormal and of half of it; NaN comes out (as float32's
# default NaN, never with a sign) for magnitudes above nan_pat in nearest mode (NaN inputs, and
# for E4M3 non-saturating everything that rounds above max), and ovf_sign = 0 drops the sign of
# a stochastic overflow to NaN (-1 keeps it: +-inf, +-max).
# ----------------------------------------------------------------------------------------------
FLOAT_PARAM_NAMES = ("s0", "s_top", "clamp_pat", "max_pat", "ovf_pat", "q_pat", "half_q_pat",
                     "nan_pat", "ovf_sign")


def float_params(fmt, saturate: bool) -> tuple:
    """Integer parameters of the float kernels for a parsed float `Format`."""
    m = fmt.man_bits
    if fmt.max_exp >= 127:  # max + ulp(max) = 2^128: the float32 inf pattern
        clamp_pat = F32_INF_BITS
    else:
        clamp_pat = f32_bits(fmt.max + 2.0 ** (fmt.max_exp - m))
    max_pat = f32_bits(fmt.max)
    if saturate or fmt.layout == "mx":  # OCP saturation; MX formats have no inf and no NaN
        ovf_pat = max_pat
    elif fmt.has_inf:  # IEEE-like: overflow to inf
        ovf_pat = F32_INF_BITS
    else:  # OCP E4M3 non-saturating: overflow to NaN (its only special value)
        ovf_pat = F32_QNAN_BITS
    nan_pat, ovf_sign = F32_INF_BITS, -1
    if ovf_pat == F32_QNAN_BITS:  # max's last mantissa bit is 0: max + ulp/2 still rounds down
        assert m >= 1 and (fmt.max / 2.0 ** (fmt.max_exp - m)) % 2 == 0
        nan_pat, ovf_sign = f32_bits(fmt.max + 2.0 ** (fmt.max_exp - m - 1)), 0
    if fmt.exp_bits < 8:
        q_pat, half_q_pat = f32_bits(fmt.min_subnormal), f32_bits(fmt.min_subnormal / 2)
    else:  # unused: s never exceeds 23 (and half of 2^-149 is no float32)
        q_pat = half_q_pat = 0
    s0 = F32_MAN_BITS - m
    return (s0, s0 + (1 - fmt.bias) + F32_BIAS, clamp_pat, max_pat, ovf_pat, q_pat, half_q_pat,
            nan_pat, ovf_sign)


def _float_split(bits: torch.Tensor, s0, s_top, clamp_pat):
    mag = bits & F32_ABS_MASK
    sign = bits ^ mag
    # inf and NaN clamp to the first always-overflowing pattern (NaN is restored at the end), so
    # no later step sees an exponent beyond the format's range.
    magc = torch.clamp(mag, max=clamp_pat)
    ef = magc >> F32_MAN_BITS
    # pattern bits below the format's quantum: s0, plus one per binade below the smallest normal
    # (float32 subnormals, field 0, sit in the binade of field 1)
    s = torch.clamp(s_top - torch.clamp(ef, min=1), min=s0)
    sc = torch.clamp(s, max=F32_MAN_BITS)
    return mag, sign, magc, s, sc


def _float_finish(mag, sign, r, max_pat, ovf_pat, nan_pat=F32_INF_BITS):
    out = torch.where(r > max_pat, ovf_pat, r) | sign
    return torch.where(mag > nan_pat, F32_QNAN_BITS, out)


def float_nearest(bits: torch.Tensor, p) -> torch.Tensor:
    """Round float32 patterns to the float format of parameters p, to nearest, ties to even
    (the even pattern: for formats without mantissa bits, the even exponent field)."""
    s0, s_top, clamp_pat, max_pat, ovf_pat, q_pat, half_q_pat, nan_pat, ovf_sign = p
    mag, sign, magc, s, sc = _float_split(bits, s0, s_top, clamp_pat)
    nz = (sc > 0).to(torch.int32)  # sc == 0 (23 mantissa bits, normal range): nothing dropped
    half_m1 = ((1 << sc) >> 1) - nz
    # the kept pattern's last bit decides ties; in the binade [Q, 2Q) (s == 23 below the normal
    # range) the neighbours are Q (odd code 1) and 2Q (even code 2), so a tie goes up
    odd = ((magc >> sc) & nz) | ((s == 23) & (s != s0)).to(torch.int32)
    r = ((magc + half_m1 + odd) >> sc) << sc
    # below the smallest subnormal Q: Q if more than Q/2 (a tie goes to 0), else 0
    r = torch.where(s >= 24, ((s == 24) & (magc > half_q_pat)).to(torch.int32) * q_pat, r)
    return _float_finish(mag, sign, r, max_pat, ovf_pat, nan_pat)


def float_stochastic(bits: torch.Tensor, p, rand: torch.Tensor) -> torch.Tensor:
    """Round float32 patterns to the float format of parameters p, stochastically (unbiased).

    Adds uniform random bits below the kept mantissa and truncates: x between neighbours lo < hi
    becomes hi with probability (x - lo) / (hi - lo) exactly (the dropped bits are the fraction of
    the gap). Below the smallest subnormal Q, x becomes Q with probability x / Q resolved to
    2^-30 of Q (exact down to Q / 2^7; a value more than 2^30 times smaller than Q rounds to 0).
    """
    s0, s_top, clamp_pat, max_pat, ovf_pat, q_pat, half_q_pat, nan_pat, ovf_sign = p
    mag, sign, magc, s, sc = _float_split(bits, s0, s_top, clamp_pat)
    low = (-1 << sc) ^ -1  # the pattern bits below the quantum
    r = (magc + (rand & low)) & ~low
    # below Q (s >= 24): x / Q as a 30-bit fixed-point fraction (the significand, implicit bit
    # set, shifted by the binade; float32 subnormals are far below Q / 2^30 and come out 0),
    # against 30 random bits: Q where they are smaller (the sign bit of their difference), else 0
    frac = (((magc & F32_MAN_MASK) | (1 << F32_MAN_BITS)) << 6) >> torch.clamp(s - 24, 0, 31)
    below_q = (((rand & ((1 << 30) - 1)) - frac) >> 31) & q_pat
    r = torch.where(s >= 24, below_q, r)
    out = torch.where(r > max_pat, ovf_pat | (sign & ovf_sign), r | sign)
    return torch.where(mag > F32_INF_BITS, F32_QNAN_BITS, out)


def float_stochastic_e8(bits: torch.Tensor, p, rand: torch.Tensor) -> torch.Tensor:
    """float_stochastic for formats with 8 exponent bits (bf16, e8mY): their quantum below the
    normal range is float32's own, so adding random bits below the kept mantissa and truncating
    the pattern is the whole rounding (float32 subnormals included); a third of the work."""
    s0, s_top, clamp_pat, max_pat, ovf_pat, q_pat, half_q_pat, nan_pat, ovf_sign = p
    mag = bits & F32_ABS_MASK
    sign = bits ^ mag
    magc = torch.clamp(mag, max=clamp_pat)
    r = (magc + (rand & ((1 << s0) - 1))) & -(1 << s0)
    return _float_finish(mag, sign, r, max_pat, ovf_pat)  # (never an overflow to NaN)


# ----------------------------------------------------------------------------------------------
# Posits. Parameters (see posit_params): n1 = n - 1 (bits after the sign), es, emask = 2^es - 1,
# w = es + 23 (width of the exponent+fraction tail), kmax = n - 2 (regime of maxpos),
# maxpos_bits / minpos_bits (float32 patterns of maxpos and minpos).
#
# Rounding never decodes a posit pattern. For |x| = 2^scale * (1 + f) in range, the regime
# k = floor(scale / 2^es) leaves a = n - 1 - (regime length) bits for the tail (es exponent bits,
# then the 23 fraction bits of x). Truncating the tail to a bits gives the lower neighbour lo,
# which in float32 is x with its low d = w - a tail bits cleared: fraction bits if d <= 23, else
# all fraction bits and the low d - 23 bits of the scale. The next posit up is always
# hi = lo + 2^(23 + es - a) in float32 pattern arithmetic: one fraction ulp while exponent bits
# remain (a carry out of the fraction moves to the next binade, the next posit), else a scale
# step of 2^(es - a) (exponent bits cut; across a regime boundary too). Rounding then only
# chooses lo or hi.
# ----------------------------------------------------------------------------------------------
POSIT_PARAM_NAMES = ("n1", "es", "emask", "w", "kmax", "maxpos_bits", "minpos_bits")

# floor(2^31 / (2^g - 1)), the bit pattern "a one every g bits", for g = 2, 4, 8, 16 (index
# log2 g - 1); posit stochastic rounding across cut exponent bits builds its threshold from it.
_ONES_EVERY = (0x2AAAAAAA, 0x08888888, 0x00808080, 0x00008000)
assert all(v == 2**31 // ((1 << (2 << i)) - 1) for i, v in enumerate(_ONES_EVERY))


def posit_params(fmt) -> tuple:
    n, es = fmt.bits, fmt.es
    return (n - 1, es, (1 << es) - 1, es + F32_MAN_BITS, n - 2, f32_bits(fmt.max),
            f32_bits(fmt.min_subnormal))


def posit_shift_window(fmt) -> tuple:
    """(lo, hi): the power-of-two scale exponents k for which posit_nearest/stochastic(shift=k)
    equal q(x * 2^k) / 2^k exactly (see posit_nearest). With K = log2(maxpos) <= 126 the window
    [K - 127, 126 - K] is never empty."""
    big = (fmt.bits - 2) << fmt.es  # log2(maxpos) = -log2(minpos)
    return big - 127, 126 - big


def posit_decode(pat: torch.Tensor, n1, es, two_es):
    """float32 bit pattern of the positive posit with pattern `pat` (1 <= pat <= 2^(n-1)-1).

    Used to list a format's values. The regime length is a count of leading equal bits; torch has
    no count-leading-zeros, so the position of the highest set bit comes from the exponent of the
    exact int -> float32 conversion of a value below 2^16.
    """
    top = (pat >> (n1 - 1)) & 1
    maxpat = (1 << n1) - 1
    q = torch.where(top == 1, (~pat) & maxpat, pat)  # a run of ones: look at the inverted bits
    msb = (q.to(torch.float32).view(torch.int32) >> F32_MAN_BITS) - F32_BIAS
    m = torch.where(q == 0, n1, n1 - 1 - msb)  # regime run length
    k = torch.where(top == 1, m - 1, -m)
    rem_len = torch.clamp(n1 - 1 - m, min=0)  # bits after the regime's terminating bit
    rem = pat & ((1 << rem_len) - 1)
    fb = torch.clamp(rem_len - es, min=0)  # fraction bits present
    eb = (rem >> fb) << torch.clamp(es - rem_len, min=0)  # exponent bits cut by the end are 0
    frac = rem & ((1 << fb) - 1)
    scale = k * two_es + eb
    return ((scale + F32_BIAS) << F32_MAN_BITS) | (frac << (F32_MAN_BITS - fb))


def _posit_split(bits: torch.Tensor, p, shift=0):
    n1, es, emask, w, kmax, maxpos_bits, minpos_bits = p
    mag = bits & F32_ABS_MASK
    sign = bits ^ mag
    special = mag >= F32_INF_BITS  # inf and NaN -> NaR
    # float32 subnormals: -127, below every minpos. `shift` = log2 of a power-of-two scale s:
    # the rounding sees x*s (same fraction bits, scale + shift), see posit_nearest
    scale = (mag >> F32_MAN_BITS) - F32_BIAS + shift
    k = scale >> es  # regime (floor division by 2^es)
    sat_hi = k >= kmax  # at or beyond maxpos
    sat_lo = k < -kmax  # below minpos: never rounds to 0
    kc = torch.clamp(k, min=-kmax, max=kmax - 1)  # in range from here on (others saturate)
    # regime bits including the terminating bit: kc + 2 for kc >= 0, 1 - kc below (= ~kc + 2;
    # kc ^ (kc >> 31) is kc or ~kc by its sign: three integer ops, no compare and select)
    rlen = (kc ^ (kc >> 31)) + 2
    a = torch.clamp(n1 - rlen, min=0)  # tail bits kept (<= n - 3)
    d = w - a  # tail bits dropped (>= 1 since a <= 13 < w)
    dl = torch.clamp(d, max=F32_MAN_BITS)  # ... of them fraction bits
    de = torch.clamp(d - F32_MAN_BITS, min=0)  # ... of them exponent bits (<= es)
    lo_scale = torch.clamp((scale & -(1 << de)) + F32_BIAS, min=1)
    lo = (lo_scale << F32_MAN_BITS) | (mag & F32_MAN_MASK & -(1 << dl))
    step = 1 << (F32_MAN_BITS + es - a)  # hi - lo as a float32 pattern difference
    return mag, sign, special, sat_hi, sat_lo, scale, kc, a, d, dl, de, lo, step


def _posit_finish(val, mag, sign, special, sat_hi, sat_lo, maxpos_bits, minpos_bits, shift=0):
    val = torch.where(sat_hi, maxpos_bits, torch.where(sat_lo, minpos_bits, val))
    val = val - (shift << F32_MAN_BITS)  # q(x*s) / s: minpos..maxpos stay float32 normals
    out = torch.where(mag == 0, 0, val) | sign  # zero keeps its sign (-0.0 == 0)
    return torch.where(special, F32_QNAN_BITS, out)


def posit_nearest(bits: torch.Tensor, p, shift=0) -> torch.Tensor:
    """Round float32 patterns to posit(n, es): the bit string rounded to n bits, ties to the even
    pattern (the decision points are then the posit(n+1, es) values, not arithmetic means).

    shift = k returns q(x * 2^k) / 2^k, the power-of-two scaling done on the exponent field
    instead of two float passes. Exact for k in [log2(maxpos) - 127, 126 + log2(minpos)]
    (`posit_shift_window`): there every posit value divided by 2^k is a float32 normal, and an
    x whose x*2^k falls below 2^-126 (a float32 subnormal x included) is below minpos, so it
    rounds to minpos as it must.
    """
    n1, es, emask, w, kmax, maxpos_bits, minpos_bits = p
    mag, sign, special, sat_hi, sat_lo, scale, kc, a, d, dl, de, lo, step = _posit_split(
        bits, p, shift)
    tail = ((scale & emask) << F32_MAN_BITS) | (mag & F32_MAN_MASK)
    guard = (tail >> (d - 1)) & 1  # first dropped bit
    sticky = ((tail & ((1 << (d - 1)) - 1)) != 0).to(torch.int32)
    # last kept bit: a tail bit, or the regime's last bit (0 for k >= 0 "1..10", 1 for "0..01")
    lsb = torch.where(a > 0, (tail >> d) & 1, (kc < 0).to(torch.int32))
    up = guard & (sticky | lsb)
    return _posit_finish(lo + up * step, mag, sign, special, sat_hi, sat_lo, maxpos_bits,
                         minpos_bits, shift)


def posit_stochastic(bits: torch.Tensor, p, rand: torch.Tensor, rand2: torch.Tensor, shift=0):
    """Round float32 patterns to posit(n, es) stochastically, unbiased in value (es <= 4).

    Only fraction bits dropped (d <= 23): lo and hi are a fraction ulp apart, so adding d random
    bits to the dropped ones and carrying is exact. Exponent bits cut (lo = 2^L, hi = 2^(L+g),
    g = 2^(d-23)): adding random bits to the string would be biased (not linear in the value), so
    two unbiased steps compose: first x to its own binade ends 2^t, 2^(t+1) (exact, with the
    fraction), then 2^(L+m) to lo or hi with probability (2^m - 1) / (2^g - 1): up where a
    31-bit random integer is below floor(2^31 (2^m - 1) / (2^g - 1)), so resolved to 2^-31.
    With N = 2^m - 1 and 2^31 = q (2^g - 1) + 2^(31 mod g) (q: "a one every g bits"), that
    floor is N q + floor(N 2^(31 mod g) / (2^g - 1)) = N q + (N >> 1) for m < g, as g - 1 =
    31 mod g for every g here: the second term is N/2 + N / (2 (2^g - 1)), just above N/2.
    Gaps of g >= 32 (es >= 5) cannot be resolved this way: quant.py refuses them. Below
    minpos, zero is the lower neighbour: |x| becomes minpos with probability |x| / minpos,
    else 0 (sign kept), resolved to 2^-30 as in float_stochastic; |x| >= maxpos gives maxpos.
    `shift` scales as in posit_nearest.
    """
    n1, es, emask, w, kmax, maxpos_bits, minpos_bits = p
    mag, sign, special, sat_hi, sat_lo, scale, kc, a, d, dl, de, lo, step = _posit_split(
        bits, p, shift)
    frac = mag & F32_MAN_MASK
    mask = (1 << dl) - 1
    up_frac = ((frac & mask) + (rand & mask)) >> dl  # d <= 23: the whole answer
    # exponent bits cut: binade step, then the ladder probability
    m = (scale & ((1 << de) - 1)) + up_frac  # 2^m = (binade end) / lo, 0 <= m <= g
    g = 1 << de
    # (the innermost operand, (de >> 2) << 15 = [de == 4] * 0x8000 for de <= es <= 4, is an int32
    # tensor so that no step promotes to int64)
    ones = torch.where(de == 1, _ONES_EVERY[0], torch.where(de == 2, _ONES_EVERY[1], torch.where(
        de == 3, _ONES_EVERY[2], (de >> 2) << 15)))
    n_up = (1 << torch.clamp(m, max=30)) - 1  # 2^m - 1
    threshold = n_up * ones + (n_up >> 1)  # floor(2^31 n_up / (2^g - 1)) <= 2^31 - 1
    up_exp = ((rand2 & F32_ABS_MASK) < threshold) | (m == g)
    up = torch.where(de > 0, up_exp.to(torch.int32), up_frac)
    # below minpos, |x*s| / minpos = sig * 2^-(23 + t) with t = log2(minpos) - binade(x*s) >= 0
    # (float32 subnormals: no implicit bit, binade of field 1), as a 30-bit fixed-point fraction
    # p30 against 30 random bits: keep = -1 (minpos) where they are smaller, else 0 (zero). In
    # range t < 0 gives p30 >= 2^30 (keep = -1), and x = 0 gives p30 = 0 (keep = 0).
    normal = torch.clamp(mag >> F32_MAN_BITS, max=1)
    t = normal - (scale + ((kmax << es) + 1))
    p30 = ((frac | (normal << F32_MAN_BITS)) << 7) >> torch.clamp(t, 0, 31)
    keep = ((rand & ((1 << 30) - 1)) - p30) >> 31
    val = torch.where(sat_hi, maxpos_bits, torch.where(sat_lo, minpos_bits, lo + up * step))
    out = ((val - (shift << F32_MAN_BITS)) & keep) | sign
    return torch.where(special, F32_QNAN_BITS, out)


# ----------------------------------------------------------------------------------------------
# Native casts: exact where torch's own conversion is exactly the contract's rounding.
# ----------------------------------------------------------------------------------------------
_FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def cast_nearest(x: torch.Tensor, dtype: torch.dtype, bound: float) -> torch.Tensor:
    """Round via torch's RNE cast to `dtype` (eager). bound: the format's max (saturating) or
    inf. bf16/fp16 overflow to inf like IEEE, then inf becomes +-bound; float8 is clamped to
    +-bound first (torch's CPU e4m3 cast saturates, its e5m2 cast does not, Triton's float8
    casts saturate). NaN becomes float32's default NaN: torch's casts keep payloads and signs,
    differently on their vector and scalar paths. -0.0 stays -0.0."""
    if dtype in _FLOAT8_DTYPES:
        x = torch.clamp(x, min=-bound, max=bound)
    return x.to(dtype).to(torch.float32).nan_to_num_(math.nan, bound, -bound)


def cast_nearest_fused(x: torch.Tensor, dtype: torch.dtype, bound: torch.Tensor) -> torch.Tensor:
    """cast_nearest for bf16/fp16 in a compiled kernel, with bound a 0-d float32 tensor (a
    runtime input: one kernel serves both overflow modes). x != x, not isnan: inductor's CPU
    code vectorises the comparison, not isnan."""
    y = torch.clamp(x, -bound, bound).to(dtype).to(torch.float32)
    return torch.where(x != x, math.nan, y)


# ----------------------------------------------------------------------------------------------
# float64 inputs: narrowed to float32 by round-to-odd, so that the format's rounding of the
# float32 value equals the rounding of the float64 value (no double rounding) for every format
# with at most 21 mantissa bits.
# ----------------------------------------------------------------------------------------------
def f64_to_f32_round_to_odd(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounded to odd: truncate toward zero, then set the last bit where
    anything nonzero was cut (beyond float32's range: +-max, odd already). Integer arithmetic on
    the bit patterns, so that no compiler can fold it away. inf stays inf, NaN gives NaN."""
    b = x.view(torch.int64)
    mag = b & F64_ABS_MASK
    field = mag >> F64_MAN_BITS
    sig = (mag & F64_MAN_MASK) | ((field != 0).to(torch.int64) << F64_MAN_BITS)
    e = field - F64_BIAS
    # bits of the 53-bit significand that float32 cannot keep: 29, plus one per binade below
    # float32's smallest normal (a float64 subnormal keeps none)
    cut = torch.clamp(F64_MAN_BITS - F32_MAN_BITS + torch.clamp(1 - F32_BIAS - e, min=0), max=62)
    sticky = ((sig & ((1 << cut) - 1)) != 0).to(torch.int64)
    # normal: (field - 1) << 23 plus the significand with its implicit bit carries into field
    pat = ((torch.clamp(e + F32_BIAS, min=1) - 1) << F32_MAN_BITS) + (sig >> cut) | sticky
    pat = torch.where(e > F32_BIAS, F32_MAX_BITS, pat)
    pat = torch.where(field == F64_EXP_ALL_ONES,
                      torch.where(mag == field << F64_MAN_BITS, F32_INF_BITS, F32_QNAN_BITS), pat)
    sign = (b >> 32).to(torch.int32) & F32_SIGN_BIT  # the high word's sign bit
    return (pat.to(torch.int32) | sign).view(torch.float32)
