"""common/quant.py on CUDA: the same bits as on the CPU, and the same independent references.

Skipped where torch sees no CUDA device. Every nearest-mode path on the device (eager and
compiled, bit arithmetic and native cast) is compared bit for bit with the CPU's eager bit
arithmetic on the exhaustive and random input sets of tests/oracles.py, and with the definition
oracles and ml_dtypes; stochastic rounding with fixed seed words gives the same bits on both.
"""
import math

import numpy as np
import pytest
import torch

from common.blocks import quantize_block
from common.formats import parse_format
from common.quant import (
    _quantize_compiled,
    _quantize_eager,
    quantize,
    quantize_scaled,
    representable_values,
)

from cast_paths import check_default_nans, paths_for, run_path, user_compile
from oracles import (
    F32_QNAN,
    ML_DTYPES,
    OTHER_FLOATS,
    POSIT_SPECS,
    assert_same_array_bits,
    assert_same_bits,
    bit_set,
    block_inputs_for_user_compile,
    block_oracle,
    float_inputs,
    float_oracle,
    inputs32,
    inputs64,
    ml_dtypes_reference,
    n_es,
    nans,
    posit_inputs,
    posit_oracle,
    random_finite,
    special_blocks,
)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA_FLOATS = list(ML_DTYPES) + OTHER_FLOATS
SEED = 20250101  # test_blocks' seed: the block inputs the CPU suite checks too
SR_SPECS = ["e4m3", "e5m2", "e2m1", "e3m2", "bf16", "fp16", "e6m9", "posit8es0", "posit8es1",
            "posit6es2", "posit16es1", "posit16es3"]


def _cases(specs, rounding="nearest"):
    return [pytest.param(spec, sat, path, id=f"{spec}-{'sat' if sat else 'nonsat'}-{path}")
            for spec in specs for sat in (True, False)
            for path in paths_for(spec, rounding, sat)]


@pytest.mark.parametrize("spec,saturate,path", _cases(CUDA_FLOATS))
def test_cuda_float_nearest_matches_cpu_and_references(spec, saturate, path):
    fmt = parse_format(spec)
    x = float_inputs(spec)
    xt = torch.from_numpy(x)
    cpu = _quantize_eager(xt, spec, "nearest", saturate, method="bits")
    got = run_path(path, xt.cuda(), spec, "nearest", saturate)
    assert got.is_cuda
    assert_same_bits(got, cpu.numpy(), x, f"{spec} cuda {path} vs cpu")
    assert_same_bits(got, float_oracle(x, fmt, saturate), x, f"{spec} cuda {path} vs oracle")
    if spec in ML_DTYPES:
        keep = ~np.isnan(x)
        assert_same_bits(got.cpu().numpy()[keep], ml_dtypes_reference(x, spec, saturate)[keep],
                         x[keep], f"{spec} cuda {path} vs ml_dtypes")


@pytest.mark.parametrize("path", ["eager-bits", "compiled-bits"])
@pytest.mark.parametrize("spec", POSIT_SPECS)
def test_cuda_posit_nearest_matches_cpu_and_oracle(spec, path):
    n, es = n_es(spec)
    x = posit_inputs(n, es)
    xt = torch.from_numpy(x)
    got = run_path(path, xt.cuda(), spec)
    assert_same_bits(got, _quantize_eager(xt, spec, method="bits").numpy(), x, f"{spec} cuda")
    assert_same_bits(got, posit_oracle(x, n, es), x, f"{spec} cuda {path} vs oracle")


@pytest.mark.parametrize("path", ["eager-bits", "compiled-bits"])
@pytest.mark.parametrize("spec", SR_SPECS)
def test_cuda_stochastic_same_bits_as_cpu(spec, path):
    """Counter-based random bits: fixed seed words give the same result on both devices (the
    compiled CPU kernel uses a (rows, 16) index form, CUDA a flat one: same indices)."""
    x = torch.from_numpy(float_inputs("e4m3", n_random=1 << 18)) * 7
    n16 = x.numel() // 16 * 16
    seed = torch.tensor([20240611, -1234567], dtype=torch.int32)
    for saturate, x in ((True, x[:n16]), (False, x[:n16 - 3])):  # both CPU index forms
        cpu = run_path("compiled-bits", x, spec, "stochastic", saturate, seed=seed)
        assert_same_bits(cpu, _quantize_eager(x, spec, "stochastic", saturate,
                                              seed=seed).numpy(), x.numpy(), f"{spec} cpu")
        got = run_path(path, x.cuda(), spec, "stochastic", saturate, seed=seed.cuda())
        assert_same_bits(got, cpu.numpy(), x.numpy(), f"{spec} {path} cuda vs cpu")


@pytest.mark.parametrize("spec,x", [("e4m3", 1.0375), ("bf16", 3e-39), ("posit6es2", 3000.0),
                                    ("posit8es1", -0.013), ("e2m1", 0.2)])
def test_cuda_stochastic_is_unbiased(spec, x):
    n = 1 << 20
    x32 = float(np.float32(x))
    vals = representable_values(spec).double().numpy()
    i = np.searchsorted(vals, x32, side="right") - 1
    lo, hi = vals[i], vals[i + 1]
    torch.manual_seed(3)
    got = quantize(torch.full((n,), x32, device="cuda"), spec, "stochastic").double().cpu()
    assert torch.isin(got, torch.tensor([lo, hi], dtype=torch.float64)).all()
    p = (x32 - lo) / (hi - lo)
    sigma = (hi - lo) * math.sqrt(p * (1 - p) / n)
    assert abs(got.mean().item() - x32) <= 6 * sigma


def test_cuda_reproducible_under_manual_seed_and_generator():
    x = torch.randn(1 << 16, device="cuda") * 100
    for spec in ("e4m3", "posit8es1"):
        torch.manual_seed(5)
        a = quantize(x, spec, "stochastic")
        torch.manual_seed(5)
        assert torch.equal(quantize(x, spec, "stochastic"), a)
        g1 = torch.Generator(device="cuda").manual_seed(9)
        g2 = torch.Generator(device="cuda").manual_seed(9)
        assert torch.equal(quantize(x, spec, "stochastic", generator=g1),
                           quantize(x, spec, "stochastic", generator=g2))
        g3 = torch.Generator().manual_seed(9)  # a CPU generator for a CUDA tensor works too
        assert quantize(x, spec, "stochastic", generator=g3).is_cuda


def test_cuda_layouts_dtypes_and_scaling():
    x = torch.randn(8, 16, 12, 12) * 30
    xc = x.cuda().contiguous(memory_format=torch.channels_last)
    for spec in ("e4m3", "bf16", "posit8es1", "e2m1"):
        y = quantize(xc, spec)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y.cpu(), quantize(x, spec))
        assert torch.equal(quantize(xc.bfloat16(), spec).cpu(), quantize(x.bfloat16(), spec))
        for scaling in ("tensor", "channel"):
            assert torch.equal(quantize_scaled(xc, spec, scaling).cpu(),
                               quantize_scaled(x, spec, scaling))


@pytest.mark.parametrize("spec", ["bf16", "fp16", "e4m3", "e5m2", "e2m1", "posit8es1",
                                  "posit16es1"])
def test_cuda_nan_float64_and_user_compile_same_bits_as_cpu(spec):
    """test_oracle's exactness checks on the device: NaN of any sign and payload comes out as
    float32's default NaN on every CUDA path, float64 inputs round once (round-to-odd first)
    and quantize inside a user's torch.compile rounds, all bit for bit as on the CPU."""
    for fn in (_quantize_eager, _quantize_compiled):
        for rounding in ("nearest", "stochastic"):
            for saturate in (True, False):
                got = fn(nans(1 << 12).cuda(), spec, rounding, saturate).cpu()
                assert bit_set(got) == {F32_QNAN}, (fn.__name__, rounding, saturate)
        x64 = torch.from_numpy(inputs64(spec))
        assert torch.equal(fn(x64.cuda(), spec).cpu().view(torch.int64),
                           _quantize_eager(x64, spec).view(torch.int64)), fn.__name__
    x = torch.from_numpy(inputs32(spec))
    got = user_compile(lambda v: quantize(v, spec))(x.cuda()).cpu()
    assert torch.equal(got.view(torch.int32), quantize(x, spec).view(torch.int32))


# ---------------------------------------------------------------------------------------------
# block formats (common/blocks.py) on the device: the contract's oracle (tests/oracles.py)
# ---------------------------------------------------------------------------------------------
BLOCK_SPECS = ("mxfp8", "mx-e5m2", "mxfp6", "mx-e3m2", "mxfp4", "mx16-e2m1", "nvfp4")


def _block_inputs(spec):
    """[name, float32 array] pairs: a 4-D tensor whose dim 1 (70) k does not divide, random
    patterns over the whole float32 range, and (MX) the special blocks: zero, NaN, inf, E8M0's
    limits, subnormals."""
    rng = np.random.default_rng(SEED + len(spec))
    cases = [("4d", rng.standard_normal((2, 70, 3, 2)).astype(np.float32) * np.float32(300))]
    if spec == "nvfp4":  # one tensor scale per tensor: one row of a narrow window each
        cases += [(f"row{lo}", random_finite((1, 96), rng, lo, lo + 12)) for lo in (1, 100, 200)]
    else:
        cases.append(("random", random_finite((8, 96), rng, 0, 254)))
        cases.append(("special", special_blocks(parse_format(spec).block_size, SEED)))
    return cases


@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("spec", BLOCK_SPECS)
def test_cuda_block_formats_match_oracle(spec, path):
    for name, x in _block_inputs(spec):
        want = block_oracle(x, spec)
        xt = torch.from_numpy(x).cuda()
        got = quantize_block(xt, spec, path=path)
        assert got.is_cuda
        assert_same_array_bits(got, want, f"{spec} cuda {path} {name}")
        if xt.dim() == 4:
            got = quantize_block(xt.contiguous(memory_format=torch.channels_last), spec, path=path)
            assert got.is_contiguous(memory_format=torch.channels_last)
            assert_same_array_bits(got, want, f"{spec} cuda {path} {name} channels_last")


@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("spec", ["mxfp8", "mxfp4", "nvfp4"])
def test_cuda_block_nan_is_the_default_nan(spec, path):
    """NaN patterns and the NaN an inf makes come out as the default NaN on the device too
    (NVFP4's 0 * inf; MX on bfloat16), as test_blocks checks on the CPU."""
    for rounding in ("nearest", "stochastic"):
        check_default_nans(spec, rounding, path, device="cuda")


@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("spec", ["mxfp8", "mxfp4", "nvfp4"])
def test_cuda_block_stochastic_same_bits_as_cpu(spec, path):
    """Fixed seed words: the device's stochastic block cast gives the CPU's bits (the CPU's are
    checked for bias against the oracle in test_blocks)."""
    seed = torch.tensor([20240611, -1234567], dtype=torch.int32)
    x4 = torch.randn(64, 96, 2, 2) * 5
    # 4-D contiguous (R > 1), channels-last and 2-D (R == 1: the compiled kernel's lane form)
    for x in (x4, x4.contiguous(memory_format=torch.channels_last), x4[:, :, 0, 0].clone()):
        cpu = quantize_block(x, spec, "stochastic", path="eager", seed=seed)
        got = quantize_block(x.cuda(), spec, "stochastic", path=path, seed=seed.cuda())
        assert_same_array_bits(got, cpu, f"{spec} cuda {path} stochastic vs cpu {tuple(x.shape)}")


@pytest.mark.parametrize("spec", ["mxfp4", "nvfp4"])
def test_cuda_block_stochastic_inside_a_dynamic_user_compile(spec):
    """As a compiled training step (--compile) traces a stochastic block cast, dynamic shapes:
    it compiles (torch 2.11 failed on int64 index products, see blocks._index) and gives the
    CPU's bits for fixed seed words."""
    seed = torch.tensor([123, -456], dtype=torch.int32)
    fn = torch.compile(lambda t, s: quantize_block(t * 1.0, spec, "stochastic", seed=s),
                       dynamic=True)
    for name, x in block_inputs_for_user_compile().items():
        cpu = quantize_block(x, spec, "stochastic", path="eager", seed=seed)
        assert_same_array_bits(fn(x.cuda(), seed.cuda()), cpu,
                               f"{spec} cuda {name} in a user's compile")
