"""quantize checked against an exact oracle written from the definitions, on every path.

The oracle (tests/oracles.py) knows nothing of common/'s casts: a float format is its exponent
and mantissa widths and its layout (docs/formats.md's table), a posit is decoded pattern by
pattern, and every rounding is done in Python fractions (exact), also for float64 inputs. Each
case runs on every path a user can reach: the eager bit arithmetic and native cast, quantize's
own compiled kernels, quantize's automatic choice on small and large tensors, and quantize
inside a user's torch.compile. Results must match bit for bit, NaN included (float32's default
quiet NaN, 0x7FC00000).

The last part holds the regression tests of "casts that stay exact everywhere", each named
after what it checks; every one of them failed before its fix.
"""
import functools
import math
import os
import re
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from common import quant
from common.formats import parse_format
from common.qat import QuantConfig, RoleQuant, quantize_model
from common.quant import _quantize_compiled, _quantize_eager, quantize, quantize_scaled

from cast_paths import run_path, user_compile
from oracles import (
    F32_QNAN,
    TWO,
    PositDef,
    bit_set,
    definition,
    inputs32,
    inputs64,
    nans,
    oracle_nearest,
)

ml_dtypes = pytest.importorskip("ml_dtypes")

DTYPE_QNAN = {torch.float32: 0x7FC00000, torch.float64: 0x7FF8000000000000,
              torch.float16: 0x7E00, torch.bfloat16: 0x7FC0}

# one or more formats of every family: bf16, fp16, OCP FP8, OCP MX FP6/FP4, other eXmY (eXm0
# ties on the exponent field, 8 exponent bits), posits (es 0..4; es >= 5: nearest only)
FLOAT_SPECS = ["bf16", "fp16", "e4m3", "e5m2", "e2m1", "e2m3", "e3m2", "e3m4", "e6m9", "e8m0",
               "e2m0", "e8m3"]
POSIT_SPECS = ["posit4es0", "posit8es0", "posit8es1", "posit8es2", "posit16es1", "posit6es3",
               "posit16es3", "posit9es4", "posit5es5", "posit3es6"]
SPECS = FLOAT_SPECS + POSIT_SPECS
SR_SPECS = [s for s in SPECS if not re.fullmatch(r"posit\d+es[56]", s)]


# =============================================================================================
# the oracle (tests/oracles.py: definitions, docs/formats.md, in exact arithmetic) and its inputs
# (every decision point or a sample, +-1 ulp, values, ends, specials; both signs)
# =============================================================================================
def assert_bits(got, want, xs, what):
    """Bit-for-bit equality, NaN as float32's default NaN; reports the first mismatches."""
    got = np.asarray(got.detach().cpu() if isinstance(got, torch.Tensor) else got,
                     dtype=np.float32)
    want = np.asarray(want, dtype=np.float64).astype(np.float32)
    want_bits = np.where(np.isnan(want), np.uint32(F32_QNAN), want.view(np.uint32))
    bad = np.flatnonzero(got.view(np.uint32) != want_bits)
    if bad.size:
        rows = ", ".join(f"x={float(xs[i])!r} got={got[i]!r} ({got.view(np.uint32)[i]:#010x}) "
                         f"want={want[i]!r}" for i in bad[:5])
        raise AssertionError(f"{what}: {bad.size} of {got.size} differ: {rows}")


# =============================================================================================
# nearest: every path against the oracle
# =============================================================================================
def nearest_paths(spec, saturate):
    """Every path of quantize for this case: the eager and compiled methods, and the automatic
    choice ("auto") on a small tensor (eager) and tiled past the compile threshold."""
    fmt = parse_format(spec)
    paths = [f"eager-{m}" for m in quant._methods(fmt, "nearest", saturate)]
    paths += [f"compiled-{m}" for m in quant._methods(fmt, "nearest", saturate, compiled=True)]
    return paths + ["auto-small", "auto-large"]


def run_any(path, x, spec, rounding="nearest", saturate=True):
    if path == "auto-small":
        return torch.cat([quantize(c, spec, rounding, saturate) for c in x.split(256)])
    if path == "auto-large":  # past both compile thresholds
        reps = -(-(1 << 18) // x.numel())
        return quantize(x.repeat(reps), spec, rounding, saturate)[:x.numel()]
    return run_path(path, x, spec, rounding, saturate)


@pytest.mark.parametrize("spec,saturate,path", [
    pytest.param(s, sat, p, id=f"{s}-{'sat' if sat else 'nonsat'}-{p}")
    for s in SPECS for sat in (True, False) for p in nearest_paths(s, sat)])
def test_nearest_matches_oracle(spec, saturate, path):
    xs = inputs32(spec)
    want = oracle_nearest(spec, xs, saturate)
    got = run_any(path, torch.from_numpy(xs), spec, "nearest", saturate)
    assert_bits(got, want, xs, f"{spec} {path} saturate={saturate}")


@pytest.mark.parametrize("spec,path", [
    pytest.param(s, p, id=f"{s}-{p}") for s in SPECS for p in nearest_paths(s, True)])
def test_float64_inputs_round_as_if_directly(spec, path):
    """float64 inputs at, and a float64 ulp or a quarter float32 ulp around, each decision
    point: the result is the format value nearest to the float64 value itself."""
    xs = inputs64(spec)
    want = oracle_nearest(spec, xs, True)
    got = run_any(path, torch.from_numpy(xs), spec, "nearest", True)
    assert got.dtype == torch.float64
    assert_bits(got.float(), want, xs, f"{spec} {path} float64")


@functools.lru_cache(maxsize=None)
def user_compiled(specs, rounding, saturate, hook=False):
    """One function a user might compile: quantize to each format (or, with hook, through the
    eager entry point with fixed seed words)."""
    def fn(xs, seed=None):
        if hook:
            return [_quantize_eager(x, s, rounding, saturate, seed=seed) for x, s in zip(xs, specs)]
        return [quantize(x, s, rounding, saturate) for x, s in zip(xs, specs)]
    return user_compile(fn)


@pytest.mark.slow
@pytest.mark.parametrize("saturate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_inside_user_torch_compile_matches_oracle(dtype, saturate):
    """quantize traced into a user's graph (inductor, default options) for every family."""
    inputs = inputs32 if dtype == torch.float32 else inputs64
    xs = [torch.from_numpy(inputs(s)) for s in SPECS]
    got = user_compiled(tuple(SPECS), "nearest", saturate)(xs)
    errors = []
    for spec, x, y in zip(SPECS, xs, got):
        try:
            assert y.dtype == dtype
            assert_bits(y.float(), oracle_nearest(spec, x.numpy(), saturate), x.numpy(),
                        f"{spec} inside torch.compile, {dtype}, saturate={saturate}")
        except AssertionError as err:
            errors.append(str(err))
    assert not errors, "\n".join(errors)


# =============================================================================================
# stochastic: the frequency of each neighbour against the exact probability
# =============================================================================================
def sr_points(spec):
    """x strictly between neighbours: within the range, in the subnormals (floats), below the
    smallest subnormal or minpos, across cut exponent bits (posits), and between max and the
    virtual next value (floats; an overflow in non-saturating mode)."""
    d = definition(spec)
    if isinstance(d, PositDef):
        pts = [d.minpos / 2, d.minpos * Fraction(3, 10), d.minpos / 2**9]
        for i in {len(d.vals) // 2, len(d.vals) // 2 + 1, 1, len(d.vals) - 3}:
            pts.append((d.vals[i] * 3 + d.vals[i + 1]) / 4)
    else:
        pts = [d.min_sub / 3, d.min_sub * Fraction(3, 2) if d.man else d.min_sub / 2,
               TWO**d.emin * Fraction(5, 4) + d.min_sub / 2,
               d.max + d.quantum(d.max) * Fraction(3, 8),
               Fraction(1) + d.quantum(Fraction(1)) * Fraction(5, 8)]
    top = float(np.finfo(np.float32).max)
    return [float(np.float32(float(p))) for p in pts if float(p) <= top]


N_DRAWS = 1 << 14


def check_frequencies(spec, x, draws, saturate, what):
    """Every draw is one of the outcomes; each outcome's count is within 6 standard deviations
    of its exact probability (plus one, for probabilities resolved to 2^-30)."""
    pairs = {}
    for p, v in definition(spec).outcomes(x, "stochastic", saturate):
        key = "nan" if math.isnan(v) else (v, math.copysign(1, v))  # (saturation merges two)
        pairs[key] = (pairs.get(key, (0, v))[0] + p, v)
    pairs = list(pairs.values())
    draws = draws.double().numpy()
    seen = np.zeros(len(draws), dtype=bool)
    for p, v in pairs:
        hit = np.isnan(draws) if math.isnan(v) else (draws == v) & (
            np.signbit(draws) == (math.copysign(1, v) < 0))
        seen |= hit
        n, p = len(draws), float(p)
        assert abs(hit.sum() - n * p) <= 6 * math.sqrt(n * p * (1 - p)) + 1, (
            f"{what}: x={x!r}: {hit.sum()} of {n} draws gave {v!r}, expected p={p:.6g}")
    assert seen.all(), f"{what}: x={x!r} gave {draws[~seen][:4]}, not one of {pairs}"


@pytest.mark.slow
@pytest.mark.parametrize("path", ["eager-bits", "compiled-bits", "auto-large"])
@pytest.mark.parametrize("saturate", [True, False])
@pytest.mark.parametrize("spec", SR_SPECS)
def test_stochastic_matches_exact_probabilities(spec, saturate, path):
    torch.manual_seed(1)
    for x in sr_points(spec):
        draws = run_any(path, torch.full((N_DRAWS,), x), spec, "stochastic", saturate)
        check_frequencies(spec, x, draws, saturate, f"{spec} {path} saturate={saturate}")


@pytest.mark.slow
def test_stochastic_inside_user_torch_compile_matches_exact_probabilities():
    points = [sr_points(s) for s in SR_SPECS]
    xs = [torch.tensor(p).repeat_interleave(N_DRAWS) for p in points]
    torch.manual_seed(2)
    got = user_compiled(tuple(SR_SPECS), "stochastic", False)(xs)
    for spec, pts, y in zip(SR_SPECS, points, got):
        for x, draws in zip(pts, y.view(len(pts), N_DRAWS)):
            check_frequencies(spec, x, draws, False, f"{spec} inside torch.compile")


@pytest.mark.slow
def test_stochastic_inside_user_torch_compile_same_bits_as_eager():
    """With the same seed words, the bits a user's compiled graph draws are eager's."""
    xs = [torch.from_numpy(inputs32(s)[:4000]) * 3 for s in SR_SPECS]
    seed = torch.tensor([12345, -678], dtype=torch.int32)
    for saturate in (True, False):
        got = user_compiled(tuple(SR_SPECS), "stochastic", saturate, hook=True)(xs, seed)
        for spec, x, y in zip(SR_SPECS, xs, got):
            want = _quantize_eager(x, spec, "stochastic", saturate, seed=seed)
            assert torch.equal(y.view(torch.int32), want.view(torch.int32)), (spec, saturate)


@pytest.mark.slow
@pytest.mark.parametrize("n", [48, 50, 59])
def test_stochastic_inside_user_torch_compile_any_size(n):
    """Static sizes that are no multiple of 16: inductor's CPU code once turned the counter
    arange(n) * constant into a vector arange whose lanes overflowed int32 (undefined in C++),
    and the compiled loop left elements 16 and up unwritten (garbage)."""
    x = torch.linspace(-5, 5, n)
    seed = torch.tensor([12345, -678], dtype=torch.int32)
    for spec in ("e4m3", "bf16", "posit8es1"):
        got = user_compile(lambda v, s: _quantize_eager(v, spec, "stochastic", seed=s))(x, seed)
        want = _quantize_eager(x, spec, "stochastic", seed=seed)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (spec, n)


# =============================================================================================
# the quantized layers inside torch.compile
# =============================================================================================
QAT_SPECS = ["bf16", "fp16", "e4m3", "e5m2", "e2m1", "e3m2", "e6m9", "posit8es1", "posit12es2"]


def _exact_layer_inputs(seed):
    """Weights and inputs in [1, 2) (and signs), 4 in-features: products of two values of at
    most 12 significant bits and their sums are exact in float32 in any order, so the eager and
    compiled layers can differ only through the casts."""
    g = torch.Generator().manual_seed(seed)
    x = (1 + torch.rand(6, 4, generator=g)) * (torch.randint(0, 2, (6, 4), generator=g) * 2 - 1)
    w = (1 + torch.rand(3, 4, generator=g)) * (torch.randint(0, 2, (3, 4), generator=g) * 2 - 1)
    c = torch.randint(-2, 3, (6, 3), generator=g).float()  # the loss's gradient
    return x, w, c


class _Branches(torch.nn.Module):
    """One QuantLinear and one 1x1 QuantConv2d per format, side by side (one compile)."""

    def __init__(self, specs, w):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for spec in specs:
            role = RoleQuant(spec)
            cfg = QuantConfig(weight=role, act=role, grad=role)
            lin, conv = torch.nn.Linear(4, 3, bias=False), torch.nn.Conv2d(4, 3, 1, bias=False)
            lin.weight.data.copy_(w)
            conv.weight.data.copy_(w.view(3, 4, 1, 1))
            self.layers.extend([quantize_model(lin, cfg), quantize_model(conv, cfg)])

    def forward(self, xs):
        return [m(x if i % 2 == 0 else x.view(6, 4, 1, 1)).reshape(6, 3)
                for i, (m, x) in enumerate(zip(self.layers, xs))]


def _layer_results(specs, compiled):
    x, w, c = _exact_layer_inputs(7)
    model = _Branches(specs, w)
    xs = [x.clone().requires_grad_() for _ in model.layers]
    ys = (torch.compile(model) if compiled else model)(xs)
    sum((y * c).sum() for y in ys).backward()
    return [(y.detach(), xi.grad, m.weight.grad.reshape(3, 4))
            for y, xi, m in zip(ys, xs, model.layers)]


@pytest.mark.slow
def test_quantized_layers_inside_torch_compile_same_bits_as_eager():
    """QuantLinear and QuantConv2d with weights, activations and gradients in each format:
    output, input gradient and weight gradient bit for bit the same compiled and eager, and
    not those of float32 layers."""
    eager, compiled = _layer_results(QAT_SPECS, False), _layer_results(QAT_SPECS, True)
    fp32 = _layer_results(["fp32"], False)[0]
    names = [f"{s} {kind}" for s in QAT_SPECS for kind in ("linear", "conv")]
    for name, e, c in zip(names, eager, compiled):
        for what, a, b in zip(("output", "input grad", "weight grad"), e, c):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{name} {what}"
        assert not torch.equal(e[0], fp32[0]) and not torch.equal(e[1], fp32[1]), name


# =============================================================================================
# regression tests: casts that stay exact everywhere (each failed before its fix)
# =============================================================================================
def _bits(t):
    return bit_set(t).pop()


# --- bf16 and fp16 rounded inside a user's torch.compile -----------------------------------------
@pytest.mark.parametrize("spec", ["bf16", "fp16"])
@pytest.mark.parametrize("saturate", [True, False])
def test_bf16_fp16_round_inside_user_torch_compile(spec, saturate):
    x = torch.tensor([3.14159, 1e6, -70000.0, 65520.0])
    got = user_compile(lambda v: quantize(v, spec, saturate=saturate))(x)
    want = torch.tensor(oracle_nearest(spec, x.numpy(), saturate), dtype=torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert _bits(got[:1]) == 0x40490000  # 3.140625, as eager (it was 0x40490fd0, unrounded)


@pytest.mark.slow
def test_bf16_emulated_training_with_compile_is_not_fp32(tmp_path):
    """BF16/bf16_train.py --mode emulated --compile trained exactly the float32 weights when
    inductor dropped the bf16 casts; its weights must differ from an FP32 run's."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = ["--synthetic", "--model", "resnet8", "--epochs", "1", "--max-steps-per-epoch",
              "2", "--batch-size", "32", "--compile", "--runs-dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for script, extra in (("BF16/bf16_train.py", ["--mode", "emulated"]),
                          ("FP32/train_cifar10_fp32.py", [])):
        r = subprocess.run([sys.executable, os.path.join(root, script), *extra, *common],
                           cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
    (bf16,) = tmp_path.glob("bf16_*/last.pt")
    (fp32,) = tmp_path.glob("fp32_*/last.pt")
    a = torch.load(bf16, map_location="cpu", weights_only=False)["model"]
    b = torch.load(fp32, map_location="cpu", weights_only=False)["model"]
    weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
    assert weights and all(not torch.equal(a[k], b[k]) for k in weights)


# --- posit stochastic rounding unbiased below minpos ---------------------------------------------
@pytest.mark.parametrize("path", ["eager-bits", "compiled-bits"])
def test_posit_stochastic_below_minpos_is_unbiased(path):
    """posit8es1 at x = 2^-13 (minpos / 2): minpos half the time, else 0 (was always minpos)."""
    torch.manual_seed(3)
    x = -(2.0**-13)
    draws = run_path(path, torch.full((1 << 20,), x), "posit8es1", "stochastic")
    check_frequencies("posit8es1", x, draws[: 1 << 16], True, path)
    assert abs((draws != 0).double().mean().item() - 0.5) < 6 * 0.5 / 2**10


@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_posit_stochastic_below_minpos_of_subnormals_under_scaling(path, monkeypatch):
    """Float32 subnormals scaled past minpos (posit16es3, scale 2^14 at the window's top):
    x = 2^-127 is minpos / 2 after scaling, so half the draws are minpos / 2^14."""
    monkeypatch.setenv("QUANT_PATH", path)
    x = torch.full((1 << 16,), 2.0**-127)
    torch.manual_seed(4)
    got = quantize_scaled(x, "posit16es3", "tensor", "stochastic")
    minpos_unscaled = 2.0**-112 / 2**14
    assert torch.isin(got, torch.tensor([0.0, minpos_unscaled])).all()
    assert abs((got != 0).double().mean().item() - 0.5) < 6 * 0.5 / 2**8


# --- es >= 5 posits: stochastic rounding refused -------------------------------------------------
@pytest.mark.parametrize("spec", ["posit3es6", "posit5es5", "posit4es5"])
def test_posit_stochastic_with_es5_or_more_is_refused(spec):
    x = torch.full((64,), 0.5)
    for call in (lambda: quantize(x, spec, "stochastic"),
                 lambda: quantize_scaled(x, spec, "tensor", "stochastic")):
        with pytest.raises(ValueError, match=r"es <= 4.*nearest") as err:
            call()
        assert "\n" not in str(err.value)
    assert torch.isfinite(quantize(x, spec)).all()  # nearest stays available


# --- inputs whose dtype cannot hold the format's values ------------------------------------------
DTYPE_SPECS = ["bf16", "fp16", "e4m3", "e5m2", "e2m1", "e2m3", "e3m2", "e3m4", "e8m0", "e6m9",
               "e4m10", "e5m11", "e8m7", "posit8es0", "posit8es1", "posit8es2", "posit11es1",
               "posit12es1", "posit16es1", "posit6es3"]
NARROW = {torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16}


@functools.lru_cache(maxsize=None)
def fits(spec, dtype):
    """Whether every value of spec (from the definition) survives a round trip through the
    numpy type of dtype (ml_dtypes' bfloat16, numpy's float16)."""
    d = definition(spec)
    if isinstance(d, PositDef):
        vals = d.vals
    else:
        vals, v = [], d.min_sub
        while v <= d.max:
            vals.append(v)
            v += d.quantum(v)
            if len(vals) > 1 << 17:  # more values than a 16-bit type holds
                return False
    v64 = np.array([float(v) for v in vals])
    with np.errstate(over="ignore"):
        return bool(np.all(v64.astype(NARROW[dtype]).astype(np.float64) == v64))


def _same(got, want):
    """Same values (NaN where NaN) and the same dtype."""
    return got.dtype == want.dtype and torch.equal(got.isnan(), want.isnan()) and torch.equal(
        got.nan_to_num(0.0, math.inf, -math.inf), want.nan_to_num(0.0, math.inf, -math.inf))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", DTYPE_SPECS)
def test_narrow_inputs_refused_unless_every_value_fits(spec, dtype):
    xs = torch.from_numpy(inputs32("e5m2")).to(dtype)
    if fits(spec, dtype):
        want = quantize(xs.float(), spec).to(dtype)
        assert _same(quantize(xs, spec), want)
        assert _same(quantize(xs.repeat(64), spec)[:xs.numel()], want)  # the compiled kernel
    else:
        with pytest.raises(ValueError, match="float32") as err:
            quantize(xs, spec)
        assert "\n" not in str(err.value) and str(parse_format(spec)) in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrow_inputs_inside_user_torch_compile(dtype):
    specs = tuple(s for s in DTYPE_SPECS if fits(s, dtype))
    xs = torch.from_numpy(inputs32("e5m2")).to(dtype)
    got = user_compile(lambda v: [quantize(v, s) for s in specs])(xs)
    for spec, y in zip(specs, got):
        assert _same(y, quantize(xs.float(), spec).to(dtype)), spec


def test_narrow_inputs_audit_cases():
    h = torch.tensor([65504.0, math.inf, 65408.0], dtype=torch.float16)
    for spec in ("bf16", "posit16es1"):
        with pytest.raises(ValueError, match="float32"):
            quantize(h, spec, saturate=True)
    with pytest.raises(ValueError, match="float32"):
        quantize(torch.tensor([70000.0, 1e30], dtype=torch.bfloat16), "fp16")
    assert quantize(h, "e5m2").tolist() == [57344.0, 57344.0, 57344.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrow_inputs_refused_by_scaled_casts(dtype):
    """A scale moves the values: e4m3 values / 2^-8 leave float16 (amax 65504 -> 65536)."""
    x = torch.tensor([65504.0, 1.0, -3.0]).to(dtype)
    for spec in ("e4m3", "posit8es1"):
        with pytest.raises(ValueError, match="float32"):
            quantize_scaled(x, spec, "tensor")
    assert torch.equal(quantize_scaled(x, "e4m3", "none"), quantize(x, "e4m3"))


# --- float64 inputs rounded once -----------------------------------------------------------------
@pytest.mark.parametrize("path", ["eager", "compiled", "auto-large", "user"])
@pytest.mark.parametrize("spec,x,want", [("fp16", -58.29687414000341, -58.28125),
                                         ("posit8es1", -384.000001205991, -512.0)])
def test_float64_audit_cases_round_once(spec, x, want, path):
    xt = torch.tensor([x], dtype=torch.float64)
    if path == "user":
        got = user_compile(lambda v: quantize(v, spec))(xt)
    else:
        got = run_any(path, xt, spec)
    assert got.dtype == torch.float64 and got.item() == want
    assert oracle_nearest(spec, [x], True) == [want]


@pytest.mark.parametrize("scaling", ["tensor", "channel"])
@pytest.mark.parametrize("spec", ["e4m3", "e5m2", "fp16"])
def test_float64_inputs_with_float_scaling_round_once(spec, scaling):
    """A float scale keeps float64 inputs float64: each value is rounded once, like the oracle
    rounding x*s itself. The second value lies a hair (below float32's resolution) above a
    rounding midpoint: rounded through float32 first it would tie to even, the wrong way."""
    fmt = parse_format(spec)
    q = 2.0 ** -fmt.man_bits                       # quantum in [1, 2)
    amax = fmt.max * 0.75                          # scale 1: amax*1 already in (max/2, max]
    xs = [amax, 1.0 + q / 2 + 2.0 ** -40, -(1.0 + 3 * q / 2 - 2.0 ** -40)]
    x = torch.tensor(xs, dtype=torch.float64).reshape(1, 3)
    got = quantize_scaled(x, spec, scaling, channel_dim=0)
    want = oracle_nearest(spec, xs, True)
    assert got.dtype == torch.float64
    assert got.flatten().tolist() == want
    assert want[1] == 1.0 + q and want[2] == -(1.0 + q)     # the midpoints were not ties


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["posit8es1", "e4m3"])
@pytest.mark.parametrize("scaling", ["tensor", "channel"])
def test_scaled_casts_compile_without_a_graph_break(spec, scaling):
    """The posit scale's rms has a float64 redo for all-zero or extreme slices; under a user's
    torch.compile (fullgraph: a graph break is an error) it runs branch-free with the same bits
    as eager: ordinary slices, an all-zero one (s = 1), one holding inf (s = 1). Floats' amax
    path likewise."""
    x = torch.randn(4, 64) * torch.tensor([[1e-3], [1.0], [1e3], [1.0]])
    x[1] = 0.0
    x[3, 5] = float("inf")
    if scaling == "tensor":
        x = x[:3]                                       # inf would set the tensor's one s to 1

    def fn(v):
        return quantize_scaled(v, spec, scaling, channel_dim=0)

    got = user_compile(fn)(x)
    want = quantize_scaled(x, spec, scaling, channel_dim=0)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


# --- one NaN out of every path -------------------------------------------------------------------
NAN_SPECS = ["bf16", "fp16", "e4m3", "e5m2", "e2m1", "e8m0", "posit8es1"]


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("spec", NAN_SPECS)
def test_nan_is_float32_default_nan_on_every_path_and_size(spec, rounding):
    """NaNs of either sign, quiet or signalling, with payloads: one NaN out, whatever the
    path (eager cast or bits, compiled cast or bits, automatic) and the tensor size."""
    fmt = parse_format(spec)
    for n in (6, 1000, 1 << 18):
        x = nans(n)
        for saturate in (True, False):
            outs = {"auto": quantize(x, spec, rounding, saturate)}
            for m in quant._methods(fmt, rounding, saturate):
                outs[f"eager-{m}"] = _quantize_eager(x, spec, rounding, saturate, method=m)
            for m in quant._methods(fmt, rounding, saturate, compiled=True):
                outs[f"compiled-{m}"] = _quantize_compiled(x, spec, rounding, saturate, method=m)
            for path, y in outs.items():
                got = bit_set(y)
                assert got == {F32_QNAN}, (path, n, saturate, [hex(b) for b in got])


@pytest.mark.slow
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_nan_is_float32_default_nan_inside_user_torch_compile(rounding):
    fn = user_compiled(tuple(NAN_SPECS), rounding, False)
    for n in (6, 1000):
        for spec, y in zip(NAN_SPECS, fn([nans(n)] * len(NAN_SPECS))):
            assert bit_set(y) == {F32_QNAN}, (spec, n, [hex(b) for b in bit_set(y)])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_nan_of_other_dtypes_is_their_default_nan(dtype):
    for n in (6, 1 << 18):
        xs = nans(n, dtype)
        for y in (quantize(xs, "e4m3"), quantize(xs, "posit8es1", "stochastic"),
                  user_compile(lambda v: quantize(v, "e4m3"))(xs[:6])):
            assert y.dtype == dtype
            assert bit_set(y) == {DTYPE_QNAN[dtype]}, (dtype, n, [hex(b) for b in bit_set(y)])


# --- the documented behaviours, and the user-facing reference ------------------------------------
def test_stochastic_bits_follow_memory_order():
    """Documented: the same values stored channels-last or contiguous draw other bits (each
    layout is still unbiased), and the same layout with the same seed draws the same bits."""
    x = torch.full((8, 16, 8, 8), 1 + 2.0**-9)
    cl = x.contiguous(memory_format=torch.channels_last)
    seed = torch.tensor([5, 6], dtype=torch.int32)
    a = _quantize_eager(x, "bf16", "stochastic", seed=seed)
    b = _quantize_eager(cl, "bf16", "stochastic", seed=seed)
    assert not torch.equal(a, b) and torch.equal(a.flatten(), _quantize_eager(
        x.flatten(), "bf16", "stochastic", seed=seed))


def test_nonsaturating_stochastic_overflow_follows_the_virtual_next_value():
    """Documented: e4m3 at 464 lies halfway between 448 and the virtual 480, so non-saturating
    stochastic rounding gives NaN (e4m3's overflow) in half of the draws."""
    torch.manual_seed(6)
    got = quantize(torch.full((1 << 16,), 464.0), "e4m3", "stochastic", saturate=False)
    check_frequencies("e4m3", 464.0, got, False, "e4m3 464")
    assert abs(torch.isnan(got).double().mean().item() - 0.5) < 0.02


def test_e8m0_is_ieee_like_not_the_ocp_scale_format():
    """Documented: "e8m0" follows the eXmY rule (sign, inf, NaN, smallest value 2^-126), not
    OCP MX's unsigned E8M0 scale format (no sign, no inf, 2^-127 .. 2^127, one NaN)."""
    got = quantize(torch.tensor([-3.5, 2.0**-127, math.inf, 2.0**127 * 1.6]), "e8m0",
                   saturate=False)
    assert got[0] == -4.0 and got[1] == 0.0 and got[2] == math.inf and got[3] == math.inf


DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "formats.md")


def test_format_reference_table_matches_the_parser():
    """docs/formats.md's table: each spec's max, smallest normal and smallest subnormal as
    the parser derives them (so that the user-facing reference cannot drift)."""
    with open(DOC) as f:
        text = f.read()
    rows = re.findall(r"^\| `([a-z0-9]+)`[^|]*\|[^|]*\| ([^|]+) \| ([^|]+) \| ([^|]+) \|", text,
                      re.M)
    assert len(rows) >= 8
    def value(cell):  # "(2 - 2^-7) * 2^127", "65504", "2^-9"
        assert re.fullmatch(r"[0-9.^*() -]+", cell), cell
        return float(eval(cell.replace("^", "**")))

    for spec, mx, mn, sub in rows:
        fmt = parse_format(spec)
        assert (value(mx), value(sub)) == (fmt.max, fmt.min_subnormal), spec
        if fmt.is_float:
            assert value(mn) == fmt.min_normal, spec
    flat = " ".join(text.split()).lower()
    for words in ("memory order", "virtual next value", "not OCP MX's E8M0", "sets its scale to 1",
                  "round-to-odd", "inside your own `torch.compile`", "asking for a float32 input",
                  "0x7FC00000", "es >= 5", "Block-scaled formats"):
        assert words.lower() in flat, words
