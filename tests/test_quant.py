"""common/quant.py checked against independent references, never against itself.

References (the format contract, restated for users in docs/formats.md): ml_dtypes casts and
torch's own casts (floats), softposit (posit8 = posit(8,0), posit16 = posit(16,1), pX2 =
posit(n,2)), qtorch-plus ``posit_quantize``, qtorch ``float_quantize`` (inside its valid range
only), and two oracles written from the definitions, separately from the implementation
(tests/oracles.py): floats by float64 arithmetic (quantum, rint, the overflow rule) and posits by
decoding every bit pattern from the definition and rounding at the posit(n+1, es) decision
points. Every test runs each implementation path (tests/cast_paths.py): the eager bit
arithmetic, the eager native cast (where quantize uses one) and the compiled kernel.
"""
import functools
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from common import dispatch, quant
from common.formats import parse_format
from common.qtorch_backend import import_isolated
from common.quant import (
    ROUNDINGS,
    SCALINGS,
    _quantize_compiled,
    _quantize_eager,
    quantize,
    quantize_scaled,
    representable_values,
)

from cast_paths import paths_for, run_path
from oracles import (
    ML_DTYPES,
    N_RANDOM,
    OTHER_FLOATS,
    POSIT_SPECS,
    RNG_SEED,
    assert_same_bits,
    float_inputs,
    float_oracle,
    float_values_by_definition,
    ml_dtypes_reference,
    n_es,
    posit_inputs,
    posit_oracle,
    posit_table,
    random_bits,
)

ml_dtypes = pytest.importorskip("ml_dtypes")


# =============================================================================================
# floats
# =============================================================================================
@functools.lru_cache(maxsize=None)
def float_reference(spec, saturate):
    x = float_inputs(spec)
    return x, float_oracle(x, parse_format(spec), saturate)


def float_cases(specs):
    """(spec, saturate, path) for every nearest-mode path quantize has for that case."""
    return [pytest.param(spec, sat, path, id=f"{spec}-{'sat' if sat else 'nonsat'}-{path}")
            for spec in specs for sat in (True, False) for path in paths_for(spec, "nearest", sat)]


@pytest.mark.parametrize("spec,saturate,path", float_cases(list(ML_DTYPES) + OTHER_FLOATS))
def test_float_nearest_matches_oracle_and_ml_dtypes(spec, saturate, path):
    """Each path against the float64 oracle and, where it has the format, ml_dtypes. Formats
    without a NaN code: ml_dtypes turns NaN into a number, docs/formats.md keeps NaN, so NaN inputs
    are left to the oracle there."""
    x, want = float_reference(spec, saturate)
    got = run_path(path, torch.from_numpy(x), spec, "nearest", saturate).numpy()
    assert_same_bits(got, want, x, f"{spec} {path} saturate={saturate}")
    if spec in ML_DTYPES:
        keep = ~np.isnan(x)
        assert_same_bits(got[keep], ml_dtypes_reference(x, spec, saturate)[keep], x[keep],
                         f"{spec} {path} saturate={saturate} vs ml_dtypes")


@pytest.mark.parametrize("path", ["eager-bits", "compiled-bits"])
@pytest.mark.parametrize("spec,dtype,saturating", [
    ("e4m3", torch.float8_e4m3fn, True),  # torch's CPU e4m3fn cast saturates, NaN stays NaN
    ("e5m2", torch.float8_e5m2, False),  # torch's CPU e5m2 cast overflows to inf
    ("bf16", torch.bfloat16, False), ("fp16", torch.float16, False)])
def test_float_nearest_matches_torch_casts(spec, dtype, saturating, path):
    x = float_inputs(spec)
    xt = torch.from_numpy(x)
    want = xt.to(dtype).to(torch.float32)
    assert_same_bits(run_path(path, xt, spec, "nearest", saturating), want.numpy(), x,
                     f"{spec} {path} vs torch {dtype}")
    if not saturating:  # saturating mode = torch's cast of x clipped to +-max
        fmt = parse_format(spec)
        want = xt.clamp(-fmt.max, fmt.max).to(dtype).to(torch.float32)
        assert_same_bits(run_path(path, xt, spec, "nearest", True), want.numpy(), x,
                         f"{spec} {path} saturating vs torch {dtype}")


def _import_isolated(pkg):
    """Import qtorch / qtorch_plus, each with its own torch_extensions folder: both JIT-build a C++
    extension named "quant_cpu" in the same default folder, so importing one invalidates the
    other's cached build (a ~20 s rebuild on every test run). Skip when absent or unbuildable."""
    try:
        return import_isolated(pkg)
    except ImportError as err:
        pytest.skip(f"{pkg} not installed ({err})")
    except Exception as err:  # the JIT build failed: no compiler, ...
        pytest.skip(f"{pkg} failed to build its extension ({type(err).__name__})")


@pytest.fixture(scope="module")
def qtorch_quant():
    return _import_isolated("qtorch")


@pytest.fixture(scope="module")
def qtorch_plus_quant():
    return _import_isolated("qtorch_plus")


@pytest.mark.parametrize("path", ["eager-bits", "compiled-bits"])
@pytest.mark.parametrize("spec", ["e4m3", "e5m2", "bf16", "fp16", "e3m2", "e6m9", "e5m13"])
def test_float_nearest_matches_qtorch_in_its_valid_range(spec, path, qtorch_quant):
    """qtorch float_quantize reserves no exponent for inf/NaN (its e4m3 tops out at 480), does not
    saturate like OCP, breaks ties away from zero and treats subnormals its own way, so compare
    only normal-range inputs at most max that are not exact ties."""
    fmt = parse_format(spec)
    rng = np.random.default_rng(RNG_SEED)
    x = np.concatenate([random_bits(N_RANDOM, RNG_SEED + 1),
                        (rng.standard_normal(N_RANDOM) * fmt.max / 8).astype(np.float32)])
    x = x[np.isfinite(x) & (np.abs(x) >= fmt.min_normal) & (np.abs(x) <= fmt.max)]
    want = qtorch_quant.float_quantize(torch.from_numpy(x), fmt.exp_bits, fmt.man_bits,
                                       rounding="nearest").numpy()
    a = np.abs(x.astype(np.float64))
    q = np.ldexp(1.0, np.frexp(a)[1] - 1 - fmt.man_bits)
    tie = (a / q) % 1 == 0.5
    x, want = x[~tie], want[~tie]
    assert len(x) > N_RANDOM // 4
    assert_same_bits(run_path(path, torch.from_numpy(x), spec), want, x, f"{spec} vs qtorch")


# hand-picked cases, one reason each: (spec, x, saturating result, non-saturating result)
FLOAT_CASES = [
    ("e4m3", 464.0, 448.0, 448.0),  # tie between 448 and (480): 448's mantissa 110 is even
    ("e4m3", 464.00003, 448.0, math.nan),  # just past the tie: overflow -> NaN (no inf)
    ("e4m3", math.inf, 448.0, math.nan),  # inf saturates / has no e4m3 encoding
    ("e4m3", 2.0**-10, 0.0, 0.0),  # half the smallest subnormal: tie to even (0)
    ("e4m3", 3 * 2.0**-10, 2.0**-8, 2.0**-8),  # tie between subnormals 1 and 2 (x2^-9): even 2
    ("e4m3", 1.0625, 1.0, 1.0),  # tie: even mantissa 000 (QPyTorch would give 1.125)
    ("e4m3", 1.1875, 1.25, 1.25),  # tie: even mantissa 010
    ("e4m3", -0.0, -0.0, -0.0),  # sign of zero kept
    ("e4m3", -1e-30, -0.0, -0.0),  # underflow keeps the sign
    ("e5m2", 61440.0, 57344.0, math.inf),  # tie at the overflow boundary: max is odd -> inf
    ("e5m2", 61439.996, 57344.0, 57344.0),  # just below it
    ("e5m2", -math.inf, -57344.0, -math.inf),
    ("e2m1", 5.0, 4.0, 4.0),  # tie between 4 and 6: even mantissa (4)
    ("e2m1", 7.0, 6.0, 6.0),  # MX FP4 has neither inf nor NaN: overflow gives max
    ("e2m1", 0.25, 0.0, 0.0),  # half the smallest subnormal 0.5: tie to 0
    ("e2m1", 0.75, 1.0, 1.0),  # tie between subnormal 0.5 (odd) and 1.0 (even)
    ("e2m1", math.nan, math.nan, math.nan),  # no NaN code, but NaN is never hidden
    ("e3m2", 30.0, 28.0, 28.0),  # tie between 28 and (32): 28 = 1.11b x 2^4 is odd -> overflow
    ("bf16", 1 + 2.0**-8, 1.0, 1.0),  # tie: even
    ("bf16", 3.4e38, 3.3895313892515355e38, math.inf),  # beyond max + ulp/2
    ("fp16", 65520.0, 65504.0, math.inf),  # IEEE binary16 overflow threshold (tie, odd max)
    ("fp16", 2.0**-25, 0.0, 0.0),  # half the smallest subnormal: tie to 0
]


@pytest.mark.parametrize("spec,x,sat,nonsat", FLOAT_CASES)
def test_float_hand_picked_cases(spec, x, sat, nonsat):
    xt = torch.tensor([x], dtype=torch.float32)
    for path in paths_for(spec, "nearest", True):
        assert_same_bits(run_path(path, xt, spec, "nearest", True), [sat], [x], f"{spec} {path}")
    for path in paths_for(spec, "nearest", False):
        assert_same_bits(run_path(path, xt, spec, "nearest", False), [nonsat], [x],
                         f"{spec} {path} nonsat")


# =============================================================================================
# posits: the definition's decoder and oracle (tests/oracles.py), and the references
# =============================================================================================
def test_posit_decoder_reproduces_numerics_worked_values():
    # docs/formats.md: posit(4,0) = {0, +-1/4, +-1/2, +-3/4, +-1, +-3/2, +-2, +-4}
    vals, dps = posit_table(4, 0)
    assert vals.tolist() == [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0]
    assert dps.tolist() == [0.375, 0.625, 0.875, 1.25, 1.75, 3.0]


@pytest.mark.parametrize("path", ["eager-bits", "compiled-bits"])
@pytest.mark.parametrize("spec", POSIT_SPECS)
def test_posit_nearest_matches_oracle(spec, path):
    n, es = n_es(spec)
    x = posit_inputs(n, es)
    want = posit_oracle(x, n, es)
    saturate = n % 2 == 0  # posits have one overflow rule: saturate must not matter
    got = run_path(path, torch.from_numpy(x), spec, "nearest", saturate)
    assert_same_bits(got, want, x, f"{spec} {path}")


# docs/formats.md worked values
POSIT_CASES = [
    ("posit4es0", 1.25, 1.0), ("posit4es0", 1.75, 2.0), ("posit4es0", 3.0, 2.0),
    ("posit4es0", 5.0, 4.0), ("posit4es0", 1e-30, 0.25), ("posit8es0", 100.0, 64.0),
    ("posit8es0", 1e-9, 2.0**-6), ("posit16es1", 1e9, 2.0**28),
    ("posit8es1", -1e-30, -(2.0**-12)),  # never rounds to 0, keeps the sign
    ("posit8es1", math.inf, math.nan), ("posit8es1", -math.inf, math.nan),  # inf -> NaR
    ("posit8es1", math.nan, math.nan), ("posit8es1", -0.0, -0.0),
]


@pytest.mark.parametrize("spec,x,want", POSIT_CASES)
def test_posit_worked_values(spec, x, want):
    fmt = parse_format(spec)
    # stochastic rounding has no choice at zero, NaN/inf and at or beyond maxpos (below minpos it
    # chooses between 0 and minpos: test_oracle.py)
    fixed = x == 0 or not math.isfinite(x) or abs(x) >= fmt.max
    for path in ("eager-bits", "compiled-bits"):
        for rounding in ROUNDINGS if fixed else ("nearest",):
            got = run_path(path, torch.tensor([x]), spec, rounding, True,
                           seed=torch.tensor([1, 2], dtype=torch.int32))
            assert_same_bits(got, [want], [x], f"{spec} {path} {rounding}")


def _softposit_round(x, n, es, sp):
    if (n, es) == (8, 0):
        return np.array([sp.convertP8ToDouble(sp.convertDoubleToP8(float(v))) for v in x])
    if (n, es) == (16, 1):
        return np.array([sp.convertP16ToDouble(sp.convertDoubleToP16(float(v))) for v in x])
    assert es == 2
    return np.array([sp.convertPX2ToDouble(sp.convertDoubleToPX2(float(v), n)) for v in x])


SOFTPOSIT_CASES = [(8, 0), (16, 1), (3, 2), (5, 2), (8, 2), (11, 2), (16, 2)]


@pytest.mark.parametrize("n,es", SOFTPOSIT_CASES)
def test_posit_decoder_matches_softposit(n, es):
    """The test's own decoder agrees with softposit on every pattern (values round-trip)."""
    sp = pytest.importorskip("softposit")
    vals, dps = posit_table(n, es)
    np.testing.assert_array_equal(_softposit_round(vals, n, es, sp), vals)


@pytest.mark.parametrize("path", ["eager-bits", "compiled-bits"])
@pytest.mark.parametrize("n,es", SOFTPOSIT_CASES)
def test_posit_nearest_matches_softposit(n, es, path):
    """Exhaustive: every value, decision point and arithmetic midpoint, +-1 ulp, both signs.
    softposit returns inf for NaR, so inf/NaN inputs are left to the oracle test."""
    sp = pytest.importorskip("softposit")
    x = posit_inputs(n, es, n_random=0)
    x = x[np.isfinite(x)]
    want = _softposit_round(x, n, es, sp).astype(np.float32)
    want = np.where(x == 0, x, want)  # softposit has one zero; -0.0 is kept here
    got = run_path(path, torch.from_numpy(x), f"posit{n}es{es}")
    assert_same_bits(got, want, x, f"posit({n},{es}) {path} vs softposit")


@pytest.mark.parametrize("path", ["eager-bits", "compiled-bits"])
@pytest.mark.parametrize("spec", ["posit4es0", "posit6es2", "posit8es1", "posit8es3",
                                  "posit12es1", "posit16es1", "posit16es2"])
def test_posit_nearest_matches_qtorch_plus(spec, path, qtorch_plus_quant):
    """qtorch-plus posit_quantize on millions of random inputs; it maps NaN and inf to -inf, so
    only finite inputs are compared, and -0.0 becomes +0.0 there."""
    n, es = n_es(spec)
    x = posit_inputs(n, es, n_random=N_RANDOM)
    x = x[np.isfinite(x) & (x != 0)]
    want = qtorch_plus_quant.posit_quantize(torch.from_numpy(x), n, es, rounding="nearest")
    assert_same_bits(run_path(path, torch.from_numpy(x), spec), want.numpy(), x,
                     f"{spec} {path} vs qtorch-plus")


# =============================================================================================
# representable_values
# =============================================================================================
@pytest.mark.parametrize("spec", list(ML_DTYPES))
def test_representable_values_match_ml_dtypes(spec):
    dt = ML_DTYPES[spec]
    bits = ml_dtypes.finfo(dt).bits
    pats = np.arange(2**bits, dtype=np.uint16 if bits > 8 else np.uint8)
    if bits < 8:  # sub-byte ml_dtypes types hold one code per byte
        pats = pats.astype(np.uint8)
    with np.errstate(all="ignore"):
        vals = pats.view(dt).astype(np.float32)
    want = np.unique(np.abs(vals[np.isfinite(vals)]))
    want = np.concatenate([-want[::-1][:-1], want])  # zero once
    got = representable_values(spec)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("spec", ["e6m9", "e3m1", "e2m0", "e7m8"])
def test_representable_values_match_definition(spec):
    vals = float_values_by_definition(parse_format(spec)).astype(np.float32)
    np.testing.assert_array_equal(representable_values(spec).numpy(),
                                  np.concatenate([-vals[::-1], [0.0], vals]))


@pytest.mark.parametrize("spec", ["posit2es0", "posit4es0", "posit8es0", "posit8es2",
                                  "posit16es1", "posit16es3"])
def test_representable_values_of_posits(spec):
    n, es = n_es(spec)
    vals = posit_table(n, es)[0].astype(np.float32)
    np.testing.assert_array_equal(representable_values(spec).numpy(),
                                  np.concatenate([-vals[::-1], [0.0], vals]))


def test_representable_values_aliases_and_limits():
    assert torch.equal(representable_values("e8m7"), representable_values("bf16"))
    assert torch.equal(representable_values("fp4"), representable_values("e2m1"))
    for spec in ("fp32", "e8m10", "e5m13"):
        with pytest.raises(ValueError):
            representable_values(spec)


# =============================================================================================
# stochastic rounding
# =============================================================================================
def _neighbours(spec, x):
    vals = representable_values(spec).double().numpy()
    i = np.clip(np.searchsorted(vals, x, side="right") - 1, 0, len(vals) - 2)
    return vals[i], vals[i + 1]


# x strictly between neighbours: normal range, subnormals, just below max, below the smallest
# subnormal, cut exponent bits of posits (not linear in the bit string), tiny posit fractions
SR_CASES = {
    "e4m3": [1.0 + 0.3 * 0.125, -3.3e-3, 431.0, 2.0**-12, 3.0 * 2.0**-22], "e5m2": [1e-5, 700.0],
    "e2m1": [2.6, 0.2], "e3m2": [13.0], "bf16": [1.0 + 2.0**-10, 3e-39],
    "fp16": [1e-7, 3.14159, 3e-8],
    "posit8es1": [3.3, -0.013], "posit6es2": [3000.0, 1e-3, 40.0], "posit16es1": [1.0001],
    "posit8es0": [40.0], "posit16es3": [1e20, 3e-30], "posit6es4": [1e5, 3e-9],
}


@pytest.mark.parametrize("path", ["eager-bits", "compiled-bits"])
@pytest.mark.parametrize("spec", list(SR_CASES))
def test_stochastic_is_unbiased(spec, path):
    """For each x: every draw is one of its two neighbours, and the mean of N draws is x within 6
    standard errors, sigma = (hi - lo) * sqrt(p (1 - p) / N), p = (x - lo) / (hi - lo)."""
    n = 200_000
    xs = [float(np.float32(x)) for x in SR_CASES[spec]]
    torch.manual_seed(7)
    got = run_path(path, torch.tensor(xs).repeat_interleave(n), spec, "stochastic")
    for x, draws in zip(xs, got.double().numpy().reshape(len(xs), n)):
        lo, hi = _neighbours(spec, x)
        assert lo < x < hi
        assert np.isin(draws, [lo, hi]).all(), x
        p = (x - lo) / (hi - lo)
        sigma = (hi - lo) * math.sqrt(p * (1 - p) / n)
        assert abs(draws.mean() - x) <= 6 * sigma, (x, draws.mean(), sigma)


@pytest.mark.parametrize("spec", ["e4m3", "e5m2", "bf16", "posit8es1", "posit6es2"])
def test_stochastic_is_unbiased_over_random_inputs(spec):
    """Sum of errors over a million random in-range inputs, against its standard deviation."""
    fmt = parse_format(spec)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(1 << 20) * min(fmt.max / 16, 1e6)).astype(np.float32)
    lo, hi = _neighbours(spec, x.astype(np.float64))
    ok = (hi > lo) & (x > lo) & (x < hi)
    p = np.where(ok, (x - lo) / np.where(ok, hi - lo, 1), 0)
    sigma = math.sqrt(float(np.sum((hi - lo) ** 2 * p * (1 - p), where=ok)))
    got = quantize(torch.from_numpy(x), spec, "stochastic").double().numpy()
    assert np.all((got == lo) | (got == hi) | (got == x))
    assert abs(float(np.sum(got - x))) <= 6 * sigma


@pytest.mark.parametrize("spec", ["e4m3", "e2m1", "bf16", "posit8es1", "posit16es2"])
def test_stochastic_keeps_representable_values_and_specials(spec):
    fmt = parse_format(spec)
    vals = representable_values(spec)
    for path in ("eager-bits", "compiled-bits"):
        assert torch.equal(run_path(path, vals, spec, "stochastic"), vals)
        x = torch.tensor([math.nan, math.inf, -math.inf, fmt.max * 4, -fmt.max * 4, -0.0])
        got = run_path(path, x, spec, "stochastic", True)
        assert math.isnan(got[0])
        if fmt.is_posit:  # NaR for inf, saturation for finite values
            assert math.isnan(got[1]) and math.isnan(got[2])
        else:
            assert got[1] == fmt.max and got[2] == -fmt.max
        assert got[3] == fmt.max and got[4] == -fmt.max
        assert got[5] == 0 and math.copysign(1, got[5]) == -1


def test_stochastic_nonsaturating_overflow():
    x = torch.tensor([1e6, -1e6, 460.0])
    got = quantize(x, "e5m2", "stochastic", saturate=False)
    assert got[0] == math.inf and got[1] == -math.inf
    got = _quantize_eager(torch.full((1000,), 460.0), "e4m3", "stochastic", saturate=False)
    # 460 lies between 448 and (480): rounding up overflows to NaN (e4m3 has no inf)
    assert torch.isnan(got).any() and (got[~torch.isnan(got)] == 448).all()


@pytest.mark.parametrize("spec", ["e4m3", "posit8es1"])
def test_stochastic_same_seed_same_bits(spec):
    x = torch.randn(50_000)
    torch.manual_seed(11)
    a = quantize(x, spec, "stochastic")
    b = quantize(x, spec, "stochastic")
    torch.manual_seed(11)
    assert torch.equal(quantize(x, spec, "stochastic"), a)
    assert not torch.equal(a, b)  # the stream moves on
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(quantize(x, spec, "stochastic", generator=g1),
                       quantize(x, spec, "stochastic", generator=g2))


@pytest.mark.parametrize("spec", ["e4m3", "e3m2", "bf16", "fp16", "posit8es1", "posit6es2",
                                  "posit16es1"])
def test_stochastic_eager_and_compiled_agree(spec):
    x = torch.from_numpy(float_inputs("e4m3", n_random=1 << 16)) * 3
    n16 = x.numel() // 16 * 16
    seed = torch.tensor([123456789, -987654321], dtype=torch.int32)
    # a multiple of 16 elements takes the compiled CPU kernel's (rows, 16) index form
    for saturate, x in ((True, x[:n16]), (False, x[:n16 - 3]), (True, x[:n16 - 5])):
        a = run_path("eager-bits", x, spec, "stochastic", saturate, seed=seed)
        b = run_path("compiled-bits", x, spec, "stochastic", saturate, seed=seed)
        assert_same_bits(b, a.numpy(), x.numpy(), f"{spec} compiled vs eager")


@pytest.mark.parametrize("spec", ["posit8es1", "posit8es2", "posit8es3", "posit6es4", "posit9es4"])
def test_posit_stochastic_threshold_across_cut_exponent_bits(spec):
    """Where exponent bits are cut, neighbours lo = 2^L and hi = 2^(L+g) are g binades apart,
    and x = 2^t between them rounds up with probability p = (x - lo) / (hi - lo). The kernel
    draws 31 random bits r and rounds up where r < floor(p * 2^31) (p resolved to 2^-31, as
    docs/formats.md says): r one below that rounds up, r equal to it rounds down. Every power
    of two strictly between two such neighbours, es = 1 to 4 (g = 2, 4, 8, 16)."""
    from common import _quant_kernels as K
    vals = [Fraction(v) for v in representable_values(spec).double().tolist() if v > 0]
    xs, los, his, thresholds = [], [], [], []
    for lo, hi in itertools.pairwise(vals):
        t = 2 * lo
        while hi / lo >= 4 and t < hi:  # only powers of two there: no fraction bits are left
            xs.append(float(t))
            los.append(float(lo))
            his.append(float(hi))
            thresholds.append(math.floor((t - lo) / (hi - lo) * 2**31))
            t *= 2
    assert xs
    bits = torch.tensor(xs, dtype=torch.float32).view(torch.int32)
    p = K.posit_params(parse_format(spec))
    zero = torch.zeros_like(bits)  # no fraction bits to round: the ladder step alone decides
    for offset, want in ((-1, his), (0, los)):
        r2 = torch.tensor(thresholds, dtype=torch.int32) + offset
        got = K.posit_stochastic(bits, p, zero, r2).view(torch.float32).double().tolist()
        wrong = [(x, g, w) for x, g, w in zip(xs, got, want) if g != w]
        assert not wrong, f"{spec} r = threshold {offset:+d}: (x, got, want) {wrong[:4]}"


def test_random_bits_are_fair_and_decorrelated():
    from common import _quant_kernels as K
    seed = torch.tensor([1, 2], dtype=torch.int32)
    idx = torch.arange(1 << 18, dtype=torch.int32)
    shifts = torch.arange(32, dtype=torch.int32)
    r, r2 = K.random_bits(idx, seed, words=2)
    for word in (r, r2, r ^ r2, r ^ r.roll(1)):  # each bit fair; words and neighbours unrelated
        bits = ((word.unsqueeze(1) >> shifts) & 1).float().mean(0)
        assert ((bits - 0.5).abs() < 0.006).all()  # 6 sigma = 0.0059
    other = K.random_bits(idx, torch.tensor([1, 3], dtype=torch.int32))
    assert (r == other).double().mean() < 1e-3
    # the (rows, 16) index form used by the CPU kernels gives the same indices
    lanes = K.element_index(idx.view(-1, 16), torch.arange(16, dtype=torch.int32))
    assert torch.equal(lanes.view(-1), K.element_index(idx))


# =============================================================================================
# API: dtypes, shapes, layouts, errors, fallback, torch.compile
# =============================================================================================
def test_identity_returns_input():
    """fp32 rounds nothing: the input itself, detached when it requires grad (as every cast)."""
    x = torch.randn(10)
    assert quantize(x, "fp32") is x and quantize(x, "none", "stochastic") is x
    w = torch.randn(10, requires_grad=True)
    y = quantize(w, "fp32")
    assert not y.requires_grad and torch.equal(y, w.detach())
    assert not quantize_scaled(w, "fp32", "tensor").requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_and_shape_kept(dtype):
    x = (torch.randn(3, 5, 7) * 10).to(dtype)
    y = quantize(x, "e4m3")
    assert y.dtype == dtype and y.shape == x.shape
    want = quantize(x.float(), "e4m3").to(dtype)
    assert torch.equal(y, want)


@pytest.mark.parametrize("numel", [0, 1, 3])
def test_tiny_tensors(numel):
    x = torch.randn(numel)
    for path in ("eager-bits", "compiled-bits"):
        assert run_path(path, x, "e5m2").shape == x.shape
    assert quantize(torch.tensor(3.3), "e2m1").shape == ()
    assert quantize(torch.tensor(3.3), "e2m1").item() == 3.0


def test_layouts_kept_and_values_independent_of_layout():
    x = torch.randn(4, 8, 16, 16) * 5
    want = quantize(x, "e4m3")
    cl = x.contiguous(memory_format=torch.channels_last)
    y = quantize(cl, "e4m3")
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, want)
    t = x.transpose(1, 3)
    assert torch.equal(quantize(t, "e4m3"), want.transpose(1, 3))
    big = torch.randn(64, 64, 8, 8).contiguous(memory_format=torch.channels_last)  # compiled
    assert torch.equal(quantize(big, "posit8es1"), quantize(big.contiguous(), "posit8es1"))


def test_auto_path_equals_both_paths():
    x = torch.from_numpy(float_inputs("e4m3", n_random=1 << 16))
    for spec in ("e4m3", "e3m2", "bf16", "posit8es1"):
        auto = quantize(x, spec)
        assert_same_bits(auto, run_path("eager-bits", x, spec).numpy(), x, spec)
        assert_same_bits(auto, run_path("compiled", x, spec).numpy(), x, spec)
        assert_same_bits(auto, run_path("eager", x, spec).numpy(), x, spec)


def test_no_grad_through_the_cast():
    x = torch.randn(100, requires_grad=True)
    y = quantize(x, "e4m3")
    assert not y.requires_grad


def test_bad_arguments():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="nearest, stochastic"):
        quantize(x, "e4m3", rounding="up")
    with pytest.raises(ValueError, match="accepted"):
        quantize(x, "e4m9x")
    with pytest.raises(TypeError):
        quantize(torch.arange(4), "e4m3")
    with pytest.raises(TypeError):
        quantize([1.0], "e4m3")
    with pytest.raises(ValueError, match="none, tensor, channel"):
        quantize_scaled(x, "e4m3", scaling="block")
    assert ROUNDINGS == ("nearest", "stochastic") and SCALINGS == ("none", "tensor", "channel")


def test_quant_path_env(monkeypatch):
    x = torch.randn(1000)
    monkeypatch.setenv("QUANT_PATH", "eager")
    a = quantize(x, "e5m2")
    monkeypatch.setenv("QUANT_PATH", "compiled")
    assert torch.equal(quantize(x, "e5m2"), a)
    monkeypatch.setenv("QUANT_PATH", "fast")
    with pytest.raises(ValueError, match="QUANT_PATH"):
        quantize(x, "e5m2")


def test_compile_failure_falls_back_silently(monkeypatch):
    def broken(fn, tag, options):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run
    monkeypatch.setattr(dispatch, "_COMPILED", {})
    monkeypatch.setattr(dispatch, "_compile", broken)
    x = torch.randn(1 << 16) * 100
    want = run_path("eager-bits", x, "e3m2")
    assert torch.equal(quantize(x, "e3m2"), want)
    assert dispatch._COMPILED[("float", "nearest", "cpu")] is None  # remembered, not retried
    assert torch.equal(quantize(x, "e3m2"), want)
    with pytest.raises(RuntimeError):
        _quantize_compiled(x, "e3m2")


def test_compiled_cast_that_drops_its_rounding_is_not_used(monkeypatch):
    """torch 2.11's inductor compiles x.to(bfloat16).to(float32) to a no-op: the probe must
    catch such a kernel and the compiled bit arithmetic must take over."""
    monkeypatch.setattr(dispatch, "_COMPILED", {})
    monkeypatch.setattr(quant, "_CAST_PROBE_OK", {})
    monkeypatch.setitem(quant._CAST_KERNELS, "bf16", lambda x, bound: torch.clamp(x, -bound, bound))
    x = torch.randn(1 << 19) * 3
    want = run_path("eager-cast", x, "bf16")
    assert torch.equal(quantize(x, "bf16"), want)
    assert quant._CAST_PROBE_OK[("bf16", "cpu")] is False
    assert ("float", "nearest", "cpu") in dispatch._COMPILED  # served by the bits kernel


@pytest.mark.slow
def test_usable_inside_torch_compile():
    def f(x):
        return quantize(x, "e4m3"), quantize(x, "posit8es1", "stochastic")

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(1000) * 10
    near, sr = compiled(x)
    assert torch.equal(near, quantize(x, "e4m3"))
    lo, hi = _neighbours("posit8es1", x.double().numpy())
    sr = sr.double().numpy()
    assert np.all((sr == lo) | (sr == hi))


# =============================================================================================
# quantize_scaled
# =============================================================================================
def _pow2_reference(amax, fmax):
    """2^floor(log2(fmax / amax)) by exact rational comparison (Python floats are exact here)."""
    k = math.floor(math.log2(fmax / amax))
    while amax * 2.0**k > fmax:
        k -= 1
    while amax * 2.0 ** (k + 1) <= fmax:
        k += 1
    return 2.0**k


def _scale_window(fmt):
    """Scales quantize_scaled may use (docs/formats.md): for floats, powers of two s with s and
    1/s float32 normals and every format value / s below 2^128 (a float32): s in
    [2^(E-127), 2^127], E = the exponent of the format's max; for posits those with every posit
    value / s a float32 normal: s in [2^(K-127), 2^(126-K)], K = log2(maxpos) = (n-2) * 2^es
    (from the posit definition)."""
    if fmt.is_posit:
        big = (fmt.bits - 2) * 2**fmt.es
        return 2.0 ** (big - 127), 2.0 ** (126 - big)
    return 2.0 ** max(math.frexp(fmt.max)[1] - 128, -126), 2.0**127


def _posit_scale_reference(x, fmt):
    """docs/formats.md's posit scale: 2^round(-log2(rms)) from a float64 rms (every float32 squared
    is exact-range in float64), clamped to the exact-rescale window; 1 for an all-zero tensor."""
    v = x.double().numpy().ravel()
    rms = math.sqrt(float(np.mean(v * v)))
    if rms == 0 or not math.isfinite(rms):
        return 1.0
    lo, hi = _scale_window(fmt)
    return min(max(2.0 ** round(-math.log2(rms)), lo), hi)


@pytest.mark.parametrize("spec", ["e4m3", "e2m1", "e5m2", "bf16"])
@pytest.mark.parametrize("amax", [1e-3, 0.75, 448.0, 449.0, 6.0, 7.0, 3e5, 1e-30, 3e38])
def test_tensor_scaling_uses_power_of_two(spec, amax):
    fmt = parse_format(spec)
    amax = float(np.float32(amax))
    x = torch.tensor([amax, -amax / 3, amax / 7, 0.0])
    s = _pow2_reference(amax, fmt.max)
    lo, hi = _scale_window(fmt)
    if lo <= s <= hi:
        assert fmt.max / 2 < amax * s <= fmt.max
    else:  # documented: the scale stays where the rescale is exact (bf16 with a tiny amax, ...)
        s = min(max(s, lo), hi)
    want = quantize(x * s, spec) / s
    assert torch.equal(quantize_scaled(x, spec, "tensor"), want)


@pytest.mark.parametrize("scaling", ["tensor", "channel"])
@pytest.mark.parametrize("spec", ["bf16", "e8m3", "e5m2", "e4m3", "e2m1"])
def test_scaled_cast_rounds_once_and_stays_finite(spec, scaling):
    """An amax near float32's top: each value is x * s rounded once (the oracle's rounding of the
    exact float64 product, saturating) and divided by s, with s from docs/formats.md's rule and
    window, and nothing finite comes out as inf. Before, bf16 and e8mY took s = 1/2: x * s fell
    into float32's subnormals and was rounded there first (65537 * 2^-149 gave 0 in bf16, the
    audit's case: one rounding at s = 1 gives 2^-133, two at s = 1/2 gave 0); and a value that
    rounds up to 2^(128+k) gave inf (e2m1 at amax 3e38, bf16 at 3.4e38). Inputs: values 2^-149
    either side of bf16's rounding midpoints below 2^-125, random tiny values, large values."""
    fmt = parse_format(spec)
    rng = np.random.default_rng(5)
    odd = rng.integers(0, 2**7, 20) * 2 + 1
    units = np.concatenate([odd * 2**15 + 1, odd * 2**15 - 1, rng.integers(1, 2**24, 23),
                            [65537]])
    x = units.astype(np.float64) * 2.0**-149 * rng.choice([-1.0, 1.0], units.size)
    x = x.reshape(2, -1)
    x[:, :4] = [[3.395e38, 3.1e38, -1.7e38, 3.0e38], [-3.4e38, 2.9e38, 6.0e37, 3.3e38]]
    x = x.astype(np.float32)
    got = quantize_scaled(torch.from_numpy(x), spec, scaling, channel_dim=0).double().numpy()
    lo, hi = _scale_window(fmt)
    amax = np.abs(x).max(axis=None if scaling == "tensor" else 1, keepdims=True).astype(float)
    s = np.clip([[_pow2_reference(a, fmt.max)] for a in amax.ravel()], lo, hi)
    v = x.astype(np.float64) * s  # exact
    _, e = np.frexp(np.abs(v))
    q = np.ldexp(1.0, np.maximum(e - 1, 1 - fmt.bias) - fmt.man_bits)
    want = np.copysign(np.minimum(np.rint(np.abs(v) / q) * q, fmt.max), v) / s
    bad = np.argwhere(got != want)
    assert not bad.size, [(x[tuple(i)], got[tuple(i)], want[tuple(i)]) for i in bad[:4]]
    assert np.isfinite(got).all()
    if spec == "bf16":  # the audit's case: 65537 * 2^-149, rounded once (to nearest: 2^-133)
        assert abs(got[1, -1]) == 2.0**-133


def _scaled_inputs(seed):
    """Tensors whose amax spans the whole float32 range, with zeros, subnormals and ties."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(4096, generator=gen)
    base[::7] = 0.0
    base[1::97] = torch.tensor(2.0**-130)  # float32 subnormals
    out = []
    for amax_exp in (-140, -120, -100, -60, -20, -3, 0, 5, 30, 60, 100, 126):
        x = base * 2.0 ** max(amax_exp, -126) * (2.0 ** min(amax_exp + 126, 0))
        out.append(x)
    bits = torch.randint(-2**31, 2**31, (1 << 16,), dtype=torch.int32, generator=gen)
    out.append(bits.view(torch.float32).nan_to_num(0.0, 0.0, 0.0))  # every binade at once
    return out


@pytest.mark.parametrize("spec", ["posit4es0", "posit8es1", "posit16es1", "posit12es3",
                                  "posit6es4", "posit16es3"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_posit_tensor_scaling_on_exponent_field_equals_float_rescale(spec, rounding, path,
                                                                     monkeypatch):
    """Posit tensor scaling (s from the rms, docs/formats.md) runs in the kernel (exponent-field
    shift): same bits as rounding x * s with the plain cast and dividing by s, for tensors
    anywhere in float32's range."""
    fmt = parse_format(spec)
    monkeypatch.setenv("QUANT_PATH", path)
    for i, x in enumerate(_scaled_inputs(1)):
        s = _posit_scale_reference(x, fmt)
        g1, g2 = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        got = quantize_scaled(x, fmt, "tensor", rounding, generator=g1)
        want = quantize(x * s, fmt, rounding, generator=g2) / s
        # where x*s underflows float32 to 0, the float rescale loses x != 0: a posit never
        # rounds a nonzero x to 0, so the answer there is +-minpos / s (docs/formats.md)
        # (stochastic: +-minpos / s with probability |x*s| / minpos < 2^-23, else +-0)
        lost = (x * s == 0) & (x != 0)
        want[lost] = torch.copysign(torch.tensor(fmt.min_subnormal / s), x[lost])
        if rounding == "stochastic":
            zero = got[lost] == 0
            assert torch.equal(torch.signbit(got[lost]), torch.signbit(x[lost]))
            want[lost] = torch.where(zero, got[lost], want[lost])
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (spec, i, s)


@pytest.mark.parametrize("spec", ["posit8es1", "posit4es0"])
def test_posit_channel_scaling_per_slice_in_any_layout(spec):
    """Per-channel posit scaling shifts each element by its own channel's exponent, whatever the
    memory layout (contiguous, channels-last, a transposed view)."""
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-30, 20, 8).view(8, 1, 1, 1)
    want = torch.stack([quantize_scaled(w[c], spec, "tensor") for c in range(8)])
    for layout in (w, w.contiguous(memory_format=torch.channels_last),
                   w.transpose(2, 3).contiguous().transpose(2, 3)):
        assert torch.equal(quantize_scaled(layout, spec, "channel"), want)


@pytest.mark.parametrize("spec", ["posit8es1", "posit4es0", "posit16es1"])
@pytest.mark.parametrize("rms", [1.0, 2.0**0.49, 2.0**0.51, 3e-3, 2.0**-70, 1e-25, 7e20, 1e30])
def test_posit_scaling_puts_rms_nearest_one(spec, rms):
    """The posit scale puts the rms at the power of two nearest to 1 (log domain), also where
    float32 squares would underflow or overflow (rms 1e-25, 1e30)."""
    fmt = parse_format(spec)
    x = torch.tensor([1.0, -1.0, 1.0, -1.0]) * rms            # rms of x is exactly rms (float32)
    x[0] = 0.0
    x = x * math.sqrt(4 / 3)
    s = _posit_scale_reference(x, fmt)
    lo, hi = _scale_window(fmt)
    if lo < s < hi:
        got_rms = math.sqrt(float(np.mean(x.double().numpy() ** 2))) * s
        assert 2**-0.5 <= got_rms <= 2**0.5
    assert torch.equal(quantize_scaled(x, spec, "tensor"), quantize(x * s, spec) / s)
    w = torch.stack([x, x * 2**-20, torch.zeros(4), x * 2**9])
    want = torch.stack([quantize(r * _posit_scale_reference(r, fmt), spec)
                        / _posit_scale_reference(r, fmt) for r in w])
    assert torch.equal(quantize_scaled(w, spec, "channel"), want)


def test_channel_scaling_per_slice_along_dim():
    torch.manual_seed(0)
    w = torch.randn(8, 3, 3, 3) * torch.logspace(-4, 4, 8).view(8, 1, 1, 1)
    got = quantize_scaled(w, "e4m3", "channel")
    for c in range(8):
        assert torch.equal(got[c], quantize_scaled(w[c], "e4m3", "tensor"))
    got1 = quantize_scaled(w, "e2m1", "channel", channel_dim=1)
    for c in range(3):
        assert torch.equal(got1[:, c], quantize_scaled(w[:, c], "e2m1", "tensor"))
    assert torch.equal(quantize_scaled(w, "e2m1", "channel", channel_dim=-3), got1)


def test_scaling_of_zero_nan_and_inf_slices():
    x = torch.zeros(3, 4)
    x[1] = torch.tensor([1.0, math.nan, 3.0, 1e-3])
    x[2] = torch.tensor([1e-3, math.inf, 3.0, -2.0])
    got = quantize_scaled(x, "e4m3", "channel")
    assert torch.equal(got[0], torch.zeros(4))  # amax 0: s = 1, zeros stay zeros
    assert torch.isnan(got[1, 1])  # NaN stays NaN, the rest quantized unscaled
    assert torch.equal(got[1, [0, 2, 3]], quantize(x[1, [0, 2, 3]], "e4m3"))
    assert torch.equal(got[2], quantize(x[2], "e4m3"))  # inf: s = 1, saturates
    assert torch.isnan(quantize_scaled(x, "e4m3", "tensor")[1, 1])
    assert torch.equal(quantize_scaled(torch.zeros(5), "e2m1", "tensor"), torch.zeros(5))


def test_scaled_none_and_identity():
    x = torch.randn(10) * 1000
    assert torch.equal(quantize_scaled(x, "e4m3"), quantize(x, "e4m3"))
    assert torch.equal(quantize_scaled(x, "fp32", "tensor"), x)
    y = quantize_scaled(x, "e4m3", "tensor", rounding="stochastic")
    assert y.shape == x.shape and torch.isfinite(y).all()
