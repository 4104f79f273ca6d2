"""Block-scaled formats (common/blocks.py, OCP MX and NVFP4), bit for bit against independent
references, never against the code itself:

- torchao (``prototype.mx_formats``): ``to_mx`` with scale mode FLOOR plus ``to_dtype`` for MX,
  ``NVFP4Tensor.to_nvfp4`` with a per-tensor scale plus ``dequantize`` for NVFP4. torchao
  blocks along the last dim, so dim 1 is moved last to compare. It covers dims that k divides,
  finite inputs, and MX blocks whose scale exponent is above -127.
- an oracle (tests/oracles.py) written from the number-format contract ("Block-scaled formats",
  "Rounding"; docs/block-formats.md for users) with Python fractions (MX: exact) and numpy
  float32 scalars (NVFP4: the contract's float32 formula), independent of the implementation
  and of common.formats, for the rest: short last blocks, 4-D tensors in both memory formats,
  all-zero, NaN and inf blocks, scales at E8M0's limits, float32-subnormal inputs, and
  stochastic rounding (statistical, 6 sigma, seeded). test_torchao_differences pins where
  torchao differs.

Every cast runs on each path: the eager ops and the compiled kernel.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from common import blocks, dispatch
from common.formats import parse_format
from common.quant import quantize, quantize_scaled, representable_values

from cast_paths import check_default_nans, run_block
from oracles import (
    E2M1,
    E4M3,
    FloatDef,
    assert_same_array_bits,
    block_inputs_for_user_compile,
    block_oracle,
    f32,
    mx_oracle_block,
    mx_scale_of_block,
    nvfp4_oracle_tensor,
    pow2,
    random_finite,
    signed,
    special_blocks,
)

PATHS = ("eager", "compiled")
MX_SPECS = ("mxfp8", "mx-e5m2", "mxfp6", "mx-e3m2", "mxfp4")
SEED = 20250101


# =============================================================================================
# the oracle's own anchors: worked values of the contract and the OCP spec
# =============================================================================================
def test_oracle_worked_values():
    # e2m1 values {0, 0.5, 1, 1.5, 2, 3, 4, 6}; ties to even; saturation
    assert [float(E2M1.nearest(Fraction(v))) for v in (0.25, 0.75, 2.5, 5.0, 7.0, 100.0)] == \
        [0.0, 1.0, 2.0, 4.0, 6.0, 6.0]
    emaxes = [FloatDef(spec).emax for spec in ("e4m3", "e5m2", "e2m3", "e3m2", "e2m1")]
    assert emaxes == [8, 15, 2, 4, 2]  # docs/block-formats.md's emax of the element
    # amax 448 -> X = 1; amax 511 (floor rule) -> X = 1 too, 511 saturates to 448
    assert mx_oracle_block([448.0, 1.0], E4M3) == [448.0, 1.0]
    assert mx_oracle_block([511.0, -3.0], E4M3) == [448.0, -3.0]
    # mxfp4 block with amax 10: X = 2^(3-2) = 2, 10/2 = 5 -> tie to 4 -> 8
    assert mx_oracle_block([10.0, 1.0, -0.5], E2M1) == [8.0, 1.0, -0.0]
    assert all(math.isnan(v) for v in mx_oracle_block([1.0, math.inf], E2M1))


# =============================================================================================
# Format: parser fields
# =============================================================================================
ml_dtypes = pytest.importorskip("ml_dtypes")
ELEM_DTYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2,
               "e2m3": ml_dtypes.float6_e2m3fn, "e3m2": ml_dtypes.float6_e3m2fn,
               "e2m1": ml_dtypes.float4_e2m1fn}


@pytest.mark.parametrize("spec,elem,k,bpe", [
    ("mxfp8", "e4m3", 32, 8.25), ("mx-e5m2", "e5m2", 32, 8.25), ("mxfp6", "e2m3", 32, 6.25),
    ("mx-e3m2", "e3m2", 32, 6.25), ("mxfp4", "e2m1", 32, 4.25), ("mx16-e2m1", "e2m1", 16, 4.5),
    ("mx64-e4m3", "e4m3", 64, 8.125), ("nvfp4", "e2m1", 16, 4.5)])
def test_block_format_fields(spec, elem, k, bpe):
    f = parse_format(spec)
    fi = ml_dtypes.finfo(ELEM_DTYPES[elem])
    assert (f.kind, f.is_block, f.is_float, f.is_posit, f.is_identity) == (
        "block", True, False, False, False)
    assert (f.element.name, f.block_size, f.bits) == (elem, k, fi.bits)
    assert (f.exp_bits, f.man_bits) == (fi.nexp, fi.nmant)
    assert f.bits_per_element == bpe  # 8-bit scale per k elements (NVFP4's float32 left out)
    assert (f.has_nan, f.has_inf) == (True, False)
    if spec == "nvfp4":  # in units of the per-tensor scale: e2m1 x e4m3 block scale
        assert (f.scale_kind, f.tensor_scale) == ("e4m3", True)
        assert f.max == 6 * 448 == 2688
        assert f.min_subnormal == 0.5 * 2.0**-6 and f.min_normal == 2.0**-6
    else:  # element x E8M0 scale 2^-127 .. 2^127
        assert (f.scale_kind, f.tensor_scale) == ("e8m0", False)
        assert f.max == float(fi.max) * 2.0**127
        assert f.min_subnormal == float(fi.smallest_subnormal) * 2.0**-127
        assert f.min_normal == float(fi.smallest_normal) * 2.0**-127


def test_plain_formats_bits_per_element():
    assert parse_format("e2m1").bits_per_element == 4.0
    assert parse_format("posit8es1").bits_per_element == 8.0
    assert parse_format("bf16").bits_per_element == 16.0


@pytest.mark.parametrize("alias,canonical", [
    ("mx-e4m3", "mxfp8"), ("mx32-e4m3", "mxfp8"), ("MXFP8", "mxfp8"), ("mx-e2m3", "mxfp6"),
    ("mx-e2m1", "mxfp4"), ("mx-fp4", "mxfp4"), (" mx32-E5M2 ", "mx-e5m2"),
    ("mx16-fp4", "mx16-e2m1"), ("NVFP4", "nvfp4")])
def test_block_aliases_are_one_format(alias, canonical):
    assert parse_format(alias) == parse_format(canonical)
    assert parse_format(alias).name == canonical


@pytest.mark.parametrize("spec", ["mxfp8", "mx-e5m2", "mxfp6", "mx-e3m2", "mxfp4", "nvfp4",
                                  "mx16-e2m1", "mx1-e3m4", "mx4096-e7m0", "mx-e2m0"])
def test_block_str_round_trips(spec):
    f = parse_format(spec)
    assert parse_format(str(f)) == f and hash(f) == hash(parse_format(str(f)))


@pytest.mark.parametrize("spec", ["mx-e8m7", "mx-bf16", "mx-e4m4", "mx-posit8es1", "mx0-e2m1",
                                  "mx4097-e2m1", "mx-e4m3x", "mxfp5", "mx-", "mx16", "nvfp8",
                                  "mx-fp32", "mx-1-e2m1", "mxfp4-e2m1"])
def test_bad_block_spec_is_a_one_line_value_error(spec):
    with pytest.raises(ValueError) as info:
        parse_format(spec)
    msg = str(info.value)
    assert "\n" not in msg and repr(spec) in msg
    assert "accepted" in msg and "mx<k>-eXmY" in msg and "nvfp4" in msg


# =============================================================================================
# torchao
# =============================================================================================
@pytest.fixture(scope="module")
def torchao_mx():
    pytest.importorskip("torchao")
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    dtypes = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e2m3": DTYPE_FP6_E2M3,
              "e3m2": DTYPE_FP6_E3M2, "e2m1": torch.float4_e2m1fn_x2}

    def ref(x: torch.Tensor, spec: str) -> torch.Tensor:
        """torchao's cast of x with blocks along dim 1 (moved last; torchao blocks the last
        dim), back in x's layout."""
        fmt = parse_format(spec)
        xm = x.unsqueeze(0) if x.dim() == 1 else x.movedim(1, -1)
        x2 = xm.reshape(-1, xm.shape[-1]).contiguous()
        if fmt.tensor_scale:
            t = NVFP4Tensor.to_nvfp4(x2, per_tensor_scale=per_tensor_amax_to_scale(
                x2.abs().amax()))
            y2 = t.dequantize(torch.float32)
        else:
            el = dtypes[fmt.element.name]
            scale, data = mx.to_mx(x2, el, fmt.block_size, ScaleCalculationMode.FLOOR)
            y2 = mx.to_dtype(data, scale, el, fmt.block_size, torch.float32)
        y = y2.reshape(xm.shape)
        return y.squeeze(0) if x.dim() == 1 else y.movedim(-1, 1)
    return ref


def _grid(elem_spec):
    """Positive element values by the contract (ascending), for ties and saturation inputs."""
    el = FloatDef(elem_spec)
    vals, v = [], Fraction(0)
    while v < el.max:
        v = el.neighbours(v)[1]
        vals.append(min(v, el.max))
    return np.array([float(v) for v in vals])


def mx_blocks(elem_spec, k, n_blocks, rng, e_lo=-110, e_hi=110):
    """[n_blocks, k] float32 blocks that exercise the MX cast, with every block's scale exponent
    in [e_lo, e_hi]: Gaussian blocks; ties (midpoints between element values, +-1 float32 ulp)
    under a block max that sets X exactly; the saturation range (amax/X up to 2^(emax+1));
    random bit patterns near the block's binade (float32 subnormals when e is low); NaN."""
    el = FloatDef(elem_spec)
    grid = _grid(elem_spec)
    mids = (np.concatenate([[0.0], grid[:-1]]) + grid) / 2
    out = []
    for i in range(n_blocks):
        e = int(rng.integers(e_lo, e_hi + 1))
        kind = i % 5
        if kind == 0:
            b = rng.standard_normal(k) * 2.0 ** (e + el.emax)
            b[-1] = 1.25 * 2.0 ** (e + el.emax)  # amax >= 2^(e + emax): the scale is >= 2^e
        elif kind == 1:  # ties and their neighbours, the max element fixing X = 2^e
            b = rng.choice(mids, k) * rng.choice([-1, 1], k)
            b = b.astype(np.float32)
            b = np.where(rng.random(k) < 0.3, np.nextafter(b, np.float32(np.inf)), b)
            b = np.where(rng.random(k) < 0.3, np.nextafter(b, np.float32(-np.inf)), b)
            b[0] = float(el.max)
            b = b.astype(np.float64) * 2.0**e
        elif kind == 2:  # amax/X in [max, 2^(emax+1)): saturates
            top = 2.0 ** (el.emax + 1)
            b = rng.uniform(-top, top, k)
            b[0] = rng.uniform(float(el.max), top)
            b = b * 2.0**e
        elif kind == 3:  # random patterns in the binades just below the block max
            field = np.clip(e + el.emax + 127 - rng.integers(0, 30, k), 0, 254)
            pat = (field << 23) | rng.integers(0, 1 << 23, k)
            b = pat.astype(np.uint32).view(np.float32).astype(np.float64)
            b *= rng.choice([-1, 1], k)
            b[0] = 2.0 ** (e + el.emax) * 1.5
        else:  # a NaN somewhere
            b = rng.standard_normal(k) * 2.0 ** (e + el.emax)
            b[-1] = 1.25 * 2.0 ** (e + el.emax)
            b[rng.integers(0, k)] = np.nan
        out.append(b.astype(np.float32))
    return np.stack(out)


def _layouts(x2: torch.Tensor, c: int):
    """The [rows, C] input, and the same values as 4-D NCHW tensors (C = dim 1) contiguous and
    channels-last."""
    n = x2.shape[0] // 4
    nhwc = x2.view(n, 2, 2, c)
    return {"2d": x2, "nchw": nhwc.permute(0, 3, 1, 2).contiguous(),
            "channels_last": nhwc.permute(0, 3, 1, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec", MX_SPECS + ("mx16-e2m1", "mx64-e4m3", "mx16-e3m2"))
def test_mx_matches_torchao(spec, path, torchao_mx):
    fmt = parse_format(spec)
    k = fmt.block_size
    rng = np.random.default_rng(SEED + k)
    c = 2 * k
    # scale exponents above -127: there torchao and the contract agree (test_torchao_differences)
    x2 = torch.from_numpy(mx_blocks(fmt.element.name, k, 400, rng, e_lo=-126)).reshape(-1, c)
    x2 = x2[: x2.shape[0] // 4 * 4]
    for name, x in _layouts(x2, c).items():
        assert_same_array_bits(run_block(path, x, spec), torchao_mx(x, spec),
                               f"{spec} {path} {name}")


def test_mx_layouts_kept():
    x = torch.randn(2, 32, 3, 3).to(memory_format=torch.channels_last)
    y = quantize(x, "mxfp4")
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert quantize(x.contiguous(), "mxfp4").is_contiguous()


def nvfp4_tensors(rng, n_rows=64, c=64):
    """NVFP4 inputs: blocks spread over 2^-40..2^0 of the tensor max (block scales from the
    clamp at 2^-6 up to 448), ties of e2m1 after the scaling, random patterns; finite, with a
    tensor max far from float32's ends."""
    out = []
    for t in range(4):
        e = rng.uniform(-30, 30)
        x = rng.standard_normal((n_rows, c)) * 2.0 ** e
        x *= 2.0 ** rng.integers(-40, 1, (n_rows, c // 16)).repeat(16, axis=1)
        if t == 1:  # values on the e2m1 grid and its midpoints, times a power of two
            x = rng.choice([0.25, 0.5, 0.75, 1.0, 1.25, 2.5, 3.5, 5.0, 6.0], (n_rows, c))
            x *= rng.choice([-1, 1], (n_rows, c)) * 2.0 ** rng.integers(-8, 4, (n_rows, 1))
        if t == 2:  # random bit patterns, exponent within 2^+-40
            pat = ((127 + rng.integers(-40, 40, (n_rows, c))) << 23) | rng.integers(
                0, 1 << 23, (n_rows, c))
            x = pat.astype(np.uint32).view(np.float32) * rng.choice([-1, 1], (n_rows, c))
        out.append(torch.from_numpy(np.asarray(x, np.float32)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_nvfp4_matches_torchao(path, torchao_mx):
    rng = np.random.default_rng(SEED)
    for i, x2 in enumerate(nvfp4_tensors(rng)):
        for name, x in _layouts(x2, x2.shape[1]).items():
            assert_same_array_bits(run_block(path, x, "nvfp4"), torchao_mx(x, "nvfp4"),
                                   f"nvfp4 {path} tensor {i} {name}")


def test_quantize_routes_block_formats(torchao_mx):
    """The public quantize (its own choice of path, here the compiled kernel at 64k elements)
    and quantize_scaled with scaling "none" give torchao's values."""
    x = torch.randn(512, 128) * 3
    for spec in ("mxfp4", "nvfp4"):
        want = torchao_mx(x, spec)
        assert_same_array_bits(quantize(x, spec), want, f"quantize {spec}")
        assert_same_array_bits(quantize_scaled(x, spec, "none"), want, f"quantize_scaled {spec}")


def test_torchao_differences(torchao_mx):
    """Where torchao (this version) and the contract differ, the contract is followed (the
    oracle); if this test fails, torchao changed: update docs/block-formats.md."""
    x = torch.zeros(3, 32)
    x[0] = torch.linspace(-1, 1, 32) * 2.0**-119  # e4m3 block with scale exponent -127
    x[1] = 1.0
    x[1, 3] = math.inf  # inf block
    want = block_oracle(x.numpy(), "mxfp8")
    assert_same_array_bits(run_block("eager", x, "mxfp8"), want, "mxfp8 vs oracle")
    ref = torchao_mx(x, "mxfp8")
    nz = x[0] != 0
    assert torch.equal(ref[0][nz] * 2, torch.from_numpy(want[0])[nz])  # torchao: half
    assert ref[1, 3] == math.inf and (ref[1, :3] == 0).all()  # torchao: inf kept, rest 0
    assert np.isnan(want[1]).all()  # contract: the block is NaN
    z = torch.zeros(2, 16)
    assert torch.isnan(torchao_mx(z, "nvfp4")).all()  # torchao: g = 0, 0/0
    assert_same_array_bits(run_block("eager", z, "nvfp4"), z, "nvfp4 zeros")  # contract: g = 1


# =============================================================================================
# the oracle: what torchao does not cover
# =============================================================================================
ORACLE_SPECS = MX_SPECS + ("mx16-e2m1", "mx8-e3m4", "mx4-e3m0", "mx-e2m0", "nvfp4")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec", ORACLE_SPECS)
@pytest.mark.parametrize("shape", [(3, 40), (2, 3, 5, 5), (2, 70, 3, 2), (100,), (5, 16),
                                   (4, 33, 2, 1)])
def test_short_blocks_and_layouts_match_oracle(spec, shape, path):
    """Dims 1 that k does not divide (40 = 32 + 8; 3 and 16 below k: one short block; 70; 33),
    1-D, and 4-D tensors contiguous and channels-last."""
    rng = np.random.default_rng(SEED + len(shape) * 100 + shape[-1])
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(
        2.0 ** rng.integers(-20, 20))
    if len(shape) == 2:  # rows of very different magnitude, so the blocks do differ
        x *= (2.0 ** rng.integers(-10, 10, (shape[0], 1))).astype(np.float32)
    want = block_oracle(x, spec)
    xt = torch.from_numpy(x)
    assert_same_array_bits(run_block(path, xt, spec), want, f"{spec} {path} {shape}")
    if len(shape) == 4:
        xc = xt.to(memory_format=torch.channels_last)
        got = run_block(path, xc, spec)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert_same_array_bits(got, want, f"{spec} {path} {shape} channels_last")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec", ORACLE_SPECS)
def test_random_patterns_match_oracle(spec, path):
    """Random float32 patterns over the whole finite range, blocks over narrow exponent windows
    (subnormals to the top) and the full range at once; rows [8, 96] in 3 blocks."""
    rng = np.random.default_rng(SEED + len(spec))
    rows = [random_finite((1, 96), rng, 0, 254)]
    for lo in (0, 1, 10, 100, 118, 200, 240):
        rows.append(random_finite((1, 96), rng, lo, min(lo + 12, 254)))
    x = np.concatenate(rows)
    if spec == "nvfp4":  # one tensor scale: test each row as its own tensor
        for r in range(x.shape[0]):
            xr = x[r:r + 1]
            assert_same_array_bits(run_block(path, torch.from_numpy(xr), spec),
                                   block_oracle(xr, spec), f"{spec} {path} row {r}")
        return
    assert_same_array_bits(run_block(path, torch.from_numpy(x), spec), block_oracle(x, spec),
                           f"{spec} {path}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec", MX_SPECS + ("mx16-e2m1", "mx-e2m0", "mx8-e3m4"))
def test_mx_special_blocks_match_oracle(spec, path):
    k = parse_format(spec).block_size
    x = special_blocks(k, SEED)
    got = run_block(path, torch.from_numpy(x), spec)
    want = block_oracle(x, spec)
    assert_same_array_bits(got, want, f"{spec} {path}")
    assert np.isnan(want[1:4]).all() and not np.isnan(want[np.r_[0, 4:len(want)]]).any()
    assert (want[0] == 0).all() and np.signbit(want[4]).tolist() == np.signbit(x[4]).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("spec", ["mxfp8", "mxfp4", "nvfp4"])
def test_nan_out_of_a_block_cast_is_the_default_nan(spec, rounding, path):
    """The contract: one NaN out, float32's default quiet NaN, whatever made it: NaNs of either
    sign with payloads, and the NaN an inf makes (its MX block; the whole NVFP4 tensor, whose
    tensor scale becomes inf: 0 * inf is the CPU's NaN with the sign bit set). A bfloat16 tensor
    (MX) gets bfloat16's default NaN (torch's float32 -> bfloat16 cast would give 0xFFFF)."""
    check_default_nans(spec, rounding, path)


@pytest.mark.parametrize("path", PATHS)
def test_nvfp4_special_tensors_match_oracle(path):
    """All-zero tensor (g = 1), NaN or inf anywhere (g non-finite: the whole tensor NaN),
    float32-subnormal elements beside a normal tensor max, a tensor max at float32's top."""
    rng = np.random.default_rng(SEED)
    f32 = np.finfo(np.float32)
    cases = {"zeros": np.zeros((2, 32)), "nan": np.r_[np.nan, np.ones(31)].reshape(1, 32),
             "inf": np.r_[np.ones(31), -np.inf].reshape(1, 32),
             "subnormals": np.r_[[1.0], random_finite((47,), rng, 0, 0)].reshape(1, 48),
             "top": np.r_[[float(f32.max)], rng.standard_normal(31) * 1e38].reshape(1, 32)}
    for name, x in cases.items():
        x = x.astype(np.float32)
        want = block_oracle(x, "nvfp4")
        assert_same_array_bits(run_block(path, torch.from_numpy(x), "nvfp4"), want,
                               f"nvfp4 {path} {name}")
        if name in ("nan", "inf"):
            assert np.isnan(want).all()
        if name == "zeros":
            assert not np.signbit(want).any() and (want == 0).all()


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("path", PATHS)
def test_nvfp4_zero_blocks_stay_zero_whatever_the_tensor_amax(path, rounding):
    """Below a tensor max of about 2^-110, (1/g)/s overflows float32 to inf, and 0 * inf made
    every zero of such a block NaN (one tiny gradient put NaN into training): zeros stay zeros,
    signs kept; the nonzero elements follow the formula (docs/block-formats.md, Known limits)."""
    seed = torch.tensor([7, 8], dtype=torch.int32)
    x = np.zeros((3, 32), np.float32)
    x[0, 0] = 5e-34                                   # the audit's case: block 2 all zero
    x[1, 0], x[1, 20], x[1, 21] = 1e-36, 1e-39, -0.0  # a tiny nonzero beside zeros
    x[2, :] = -0.0
    x[2, 3] = -3e-35
    for r in range(3):
        want = block_oracle(x[r:r + 1], "nvfp4")
        got = run_block(path, torch.from_numpy(x[r:r + 1]), "nvfp4", rounding, seed=seed).numpy()
        zero = x[r:r + 1] == 0
        assert (got[zero] == 0).all(), f"row {r}: {got[zero]}"
        assert (np.signbit(got[zero]) == np.signbit(x[r:r + 1][zero])).all()
        if rounding == "nearest":
            assert_same_array_bits(got, want, f"nvfp4 {path} row {r}")


@pytest.mark.slow
def test_same_bits_inside_a_user_compile(torchao_mx):
    """quantize called while torch.compile traces a user's function runs the eager ops in the
    user's graph: inductor must keep their bits."""
    x = torch.randn(64, 96) * 2.0 ** torch.randint(-30, 30, (64, 1))
    for spec in ("mxfp4", "nvfp4"):
        fn = torch.compile(lambda t, spec=spec: quantize(t * 1.0, spec), dynamic=False)
        assert_same_array_bits(fn(x), torchao_mx(x, spec), f"{spec} in a user's compile")


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["mxfp4", "nvfp4"])
def test_stochastic_same_bits_inside_a_dynamic_user_compile(spec):
    """Stochastic block casts traced by a user's torch.compile with dynamic shapes (as a
    compiled training step sees them) give the eager ops' bits for fixed seed words."""
    seed = torch.tensor([123, -456], dtype=torch.int32)
    fn = torch.compile(lambda t, s, spec=spec: blocks.quantize_block(t * 1.0, spec, "stochastic",
                                                                     seed=s), dynamic=True)
    for name, x in block_inputs_for_user_compile().items():
        assert_same_array_bits(fn(x, seed), run_block("eager", x, spec, "stochastic", seed=seed),
                               f"{spec} {name} in a user's dynamic compile")


# =============================================================================================
# stochastic rounding of the elements
# =============================================================================================
def _sr_row(elem: FloatDef, k, rng):
    """One block whose max fixes X = 2^e and whose other elements lie strictly between two
    element values with P(up) in [0.1, 0.9], plus a representable value (never moves)."""
    e = int(rng.integers(-20, 20))
    grid = _grid_from(elem)
    row = [float(elem.max) * 2.0**e, float(grid[1]) * 2.0**e]
    while len(row) < k:
        i = int(rng.integers(0, len(grid) - 1))
        lo, hi = grid[i], grid[i + 1]
        v = np.float32((lo + rng.uniform(0.1, 0.9) * (hi - lo)) * 2.0**e)
        row.append(float(v) * rng.choice([-1, 1]))
    return np.array(row, np.float32)


def _grid_from(elem: FloatDef):
    vals, v = [0.0], Fraction(0)
    while v < elem.max:
        v = min(elem.neighbours(v)[1], elem.max)
        vals.append(float(v))
    return np.array(vals)


def _sr_expectations_mx(row, elem):
    """Per element: lo, hi (as float32 values, signed) and P(hi) by the contract."""
    e = mx_scale_of_block([float(v) for v in row], elem)
    out = []
    for v in row:
        a = abs(Fraction(float(v))) / pow2(e)
        if a >= elem.max:
            lo = hi = elem.max
            p = 0.0
        else:
            lo, hi = elem.neighbours(a)
            p = float((a - lo) / (hi - lo))
        out.append((signed(lo * pow2(e), v), signed(hi * pow2(e), v), p))
    return out


def _check_sr(got, expect, what):
    """got: [n, k] draws of the same block; every draw is lo or hi, and the share of hi is
    within 6 sigma of P(hi)."""
    n = got.shape[0]
    for j, (lo, hi, p) in enumerate(expect):
        col = got[:, j]
        is_lo, is_hi = col == np.float32(lo), col == np.float32(hi)
        assert (is_lo | is_hi).all(), f"{what} element {j}: {set(col.tolist())} not in {lo, hi}"
        if lo == hi:
            continue
        share = is_hi.mean()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(share - p) <= 6 * sigma + 1e-12, f"{what} element {j}: {share} vs p={p}"


@pytest.mark.parametrize("path,n", [("eager", 2048), ("compiled", 8192)])
@pytest.mark.parametrize("spec", MX_SPECS + ("mx16-e2m1",))
def test_mx_stochastic_is_unbiased(spec, path, n):
    """n copies of one block: every copy gets the block's deterministic scale, and each element
    goes up with probability (x - lo) / (hi - lo), within 6 sigma."""
    fmt = parse_format(spec)
    elem = FloatDef(fmt.element.name)
    rng = np.random.default_rng(SEED + fmt.bits)
    row = _sr_row(elem, fmt.block_size, rng)
    x = torch.from_numpy(np.tile(row, (n, 1)))
    got = run_block(path, x, spec, "stochastic", seed=torch.tensor([11, 22], dtype=torch.int32))
    _check_sr(got.numpy(), _sr_expectations_mx(row, elem), f"{spec} {path}")


@pytest.mark.parametrize("path,n", [("eager", 2048), ("compiled", 8192)])
def test_nvfp4_stochastic_is_unbiased(path, n):
    """Each element's y = x * ((1/g) / s) goes to its upper e2m1 neighbour with probability
    (y - lo) / (hi - lo), within 6 sigma; the scales are those of nearest mode."""
    rng = np.random.default_rng(SEED)
    row = (rng.standard_normal(16) * 3).astype(np.float32)
    row[0] = 10.0  # every copy has the same g and s
    x = torch.from_numpy(np.tile(row, (n, 1)))
    got = run_block(path, x, "nvfp4", "stochastic", seed=torch.tensor([5, 6], dtype=torch.int32))
    _, parts = nvfp4_oracle_tensor([[float(v) for v in row]], float(np.abs(row).max()))
    expect = []
    for y, gs in parts[0]:
        a = abs(Fraction(float(y)))
        if a >= E2M1.max:
            lo = hi = E2M1.max
            p = 0.0
        else:
            lo, hi = E2M1.neighbours(a)
            p = float((a - lo) / (hi - lo))
        sgn = float(y)
        expect.append((float(f32(signed(lo, sgn)) * gs), float(f32(signed(hi, sgn)) * gs), p))
    _check_sr(got.numpy(), expect, f"nvfp4 {path}")


@pytest.mark.parametrize("spec", ["mxfp4", "nvfp4"])
def test_stochastic_reproducible_and_paths_agree(spec):
    x = torch.randn(64, 64)
    seed = torch.tensor([3, 4], dtype=torch.int32)
    a = run_block("eager", x, spec, "stochastic", seed=seed)
    assert_same_array_bits(run_block("compiled", x, spec, "stochastic", seed=seed), a,
                           f"{spec} paths")
    torch.manual_seed(7)
    b = quantize(x, spec, "stochastic")
    torch.manual_seed(7)
    assert_same_array_bits(quantize(x, spec, "stochastic"), b, f"{spec} manual_seed")
    g = torch.Generator().manual_seed(7)
    c = quantize(x, spec, "stochastic", generator=g)
    assert not torch.equal(c, quantize(x, spec, "stochastic", generator=g))


# =============================================================================================
# dtypes, shapes and refusals
# =============================================================================================
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mx_half_inputs_exact(dtype):
    """An MX result of a float16/bfloat16 tensor is the float32 result, exactly in that dtype."""
    x = (torch.randn(16, 64) * 2.0 ** torch.randint(-12, 12, (16, 1))).to(dtype)
    for spec in MX_SPECS:
        want = quantize(x.float(), spec)
        got = quantize(x, spec)
        assert got.dtype == dtype
        assert_same_array_bits(got.float(), want, f"{spec} {dtype}")


def test_nvfp4_refuses_half_inputs():
    with pytest.raises(ValueError, match="float32"):
        quantize(torch.ones(4, 16, dtype=torch.float16), "nvfp4")


def test_compile_failure_falls_back_to_the_eager_ops(monkeypatch):
    """Block casts share the element casts' compile cache and fallback (common/dispatch.py):
    a kernel that cannot compile is remembered and the eager ops give the same bits."""
    def broken(fn, tag, options):
        def fail(*args):
            raise RuntimeError("no compiler here")
        return fail
    monkeypatch.setattr(dispatch, "_COMPILED", {})
    monkeypatch.setattr(dispatch, "_compile", broken)
    x = torch.randn(64, 128) * 10
    want = run_block("eager", x, "mxfp8")
    assert_same_array_bits(quantize(x, "mxfp8"), want, "mxfp8 after a failed compile")
    assert dispatch._COMPILED[("block", "mx", "nearest", "cpu", "r1")] is None
    assert_same_array_bits(quantize(x, "mxfp8"), want, "mxfp8, failure remembered")
    with pytest.raises(RuntimeError):
        run_block("compiled", x, "mxfp8")


def test_float64_input_is_narrowed_first():
    x = torch.randn(8, 64)
    for spec in ("mxfp8", "nvfp4"):
        got = quantize(x.double(), spec)
        assert got.dtype == torch.float64
        assert_same_array_bits(got.float(), quantize(x, spec), f"{spec} float64")


def test_refusals():
    with pytest.raises(ValueError, match="carries its own scaling"):
        quantize_scaled(torch.ones(4, 32), "mxfp4", "tensor")
    with pytest.raises(ValueError, match="carries its own scaling"):
        quantize_scaled(torch.ones(4, 32), "nvfp4", "channel")
    with pytest.raises(ValueError, match="at least one dimension"):
        quantize(torch.tensor(1.0), "mxfp4")
    with pytest.raises(ValueError, match="saturate"):
        quantize(torch.ones(4, 32), "mxfp8", saturate=False)
    with pytest.raises(ValueError, match="block format"):
        representable_values("mxfp4")
    empty = torch.empty(0, 32)
    assert quantize(empty, "mxfp4").shape == (0, 32)
