"""GEMM operand casts (common/operands.py) against independent references:

- ``cast_along``: every block cut explicitly in Python along the axis (all other indices
  fixed, blocks of k from the line's start, the last one shorter) and cast by the contract's
  oracles (tests/oracles.py: ``mx_oracle_block`` in fractions, ``nvfp4_oracle_tensor``).
- ``quantize_weight_2d``: every k x k tile at every tap gathered explicitly and cast by the same
  oracles as one block; the sharing property (each forward block along C and each dgrad block
  along O holds values of one scale) checked with the oracle's tile scales.
- The Hadamard rotation: the Sylvester matrix from its definition H[i, j] = (-1)^popcount(i & j),
  orthogonality, round trips on inputs where the arithmetic is exact, and the GEMM identity
  (aR)(bR)ᵀ = abᵀ against float64.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from common import blocks
from common.operands import (
    HADAMARD_BLOCK,
    cast_along,
    hadamard_matrix,
    hadamard_transform,
    quantize_weight_2d,
)
from common.quant import quantize_scaled

from cast_paths import user_compile
from oracles import (
    E2M1,
    FloatDef,
    assert_same_array_bits,
    f32,
    mx_oracle_block,
    mx_scale_of_block,
    mx_spec,
    nvfp4_oracle_tensor,
    pow2,
)

SEED = 20250611
NVFP4_K = 16   # docs/block-formats.md: 16 e2m1 elements per e4m3 scale


@pytest.fixture(autouse=True)
def eager_kernels(monkeypatch):
    """The casts' eager ops whatever the size, so that no kernel compiles in the fast lane: a
    padded weight crosses the size where "auto" compiles. The compiled kernels run the same
    functions: test_quantize_tiles_compiled_kernel_matches_eager (and tests/test_blocks.py)
    compare them."""
    monkeypatch.setenv("QUANT_PATH", "eager")


def block_size(spec):
    return NVFP4_K if spec == "nvfp4" else mx_spec(spec)[1]


def oracle_blocks(x: np.ndarray, spec: str, cuts) -> np.ndarray:
    """x (float32) with every block in `cuts` (tuples of numpy indices, each one block) cast by
    the contract's oracle; NVFP4's tensor scale from the whole of x."""
    vals = [[float(v) for v in x[cut].ravel()] for cut in cuts]
    if spec == "nvfp4":
        res = nvfp4_oracle_tensor(vals, float(np.abs(x).max()))[0]
    else:
        elem = FloatDef(mx_spec(spec)[0])
        res = [mx_oracle_block(b, elem) for b in vals]
    out = np.full_like(x, np.nan)
    for cut, r in zip(cuts, res):
        out[cut] = np.asarray(r, np.float32).reshape(out[cut].shape)
    return out


def cuts_along(shape, axis: int, k: int) -> list:
    """Every block of a tensor of `shape` with blocks along `axis`: each line along the axis
    (the other indices fixed) cut into runs of k from its start, the last one shorter."""
    axis %= len(shape)
    others = [n for d, n in enumerate(shape) if d != axis]
    cuts = []
    for idx in np.ndindex(*others):
        for start in range(0, shape[axis], k):
            cut = list(idx)
            cut.insert(axis, slice(start, start + k))
            cuts.append(tuple(cut))
    return cuts


def tile_cuts(shape, k: int) -> list:
    """Every 2D tile of a weight of `shape` [O, C, *taps]: k x k over (O, C) at one tap (edge
    tiles shorter), as (o range, c range, tap index)."""
    o, c = shape[:2]
    return [(slice(i, i + k), slice(j, j + k)) + tap
            for tap in np.ndindex(*shape[2:])
            for i in range(0, o, k) for j in range(0, c, k)]


def spread(shape, rng) -> np.ndarray:
    """Gaussian values times powers of two from 2^-6 to 2^6: blocks with different scales."""
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-6, 7, shape))
    return x.astype(np.float32)


# =============================================================================================
# cast_along
# =============================================================================================
SPECS = ("mxfp8", "mxfp4", "nvfp4")


def shape_4d(axis: int) -> list:
    """A small 4-D shape whose `axis` has 40 elements: blocks of 16 or 32 and a short last one."""
    shape = [2, 3, 2, 3]
    shape[axis] = 40
    return shape


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1])
@pytest.mark.parametrize("spec", SPECS)
def test_cast_along_4d_matches_oracle(spec, axis):
    rng = np.random.default_rng(SEED + axis)
    x = spread(shape_4d(axis), rng)
    got = cast_along(torch.from_numpy(x), spec, axis)
    want = oracle_blocks(x, spec, cuts_along(x.shape, axis, block_size(spec)))
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert_same_array_bits(got, want, f"{spec} axis {axis}")


@pytest.mark.parametrize("axis", [0, 1, -1, -2])
@pytest.mark.parametrize("spec", SPECS)
def test_cast_along_2d_matches_oracle(spec, axis):
    x = spread((40, 24), np.random.default_rng(SEED))   # 24: one short block (k = 32)
    got = cast_along(torch.from_numpy(x), spec, axis)
    assert_same_array_bits(got, oracle_blocks(x, spec, cuts_along(x.shape, axis,
                                                                  block_size(spec))),
                           f"{spec} 2-D axis {axis}")


@pytest.mark.parametrize("axis", [0, -1])
def test_cast_along_1d_blocks_its_only_dim(axis):
    x = spread((70,), np.random.default_rng(SEED))
    for spec in SPECS:
        want = oracle_blocks(x, spec, cuts_along(x.shape, 0, block_size(spec)))
        assert_same_array_bits(cast_along(torch.from_numpy(x), spec, axis), want, spec)


@pytest.mark.parametrize("axis", [0, 1, 3])
@pytest.mark.parametrize("spec", ["mxfp4", "nvfp4"])
def test_cast_along_keeps_channels_last(spec, axis):
    x = spread(shape_4d(axis), np.random.default_rng(SEED))
    xc = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    got = cast_along(xc, spec, axis)
    assert got.is_contiguous(memory_format=torch.channels_last)
    want = oracle_blocks(x, spec, cuts_along(x.shape, axis, block_size(spec)))
    assert_same_array_bits(got, want, f"{spec} channels-last axis {axis}")


def test_cast_along_keeps_the_dtype():
    x = spread((3, 40), np.random.default_rng(SEED))
    xb = torch.from_numpy(x).to(torch.bfloat16)
    got = cast_along(xb, "mxfp8", 0)
    assert got.dtype == torch.bfloat16   # MX values of a bfloat16 tensor fit bfloat16
    xf = xb.float().numpy()
    assert_same_array_bits(got.float(), oracle_blocks(xf, "mxfp8", cuts_along(xf.shape, 0, 32)),
                           "bf16 axis 0")


@pytest.mark.parametrize("spec,scaling", [("e4m3", "tensor"), ("e2m1", "tensor"),
                                          ("e4m3", "none"), ("posit8es1", "tensor")])
def test_cast_along_other_formats_ignore_the_axis(spec, scaling):
    x = torch.from_numpy(spread((4, 40, 3), np.random.default_rng(SEED)))
    want = quantize_scaled(x, spec, scaling)
    for axis in (0, 1, 2, -1):
        assert torch.equal(cast_along(x, spec, axis, scaling=scaling), want)


def test_cast_along_stochastic_is_reproducible():
    x = torch.from_numpy(spread((3, 40, 5), np.random.default_rng(SEED)))
    a = cast_along(x, "nvfp4", 2, "stochastic", generator=torch.Generator().manual_seed(1))
    b = cast_along(x, "nvfp4", 2, "stochastic", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, cast_along(x, "nvfp4", 2, "nearest"))


@pytest.mark.parametrize("axis", [4, -5, 1.0, True, "0", None])
def test_cast_along_bad_axis(axis):
    with pytest.raises(ValueError, match="accepted: an int in") as info:
        cast_along(torch.ones(2, 3, 4, 5), "mxfp4", axis)
    assert "\n" not in str(info.value)


def test_cast_along_refuses_a_0d_tensor():
    with pytest.raises(ValueError, match="0-d tensor has no axis"):
        cast_along(torch.tensor(1.0), "e4m3", 0)


def test_cast_along_refuses_scaling_on_block_formats():
    with pytest.raises(ValueError, match="carries its own scaling"):
        cast_along(torch.ones(4, 40), "mxfp4", 0, scaling="tensor")


@pytest.mark.slow
def test_cast_along_same_bits_under_torch_compile():
    x = torch.from_numpy(spread(shape_4d(3), np.random.default_rng(SEED)))
    fn = user_compile(lambda t: cast_along(t * 1.0, "nvfp4", 3) * 2.0)
    assert_same_array_bits(fn(x), cast_along(x, "nvfp4", 3) * 2.0, "compiled cast_along")


# =============================================================================================
# quantize_weight_2d
# =============================================================================================
WEIGHT_CASES = [("nvfp4", (40, 24)), ("nvfp4", (20, 12, 3, 3)), ("nvfp4", (10, 64)),
                ("mxfp4", (40, 70)), ("mxfp4", (34, 8, 3, 3)), ("mxfp4", (16, 3, 3, 3))]


@pytest.mark.parametrize("spec,shape", WEIGHT_CASES)
def test_weight_2d_matches_oracle_tiles(spec, shape):
    w = spread(shape, np.random.default_rng(SEED + len(shape)))
    got = quantize_weight_2d(torch.from_numpy(w), spec)
    want = oracle_blocks(w, spec, tile_cuts(shape, block_size(spec)))
    assert got.shape == torch.Size(shape) and got.is_contiguous()
    assert_same_array_bits(got, want, f"{spec} {shape}")


def tile_key(cut) -> tuple:
    """A tile's cut as a hashable key: its first o and c, then the tap."""
    return (cut[0].start, cut[1].start) + tuple(cut[2:])


def tile_scales(w: np.ndarray, spec: str, k: int) -> dict:
    """The oracle's scale of each tile (``tile_key`` -> the value of one element unit): MX 2^e
    from the tile's amax, NVFP4 g * s from the tile's amax and the tensor's."""
    cuts = tile_cuts(w.shape, k)
    if spec == "nvfp4":
        _, parts = nvfp4_oracle_tensor([[float(v) for v in w[cut].ravel()] for cut in cuts],
                                       float(np.abs(w).max()))
        return {tile_key(cut): float(p[0][1]) for cut, p in zip(cuts, parts)}
    elem = FloatDef(mx_spec(spec)[0])
    return {tile_key(cut): float(pow2(mx_scale_of_block([float(v) for v in w[cut].ravel()],
                                                         elem)))
            for cut in cuts}


def element_values(scale: float) -> set:
    """The values one block holds under `scale`: every e2m1 value times it (float32 products,
    as both formats compute them)."""
    grid = [Fraction(0)]
    while grid[-1] < E2M1.max:
        grid.append(E2M1.neighbours(grid[-1])[1])
    return {float(f32(float(s * v)) * f32(scale)) for v in grid for s in (1, -1)}


@pytest.mark.parametrize("spec,shape", [("nvfp4", (40, 24, 3, 3)), ("mxfp4", (40, 70)),
                                        ("nvfp4", (10, 64))])
def test_weight_2d_forward_and_dgrad_blocks_have_one_scale(spec, shape):
    """Each forward block (k consecutive c of one o at one tap) and each dgrad block (k
    consecutive o of one c at one tap) lies in one tile, and its values are e2m1 values times
    that tile's scale: one scale per block for both GEMMs."""
    k = block_size(spec)
    w = spread(shape, np.random.default_rng(SEED))
    q = quantize_weight_2d(torch.from_numpy(w), spec).numpy()
    scales = tile_scales(w, spec, k)
    values = {cut: element_values(s) for cut, s in scales.items()}

    def tile_of(o, c, tap):
        return (o // k * k, c // k * k) + tap

    for gemm, axis in (("forward", 1), ("dgrad", 0)):
        for cut in cuts_along(shape, axis, k):
            block = q[cut]
            first = [s.start if isinstance(s, slice) else s for s in cut]
            last = [s.start + len(block) - 1 if isinstance(s, slice) else s for s in cut]
            tile = tile_of(first[0], first[1], tuple(first[2:]))
            assert tile == tile_of(last[0], last[1], tuple(last[2:])), (gemm, cut)
            stray = [float(v) for v in block if float(v) not in values[tile]]
            assert not stray, f"{spec} {gemm} block {cut}: {stray} not on {scales[tile]}"


def test_weight_2d_stochastic_reproducible_and_unbiased():
    """n copies of one 32 x 32 tile (max 5: scale 1, nothing saturates): every draw is one of
    the two e2m1 neighbours, each element goes up with probability (x - lo) / (hi - lo) within
    6 sigma, and a generator seeded alike draws alike."""
    rng = np.random.default_rng(SEED)
    tile = rng.uniform(-5, 5, (32, 32)).astype(np.float32)
    tile[0, 0] = 5.0
    n = 96
    w = torch.from_numpy(np.tile(tile, (n, 1)))
    q = quantize_weight_2d(w, "mxfp4", "stochastic", torch.Generator().manual_seed(3))
    again = quantize_weight_2d(w, "mxfp4", "stochastic", torch.Generator().manual_seed(3))
    assert torch.equal(q, again)
    draws = q.view(n, 32 * 32).numpy()
    for j, v in enumerate(tile.ravel()):
        a = abs(Fraction(float(v)))
        lo, hi = E2M1.neighbours(a)
        col = np.abs(draws[:, j])
        assert np.isin(col, [float(lo), float(hi)]).all() and (
            np.sign(draws[:, j]) * np.sign(v) >= 0).all(), (v, set(col.tolist()))
        if lo != a:
            p = float((a - lo) / (hi - lo))
            share = (col == float(hi)).mean()
            assert abs(share - p) <= 6 * math.sqrt(p * (1 - p) / n), (v, share, p)


def test_weight_2d_stochastic_nvfp4_draws_neighbours():
    w = torch.from_numpy(spread((20, 12, 3, 3), np.random.default_rng(SEED)))
    near = quantize_weight_2d(w, "nvfp4")
    g = torch.Generator().manual_seed(5)
    a, b = (quantize_weight_2d(w, "nvfp4", "stochastic", g) for _ in range(2))
    assert not torch.equal(a, b)
    scales = tile_scales(w.numpy(), "nvfp4", NVFP4_K)
    for cut in tile_cuts(w.shape, NVFP4_K):
        assert np.isin(a.numpy()[cut], list(element_values(scales[tile_key(cut)]))).all(), cut
    assert (a != near).any()


@pytest.mark.parametrize("spec", ["e4m3", "fp32", "posit8es1", "bf16"])
def test_weight_2d_refuses_element_formats(spec):
    with pytest.raises(ValueError, match="accepted: a block format") as info:
        quantize_weight_2d(torch.ones(16, 16), spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("w", [torch.ones(16), torch.ones(16, 16, dtype=torch.float64)])
def test_weight_2d_refuses_other_tensors(w):
    with pytest.raises(ValueError, match=r"accepted: a float32 weight \[O, C, \*taps\]"):
        quantize_weight_2d(w, "nvfp4")


@pytest.mark.slow
def test_weight_2d_same_bits_under_torch_compile():
    """Ragged O and C (edge tiles cut from a zero-padded copy) traced into a user's graph."""
    w = torch.from_numpy(spread((40, 20, 3, 3), np.random.default_rng(SEED)))
    fn = user_compile(lambda t: quantize_weight_2d(t * 1.0, "nvfp4") * 2.0)
    assert_same_array_bits(fn(w), quantize_weight_2d(w, "nvfp4") * 2.0, "compiled 2D weight")


@pytest.mark.slow
def test_quantize_tiles_compiled_kernel_matches_eager():
    """The tile layout [tiles, k * k, taps] through the compiled kernel: the same bits as the
    eager ops, random bits included. (The kernels are quantize_block's, compiled for every
    family, rounding and block length by tests/test_blocks.py; one case here keeps the file
    fast.)"""
    tiles = torch.from_numpy(spread((12, 256, 9), np.random.default_rng(SEED)))
    seed = torch.tensor([3, 4], dtype=torch.int32)
    assert_same_array_bits(
        blocks.quantize_tiles(tiles, "nvfp4", "stochastic", path="compiled", seed=seed),
        blocks.quantize_tiles(tiles, "nvfp4", "stochastic", path="eager", seed=seed), "tiles")


@pytest.mark.parametrize("tiles,spec", [(torch.ones(2, 16, 1), "e4m3"),
                                        (torch.ones(2, 16), "nvfp4"),
                                        (torch.ones(2, 16, 1, dtype=torch.float64), "nvfp4")])
def test_quantize_tiles_refuses_bad_arguments(tiles, spec):
    with pytest.raises(ValueError, match="accepted: a") as info:
        blocks.quantize_tiles(tiles, spec)
    assert "\n" not in str(info.value)


# =============================================================================================
# random Hadamard transform
# =============================================================================================
def sylvester(n: int) -> np.ndarray:
    """The Sylvester Hadamard matrix by its definition: H[i, j] = (-1)^popcount(i & j)."""
    return np.array([[(-1) ** bin(i & j).count("1") for j in range(n)] for i in range(n)],
                    np.float64)


@pytest.mark.parametrize("block", [1, 2, 4, 16, 64])
def test_hadamard_matrix_is_signs_times_sylvester(block):
    r = hadamard_matrix(7, block)
    assert r.dtype == torch.float32 and r.shape == (block, block)
    h = sylvester(block)
    signs = np.sign(r[:, 0].double().numpy())   # H's first column is all ones
    assert set(np.abs(signs)) == {1.0}
    want = (signs[:, None] * h / np.sqrt(block)).astype(np.float32)
    assert np.array_equal(r.numpy(), want)


@pytest.mark.parametrize("block", [1, 4, 16, 64])
def test_hadamard_matrix_is_exactly_orthogonal(block):
    """Powers of 4: entries +-2^-j, every product and sum exact in float32."""
    r = hadamard_matrix(11, block)
    assert torch.equal(r @ r.T, torch.eye(block)) and torch.equal(r.T @ r, torch.eye(block))


def test_hadamard_matrix_other_powers_of_two_are_orthogonal_to_rounding():
    for block in (2, 8, 32):
        r = hadamard_matrix(0, block).double()
        assert torch.allclose(r @ r.T, torch.eye(block, dtype=torch.float64), atol=1e-6)


def test_hadamard_signs_follow_the_seed():
    signs = [tuple(hadamard_matrix(seed)[:, 0].tolist()) for seed in range(8)]
    assert signs[3] == tuple(hadamard_matrix(3)[:, 0].tolist())
    assert len(set(signs)) == len(signs)
    assert all(len(set(s)) == 2 for s in signs)   # random signs, not all equal


@pytest.mark.parametrize("block", [0, 3, 12, -4, True, 16.0])
def test_hadamard_bad_block(block):
    with pytest.raises(ValueError, match="accepted: a power of two"):
        hadamard_matrix(0, block)
    with pytest.raises(ValueError, match="accepted: a power of two"):
        hadamard_transform(torch.ones(4, 16), 1, 0, block)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, None])
def test_hadamard_bad_seed(seed):
    with pytest.raises(ValueError, match=r"accepted: an int in \[0, 2\*\*64\)"):
        hadamard_matrix(seed)


def test_hadamard_transform_bad_axis():
    with pytest.raises(ValueError, match="accepted: an int in"):
        hadamard_transform(torch.ones(4, 16), 2, 0)


def reference_transform(x: np.ndarray, axis: int, r: np.ndarray) -> np.ndarray:
    """float64: x zero-padded along `axis`, every block of len(r) along it times r."""
    b = r.shape[0]
    xm = np.moveaxis(x.astype(np.float64), axis, -1)
    n = -(-xm.shape[-1] // b) * b
    xm = np.concatenate([xm, np.zeros(xm.shape[:-1] + (n - xm.shape[-1],))], -1)
    out = np.concatenate([xm[..., j:j + b] @ r for j in range(0, n, b)], -1)
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_hadamard_transform_pads_and_rotates_each_block(axis):
    rng = np.random.default_rng(SEED)
    shape = [3, 5, 4]
    shape[axis] = 37                      # 3 blocks of 16, the last padded with 11 zeros
    x = rng.integers(-64, 65, shape).astype(np.float32) * np.float32(2.0**-3)
    r = hadamard_matrix(5).double().numpy()
    got = hadamard_transform(torch.from_numpy(x), axis, 5)
    want = reference_transform(x, axis, r)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert got.shape[axis] == 48
    assert np.array_equal(got.double().numpy(), want)   # few significant bits: exact


def test_hadamard_round_trip_is_exact_on_dyadic_inputs():
    rng = np.random.default_rng(SEED)
    x64 = torch.from_numpy(rng.integers(-2**20, 2**20, (6, 40)) * 2.0**-12)
    y = hadamard_transform(x64, 1, 9)
    assert y.dtype == torch.float64
    back = hadamard_transform(y, 1, 9, inverse=True)
    assert torch.equal(back.narrow(1, 0, 40), x64) and not back[:, 40:].any()
    x32 = torch.from_numpy(rng.integers(-255, 256, (40, 6)).astype(np.float32) * 2.0**-5)
    back = hadamard_transform(hadamard_transform(x32, 0, 9), 0, 9, inverse=True)
    assert back.dtype == torch.float32 and torch.equal(back[:40], x32)


def test_hadamard_round_trip_float32_to_rounding():
    x = torch.randn(8, 48, generator=torch.Generator().manual_seed(0))
    back = hadamard_transform(hadamard_transform(x, 1, 2), 1, 2, inverse=True)
    assert torch.allclose(back, x, rtol=0, atol=8 * 2.0**-24 * float(x.abs().max()))


def test_hadamard_keeps_the_gemm():
    """(aR)(bR)ᵀ = abᵀ, reduction length 37 (padded to 48), within float32 rounding of the
    float64 product: |error| <= 8 * 48 * eps32 * (|a| |b|ᵀ)."""
    gen = torch.Generator().manual_seed(SEED)
    a, b = torch.randn(6, 37, generator=gen), torch.randn(5, 37, generator=gen) * 100
    got = hadamard_transform(a, 1, 4) @ hadamard_transform(b, 1, 4).T
    exact = a.double() @ b.double().T
    bound = 8 * 48 * 2.0**-24 * (a.double().abs() @ b.double().abs().T)
    assert ((got.double() - exact).abs() <= bound).all()
    assert not torch.equal(hadamard_transform(a, 1, 4)[:, :37], a)


@pytest.mark.slow
def test_hadamard_same_bits_under_torch_compile():
    rng = np.random.default_rng(SEED)
    exact = torch.from_numpy(rng.integers(-64, 65, (6, 37, 5)).astype(np.float32))
    noisy = torch.randn(6, 37, 5, generator=torch.Generator().manual_seed(1))
    for inverse in (False, True):
        fn = user_compile(lambda t, inverse=inverse: hadamard_transform(t, 1, 7,
                                                                        inverse=inverse) * 1.0)
        assert torch.equal(fn(exact), hadamard_transform(exact, 1, 7, inverse=inverse))
        assert torch.allclose(fn(noisy), hadamard_transform(noisy, 1, 7, inverse=inverse),
                              rtol=1e-6, atol=1e-6)


def test_hadamard_block_constant():
    assert HADAMARD_BLOCK == NVFP4_K

