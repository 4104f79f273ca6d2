"""GEMM mode, its operand casts and emulated accumulation on CUDA: the CPU's results.

The CPU suites check these functions against independent oracles (tests/test_accumulate.py,
tests/test_operands.py, tests/test_gemm.py); this module checks that the device computes what
the CPU computes, from the same inputs. The reference is always the CPU's eager ops
(QUANT_PATH=eager); the device runs the eager ops, the compiled kernels (QUANT_PATH=compiled:
the fused accumulation kernel and the step-by-step path) or its own choice ("auto", on tensors
large enough that it compiles).

- ``Accumulator.matmul`` / ``.conv2d`` on e4m3-grid operands (every float64 chunk sum exact, so
  the order the float64 GEMM adds in does not matter): the CPU's bits, overflow, saturation,
  NaN and inf included. Stochastic rounding with a CPU generator (the same seed words on both
  devices, as test_quant_cuda's fixed seed words): the CPU's bits; with a device generator:
  reproducible.
- ``cast_along``, ``quantize_weight_2d``: the CPU's bits (stochastic: with a CPU generator);
  ``hadamard_transform``: the CPU's bits where the arithmetic is exact, within float32
  rounding elsewhere.
- ``gemm_conv2d`` / ``gemm_linear`` for every recipe: the casts are bit-identical, the float32
  GEMMs (cuBLAS, cuDNN) add in another order, so y, dx, dw agree to float32 rounding; with an
  Accumulator in all three GEMMs the accumulation model fixes the order and they agree bit for
  bit. TF32 is switched off here (FP32 means FP32, as the training loop does without --tf32).
- One GEMM-mode training step of a channels-last ResNet-8 on the device.

Skipped where torch sees no CUDA device. ``GEMM_PARITY_DEVICE=cpu`` runs the "device" side on
the CPU instead, to check this module's own logic on a machine without a GPU (then every case
compares the CPU with itself, paths included).
"""
import math
import os

import numpy as np
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from common import dispatch
from common.accumulate import Accumulator
from common.formats import parse_format
from common.gemm import RECIPES, GemmConfig, gemm_conv2d, gemm_linear
from common.operands import cast_along, hadamard_transform, quantize_weight_2d
from common.qat import QuantConfig, RoleQuant, quantize_model, quantized_layers
from common.resnet import resnet8

from oracles import FloatDef, assert_same_array_bits

DEVICE = os.environ.get("GEMM_PARITY_DEVICE", "cuda")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA device"),
              pytest.mark.usefixtures("one_thread")]

SEED = 20250612
# QUANT_PATH on the device side; the compiled kernels compile at first use (slow on a CPU)
PATHS = ("eager", pytest.param("compiled", marks=pytest.mark.slow))


@pytest.fixture(autouse=True, scope="module")
def device_settings():
    """float32 GEMMs and convs in float32 on the device (no TF32), and room for dynamo's
    recompiles: QUANT_PATH=compiled raises where a kernel passes the recompile limit, and this
    module runs the compiled kernels on many more shapes and layouts than one model does.
    Restored after."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             getattr(config, limit))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    setattr(config, limit, max(saved[2], 64))
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    setattr(config, limit, saved[2])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def set_path(monkeypatch, path):
    """QUANT_PATH for the calls that follow: "eager", "compiled", or unset ("auto")."""
    if path == "auto":
        monkeypatch.delenv("QUANT_PATH", raising=False)
    else:
        monkeypatch.setenv("QUANT_PATH", path)


def on_device(t):
    return t.to(DEVICE) if isinstance(t, torch.Tensor) else t


def parity(monkeypatch, path, fn, *args):
    """(device result, CPU reference): fn(*args) by the CPU's eager ops, then fn on DEVICE copies
    of the tensor arguments by `path`."""
    set_path(monkeypatch, "eager")
    want = fn(*args)
    set_path(monkeypatch, path)
    got = fn(*[on_device(a) for a in args])
    for g in got if isinstance(got, tuple) else (got,):
        assert g.device.type == torch.device(DEVICE).type
    return got, want


def spy_compiled(monkeypatch) -> list:
    """The keys of every compiled kernel call that ran compiled from now on
    (dispatch.run_compiled; not those that fell back to the eager ops)."""
    keys, run_compiled = [], dispatch.run_compiled

    def spy(key, *args, **kwargs):
        y = run_compiled(key, *args, **kwargs)
        if y is not None:
            keys.append(key)
        return y

    monkeypatch.setattr(dispatch, "run_compiled", spy)
    return keys


def compiled_kernels(keys, family) -> set:
    """The kernel names of `family` (a key's first part) that ran compiled on DEVICE (a key's
    last part is the device type)."""
    kind = torch.device(DEVICE).type
    return {key[1] for key in keys if key[0] == family and key[-1] == kind}


E4M3_VALUES = np.array([float(v) for v in FloatDef("e4m3").grid(None, 0) if v <= 16])


def e4m3_operands(shape, seed, zeros=0.1):
    """Random e4m3 values in [-16, 16] (a tenth of them 0): products span at most 36 bits, so
    every float64 chunk sum is exact, in any order (common/accumulate.py)."""
    rng = np.random.default_rng(seed)
    x = rng.choice(E4M3_VALUES, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    x[rng.random(shape) < zeros] = 0.0
    return torch.tensor(x, dtype=torch.float32)


def spread(shape, seed):
    """Gaussian values times powers of two from 2^-6 to 2^6: blocks with different scales."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-6, 7, shape))
    return torch.from_numpy(x.astype(np.float32))


def grid(shape, seed, step):
    """Integers in [-64, 64] times `step` (a power of two): few significant bits, so the
    Hadamard transform of these values is exact in float32 on every device."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.integers(-64, 65, shape) * step).astype(np.float32))


def assert_close_f32(got, want, what):
    """float32 GEMM results summed in another order: within 1e-4 relative, or 1e-4 of the
    largest magnitude (float32 sums of a few hundred terms err by far less)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert torch.isfinite(want).all(), what
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale,
                               msg=lambda m: f"{what}: {m}")


# =============================================================================================
# Accumulator
# =============================================================================================
ACC_SPECS = ("fp16", "bf16", "e5m7", "e8m13")
CHUNKS = (1, 3, 16, 32)
K_PARTIAL = 37  # none of 3, 16, 32 divides it: a partial last chunk


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("promote_every", (None, 4))
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("spec", ACC_SPECS)
def test_accumulator_matmul_same_bits_as_cpu(spec, chunk, promote_every, path, monkeypatch):
    a, b = e4m3_operands((5, K_PARTIAL), SEED), e4m3_operands((K_PARTIAL, 4), SEED + 1)
    acc = Accumulator(spec, chunk, promote_every)
    keys = spy_compiled(monkeypatch)
    got, want = parity(monkeypatch, path, acc.matmul, a, b)
    assert_same_array_bits(got, want, f"{acc.short()} {path}")
    if path == "compiled":   # fused calls only: runs of FUSED_STEPS, then of 4, 2 and 1
        fused = "fused_float_products" if chunk == 1 else "fused_float"   # k = 1: products
        assert compiled_kernels(keys, "accumulate") == {fused}


@pytest.mark.parametrize("path", PATHS)
def test_accumulator_batched_matmul_and_fp32_same_bits_as_cpu(path, monkeypatch):
    a, b = e4m3_operands((3, 4, 21), SEED + 2), e4m3_operands((3, 21, 2), SEED + 3)
    for acc in (Accumulator("bf16", 4, 2), Accumulator("fp32", 1), Accumulator("fp32", 3, 2),
                Accumulator("fp16", 1, saturate=True)):
        got, want = parity(monkeypatch, path, acc.matmul, a, b)
        assert got.shape == (3, 4, 2)
        assert_same_array_bits(got, want, f"{acc.short()} {path} batched")


CONV_CASES = [  # stride, padding, spec, chunk, promote_every
    (1, 0, "fp16", 16, None),
    (1, 1, "bf16", 3, None),
    (2, 1, "e5m7", 1, 4),
    (2, 0, "e8m13", 32, None),
    (1, 1, "fp16", 1, None),
    (2, 1, "bf16", 16, 1),
    ((2, 1), (1, 0), "fp16", 3, 2),
    (1, 0, "e5m7", 32, 2),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stride,padding,spec,chunk,promote_every", CONV_CASES)
def test_accumulator_conv2d_same_bits_as_cpu(stride, padding, spec, chunk, promote_every, path,
                                             monkeypatch):
    """Reduction length C * kh * kw = 45: a partial last chunk for k = 16 and 32."""
    x, w = e4m3_operands((2, 5, 7, 6), SEED + 4), e4m3_operands((3, 5, 3, 3), SEED + 5)
    acc = Accumulator(spec, chunk, promote_every)
    got, want = parity(monkeypatch, path, lambda x, w: acc.conv2d(x, w, stride, padding), x, w)
    assert_same_array_bits(got, want, f"{acc.short()} {path} stride {stride} pad {padding}")


@pytest.mark.slow
@pytest.mark.parametrize("spec,chunk,promote_every", [("fp16", 3, None), ("bf16", 1, None),
                                                      ("e8m13", 1, 16), ("fp32", 1, None)])
def test_accumulator_auto_path_compiles_large_tensors(spec, chunk, promote_every, monkeypatch):
    """Outputs of at least dispatch.EAGER_BITS_BELOW elements: "auto" runs the compiled
    kernels on the device (fused steps, in runs of FUSED_STEPS, 4, 2 and 1); the CPU's eager
    bits. matmul 64 x 64 outputs, conv 4 x 16 x 16 x 16."""
    threshold = dispatch.EAGER_BITS_BELOW.get(torch.device(DEVICE).type,
                                              dispatch.EAGER_BITS_BELOW["cpu"])
    a, b = e4m3_operands((64, K_PARTIAL), SEED + 6), e4m3_operands((K_PARTIAL, 64), SEED + 7)
    x, w = e4m3_operands((4, 8, 16, 16), SEED + 8), e4m3_operands((16, 8, 3, 3), SEED + 9)
    assert 64 * 64 >= threshold and 4 * 16 * 16 * 16 >= threshold
    acc = Accumulator(spec, chunk, promote_every)
    keys = spy_compiled(monkeypatch)
    got, want = parity(monkeypatch, "auto", acc.matmul, a, b)
    assert_same_array_bits(got, want, f"{acc.short()} auto matmul")
    got, want = parity(monkeypatch, "auto", lambda x, w: acc.conv2d(x, w, 1, 1), x, w)
    assert_same_array_bits(got, want, f"{acc.short()} auto conv2d")
    fused = ("fused_fp32" if spec == "fp32" else "fused_float") + (
        "_products" if chunk == 1 else "")   # k = 1: the kernels form the products
    assert fused in compiled_kernels(keys, "accumulate")


def overflow_operands():
    """Rows and columns of +-1 (and 0.5), to be scaled by a power of two: running sums that
    leave A's range (bf16's: also float32's) and some that come back; 11 products, more than
    FUSED_STEPS at k = 1."""
    a = torch.ones(4, 11)
    a[0] = 1.0
    a[1, ::2] = -1.0
    a[2, :4] = torch.tensor([1.0, 1.0, -1.0, -1.0])
    a[3, 1::3] = -1.0
    b = torch.ones(11, 3)
    b[1::2, 1] = -1.0
    b[5:, 2] = 0.5
    return a, b


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("saturate", (False, True))
@pytest.mark.parametrize("spec", ("fp16", "bf16", "e5m7", "e4m3"))
def test_accumulator_overflow_same_bits_as_cpu(spec, saturate, path, monkeypatch):
    fmt = parse_format(spec)
    big = 4 * math.sqrt(fmt.max)                        # products 16 x max: overflow
    big = 2.0 ** math.ceil(math.log2(big))
    a, b = overflow_operands()
    a, b = a * big, b * big
    for chunk, promote_every in ((1, None), (2, 2), (1, 3)):
        acc = Accumulator(spec, chunk, promote_every, saturate=saturate)
        got, want = parity(monkeypatch, path, acc.matmul, a, b)
        assert_same_array_bits(got, want, f"{acc.short()} {path}")
        if chunk == 1 and promote_every is None:   # the case reaches the overflow rule
            top = torch.tensor(fmt.max, dtype=torch.float32)
            if saturate:
                assert (want.abs() == top).any() and not torch.isinf(want).any(), want
            elif spec == "e4m3":
                assert torch.isnan(want).any(), want
            else:
                assert torch.isinf(want).any(), want


@pytest.mark.parametrize("path", PATHS)
def test_accumulator_nan_and_inf_operands_same_bits_as_cpu(path, monkeypatch):
    a, b = e4m3_operands((4, 19), SEED + 10), e4m3_operands((19, 3), SEED + 11)
    a[0, 4] = math.nan
    a[1, 2] = math.inf
    b[7, 1] = -math.inf
    b[2, 2] = 0.0
    x, w = e4m3_operands((1, 3, 5, 5), SEED + 12), e4m3_operands((2, 3, 3, 3), SEED + 13)
    x[0, 1, 2, 2] = math.nan
    x[0, 0, 0, 0] = math.inf      # inf x w: inf, NaN where w is 0, inf - inf NaN
    for acc in (Accumulator("fp16", 3, 2), Accumulator("bf16", 1, saturate=True),
                Accumulator("fp32", 4)):
        got, want = parity(monkeypatch, path, acc.matmul, a, b)
        assert torch.isnan(want[0]).all() and torch.isnan(got[0]).all()
        assert_same_array_bits(got, want, f"{acc.short()} {path} matmul")
        got, want = parity(monkeypatch, path, lambda x, w: acc.conv2d(x, w, 1, 1), x, w)
        assert torch.isnan(want).any()
        assert_same_array_bits(got, want, f"{acc.short()} {path} conv2d")


@pytest.mark.parametrize("path", PATHS)
def test_accumulator_stochastic_same_bits_as_cpu(path, monkeypatch):
    """A CPU generator seeded alike draws the same seed words for either device, and the
    random bits come from them and each element's position (test_quant_cuda's fixed seed
    words): the CPU's bits."""
    a, b = e4m3_operands((40, 64), SEED + 14), e4m3_operands((64, 3), SEED + 15)
    x, w = e4m3_operands((2, 4, 6, 6), SEED + 16), e4m3_operands((3, 4, 3, 3), SEED + 17)
    for acc in (Accumulator("bf16", 1, rounding="stochastic"),
                Accumulator("fp16", 4, 2, rounding="stochastic", saturate=True)):
        got, want = parity(monkeypatch, path, lambda a, b: acc.matmul(
            a, b, torch.Generator().manual_seed(21)), a, b)
        assert_same_array_bits(got, want, f"{acc.short()} {path} matmul")
        assert not torch.equal(want, acc.matmul(a, b, torch.Generator().manual_seed(22)))
        got, want = parity(monkeypatch, path, lambda x, w: acc.conv2d(
            x, w, 2, 1, torch.Generator().manual_seed(23)), x, w)
        assert_same_array_bits(got, want, f"{acc.short()} {path} conv2d")


def test_accumulator_stochastic_reproducible_with_a_device_generator():
    a, b = e4m3_operands((40, 64), SEED + 18).to(DEVICE), e4m3_operands((64, 3), SEED + 19)
    b = b.to(DEVICE)
    acc = Accumulator("bf16", 1, rounding="stochastic")
    first = acc.matmul(a, b, torch.Generator(device=DEVICE).manual_seed(5))
    again = acc.matmul(a, b, torch.Generator(device=DEVICE).manual_seed(5))
    other = acc.matmul(a, b, torch.Generator(device=DEVICE).manual_seed(6))
    assert first.device.type == torch.device(DEVICE).type
    assert_same_array_bits(first, again, "same device generator seed")
    assert not torch.equal(first, other)


# =============================================================================================
# operand casts
# =============================================================================================
CAST_SPECS = ("mxfp8", "mxfp4", "nvfp4")


def shape_4d(axis):
    """A small 4-D shape whose `axis` has 40 elements: blocks of 16 or 32 and a short last one."""
    shape = [2, 3, 2, 3]
    shape[axis] = 40
    return shape


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1])
@pytest.mark.parametrize("spec", CAST_SPECS)
def test_cast_along_same_bits_as_cpu(spec, axis, path, monkeypatch):
    x = spread(shape_4d(axis), SEED + axis)
    got, want = parity(monkeypatch, path, lambda t: cast_along(t, spec, axis), x)
    assert got.is_contiguous()
    assert_same_array_bits(got, want, f"{spec} axis {axis} {path}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec", CAST_SPECS)
def test_cast_along_channels_last_same_bits_as_cpu(spec, path, monkeypatch):
    for axis in (0, 1, 3):
        x = spread(shape_4d(axis), SEED + 20 + axis)
        set_path(monkeypatch, "eager")
        want = cast_along(x, spec, axis)
        set_path(monkeypatch, path)
        got = cast_along(on_device(x).contiguous(memory_format=torch.channels_last), spec, axis)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert_same_array_bits(got, want, f"{spec} channels-last axis {axis} {path}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec", CAST_SPECS)
def test_cast_along_stochastic_same_bits_as_cpu(spec, path, monkeypatch):
    """A CPU generator seeded alike: the same seed words on both devices, the CPU's bits (as
    test_quant_cuda's stochastic block casts with fixed seed words)."""
    for axis in (0, 2, -1):
        x = spread(shape_4d(axis), SEED + 30 + axis)
        got, want = parity(monkeypatch, path, lambda t: cast_along(
            t, spec, axis, "stochastic", generator=torch.Generator().manual_seed(7)), x)
        assert_same_array_bits(got, want, f"{spec} stochastic axis {axis} {path}")
        assert not torch.equal(want, cast_along(x, spec, axis))


def test_cast_along_stochastic_reproducible_with_a_device_generator():
    x = on_device(spread((3, 40, 5), SEED + 40))
    for spec in CAST_SPECS:
        a, b, c = (cast_along(x, spec, 2, "stochastic",
                              generator=torch.Generator(device=DEVICE).manual_seed(s))
                   for s in (1, 1, 2))
        assert torch.equal(a, b) and not torch.equal(a, c), spec


WEIGHT_CASES = [("nvfp4", (40, 24)), ("nvfp4", (20, 12, 3, 3)), ("mxfp4", (40, 70)),
                ("mxfp4", (34, 8, 3, 3))]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec,shape", WEIGHT_CASES)
def test_weight_2d_same_bits_as_cpu(spec, shape, path, monkeypatch):
    w = spread(shape, SEED + len(shape))
    got, want = parity(monkeypatch, path, lambda t: quantize_weight_2d(t, spec), w)
    assert_same_array_bits(got, want, f"{spec} {shape} {path}")
    if len(shape) == 4:
        got = quantize_weight_2d(on_device(w).contiguous(memory_format=torch.channels_last),
                                 spec)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert_same_array_bits(got, want, f"{spec} {shape} {path} channels-last")
    got, want = parity(monkeypatch, path, lambda t: quantize_weight_2d(
        t, spec, "stochastic", torch.Generator().manual_seed(3)), w)
    assert_same_array_bits(got, want, f"{spec} {shape} {path} stochastic")


def test_weight_2d_stochastic_reproducible_with_a_device_generator():
    w = on_device(spread((20, 12, 3, 3), SEED + 50))
    for spec in ("nvfp4", "mxfp4"):
        a, b, c = (quantize_weight_2d(w, spec, "stochastic",
                                      torch.Generator(device=DEVICE).manual_seed(s))
                   for s in (4, 4, 5))
        assert torch.equal(a, b) and not torch.equal(a, c), spec


def test_hadamard_exact_inputs_same_bits_as_cpu():
    """Few significant bits (test_operands: the transform is exact there): the CPU's bits,
    forward and inverse, float32 and float64, every axis; the round trip gives x back."""
    x32 = grid((3, 37, 5), SEED + 60, 2.0**-3)
    x64 = torch.from_numpy(np.random.default_rng(SEED + 61).integers(-2**20, 2**20, (6, 40))
                           * 2.0**-12)
    for x in (x32, x64):
        for axis in range(-1, x.dim()):
            for inverse in (False, True):
                want = hadamard_transform(x, axis, 9, inverse=inverse)
                got = hadamard_transform(on_device(x), axis, 9, inverse=inverse)
                assert got.dtype == x.dtype and got.device.type == torch.device(DEVICE).type
                assert torch.equal(got.cpu(), want), (x.dtype, axis, inverse)
            back = hadamard_transform(hadamard_transform(on_device(x), axis, 9), axis, 9,
                                      inverse=True)
            assert torch.equal(back.narrow(axis, 0, x.shape[axis]).cpu(), x), (x.dtype, axis)


def test_hadamard_float32_within_rounding_of_cpu():
    """Random float32 inputs: each output is a float32 sum of 16 terms +-v/4, within 15 * 2^-24
    * 4 * max|x| (60 units) of the exact one in any order, so the devices agree within 120
    units; the inverse adds its own 240 and passes on at most 4 times the first error, 480
    units in all. Bounds: 128 and 2048 units."""
    x = torch.randn(8, 48, 6, generator=torch.Generator().manual_seed(0)) * 10
    unit = 2.0**-24 * float(x.abs().max())
    for axis in (0, 1, 2):
        want = hadamard_transform(x, axis, 2)
        got = hadamard_transform(on_device(x), axis, 2)
        assert torch.allclose(got.cpu(), want, rtol=0, atol=128 * unit), axis
        back = hadamard_transform(got, axis, 2, inverse=True).cpu()
        assert torch.allclose(back.narrow(axis, 0, x.shape[axis]), x, rtol=0,
                              atol=2048 * unit), axis
        assert not torch.allclose(got.narrow(axis, 0, x.shape[axis]).cpu(), x, atol=1e-2)


# =============================================================================================
# GEMM mode: gemm_conv2d, gemm_linear
# =============================================================================================
def recipe_quant(recipe, rounding=None, accumulator=None) -> QuantConfig:
    """A recipe's QuantConfig (role casts and GEMM options), the gradient's rounding replaced
    by `rounding` where given, `accumulator` in all three GEMMs."""
    r = RECIPES[recipe]
    f = r.flags

    def role(key):
        return RoleQuant(f[f"{key}_fmt"], f.get(f"{key}_rounding", "nearest"),
                         f.get(f"{key}_scaling", "none"))

    grad = role("g")
    if rounding is not None:
        grad = RoleQuant(grad.fmt, rounding, grad.scaling)
    return QuantConfig(weight=role("w"), act=role("a"), grad=grad,
                       gemm=GemmConfig(weight_blocks_2d=r.weight_blocks_2d,
                                       hadamard_wgrad=r.hadamard_wgrad, accumulator=accumulator))


def recipe_config(recipe, rounding=None, accumulator=None):
    """(casts, gemm) of ``recipe_quant``: the arguments of gemm_conv2d / gemm_linear."""
    q = recipe_quant(recipe, rounding, accumulator)
    return q.gemm.operand_casts(q), q.gemm


STOCHASTIC_RECIPES = sorted(k for k, r in RECIPES.items() if r.flags["g_rounding"] != "nearest")


def recipe_accumulator(recipe):
    """An fp16 accumulator. NVFP4 operands carry a float32 tensor scale (24-bit significands):
    their float64 chunk sums are exact only one product at a time (k = 1; no promotion, so the
    fused steps run); the other recipes' operands are a few bits times a power of two, exact in
    chunks of 16 (promotion every 4 chunks)."""
    return Accumulator("fp16", 1) if recipe == "nvfp4" else Accumulator("fp16", 16, 4)


def conv_inputs():
    """x [4, 16, 8, 8], w [16, 16, 3, 3], dy [4, 16, 8, 8] (stride 1) on few-bit grids: the
    wgrad's Hadamard transform is exact, so every cast reads the same values on both devices."""
    x = grid((4, 16, 8, 8), SEED + 70, 2.0**-4)
    w = grid((16, 16, 3, 3), SEED + 71, 2.0**-6)
    return x, w


def run_conv(x, w, dy, bias, stride, padding, casts, gemm):
    """y, dx, dw (and db) of gemm_conv2d on x's device."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    y = gemm_conv2d(x, w, b, stride, padding, casts, gemm)
    y.backward(dy)
    out = (y.detach(), x.grad, w.grad)
    return out + (b.grad,) if b is not None else out


def run_linear(x, w, dy, bias, casts, gemm):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    y = gemm_linear(x, w, b, casts, gemm)
    y.backward(dy)
    out = (y.detach(), x.grad, w.grad)
    return out + (b.grad,) if b is not None else out


def layout(t, channels_last):
    t = on_device(t)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_gemm_conv2d_float32_gemms_match_cpu(recipe, stride, channels_last, path, monkeypatch):
    """Nearest rounding everywhere: the casts are the CPU's bits, the float32 GEMMs add in
    another order: y, dx, dw, db within float32 rounding."""
    casts, gemm = recipe_config(recipe, rounding="nearest")
    x, w = conv_inputs()
    ho = (8 + 2 - 3) // stride + 1
    dy = grid((4, 16, ho, ho), SEED + 72, 2.0**-5)
    bias = grid((16,), SEED + 73, 2.0**-6)
    set_path(monkeypatch, "eager")
    want = run_conv(x, w, dy, bias, stride, 1, casts, gemm)
    set_path(monkeypatch, path)
    got = run_conv(layout(x, channels_last), layout(w, channels_last), layout(dy, channels_last),
                   on_device(bias), stride, 1, casts, gemm)
    for g, e, what in zip(got, want, ("y", "dx", "dw", "db")):
        assert g.device.type == torch.device(DEVICE).type
        assert_close_f32(g, e, f"{recipe} {path} stride {stride} {what}")
    if channels_last:
        assert got[2].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_gemm_conv2d_accumulated_same_bits_as_cpu(recipe, channels_last, path, monkeypatch):
    """An Accumulator in all three GEMMs fixes the order of every sum: y, dx, dw are the CPU's
    bits (stride 2 and padding 1: zero-inserted dy in dgrad, ragged positions in wgrad)."""
    casts, gemm = recipe_config(recipe, "nearest", recipe_accumulator(recipe))
    x, w = conv_inputs()
    dy = grid((4, 16, 4, 4), SEED + 74, 2.0**-5)
    set_path(monkeypatch, "eager")
    want = run_conv(x, w, dy, None, 2, 1, casts, gemm)
    set_path(monkeypatch, path)
    got = run_conv(layout(x, channels_last), layout(w, channels_last), layout(dy, channels_last),
                   None, 2, 1, casts, gemm)
    for g, e, what in zip(got, want, ("y", "dx", "dw")):
        assert g.device.type == torch.device(DEVICE).type
        assert torch.isfinite(e).all(), what
        assert_same_array_bits(g, e, f"{recipe} {path} {what}")
    if channels_last:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[2].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("accumulated", [False, True], ids=["float32", "accumulated"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_gemm_linear_matches_cpu(recipe, accumulated, path, monkeypatch):
    """x [40, 48]: the wgrad's blocks (and Hadamard blocks) along a batch of 40, a short last
    one. Float32 GEMMs: within float32 rounding; accumulated: the CPU's bits."""
    acc = recipe_accumulator(recipe) if accumulated else None
    casts, gemm = recipe_config(recipe, "nearest", acc)
    x, w = grid((40, 48), SEED + 75, 2.0**-4), grid((24, 48), SEED + 76, 2.0**-6)
    dy = grid((40, 24), SEED + 77, 2.0**-5)
    bias = None if accumulated else grid((24,), SEED + 78, 2.0**-6)
    set_path(monkeypatch, "eager")
    want = run_linear(x, w, dy, bias, casts, gemm)
    set_path(monkeypatch, path)
    got = run_linear(on_device(x), on_device(w), on_device(dy), on_device(bias), casts, gemm)
    for g, e, what in zip(got, want, ("y", "dx", "dw", "db")):
        assert g.device.type == torch.device(DEVICE).type
        if accumulated:
            assert_same_array_bits(g, e, f"{recipe} {path} {what}")
        else:
            assert_close_f32(g, e, f"{recipe} {path} {what}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("recipe", STOCHASTIC_RECIPES)
def test_gemm_stochastic_recipes_forward_matches_cpu(recipe, path, monkeypatch):
    """The recipes' own stochastic gradients (drawn from the device's generator): the forward
    pass reads nearest casts, so y matches the CPU's; the gradients are finite and differ from
    the nearest ones."""
    casts, gemm = recipe_config(recipe)
    near_casts, _ = recipe_config(recipe, "nearest")
    x, w = conv_inputs()
    dy = grid((4, 16, 8, 8), SEED + 79, 2.0**-5)
    set_path(monkeypatch, "eager")
    want = run_conv(x, w, dy, None, 1, 1, casts, gemm)
    set_path(monkeypatch, path)
    torch.manual_seed(0)
    got = run_conv(on_device(x), on_device(w), on_device(dy), None, 1, 1, casts, gemm)
    near = run_conv(on_device(x), on_device(w), on_device(dy), None, 1, 1, near_casts, gemm)
    assert_close_f32(got[0], want[0], f"{recipe} y")
    for g, n, what in zip(got[1:], near[1:], ("dx", "dw")):
        assert torch.isfinite(g).all(), what
        assert not torch.equal(g, n), what
    lin_x, lin_w = grid((40, 48), SEED + 80, 2.0**-4), grid((24, 48), SEED + 81, 2.0**-6)
    lin_dy = grid((40, 24), SEED + 82, 2.0**-5)
    set_path(monkeypatch, "eager")
    want = run_linear(lin_x, lin_w, lin_dy, None, casts, gemm)
    set_path(monkeypatch, path)
    got = run_linear(on_device(lin_x), on_device(lin_w), on_device(lin_dy), None, casts, gemm)
    assert_close_f32(got[0], want[0], f"{recipe} linear y")
    assert all(torch.isfinite(g).all() for g in got[1:])


# =============================================================================================
# one training step
# =============================================================================================
@pytest.mark.slow
@pytest.mark.parametrize("recipe,accumulator", [("nvfp4", None),
                                                ("te-fp8", Accumulator("fp16", 32, 4))],
                         ids=["nvfp4", "te-fp8-acc-fp16-k32-p4"])
def test_gemm_mode_training_step_on_device(recipe, accumulator, monkeypatch):
    """One SGD step of a channels-last ResNet-8 in GEMM mode on the device, batch 8, each cast
    and accumulation on the path training takes ("auto": compiled for the large tensors):
    finite loss and gradients, every quantized layer's weights change."""
    set_path(monkeypatch, "auto")
    torch.manual_seed(0)
    q = recipe_quant(recipe, accumulator=accumulator)
    model = resnet8().to(DEVICE, memory_format=torch.channels_last)
    model = quantize_model(model, q)
    layers = quantized_layers(model)
    assert layers
    before = [m.weight.detach().clone() for _, m in layers]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 3, 32, 32).to(DEVICE, memory_format=torch.channels_last)
    target = torch.randint(0, 10, (8,)).to(DEVICE)
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    assert loss.device.type == torch.device(DEVICE).type and torch.isfinite(loss)
    for name, m in layers:
        assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all(), name
    opt.step()
    assert all(not torch.equal(b, m.weight) for b, (_, m) in zip(before, layers))
