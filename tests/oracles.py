"""Independent references for the cast tests, shared by the CPU suites and the CUDA suite.

Everything here is written from the definitions (the format contract: docs/formats.md and
docs/block-formats.md) or wraps an outside library (ml_dtypes). Nothing here runs the project's
casts: tests/test_imports.py checks that this module takes nothing from common/ but the spec
parser (``parse_format``, which names a format's fields).

- Exact oracles in Python fractions: ``FloatDef`` (eXmY, bf16, fp16: values, neighbours, both
  roundings), ``PositDef`` (posit(n, es) from ``posit_value``, the definition's decoder),
  ``definition(spec)``, ``oracle_nearest``.
- numpy oracles for large input sets: ``float_oracle`` (float64 arithmetic), ``posit_oracle``
  (a table of values and decision points), ``ml_dtypes_reference``.
- The block-format oracle: ``block_oracle`` (MX and NVFP4, the contract's formula).
- Input sets: ``float_inputs``, ``posit_inputs``, ``inputs32``, ``inputs64`` (decision points and
  their float32/float64 neighbours), ``random_finite``, ``special_blocks``, ``nans``.
- Bit-for-bit comparisons: ``assert_same_bits`` (flat, with the inputs),
  ``assert_same_array_bits`` (any shape), ``bit_set``.
"""
import bisect
import functools
import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from common.formats import parse_format

ml_dtypes = pytest.importorskip("ml_dtypes")

TWO = Fraction(2)
F32_QNAN = 0x7FC00000  # float32's default quiet NaN
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}

# random float32 bit patterns per format (plus the exhaustive sets, both signs): millions for
# the main formats, fewer for the many extra layouts to keep the suite fast
N_RANDOM = 1 << 20
N_RANDOM_EXTRA = 1 << 18
MAIN_FORMATS = ("bf16", "fp16", "e4m3", "e5m2", "e2m1", "e2m3", "e3m2", "posit8es1", "posit16es1",
                "posit8es0", "posit16es2")
RNG_SEED = 20240611

# ml_dtypes types (OCP / IEEE conversions, non-saturating) and the "other eXmY" rule: IEEE-like
ML_DTYPES = {
    "bf16": ml_dtypes.bfloat16, "fp16": np.float16, "e4m3": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2, "e2m1": ml_dtypes.float4_e2m1fn,
    "e2m3": ml_dtypes.float6_e2m3fn, "e3m2": ml_dtypes.float6_e3m2fn,
    "e3m4": ml_dtypes.float8_e3m4,
}
# beyond ml_dtypes: small/large exponent and mantissa widths, 8-bit exponents with subnormals
# below float32's normal range, 23-bit mantissas (no rounding in the normal range)
OTHER_FLOATS = ["e6m9", "e2m0", "e3m1", "e4m0", "e7m8", "e8m3", "e5m13", "e8m15", "e4m23",
                "e8m22", "e7m1"]
POSIT_SPECS = ["posit2es0", "posit3es0", "posit3es1", "posit4es0", "posit4es1", "posit5es2",
               "posit6es1", "posit7es3", "posit8es0", "posit8es1", "posit8es2", "posit8es4",
               "posit10es1", "posit12es2", "posit14es0", "posit16es1", "posit16es2",
               "posit16es3", "posit5es5"]


def n_es(spec):
    """(n, es) of a posit spec."""
    f = parse_format(spec)
    return f.bits, f.es


# =============================================================================================
# exact oracles: the definitions in Python fractions
# =============================================================================================
def pow2(e) -> Fraction:
    return TWO ** e


def floor_log2(a: Fraction) -> int:
    e = a.numerator.bit_length() - a.denominator.bit_length()
    return e if TWO**e <= a else e - 1


class FloatDef:
    """An eXmY float from its widths: bias 2^(X-1)-1, subnormals; layout from docs/formats.md's
    table: OCP E4M3 (no inf, the all-ones code is NaN), OCP MX FP4/FP6 (every code finite),
    else IEEE-like (all-ones exponent for inf/NaN)."""

    NAMED = {"bf16": (8, 7), "fp16": (5, 10)}

    def __init__(self, spec):
        x, m = self.NAMED.get(spec) or map(int, re.fullmatch(r"e(\d+)m(\d+)", spec).groups())
        self.man, self.bias = m, 2 ** (x - 1) - 1
        self.emin = 1 - self.bias
        top = 2**x - 1 - self.bias  # exponent of the all-ones field
        if (x, m) == (4, 3):
            self.layout, self.max = "fn", (2 - TWO ** (1 - m)) * TWO**top
        elif (x, m) in ((2, 1), (2, 3), (3, 2)):
            self.layout, self.max = "mx", (2 - TWO**-m) * TWO**top
        else:
            self.layout, self.max = "ieee", (2 - TWO**-m) * TWO ** (top - 1)
        self.min_sub = TWO ** (self.emin - m)
        self.emax = floor_log2(self.max)  # exponent of the largest normal (MX's emax_elem)

    def quantum(self, a):
        """Spacing of the grid at |x| = a (a value of the format or not)."""
        return TWO ** (max(floor_log2(a), self.emin) - self.man) if a else self.min_sub

    def neighbours(self, a):
        """(lo, hi): adjacent grid values with lo <= a < hi, for a >= 0 (hi may lie beyond
        max: the virtual next value)."""
        q = self.quantum(a)
        n = a // q
        return n * q, (n + 1) * q

    def bracket(self, a):
        """(lo, hi, lo's pattern is even) around a > 0; hi may lie beyond max (the virtual
        next value). Ties go to the even pattern: the last mantissa bit, or for eXm0 the
        exponent field's last bit (0 has pattern 0)."""
        e = max(floor_log2(a), self.emin)
        q = TWO ** (e - self.man)
        n = a // q
        even = n % 2 == 0 if self.man else (n == 0 or (e + self.bias) % 2 == 0)
        return n * q, (n + 1) * q, even

    def _nearest_unsaturated(self, a):
        """a > 0 rounded to the nearest grid value, ties to even; may exceed max."""
        lo, hi, lo_even = self.bracket(a)
        up = a - lo > hi - a or (a - lo == hi - a and not lo_even)
        return hi if up else lo

    def nearest(self, a):
        """a >= 0 rounded to nearest, ties to the even pattern, saturating at max."""
        return min(self._nearest_unsaturated(a), self.max) if a else a

    def overflow(self, saturate):
        if saturate or self.layout == "mx":
            return self.max
        return math.inf if self.layout == "ieee" else math.nan

    def outcomes(self, x, rounding, saturate):
        """[(probability, value)] of rounding the Python float x."""
        if math.isnan(x):
            return [(1, math.nan)]
        sign = math.copysign(1.0, x)
        if math.isinf(x):
            return [(1, sign * self.overflow(saturate))]
        a = Fraction(abs(x))
        if a == 0:
            return [(1, x)]
        if rounding == "nearest":
            pairs = [(1, self._nearest_unsaturated(a))]
        else:
            lo, hi, _ = self.bracket(a)
            p = (a - lo) / (hi - lo)
            pairs = [(1 - p, lo), (p, hi)] if p else [(1, lo)]
        return [(p, sign * (float(v) if v <= self.max else self.overflow(saturate)))
                for p, v in pairs]

    def grid(self, rng, n_sample):
        """Format values to test around: all of them for small formats, else the ends of the
        range, the normal/subnormal boundary and a random sample (as Fractions, >= 0)."""
        count = (floor_log2(self.max) - self.emin + 2) << self.man  # about the values
        if count <= 4096:
            vals, v = [], Fraction(0)
            while v <= self.max:
                vals.append(v)
                v += self.quantum(v)
            return vals
        picks = [Fraction(0), self.min_sub, 2 * self.min_sub, TWO**self.emin,
                 TWO**self.emin - self.min_sub, self.max, self.max - self.quantum(self.max)]
        top = floor_log2(self.max)
        for e in rng.integers(self.emin - self.man, top + 1, n_sample):
            e = int(e)
            q = self.quantum(TWO**e)
            picks.append(TWO**e + q * int(rng.integers(0, max(TWO**e // q, 1))))
        return sorted(set(picks))


def posit_value(p, n, es):
    """The value of the positive n-bit posit pattern p (0 < p < 2^(n-1)), from the definition:
    regime run, up to es exponent bits (cut bits count as 0), fraction. Exact (a Fraction)."""
    body = format(p, f"0{n}b")[1:]
    run = len(body) - len(body.lstrip(body[0]))
    k = run - 1 if body[0] == "1" else -run
    rest = body[run + 1:]
    e = int(rest[:es].ljust(es, "0"), 2) if es else 0
    f = rest[es:]
    frac = Fraction(int(f, 2), 2 ** len(f)) if f else Fraction(0)
    return TWO ** (k * 2**es + e) * (1 + frac)


class PositDef:
    """posit(n, es): values by pattern, decision points = posit(n+1, es) values of the patterns
    between (2p+1), never 0 nor beyond maxpos in nearest mode; stochastic: 0 is the lower
    neighbour of |x| < minpos."""

    def __init__(self, spec):
        n, es = map(int, re.fullmatch(r"posit(\d+)es(\d+)", spec).groups())
        self.vals = [posit_value(p, n, es) for p in range(1, 2 ** (n - 1))]
        self.dps = [posit_value(2 * p + 1, n + 1, es) for p in range(1, 2 ** (n - 1) - 1)]
        assert self.vals == sorted(self.vals)
        self.minpos, self.maxpos = self.vals[0], self.vals[-1]

    def outcomes(self, x, rounding, saturate):
        if not math.isfinite(x):
            return [(1, math.nan)]  # NaR
        a = Fraction(abs(x))
        sign = math.copysign(1.0, x)
        if a == 0:
            return [(1, x)]
        if a >= self.maxpos:
            return [(1, sign * float(self.maxpos))]
        if a < self.minpos:
            if rounding == "nearest":
                return [(1, sign * float(self.minpos))]
            p = a / self.minpos
            return [(1 - p, sign * 0.0), (p, sign * float(self.minpos))]
        i = bisect.bisect_right(self.vals, a) - 1
        lo, hi = self.vals[i], self.vals[i + 1]
        if a == lo:
            return [(1, sign * float(lo))]
        if rounding == "nearest":
            d = self.dps[i]
            up = a > d or (a == d and (i + 1) % 2 == 1)  # lo is pattern i+1: ties to even
            return [(1, sign * float(hi if up else lo))]
        p = (a - lo) / (hi - lo)
        return [(1 - p, sign * float(lo)), (p, sign * float(hi))]

    def grid(self, rng, n_sample):
        if len(self.vals) <= 4096:
            return self.vals
        idx = set(rng.integers(0, len(self.vals) - 1, n_sample).tolist()) | {0, len(self.vals) - 2}
        return [self.vals[i] for i in sorted(idx)] + [self.vals[-1]]

    def next_value(self, v):
        i = bisect.bisect_right(self.vals, v)
        return self.vals[i] if i < len(self.vals) else 2 * v


@functools.lru_cache(maxsize=None)
def definition(spec):
    return PositDef(spec) if spec.startswith("posit") else FloatDef(spec)


def oracle_nearest(spec, xs, saturate):
    return [definition(spec).outcomes(float(x), "nearest", saturate)[0][1] for x in xs]


# =============================================================================================
# exact oracle inputs: every decision point (or a sample), +-1 ulp, values, ends, specials
# =============================================================================================
def _next32(v, direction):
    return float(np.nextafter(np.float32(v), np.float32(direction)))


def _decision_points(spec, rng, n_sample):
    d = definition(spec)
    grid = d.grid(rng, n_sample)
    if isinstance(d, PositDef):
        pts = []
        for v in grid:
            w = d.next_value(v)
            i = bisect.bisect_left(d.vals, v)
            pts += [v, (v + w) / 2] + ([d.dps[i]] if i < len(d.dps) else [])
        pts += [d.minpos / 2, d.minpos / 3, d.maxpos * 2, d.maxpos * 3 / 2]
    else:
        pts = []
        for v in grid:
            pts += [v, v + d.quantum(v) / 2]  # the value and the midpoint above it
        top = d.max + d.quantum(d.max)
        pts += [top, d.max * 2, d.min_sub / 2, d.min_sub / 4, d.min_sub * 3 / 4]
    return [p for p in pts if p < TWO**128]


@functools.lru_cache(maxsize=None)
def inputs32(spec, n_sample=600):
    """float32 inputs at and one float32 ulp around every decision point (exact in float32 for
    every format here but the largest posits' far ends, which then round to float32)."""
    rng = np.random.default_rng(sum(map(ord, spec)))
    xs = []
    for p in _decision_points(spec, rng, n_sample):
        v = float(np.float32(float(p)))
        xs += [v, _next32(v, math.inf), _next32(v, -math.inf)]
    xs += [0.0, math.inf, 1e38, 3e-39, 1e-45]
    xs = np.array(xs, dtype=np.float32)
    xs = np.concatenate([xs, -xs, np.array([math.nan], dtype=np.float32)])
    return np.unique(xs.view(np.uint32)).view(np.float32)


@functools.lru_cache(maxsize=None)
def inputs64(spec, n_sample=300):
    """float64 inputs at every decision point, one float64 ulp either side and a quarter of a
    float32 ulp either side: those round to the decision point itself in float32 (round to
    nearest), the double-rounding trap."""
    rng = np.random.default_rng(sum(map(ord, spec)) + 1)
    xs = []
    for p in _decision_points(spec, rng, n_sample):
        v = float(p)
        if not 2.0**-126 <= v < 2.0**127:
            continue
        quarter = float(np.spacing(np.float32(v))) / 4
        xs += [v, math.nextafter(v, math.inf), math.nextafter(v, -math.inf), v + quarter,
               v - quarter]
    xs = np.array(xs, dtype=np.float64)
    return np.concatenate([xs, -xs])


# NaNs of either sign, quiet and signalling, with payloads
NAN_PATTERNS = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x7FA12345]


def nans(n, dtype=torch.float32):
    """n NaNs cycling through NAN_PATTERNS, as float32 then cast to ``dtype``."""
    x = torch.tensor(NAN_PATTERNS, dtype=torch.int64).to(torch.int32).view(torch.float32)
    return x.repeat(n // len(NAN_PATTERNS) + 1)[:n].to(dtype)


def bit_set(y):
    """The set of y's bit patterns (unsigned), e.g. {F32_QNAN} for a tensor of default NaNs."""
    ints = y.view(INT_VIEW[y.dtype]).numpy()
    return set(ints.view(f"u{ints.itemsize}").tolist())


# =============================================================================================
# numpy oracles over large input sets: floats in float64 arithmetic, posits from a table
# =============================================================================================
def float_oracle(x, fmt, saturate):
    """Round float32 x to float format fmt: quantum q = 2^(max(floor(log2|x|), emin) - man_bits),
    numpy rint (half to even) of |x|/q in float64 (exact here), then the overflow rule of
    docs/formats.md. Ties go to the even bit pattern: for man_bits >= 1 that is rint's even multiple
    of q; with no mantissa bits (eXm0) the pattern's last bit is the exponent field's."""
    with np.errstate(invalid="ignore"):  # signalling-NaN bit patterns raise the flag
        x64 = np.asarray(x, dtype=np.float32).astype(np.float64)
    a = np.abs(x64)
    emin = 1 - fmt.bias
    with np.errstate(all="ignore"):
        _, e = np.frexp(a)
        q = np.ldexp(1.0, np.maximum(e - 1, emin) - fmt.man_bits)
        r = np.rint(a / q) * q
        if fmt.man_bits == 0:  # tie between 2^k (field k + bias) and 2^(k+1): even field wins
            tie = (a / q) % 1 == 0.5
            lo = np.floor(a / q) * q
            lo_field = np.where(lo >= 2.0**emin, np.frexp(lo)[1] - 1 + fmt.bias, 0)
            r = np.where(tie, np.where(lo_field % 2 == 0, lo, lo + q), r)
    if saturate or fmt.layout == "mx":
        ovf = fmt.max
    elif fmt.has_inf:
        ovf = np.inf
    else:
        ovf = np.nan
    r = np.where(r > fmt.max, ovf, r)
    out = np.where(np.isnan(x64), np.nan, np.copysign(r, x64))
    return out.astype(np.float32)


def float_values_by_definition(fmt, max_fields=None):
    """Positive finite values of a float format from its fields (all of them when it has at
    most 16 bits; else the lowest and highest `max_fields` exponent fields)."""
    x_bits, m_bits = fmt.exp_bits, fmt.man_bits
    fields = np.arange(2**x_bits)
    if max_fields is not None and len(fields) > 2 * max_fields:
        fields = np.concatenate([fields[:max_fields], fields[-max_fields:]])
    mants = np.arange(2**m_bits) if m_bits <= 12 else np.unique(np.concatenate(
        [np.arange(64), 2**m_bits - 1 - np.arange(64),
         np.random.default_rng(1).integers(0, 2**m_bits, 512)]))
    f, m = np.meshgrid(fields, mants, indexing="ij")
    f, m = f.ravel(), m.ravel()
    top = 2**x_bits - 1
    if fmt.layout == "ieee":
        keep = f < top
    elif fmt.layout == "fn":
        keep = ~((f == top) & (m == 2**m_bits - 1))
    else:
        keep = np.ones_like(f, dtype=bool)
    f, m = f[keep], m[keep]
    frac = m / 2.0**m_bits
    val = np.where(f == 0, frac * 2.0 ** (1 - fmt.bias), (1 + frac) * 2.0 ** (f - fmt.bias))
    return np.unique(val[val > 0])


def ml_dtypes_reference(x, spec, saturate):
    """ml_dtypes converts with RNE, subnormals and the OCP non-saturating overflow; saturating
    mode is that conversion of x clipped to +-max."""
    fmt = parse_format(spec)
    src = np.clip(x, -fmt.max, fmt.max) if saturate else x
    with np.errstate(all="ignore"):
        return src.astype(ML_DTYPES[spec]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def posit_table(n, es):
    """Positive posit(n, es) values by pattern (index p = pattern p, 1 .. 2^(n-1)-1) and the
    decision points between p and p+1: the posit(n+1, es) value of pattern 2p+1."""
    vals = np.array([float(posit_value(p, n, es)) for p in range(1, 1 << (n - 1))])
    dps = np.array([float(posit_value(2 * p + 1, n + 1, es))
                    for p in range(1, (1 << (n - 1)) - 1)])
    return vals, dps


def posit_oracle(x, n, es):
    """Round float32 x to posit(n, es) from the table: saturate to [minpos, maxpos], never 0 for
    x != 0, round at the decision points, ties to the even pattern; inf/NaN -> NaN (NaR)."""
    vals, dps = posit_table(n, es)
    with np.errstate(invalid="ignore"):  # signalling-NaN bit patterns raise the flag
        x64 = np.asarray(x, dtype=np.float32).astype(np.float64)
    a = np.abs(x64)
    p = np.clip(np.searchsorted(vals, a, side="right") - 1, 0, len(vals) - 1)  # vals[p] <= a
    out = vals[p].copy()
    inner = (a > vals[0]) & (a < vals[-1])
    pi = p[inner]
    d = dps[np.clip(pi, 0, len(dps) - 1)] if len(dps) else np.zeros_like(pi, dtype=float)
    ai = a[inner]
    up = (ai > d) | ((ai == d) & ((pi + 1) % 2 == 1))  # pattern pi+1 is pi+2 since index 0 = 1
    res = np.where(up, vals[np.clip(pi + 1, 0, len(vals) - 1)], vals[pi])
    out[inner] = res
    out[a <= vals[0]] = vals[0]
    out[a >= vals[-1]] = vals[-1]
    out = np.copysign(out, x64)
    out[a == 0] = x64[a == 0]
    out[~np.isfinite(x64)] = np.nan
    return out.astype(np.float32)


# =============================================================================================
# large input sets
# =============================================================================================
def _around(v32):
    """v and one float32 ulp either side."""
    v32 = np.asarray(v32, dtype=np.float32)
    return np.concatenate([v32, np.nextafter(v32, np.float32(np.inf)),
                           np.nextafter(v32, np.float32(-np.inf))])


SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan,
                     np.finfo(np.float32).max, np.finfo(np.float32).smallest_subnormal,
                     np.finfo(np.float32).smallest_normal], dtype=np.float32)


def random_bits(n, seed):
    """n random float32 bit patterns (NaN, inf and subnormals included)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)


@functools.lru_cache(maxsize=None)
def float_inputs(spec, n_random=None):
    """Every value (<= 16 bits; else a sample), every midpoint between neighbours (0 and
    max + ulp included), each +-1 float32 ulp, overflow edges, specials, random bit patterns and
    random values spread over the format's range; both signs."""
    fmt = parse_format(spec)
    if n_random is None:
        n_random = N_RANDOM if spec in MAIN_FORMATS else N_RANDOM_EXTRA
    vals = float_values_by_definition(fmt, max_fields=None if fmt.bits <= 16 else 6)
    ulp_max = 2.0 ** (fmt.max_exp - fmt.man_bits)
    grid = np.concatenate([[0.0], vals, [fmt.max + ulp_max]])
    mids = (grid[:-1] + grid[1:]) / 2
    with np.errstate(over="ignore"):
        edges = np.array([fmt.max, fmt.max + ulp_max / 2, fmt.max + ulp_max, 2 * fmt.max,
                          fmt.min_subnormal / 2, fmt.min_subnormal / 4, fmt.min_normal])
        parts = [_around(vals.astype(np.float32)), _around(mids.astype(np.float32)),
                 _around(edges.astype(np.float32)), SPECIALS]
    rng = np.random.default_rng(RNG_SEED + fmt.bits)
    lo, hi = math.log2(fmt.min_subnormal) - 2, math.log2(min(fmt.max, 2.0**127)) + 1
    spread = rng.standard_normal(n_random // 4) * np.exp2(rng.uniform(lo, hi, n_random // 4))
    with np.errstate(over="ignore"):  # spread values beyond float32 become inf: wanted
        parts += [random_bits(n_random, RNG_SEED), spread.astype(np.float32)]
    x = np.concatenate(parts).astype(np.float32)
    return np.concatenate([x, -x])


@functools.lru_cache(maxsize=None)
def posit_inputs(n, es, n_random=None):
    """All values, all decision points, arithmetic midpoints, each +-1 float32 ulp, values
    beyond maxpos and below minpos, specials, random bit patterns and spread values; both
    signs."""
    if n_random is None:
        n_random = N_RANDOM if f"posit{n}es{es}" in MAIN_FORMATS else N_RANDOM_EXTRA
    vals, dps = posit_table(n, es)
    mids = (vals[:-1] + vals[1:]) / 2
    edges = np.array([vals[-1] * 2, vals[-1] * 1.5, vals[0] / 2, vals[0] / 3, 1e-38, 1e38])
    parts = [_around(v.astype(np.float32)) for v in (vals, dps, mids, edges)] + [SPECIALS]
    rng = np.random.default_rng(RNG_SEED + n * 8 + es)
    top = math.log2(vals[-1]) + 2
    spread = rng.standard_normal(n_random // 4) * np.exp2(rng.uniform(-top, top, n_random // 4))
    parts += [random_bits(n_random, RNG_SEED + 2), spread.astype(np.float32)]
    x = np.concatenate(parts).astype(np.float32)
    return np.concatenate([x, -x])


# =============================================================================================
# block formats: MX and NVFP4 by the contract (docs/block-formats.md)
# =============================================================================================
# docs/block-formats.md, "Specs": element and block size of each spec
MX_TABLE = {"mxfp8": ("e4m3", 32), "mx-e4m3": ("e4m3", 32), "mx-e5m2": ("e5m2", 32),
            "mxfp6": ("e2m3", 32), "mx-e2m3": ("e2m3", 32), "mx-e3m2": ("e3m2", 32),
            "mxfp4": ("e2m1", 32), "mx-e2m1": ("e2m1", 32)}
E4M3, E2M1 = FloatDef("e4m3"), FloatDef("e2m1")


def signed(q: Fraction, v: float) -> float:
    """|q| with v's sign, as a float."""
    return math.copysign(float(q), v)


def f32(v):
    return np.float32(v)


def mx_scale_of_block(vals, elem: FloatDef) -> int:
    """E8M0 exponent e of the block's scale X = 2^e: floor(log2 amax) - emax, clamped to
    [-127, 127]; -127 for an all-zero block."""
    amax = max(abs(Fraction(v)) for v in vals)
    return -127 if amax == 0 else min(127, max(-127, floor_log2(amax) - elem.emax))


def mx_oracle_block(vals, elem: FloatDef):
    """One MX block by the contract: NaN/inf anywhere -> all NaN; X = 2^(floor(log2 amax) - emax)
    clamped to [2^-127, 2^127] (2^-127 for an all-zero block); x/X to nearest, saturating; times
    X. Also checks the contract's premise that float32 holds every result exactly."""
    if not all(math.isfinite(v) for v in vals):
        return [math.nan] * len(vals)
    e = mx_scale_of_block(vals, elem)
    out = []
    for v in vals:
        r = elem.nearest(abs(Fraction(v)) / pow2(e)) * pow2(e)
        assert Fraction(float(np.float32(float(r)))) == r, (v, e, r)
        out.append(signed(r, v))
    return out


def nvfp4_oracle_tensor(blocks_f32, amax_tensor):
    """NVFP4 blocks by the contract, float32 arithmetic with numpy scalars: g = amax/2688 (1 for
    an all-zero tensor), s = e4m3(clamp((amax_b/6)/g, 2^-6, 448)), q = e2m1(clamp(x*((1/g)/s),
    -6, 6)), value = q*(g*s); a zero x gives q = 0 (signed) even where (1/g)/s overflows to inf
    (docs/block-formats.md: a zero block stays zero). Returns the values and, per element,
    (y, g*s) for the SR tests."""
    with np.errstate(all="ignore"):
        g = f32(1.0) if amax_tensor == 0 else f32(amax_tensor) / f32(2688.0)
        out, parts = [], []
        for vals in blocks_f32:
            amax = f32(max(abs(v) for v in vals)) if all(not math.isnan(v) for v in vals) \
                else f32(math.nan)
            s0 = (amax / f32(6.0)) / g
            if math.isnan(s0):
                s = f32(math.nan)
            else:
                s0 = min(max(s0, f32(2.0**-6)), f32(448.0))
                s = f32(float(E4M3.nearest(Fraction(float(s0)))))
            r = (f32(1.0) / g) / s
            gs = g * s
            blk, blk_parts = [], []
            for v in vals:
                y = f32(v) * r if v != 0 else f32(v)
                if math.isnan(y):
                    blk.append(math.nan)
                    blk_parts.append((y, gs))
                    continue
                y = min(max(y, f32(-6.0)), f32(6.0))
                q = f32(signed(E2M1.nearest(abs(Fraction(float(y)))), float(y)))
                blk.append(float(q * gs))
                blk_parts.append((y, gs))
            out.append(blk)
            parts.append(blk_parts)
    return out, parts


def mx_spec(spec):
    """(element spec, block size) of an MX spec."""
    if spec in MX_TABLE:
        return MX_TABLE[spec]
    m = re.fullmatch(r"mx(\d*)-(e\d+m\d+)", spec)
    return m.group(2), int(m.group(1) or 32)


def block_oracle(x: np.ndarray, spec: str) -> np.ndarray:
    """The contract's result for an array x (float32): blocks along axis 1 (axis 0 of 1-D), the
    last block of a row shorter when k does not divide that axis."""
    x = np.asarray(x, np.float32)
    xm = x.reshape(1, -1) if x.ndim == 1 else np.moveaxis(x, 1, -1)
    rows = xm.reshape(-1, xm.shape[-1]).astype(np.float64)
    c = rows.shape[1]
    if spec == "nvfp4":
        k = 16
    else:
        elem_spec, k = mx_spec(spec)
        elem = FloatDef(elem_spec)
    cuts = [(r, j, min(j + k, c)) for r in range(rows.shape[0]) for j in range(0, c, k)]
    blks = [[float(v) for v in rows[r, a:b]] for r, a, b in cuts]
    if spec == "nvfp4":
        with np.errstate(invalid="ignore"):
            amax_t = float(np.max(np.abs(x))) if x.size else 0.0
        res = nvfp4_oracle_tensor(blks, amax_t)[0]
    else:
        res = [mx_oracle_block(b, elem) for b in blks]
    out = np.empty_like(rows)
    for (r, a, b), vals in zip(cuts, res):
        out[r, a:b] = vals
    out = out.astype(np.float32).reshape(xm.shape)
    return out.reshape(x.shape) if x.ndim == 1 else np.moveaxis(out, -1, 1)


def random_finite(shape, rng, e_lo, e_hi):
    """Random float32 bit patterns with exponent fields in [e_lo, e_hi] (0 = subnormal)."""
    n = int(np.prod(shape))
    pat = (rng.integers(e_lo, e_hi + 1, n) << 23) | rng.integers(0, 1 << 23, n)
    x = pat.astype(np.uint32).view(np.float32) * rng.choice([-1, 1], n).astype(np.float32)
    return x.reshape(shape)


def special_blocks(k, seed):
    """Blocks at the edges of the contract, one per row of [n, k]: all zero; NaN; +inf; -inf;
    signed zeros; E8M0's limits: amax = float32 max (e = 127 - emax), amax the smallest
    subnormal, amax just below and at 2^(emax-126) for every element (the clamp to -127),
    all-subnormal blocks, a normal max with subnormal neighbours."""
    fi = np.finfo(np.float32)
    rows = [np.zeros(k), np.r_[np.nan, np.ones(k - 1)], np.r_[np.ones(k - 1), np.inf],
            np.r_[-np.inf, np.zeros(k - 1)], np.r_[-0.0, 0.0] .repeat(k // 2)]
    big = np.linspace(-1, 1, k) * float(fi.max)
    big[0] = float(fi.max)
    rows.append(big)
    rows.append(np.r_[float(fi.smallest_subnormal), np.zeros(k - 1)])
    rng = np.random.default_rng(seed)
    for emax in (2, 4, 8, 15):
        for edge in (2.0 ** (emax - 126), 2.0 ** (emax - 126) * (1 - 2.0**-24), 2.0**-125):
            b = rng.uniform(-edge, edge, k)
            b[0] = edge
            rows.append(b)
    sub = random_finite((3, k), rng, 0, 0).astype(np.float64)
    rows += list(sub)
    mixed = random_finite((1, k), rng, 0, 0)[0].astype(np.float64)
    mixed[0] = 2.0**-100
    rows.append(mixed)
    mixed2 = mixed.copy()
    mixed2[0] = 2.0**-120
    rows.append(mixed2)
    return np.stack(rows).astype(np.float32)


# =============================================================================================
# bit-for-bit comparisons
# =============================================================================================
def assert_same_bits(got, want, x, what):
    """Bit-for-bit equality of flat results (NaN matches any NaN); reports the first
    mismatches with their inputs x."""
    got = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    want = np.asarray(want, dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    bad = (got.view(np.uint32) != want.view(np.uint32)) & ~(np.isnan(got) & np.isnan(want))
    if bad.any():
        idx = np.flatnonzero(bad)[:6]
        rows = ", ".join(f"x={x[i]!r} ({x[i:i+1].view(np.uint32)[0]:#010x}) got={got[i]!r} "
                         f"want={want[i]!r}" for i in idx)
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} differ: {rows}")


def assert_same_array_bits(got, want, what):
    """Bit-for-bit equality of arrays or tensors of any shape and layout (NaN matches any NaN);
    names the first mismatching indices."""
    got = got.detach().cpu().contiguous().numpy() if isinstance(got, torch.Tensor) else got
    want = want.detach().cpu().contiguous().numpy() if isinstance(want, torch.Tensor) else want
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    bad = (got.view(np.uint32) != want.view(np.uint32)) & ~(np.isnan(got) & np.isnan(want))
    if bad.any():
        idx = [tuple(int(i) for i in ix) for ix in np.argwhere(bad)[:5]]
        rows = ", ".join(f"{ix}: got {got[ix]!r} want {want[ix]!r}" for ix in idx)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} differ: {rows}")


def block_inputs_for_user_compile():
    """A 2-D tensor (contiguous blocks), a 4-D one and the same 4-D values channels-last."""
    x4 = torch.randn(16, 96, 3, 3) * 4
    return {"2d": torch.randn(64, 96) * 3, "4d": x4,
            "channels_last": x4.contiguous(memory_format=torch.channels_last)}
