"""Casts traced into a user's torch.compile give the eager bits: block formats in every layout
and for every length of dim 1 (the block axis), also where a row ends in a short block, and the
exact rescale of scaled casts to formats with float32's exponent range.

The eager ops are checked against torchao and exact oracles in tests/test_blocks.py and
tests/test_quant.py; here the reference is those eager ops themselves, run outside the
compiler on the same inputs with the same seed words. Each compiled function holds several
casts (one graph, one compile: compiling is the slow part), and every result feeds a further
op, as in a model, so that inductor fuses the cast into its consumer.

What went wrong before (inductor's CPU code, torch 2.14, default options, static shapes): a
pointwise loop over a dim 1 that k does not divide, reading a per-block value at index c // k
(k > 8), was split at k without checking that k divides its length, so the last C % k elements
of each row were never written (see common/blocks.py, ``_split_cast``).
"""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from common import blocks
from common.qat import QuantConfig, RoleQuant, quantize_model
from common.quant import quantize, quantize_scaled

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MX32_SPECS = ("mxfp8", "mx-e5m2", "mxfp6", "mx-e3m2", "mxfp4")  # the MX formats with k = 32
KINDS = ("mx, k = 32", "mx16-e2m1", "nvfp4")
DIMS = (20, 33, 40, 48, 100)
LAYOUTS = ("1d", "2d", "channels_last", "nchw")
ROUNDINGS = ("nearest", "stochastic")
SEED = torch.tensor([123, -456], dtype=torch.int32)


def _input(layout: str, c: int, gen: torch.Generator) -> torch.Tensor:
    """A tensor with dim 1 (dim 0 if 1-D) of length c: rows of different magnitude (so the
    blocks differ) and a few zeros."""
    if layout == "1d":
        x = torch.randn(c, generator=gen)
    elif layout == "2d":
        x = torch.randn(3, c, generator=gen) * 2.0 ** torch.randint(-8, 8, (3, 1), generator=gen)
    else:
        x = torch.randn(2, c, 2, 3, generator=gen) * 2.0 ** torch.randint(
            -8, 8, (2, 1, 2, 3), generator=gen)
    x = (x * 3).flatten()
    x[::7] = 0.0
    x = x.view(c) if layout == "1d" else x.view((3, c) if layout == "2d" else (2, c, 2, 3))
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _cases():
    """(spec, dim 1, layout, rounding): 20 casts, one compile, instead of the 7 * 5 * 4 * 2 of
    the full product. Every dim-1 length in every layout, and every pair of any two factors at
    least once, where the block kind (MX with k = 32, MX with k = 16, NVFP4) stands for the
    format: MX element formats differ in constants only, not in the code inductor generates;
    the k = 32 cases take the five of them in turn."""
    cases, mx32 = [], itertools.cycle(MX32_SPECS)
    for j, c in enumerate(DIMS):
        for m, layout in enumerate(LAYOUTS):
            kind = (j + m) % 3
            spec = next(mx32) if kind == 0 else KINDS[kind]
            cases.append((spec, c, layout, ROUNDINGS[(j + m // 2) % 2]))
    return cases


def _kind(spec: str) -> str:
    return KINDS[0] if spec in MX32_SPECS else spec


def _casts(xs, seed, cases):
    """Each case's cast (nearest: the public quantize; stochastic: fixed seed words through
    the test hook), fed to a further op."""
    out = []
    for x, (spec, _, _, rounding) in zip(xs, cases):
        if rounding == "nearest":
            out.append(quantize(x, spec) * 2.0)
        else:
            out.append(blocks.quantize_block(x, spec, "stochastic", seed=seed) * 2.0)
    return out


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().view(torch.int32).numpy()


def _diff(got: torch.Tensor, want: torch.Tensor) -> str:
    """'' when got and want are the same bits and layout (NaN matching NaN), else a line."""
    if got.shape != want.shape or got.stride() != want.stride():
        return f"shape/stride {tuple(got.shape)}/{got.stride()} vs {want.stride()}"
    both_nan = (torch.isnan(got) & torch.isnan(want)).contiguous().numpy()
    bad = (_bits(got) != _bits(want)) & ~both_nan
    if not bad.any():
        return ""
    i = tuple(int(v) for v in np.argwhere(bad)[0])
    return f"{int(bad.sum())} of {bad.size} differ, first at {i}: {got[i]} vs {want[i]}"


@pytest.mark.slow
def test_block_casts_in_a_user_compile_give_eager_bits():
    """Every block format, every dim-1 length of DIMS, 1-D, 2-D, channels-last and NCHW 4-D,
    both roundings (see _cases), compiled with inductor's defaults and static shapes, against
    the eager ops: same bits, same layout."""
    cases = _cases()
    factors = [(_kind(spec), c, layout, rounding) for spec, c, layout, rounding in cases]
    for a, b in itertools.combinations(range(4), 2):  # the design covers every pair
        pairs = {(f[a], f[b]) for f in factors}
        assert len(pairs) == len({f[a] for f in factors}) * len({f[b] for f in factors})
    assert {spec for spec, *_ in cases} == set(MX32_SPECS + KINDS[1:])
    gen = torch.Generator().manual_seed(1)
    xs = [_input(layout, c, gen) for _, c, layout, _ in cases]
    torch._dynamo.reset()
    got = torch.compile(_casts, fullgraph=True, dynamic=False)(xs, SEED, cases)
    want = _casts(xs, SEED, cases)
    bad = [f"{spec} dim1={c} {layout} {rounding}: {msg}"
           for (spec, c, layout, rounding), g, w in zip(cases, got, want) if (msg := _diff(g, w))]
    assert not bad, "\n".join(bad)


def test_worked_values_in_a_user_compile():
    """Three small cases with known results: mxfp8 of 1..40 (the last block 33..40 has scale 4:
    32, 32, 36, 36, 36, 40, 40, 40), stochastic mxfp4 of 1.25 (only 1 or 1.5 can come out),
    mx16-e2m1 of a [2, 20] tensor (the second block of each row holds 1.5 exactly)."""
    def fn(a, b, c, seed):
        return (quantize(a, "mxfp8") + 0.0,
                blocks.quantize_block(b, "mxfp4", "stochastic", seed=seed) + 0.0,
                quantize(c, "mx16-e2m1") + 0.0)

    a = torch.arange(1.0, 41.0).view(1, 40)
    b = torch.full((4, 40), 1.25)
    c = torch.ones(2, 20)
    c[:, 16:] = 1.5
    torch._dynamo.reset()
    ya, yb, yc = torch.compile(fn)(a, b, c, SEED)
    assert ya[0, 32:].tolist() == [32, 32, 36, 36, 36, 40, 40, 40]
    assert set(yb.flatten().tolist()) == {1.0, 1.5}
    assert torch.equal(yc, c)
    for got, want in zip((ya, yb, yc), fn(a, b, c, SEED)):
        assert not _diff(got, want)


@pytest.mark.slow
def test_block_casts_in_a_dynamic_user_compile_give_eager_bits():
    """The same with dynamic shapes (sizes as symbols where the casts allow it): a 2-D and a
    channels-last tensor whose rows end in a short block, MX to nearest, NVFP4 stochastic."""
    def fn(a, b, seed):
        return [quantize(a, "mxfp4") * 2.0,
                blocks.quantize_block(b, "nvfp4", "stochastic", seed=seed) * 2.0]

    gen = torch.Generator().manual_seed(2)
    a, b = _input("2d", 40, gen), _input("channels_last", 33, gen)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, dynamic=True)(a, b, SEED)
    for i, (g, w) in enumerate(zip(got, fn(a, b, SEED))):
        assert not _diff(g, w), (i, _diff(g, w))


class _Linears(nn.Module):
    """Linear(40 -> 10) in mxfp8 and Linear(48 -> 10) in mxfp4: weight, input activation and
    input gradient cast (round to nearest), blocks of 32 along the in-features."""

    LAYERS = (("mxfp8", 40), ("mxfp4", 48))

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.layers = nn.ModuleList()
        for spec, n_in in self.LAYERS:
            role = RoleQuant(spec)
            lin = nn.Linear(n_in, 10)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(10, n_in, generator=gen) * 0.2)
                lin.bias.copy_(torch.randn(10, generator=gen) * 0.1)
            self.layers.append(quantize_model(lin, QuantConfig(weight=role, act=role, grad=role)))

    def forward(self, xs):
        return [torch.relu(layer(x)) for layer, x in zip(self.layers, xs)]


def _train_step(compiled: bool):
    model = _Linears()
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(8, layer.in_features, generator=gen).requires_grad_()
          for layer in model.layers]
    weights = [torch.randn(8, 10, generator=gen) for _ in model.layers]
    if compiled:
        torch._dynamo.reset()
    ys = (torch.compile(model) if compiled else model)(xs)
    sum((y * w).sum() for y, w in zip(ys, weights)).backward()
    return [(y.detach(), x.grad, layer.weight.grad)
            for y, x, layer in zip(ys, xs, model.layers)]


@pytest.mark.slow
def test_quantized_linear_model_in_a_user_compile_forward_and_backward():
    """A compiled model of quantized Linear(40 -> 10) (mxfp8) and Linear(48 -> 10) (mxfp4):
    outputs, input gradients and weight gradients bit for bit as eager, all finite."""
    eager, compiled = _train_step(False), _train_step(True)
    names = [f"{spec} Linear({n}->10)" for spec, n in _Linears.LAYERS]
    bad = []
    for name, e, c in zip(names, eager, compiled):
        for what, a, b in zip(("output", "input grad", "weight grad"), e, c):
            assert torch.isfinite(a).all(), f"{name} {what} (eager)"
            msg = _diff(b, a)
            if msg:
                bad.append(f"{name} {what}: {msg}")
    assert not bad, "\n".join(bad)


def test_scaled_casts_near_float32_top_in_a_user_compile_give_eager_bits():
    """Tensor- and channel-scaled casts whose amax is near float32's top, where the scale is
    held in its exact-rescale window (bf16 and e8m3: s = 1 instead of 1/2; e2m1: s = 2^-125
    instead of 2^-126), with values down to float32's subnormals: the same bits traced as
    eager, and nothing finite comes out as inf."""
    x = torch.randn(3, 64) * 2.0 ** -130
    x[0, 0] = 3.395e38
    x[1, 1] = -3.4e38
    x[2, 2] = 3.0e38
    x[2, :2] = torch.tensor([65537, 3]) * 2.0 ** -149

    def fn(v):
        return [quantize_scaled(v, spec, scaling, channel_dim=0).neg()
                for spec in ("bf16", "e8m3", "e2m1") for scaling in ("tensor", "channel")]

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(x)
    for g, w in zip(got, fn(x)):
        assert not _diff(g, w)
        assert torch.isfinite(g).all()
