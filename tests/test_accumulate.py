"""Emulated low-precision accumulation (common/accumulate.py) against its contract, written out
in fractions: exact products, exact chunk sums of k consecutive products in the documented
order, one rounding to the accumulator format A per chunk (by the format's definition in
tests/oracles.py), float32 master additions every P chunks (numpy float32 arithmetic).

Operands on e4m3's grid keep every float64 chunk sum exact (products span at most 36 bits), so
the results must match the oracle bit for bit; plain float32 operands (48-bit products) are not
covered by that guarantee and are checked on fixed random draws, where no sum falls within
float64's error of a rounding boundary. The conv oracle walks the (kh, kw, c) order with
explicit loops over the padded input, independent of how the module builds its im2col matrix.
"""
import bisect
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from common import accumulate, dispatch
from common.accumulate import Accumulator, conv2d, conv2d_weight, matmul
from common.formats import parse_format

from oracles import FloatDef, PositDef, assert_same_array_bits, definition

pytestmark = pytest.mark.usefixtures("one_thread")

ACC_SPECS = ("fp16", "bf16", "e5m7", "e8m13")
CHUNKS = (1, 3, 16)
PROMOTIONS = (None, 1, 4)
K_PARTIAL = 37  # neither 3 nor 16 divides it: a partial last chunk


# ---------------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------------
def _definition(spec):
    """The exact definition of an accumulator format (fp32 is the e8m23 float)."""
    name = parse_format(spec).name
    return definition("e8m23" if name == "fp32" else name)


def _exact(v):
    """A finite float as a Fraction; inf and NaN stay floats."""
    return Fraction(v) if math.isfinite(v) else float(v)


def _add(x, y):
    """x + y, exact for Fractions, IEEE for inf and NaN."""
    if isinstance(x, float) or isinstance(y, float):
        return float(x) + float(y)
    return x + y


def _posit_nearest(d: PositDef, a: Fraction) -> Fraction:
    """a > 0 rounded to the nearest posit (ties to the even pattern), never 0 nor beyond
    maxpos: PositDef.outcomes for an exact argument."""
    if a >= d.maxpos:
        return d.maxpos
    if a <= d.minpos:
        return d.minpos
    lo_index = bisect.bisect_right(d.vals, a) - 1
    lo, hi, point = d.vals[lo_index], d.vals[lo_index + 1], d.dps[lo_index]
    up = a > point or (a == point and lo_index % 2 == 0)  # lo is pattern lo_index + 1
    return hi if up else lo


def round_to(spec, x, saturate):
    """x (a Fraction, or inf/NaN) rounded to nearest in `spec` by definition, as a float."""
    d = _definition(spec)
    if isinstance(x, float):  # inf or NaN
        if math.isnan(x) or isinstance(d, PositDef):
            return math.nan
        return math.copysign(d.overflow(saturate), x)
    if x == 0:
        return 0.0
    a = abs(x)
    if isinstance(d, PositDef):
        v = _posit_nearest(d, a)
    else:
        v = d._nearest_unsaturated(a)
        if v > d.max:
            return math.copysign(d.overflow(saturate), x)
    return math.copysign(float(v), x)


def oracle_dot(products, spec, k, promote_every, saturate):
    """The contract for one output: chunk sums of k consecutive products, each added into A
    with one rounding, A added into a float32 master every promote_every chunks."""
    chunks = [products[i:i + k] for i in range(0, max(len(products), 1), k)]
    master, acc = np.float32(0.0), Fraction(0)
    with np.errstate(invalid="ignore"):  # master + NaN, inf - inf: NaN, as in float32
        for j, chunk in enumerate(chunks, 1):
            total = Fraction(0)
            for p in chunk:
                total = _add(total, p)
            acc = _exact(round_to(spec, _add(acc, total), saturate))
            if promote_every and j % promote_every == 0:
                master, acc = master + np.float32(float(acc)), Fraction(0)
        return master + np.float32(float(acc)) if promote_every else np.float32(float(acc))


def products_of(row, col):
    return [_exact(x) * _exact(y) if math.isfinite(x) and math.isfinite(y) else x * y
            for x, y in zip(row, col)]


def oracle_matmul(a, b, spec, k, promote_every, saturate=False):
    a, b = a.double().numpy(), b.double().numpy()
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.float32)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = oracle_dot(products_of(a[i].tolist(), b[:, j].tolist()), spec, k,
                                   promote_every, saturate)
    return out


def oracle_conv2d(x, w, stride, padding, spec, k, promote_every):
    """Direct convolution: for each output, the products in (kh, kw, c) order, c fastest,
    reading zeros outside the image."""
    x, w = x.double().numpy(), w.double().numpy()
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    out_h, out_w = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    out = np.zeros((n, o, out_h, out_w), dtype=np.float32)
    for img, oc, r, q in np.ndindex(n, o, out_h, out_w):
        prods = []
        for i in range(kh):
            for j in range(kw):
                for ch in range(c):
                    y, z = r * sh - ph + i, q * sw - pw + j
                    inside = 0 <= y < h and 0 <= z < wd
                    prods += products_of([x[img, ch, y, z] if inside else 0.0],
                                         [w[oc, ch, i, j]])
        out[img, oc, r, q] = oracle_dot(prods, spec, k, promote_every, False)
    return out


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
E4M3_VALUES = [v for v in FloatDef("e4m3").grid(None, 0) if v <= 16]


def e4m3_operands(shape, seed, zeros=0.1):
    """Random e4m3 values in [-16, 16] (a tenth of them 0): products span at most 36 bits, so
    every float64 chunk sum is exact."""
    rng = np.random.default_rng(seed)
    vals = np.array([float(v) for v in E4M3_VALUES])
    x = rng.choice(vals, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    x[rng.random(shape) < zeros] = 0.0
    return torch.tensor(x, dtype=torch.float32)


def float32_operands(shape, seed):
    """Plain float32 values over a few binades (full 24-bit significands)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 2.0 ** torch.randint(-4, 5, shape, generator=gen)


# ---------------------------------------------------------------------------------------------
# the model against the oracle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ACC_SPECS)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("promote_every", PROMOTIONS)
def test_matmul_matches_oracle_on_e4m3_operands(spec, chunk, promote_every):
    a, b = e4m3_operands((3, K_PARTIAL), 1), e4m3_operands((K_PARTIAL, 2), 2)
    acc = Accumulator(spec, chunk, promote_every)
    assert_same_array_bits(acc.matmul(a, b), oracle_matmul(a, b, spec, chunk, promote_every),
                           acc.short())


@pytest.mark.parametrize("spec", ("fp32", "fp16", "bf16", "e8m13", "posit10es1"))
@pytest.mark.parametrize("chunk, promote_every", [(1, None), (3, 2), (16, None), (5, 1)])
def test_matmul_matches_oracle_on_float32_operands(spec, chunk, promote_every):
    a, b = float32_operands((3, K_PARTIAL), 3), float32_operands((K_PARTIAL, 2), 4)
    acc = Accumulator(spec, chunk, promote_every)
    assert_same_array_bits(acc.matmul(a, b), oracle_matmul(a, b, spec, chunk, promote_every),
                           acc.short())


@pytest.mark.parametrize("chunk, promote_every", [(4, 2), (1, None), (1, 5)])
def test_module_functions_and_batched_matmul_accumulate_each_entry_alone(chunk, promote_every):
    a, b = e4m3_operands((3, 4, 21), 5), e4m3_operands((3, 21, 2), 6)
    acc = Accumulator("bf16", chunk, promote_every)
    got = matmul(a, b, acc)
    assert got.shape == (3, 4, 2) and got.dtype == torch.float32
    for entry in range(3):
        want = oracle_matmul(a[entry], b[entry], "bf16", chunk, promote_every)
        assert_same_array_bits(got[entry], want, f"{acc.short()} batch entry {entry}")


def _posit_fraction_bits_at_one(spec):
    """Fraction bits of posit(n, es) in [1, 2): sign, regime "10", es exponent bits."""
    fmt = parse_format(spec)
    return fmt.bits - 3 - fmt.es


@pytest.mark.parametrize("spec", ("fp16", "bf16", "e5m7", "e8m13", "fp32", "posit10es1"))
def test_one_rounding_per_chunk_no_double_rounding(spec):
    """acc + c: 1 (or 1 + one unit of A) plus just above or below half a unit u of A at 1, by
    u * 2^-50: c = u + tiny is exact in float64, acc + c is not. Rounding the float64 sum to
    nearest first lands on the tie; the contract rounds the exact sum once."""
    d = _definition(spec)
    fraction_bits = _posit_fraction_bits_at_one(spec) if isinstance(d, PositDef) else d.man
    half = 2.0 ** -(fraction_bits + 1)
    rows, want, naive = [], [], []
    for start in (1.0, 1.0 + 2 * half):
        for tiny in (half * 2.0**-50, -half * 2.0**-50):
            # chunks of 2: (start, 0), (half, tiny) = products of the row with (1, 1, 1, 2^-30)
            rows.append([start, 0.0, half, tiny * 2.0**30])
            want.append(round_to(spec, Fraction(start) + Fraction(half) + Fraction(tiny), False))
            naive.append(round_to(spec, Fraction(start + (half + tiny)), False))
    a, b = torch.tensor(rows), torch.tensor([[1.0], [1.0], [1.0], [2.0**-30]])
    got = Accumulator(spec, 2).matmul(a, b)[:, 0]
    assert_same_array_bits(got, np.array(want, np.float32), f"{spec}: ties")
    assert want != naive, "the case must tell one rounding from two"


@pytest.mark.parametrize("spec", ("fp16", "e5m7", "bf16", "fp32", "e4m3", "e2m1", "posit8es1"))
@pytest.mark.parametrize("saturate", (False, True))
def test_overflow_follows_quantize(spec, saturate):
    """Chunk sums beyond A's range (and beyond float32's), then back: inf, NaN (e4m3), +-max
    (saturating, e2m1, posits), as the format's definition says."""
    d = _definition(spec)
    top = d.maxpos if isinstance(d, PositDef) else d.max
    big = math.sqrt(float(top)) * 4 if spec != "fp32" else 1e30
    a = torch.tensor([[big, big, big, 1.0, 0.5], [big, -big, 1.0, 2.0, -0.25],
                      [1.0, 2.0, -big, -big, 3.0]], dtype=torch.float32)
    b = torch.tensor([[big], [big], [-big], [1.0], [1.0]], dtype=torch.float32)
    for chunk, promote_every in ((1, None), (2, 2)):
        acc = Accumulator(spec, chunk, promote_every, saturate=saturate)
        want = oracle_matmul(a, b, spec, chunk, promote_every, saturate)
        assert_same_array_bits(acc.matmul(a, b), want, acc.short())


def test_promotion_adds_into_a_float32_master():
    """2^24 then ones, promoted after every chunk: each float32 addition of 1 to 2^24 is a tie
    that rounds back to 2^24, so the result is not the exact 2^24 + 4 (a wider master)."""
    a = torch.tensor([[2.0**24, 1.0, 1.0, 1.0, 1.0]])
    b = torch.ones(5, 1)
    want = oracle_matmul(a, b, "bf16", 1, 1)
    assert_same_array_bits(Accumulator("bf16", 1, 1).matmul(a, b), want, "float32 master")
    assert want[0, 0] != 2.0**24 + 4


def test_nan_and_inf_operands():
    """A NaN operand makes its outputs NaN; inf adds as in IEEE arithmetic (inf - inf, 0 * inf:
    NaN) and then follows the overflow mode."""
    a = e4m3_operands((4, 10), 7)
    b = e4m3_operands((10, 3), 8)
    a[0, 4] = math.nan
    a[1, 2] = math.inf
    b[7, 1] = -math.inf
    b[2, 2] = 0.0
    for saturate in (False, True):
        acc = Accumulator("fp16", 3, 2, saturate=saturate)
        got = acc.matmul(a, b)
        assert torch.isnan(got[0]).all()
        assert_same_array_bits(got, oracle_matmul(a, b, "fp16", 3, 2, saturate), acc.short())


def test_zero_results_are_positive_zero():
    """A sum that cancels, and a tiny negative sum that A rounds to zero, give +0 (posits
    never round to zero)."""
    a = torch.tensor([[1.0, -1.0], [-(2.0**-30), 0.0]])
    b = torch.tensor([[2.0**-30], [2.0**-30]])
    for spec in ("fp16", "bf16", "posit10es1"):
        got = Accumulator(spec, 1).matmul(a, b)
        assert_same_array_bits(got, oracle_matmul(a, b, spec, 1, None), spec)
    assert Accumulator("fp16", 1).matmul(a, b).view(torch.int32).eq(0).all()


def test_empty_reduction_gives_zeros():
    got = Accumulator("fp16", 4).matmul(torch.zeros(3, 0), torch.zeros(0, 2))
    assert got.shape == (3, 2) and got.view(torch.int32).eq(0).all()


@pytest.mark.parametrize("stride, padding, spec, chunk, promote_every", [
    (1, 0, "fp16", 4, None),
    (2, 1, "bf16", 5, 2),
    ((2, 1), (0, 1), "e5m7", 1, None),
    (1, 1, "e8m13", 16, 1),
])
def test_conv2d_matches_direct_oracle(stride, padding, spec, chunk, promote_every):
    x, w = e4m3_operands((2, 3, 5, 6), 9, zeros=0.0), e4m3_operands((2, 3, 3, 2), 10, zeros=0.0)
    acc = Accumulator(spec, chunk, promote_every)
    pair = accumulate._pair
    want = oracle_conv2d(x, w, pair(stride, "stride", 1), pair(padding, "padding", 0), spec,
                         chunk, promote_every)
    assert_same_array_bits(acc.conv2d(x, w, stride, padding), want, acc.short())
    assert_same_array_bits(conv2d(x, w, stride, padding, acc), want, "conv2d()")


def oracle_conv2d_weight(x, dy, kernel, stride, padding, spec, k, promote_every):
    """The wgrad of a conv: for each weight, each image's products over its output positions
    (h, w) row-major, reading zeros outside the image, accumulated by the contract; the images'
    float32 results added in order."""
    x, dy = x.double().numpy(), dy.double().numpy()
    n, c, h, wd = x.shape
    o, out_h, out_w = dy.shape[1:]
    (sh, sw), (ph, pw) = stride, padding
    out = np.zeros((o, c) + kernel, dtype=np.float32)
    for oc, ch, i, j in np.ndindex(o, c, *kernel):
        total = None
        for img in range(n):
            prods = []
            for r, q in np.ndindex(out_h, out_w):
                y, z = r * sh - ph + i, q * sw - pw + j
                inside = 0 <= y < h and 0 <= z < wd
                prods += products_of([x[img, ch, y, z] if inside else 0.0], [dy[img, oc, r, q]])
            image = oracle_dot(prods, spec, k, promote_every, False)
            total = image if total is None else np.float32(total + image)
        out[oc, ch, i, j] = total
    return out


@pytest.mark.parametrize("stride, padding, spec, chunk, promote_every, in_place", [
    (1, 1, "fp16", 16, None, True),   # stride 1: x's columns read in place
    (1, 1, "bf16", 4, 1, True),       # 30 positions: a partial last chunk
    (1, 0, "e5m7", 3, 2, False),      # the unfolded columns
    (2, 1, "fp16", 16, None, False),  # stride 2: always the unfolded columns
])
def test_conv2d_weight_matches_oracle(stride, padding, spec, chunk, promote_every, in_place,
                                      monkeypatch):
    """The wgrad of a conv against the oracle, on both of its paths (the in-place one is taken
    from STRIDED_WGRAD_MIN_CHUNK up), with small work slices (several slices of images must add
    in image order)."""
    monkeypatch.setattr(accumulate, "SLICE_BYTES", 1)
    monkeypatch.setattr(accumulate, "STRIDED_WGRAD_MIN_CHUNK", 1 if in_place else 10 ** 9)
    x = e4m3_operands((3, 2, 6, 5), 21, zeros=0.0)
    out_h, out_w = ((6 + 2 * padding - 3) // stride + 1, (5 + 2 * padding - 3) // stride + 1)
    dy = e4m3_operands((3, 2, out_h, out_w), 22)
    acc = Accumulator(spec, chunk, promote_every)
    pair = accumulate._pair
    want = oracle_conv2d_weight(x, dy, (3, 3), pair(stride, "stride", 1),
                                pair(padding, "padding", 0), spec, chunk, promote_every)
    assert_same_array_bits(acc.conv2d_weight(x, dy, 3, stride, padding), want, acc.short())
    assert_same_array_bits(conv2d_weight(x, dy, 3, stride, padding, acc), want, "conv2d_weight()")
    with pytest.raises(ValueError, match="conv2d_weight takes"):
        acc.conv2d_weight(x, dy[:, :, 1:], 3, stride, padding)


def test_conv2d_order_is_taps_outside_channels_inside():
    """The oracle's (kh, kw, c) order against the (c, kh, kw) order of F.unfold: on these
    inputs the two orders round differently, so the conv tests pin the documented one."""
    x = e4m3_operands((1, 4, 4, 4), 11, zeros=0.0)
    w = e4m3_operands((1, 4, 2, 2), 12, zeros=0.0)
    got = Accumulator("e5m3", 4).conv2d(x, w)
    assert_same_array_bits(got, oracle_conv2d(x, w, (1, 1), (0, 0), "e5m3", 4, None), "taps")
    # (c, kh, kw) order: the oracle's matmul of the weights and F.unfold's columns
    cols = torch.nn.functional.unfold(x, (2, 2))                              # [1, C*4, L]
    channel_major = oracle_matmul(w.reshape(1, -1), cols[0], "e5m3", 4, None)
    assert not np.array_equal(channel_major.reshape(got.shape), got.numpy())


# ---------------------------------------------------------------------------------------------
# stochastic rounding
# ---------------------------------------------------------------------------------------------
def test_stochastic_rounding_is_reproducible_with_a_generator():
    a, b = float32_operands((40, 64), 13), float32_operands((64, 3), 14)
    acc = Accumulator("bf16", 1, rounding="stochastic")
    first = acc.matmul(a, b, torch.Generator().manual_seed(21))
    again = matmul(a, b, acc, torch.Generator().manual_seed(21))
    other = acc.matmul(a, b, generator=torch.Generator().manual_seed(22))
    assert torch.equal(first.view(torch.int32), again.view(torch.int32))
    assert not torch.equal(first, other)


def test_stochastic_rounding_is_unbiased():
    """1 plus 63 addends of 0.325 units of fp16 at 1, one rounding each: nearest rounding never
    moves from 1; stochastic rounding keeps the exact sum in expectation. Bound: 5 standard
    errors of the mean (each step's variance is at most a quarter unit squared)."""
    rows, steps = 2000, 63
    unit = 2.0**-10
    addend = 0.325 * unit
    a = torch.ones(rows, steps + 1)
    b = torch.full((steps + 1, 1), addend)
    b[0] = 1.0
    exact = 1.0 + steps * b[1].item()
    got = Accumulator("fp16", 1, rounding="stochastic").matmul(
        a, b, torch.Generator().manual_seed(3))
    bound = 5 * math.sqrt(steps / 4) * unit / math.sqrt(rows)
    assert abs(got.double().mean().item() - exact) < bound
    nearest = Accumulator("fp16", 1).matmul(a[:1], b)
    assert abs(nearest.item() - exact) > 10 * bound   # the test can tell biased rounding


# ---------------------------------------------------------------------------------------------
# the float32 sum rounded to odd, by definition
# ---------------------------------------------------------------------------------------------
F32 = FloatDef("e8m23")


def _odd_by_definition(x: Fraction) -> float:
    """x rounded to odd at float32's precision: x if float32 holds it, else the odd one of its
    two float32 neighbours; beyond float32's max, +-max."""
    if x == 0:
        return 0.0
    lo, hi, lo_even = F32.bracket(abs(x))
    if lo == abs(x):
        v = lo
    else:
        v = min(hi if lo_even else lo, F32.max)
    return math.copysign(float(v), x)


def _hard_sums(n, seed):
    """float32 acc and float64 chunk sums whose sum sits on, next to and between float32 values
    and their midpoints, in every binade, subnormals and the top of the range included."""
    rng = np.random.default_rng(seed)
    acc = (rng.integers(0, 0x7F800000, n) | rng.choice([0, 1 << 31], n)).astype(np.uint32)
    acc = acc.view(np.float32).astype(np.float64)
    unit = np.maximum(np.ldexp(1.0, np.frexp(acc)[1] - 24), 2.0**-149)  # float32's ulp
    halves = rng.integers(-6, 7, n) * 0.5 * unit
    nudge = rng.choice([0.0, 2.0**-40, -(2.0**-40), 2.0**-20, -(2.0**-20)], n) * unit
    kind = rng.integers(0, 4, n)
    c = np.where(kind == 0, halves + nudge, np.where(kind == 1, -acc + halves * 2.0**-10,
                 np.where(kind == 2, nudge, rng.standard_normal(n) * np.abs(acc))))
    c[:4] = [1e300, -1e300, float(np.finfo(np.float32).max), 0.0]
    return torch.tensor(acc, dtype=torch.float32), torch.tensor(c, dtype=torch.float64)


def test_sum_rounded_to_odd_and_to_nearest_float32():
    acc, c = _hard_sums(3000, 15)
    exact = [Fraction(float(x)) + Fraction(float(y)) for x, y in zip(acc, c)]
    odd = accumulate._sum_to_odd32(acc, c)
    assert_same_array_bits(odd, np.array([_odd_by_definition(x) for x in exact], np.float32),
                           "round to odd")
    nearest = accumulate._sum_to_nearest32(acc, c)
    want = [math.copysign(float(v) if v <= F32.max else math.inf, x)
            for x, v in ((x, F32._nearest_unsaturated(abs(x)) if x else 0) for x in exact)]
    assert_same_array_bits(nearest, np.array(want, np.float32), "round to nearest")
    specials = torch.tensor([math.inf, -math.inf, math.nan], dtype=torch.float64)
    assert_same_array_bits(accumulate._sum_to_odd32(torch.ones(3), specials),
                           specials.float(), "inf and NaN pass")


# ---------------------------------------------------------------------------------------------
# compiled kernels and a user's torch.compile
# ---------------------------------------------------------------------------------------------
def _compile_inputs():
    """e4m3 operands, a NaN, and a row of tiny negative products that fp16 rounds to -0."""
    a, b = e4m3_operands((5, 23), 16), e4m3_operands((23, 3), 17)
    a[0, 0] = math.nan
    a[1] = 0.0
    a[1, 0] = -(2.0**-30)
    x, w = e4m3_operands((2, 3, 5, 5), 18), e4m3_operands((4, 3, 3, 3), 19)
    return a, b, x, w


@pytest.mark.slow
def test_user_torch_compile_gives_the_eager_bits():
    a, b, x, w = _compile_inputs()
    acc = Accumulator("fp16", 16, 1)  # two chunks: compiling time grows with the steps

    def fn(a, b, x, w):
        y = acc.matmul(a * 1.0, b)
        return y, y + 1.0, acc.conv2d(x * 1.0, w, 2, 1) * 2.0

    got = torch.compile(fn, fullgraph=True)(a, b, x, w)
    for g, e, what in zip(got, fn(a, b, x, w), ("matmul", "matmul + 1", "conv2d")):
        assert_same_array_bits(g, e, f"compiled {what}")
    assert_same_array_bits(got[0][1], torch.zeros(3), "+0")


@pytest.mark.slow
@pytest.mark.parametrize("acc", [Accumulator("fp16", 1, 2), Accumulator("fp32", 3)],
                         ids=lambda acc: acc.short())
def test_compiled_kernels_give_the_eager_bits(acc, monkeypatch):
    """QUANT_PATH=compiled runs every step through the compiled kernels (as large tensors do in
    training), QUANT_PATH=eager through the eager ops: the same bits."""
    x, y = _hard_sums(4096, 20)
    y = y.float()
    a = torch.stack([x, y, -0.5 * x, 3 * y, x, -y], 1)      # products of a row with ones
    compiled, run_compiled = [], dispatch.run_compiled

    def spy(key, *args, **kwargs):
        compiled.append(key)
        return run_compiled(key, *args, **kwargs)

    monkeypatch.setattr(dispatch, "run_compiled", spy)
    results = {}
    for path in ("eager", "compiled"):
        monkeypatch.setenv("QUANT_PATH", path)
        results[path] = acc.matmul(a, torch.ones(6, 1))
    assert any(key[0] == "accumulate" for key in compiled)
    assert_same_array_bits(results["compiled"], results["eager"], acc.short())


@pytest.mark.slow
def test_fused_compiled_steps_match_the_oracle(monkeypatch):
    """QUANT_PATH=compiled sends round-to-nearest accumulation through the fused kernels
    (runs of FUSED_STEPS chunk steps per call, then of 4, 2 and 1): the oracle's bits, for
    step counts below, at and above FUSED_STEPS and not a multiple of it, with promotion, with
    overflow to inf / NaN and saturating; every run length's kernel takes part, also
    the k = 1 kernels that form the products themselves (matmul and conv2d)."""
    from common import accumulate

    keys, run_compiled = [], dispatch.run_compiled

    def spy(key, *args, **kwargs):
        keys.append(key[1:3])
        return run_compiled(key, *args, **kwargs)

    monkeypatch.setattr(dispatch, "run_compiled", spy)
    monkeypatch.setenv("QUANT_PATH", "compiled")
    steps = accumulate.FUSED_STEPS
    a, b = e4m3_operands((3, 2 * steps + 5), 21), e4m3_operands((2 * steps + 5, 2), 22)
    for spec in ("fp16", "bf16", "e5m7", "e8m13", "fp32"):
        for chunk, promote_every in ((1, None), (1, 7), (2, None), (2, 7), (3, 2),
                                     (1, steps + 1), (64, None)):
            acc = Accumulator(spec, chunk, promote_every)
            want = oracle_matmul(a, b, spec, chunk, promote_every)
            assert_same_array_bits(acc.matmul(a, b), want, acc.short())
    big = 2.0 ** 9
    a = torch.full((2, steps + 3), big)
    a[1, ::2] = -big
    b = torch.full((steps + 3, 1), big)
    for spec, saturate in (("fp16", False), ("fp16", True), ("e4m3", False), ("e5m7", True)):
        acc = Accumulator(spec, 1, saturate=saturate)
        assert_same_array_bits(acc.matmul(a, b), oracle_matmul(a, b, spec, 1, None, saturate),
                               acc.short())
    # k = 1 on a conv and a batched matmul too: the products kernels read the factors' rows
    x, w = e4m3_operands((2, 3, 5, 5), 23), e4m3_operands((4, 3, 3, 3), 24)
    a, b = e4m3_operands((3, 4, 2 * steps + 5), 25), e4m3_operands((3, 2 * steps + 5, 2), 26)
    for spec, promote_every in (("bf16", None), ("fp32", 4), ("e5m7", 7)):
        acc = Accumulator(spec, 1, promote_every)
        assert_same_array_bits(acc.conv2d(x, w, 1, 1),
                               oracle_conv2d(x, w, (1, 1), (1, 1), spec, 1, promote_every),
                               f"conv2d {acc.short()}")
        got = acc.matmul(a, b)
        for entry in range(a.shape[0]):
            assert_same_array_bits(got[entry], oracle_matmul(a[entry], b[entry], spec, 1,
                                                             promote_every),
                                   f"batched {acc.short()} entry {entry}")
    runs = {f"rows{n}" for n in (steps, 4, 2, 1)}
    names = ("fused_float", "fused_fp32", "fused_float_products", "fused_fp32_products")
    assert {(name, run) for name in names for run in runs} <= set(keys)
    assert ("fused_float_products_batched", f"rows{steps}") in set(keys)


@pytest.mark.slow
def test_compiled_kernels_stay_parallel_after_a_small_first_call():
    """A kernel compiled on a small tensor (a test's) keeps an OpenMP region for the large ones
    that come later: inductor otherwise decides serial or parallel once, from the first call's
    size, and its disk cache handed a serial fused step to training (2x slower on 2 cores)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    params = dispatch.param_tensor(parse_format("fp16"), False, torch.device("cpu"), "bits")
    acc, rows = torch.zeros(8), torch.ones(2, 8, dtype=torch.float64)
    key = ("accumulate", "fused_float", "rows2", "cpu", "parallel-test")
    with inductor_config.patch(fx_graph_cache=False):
        out, code = run_and_get_code(dispatch.run_compiled, key, accumulate._k_fused_float,
                                     (acc, rows, params), True)
    assert torch.equal(out, torch.full((8,), 2.0))
    assert any("#pragma omp parallel" in c for c in code), "serial kernel"


@pytest.mark.slow
def test_compiled_kernels_do_not_recompile_per_shape(monkeypatch):
    """Many layer shapes, chunk counts and promotion groups through the compiled kernels: each
    kernel compiles at most twice, whatever the shapes, with the oracle's bits. A
    kernel that dynamo recompiled per shape or stride ran out of recompiles in training and, on
    the auto path, silently fell back to eager ops for the rest of the process."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    keys, run_compiled = set(), dispatch.run_compiled

    def spy(key, *args, **kwargs):
        keys.add(key)
        return run_compiled(key, *args, **kwargs)

    monkeypatch.setattr(dispatch, "run_compiled", spy)
    monkeypatch.setenv("QUANT_PATH", "compiled")
    torch._dynamo.reset()
    counters.clear()
    cases = [(m, k_total, n, chunk, promote)
             for m, n in ((3, 2), (5, 4), (2, 7), (1, 9))
             for k_total, chunk, promote in ((37, 3, 2), (50, 4, 3), (29, 2, 5), (64, 1, None),
                                             (20, 5, 2))]
    for i, (m, k_total, n, chunk, promote) in enumerate(cases):
        a, b = e4m3_operands((m, k_total), 40 + i), e4m3_operands((k_total, n), 80 + i)
        acc = Accumulator("bf16", chunk, promote)
        assert_same_array_bits(acc.matmul(a, b), oracle_matmul(a, b, "bf16", chunk, promote),
                               f"{acc.short()} {m}x{k_total}x{n}")
    for i, (n, c, h, chunk, promote) in enumerate(((2, 3, 5, 4, 2), (1, 4, 6, 3, 3),
                                                   (3, 2, 7, 2, 2), (2, 5, 4, 5, None),
                                                   (2, 3, 5, 1, None), (1, 4, 6, 1, 4))):
        x, w = e4m3_operands((n, c, h, h), 120 + i), e4m3_operands((4, c, 3, 3), 130 + i)
        Accumulator("fp16", chunk, promote).conv2d(x, w, 1, 1)
    for i, (entries, m, k_total, n, promote) in enumerate(((2, 3, 20, 2, None),
                                                           (3, 5, 13, 4, 4), (4, 2, 9, 3, None))):
        a, b = e4m3_operands((entries, m, k_total), 140 + i), e4m3_operands(
            (entries, k_total, n), 150 + i)
        Accumulator("bf16", 1, promote).matmul(a, b)
    # at most two graphs a kernel: a run of steps that is its whole tensor, and one that is not
    assert counters["stats"]["unique_graphs"] <= 2 * len(keys), sorted(keys)


# ---------------------------------------------------------------------------------------------
# arguments and records
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(fmt="fp16", chunk=0), "chunk"),
    (dict(fmt="fp16", chunk=2.5), "chunk"),
    (dict(fmt="fp16", chunk=True), "chunk"),
    (dict(fmt="fp16", chunk=4, promote_every=0), "promote_every"),
    (dict(fmt="mxfp8", chunk=4), "block format"),
    (dict(fmt="e8m22", chunk=4), "mantissa bits"),
    (dict(fmt="fp16", chunk=4, rounding="up"), "rounding"),
    (dict(fmt="fp32", chunk=4, rounding="stochastic"), "stochastic"),
    (dict(fmt="posit4es5", chunk=4, rounding="stochastic"), "stochastic"),
    (dict(fmt="fp16", chunk=4, saturate="yes"), "saturate"),
    (dict(fmt="fp15", chunk=4), "format"),
])
def test_bad_arguments_give_one_line_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        Accumulator(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_operands_give_one_line_value_errors():
    acc = Accumulator("fp16", 4)
    cases = [lambda: acc.matmul(torch.ones(2, 3, dtype=torch.float64), torch.ones(3, 2)),
             lambda: acc.matmul(torch.ones(2, 3), torch.ones(4, 2)),
             lambda: acc.conv2d(torch.ones(1, 2, 4, 4), torch.ones(1, 3, 3, 3)),
             lambda: acc.conv2d(torch.ones(1, 2, 4, 4), torch.ones(1, 2, 3, 3), stride=0)]
    for case in cases:
        with pytest.raises(ValueError) as err:
            case()
        assert "\n" not in str(err.value)


def test_records_and_short_names():
    accs = [Accumulator("fp16", 32, 4), Accumulator("e8m7", 1),
            Accumulator(parse_format("e4m3"), 8, rounding="stochastic", saturate=True)]
    assert [acc.short() for acc in accs] == ["fp16-k32-p4", "bf16-k1", "e4m3-k8-sr-sat"]
    for acc in accs:
        assert Accumulator.from_dict(json.loads(json.dumps(acc.to_dict()))) == acc
