"""Quantized layers: forward = float op on quantized operands, straight-through backward, roles.

The references are torch's own float32 conv/linear applied to operands cast by `quantize`, and, for
the casts themselves, ml_dtypes (independent of this project's code) where a role's format is an
FP8 format.
"""
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.qat import (
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    RoleQuant,
    master_cast,
    quantize_model,
    quantized_layers,
)
from common.quant import quantize, quantize_scaled
from common.resnet import resnet20


def _ml_cast(x: torch.Tensor, dtype) -> torch.Tensor:
    """Independent cast through ml_dtypes (non-saturating; inputs here stay inside the range)."""
    return torch.from_numpy(x.detach().numpy().astype(dtype).astype(np.float32))


def _bits(t):
    return t.detach().contiguous().view(torch.int32)


def _layers(seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    lin = nn.Linear(32, 10)
    return conv, lin


def test_conv_forward_equals_float_conv_on_quantized_operands():
    conv, _ = _layers()
    x = torch.randn(4, 8, 12, 12)
    ref = F.conv2d(_ml_cast(x, ml_dtypes.float8_e4m3fn),
                   _ml_cast(conv.weight, ml_dtypes.float8_e5m2), padding=1)
    qconv = quantize_model(nn.Sequential(conv), QuantConfig(weight=RoleQuant("e5m2"),
                                                            act=RoleQuant("e4m3")))[0]
    assert isinstance(qconv, QuantConv2d)
    assert torch.equal(_bits(qconv(x)), _bits(ref))


def test_linear_forward_equals_float_linear_on_quantized_operands():
    _, lin = _layers()
    x = torch.randn(5, 32)
    ref = F.linear(_ml_cast(x, ml_dtypes.float8_e5m2),
                   _ml_cast(lin.weight, ml_dtypes.float8_e4m3fn), lin.bias)
    qlin = quantize_model(nn.Sequential(lin), QuantConfig(weight=RoleQuant("e4m3"),
                                                          act=RoleQuant("e5m2")))[0]
    assert isinstance(qlin, QuantLinear)
    assert torch.equal(_bits(qlin(x)), _bits(ref))


def test_backward_is_straight_through_then_gradient_cast():
    """grad_input = cast_g(float grad w.r.t. the quantized input); grad_weight = cast_wg(...)."""
    _, lin = _layers(1)
    x = torch.randn(6, 32, requires_grad=True)
    upstream = torch.randn(6, 10)
    qcfg = QuantConfig(weight=RoleQuant("e4m3"), act=RoleQuant("e4m3"), grad=RoleQuant("e5m2"),
                       weight_grad=RoleQuant("bf16"))
    qlin = quantize_model(nn.Sequential(lin), qcfg)[0]
    qlin(x).backward(upstream)

    xq = _ml_cast(x, ml_dtypes.float8_e4m3fn)
    wq = _ml_cast(lin.weight, ml_dtypes.float8_e4m3fn)
    grad_x_float = upstream @ wq                # d/dxq of xq @ wq^T, passed straight through
    grad_w_float = upstream.t() @ xq
    assert torch.equal(_bits(x.grad), _bits(_ml_cast(grad_x_float, ml_dtypes.float8_e5m2)))
    assert torch.equal(_bits(lin.weight.grad), _bits(grad_w_float.to(torch.bfloat16).float()))
    assert torch.equal(lin.bias.grad, upstream.sum(0))   # bias stays float32


def test_fp32_roles_leave_gradients_untouched():
    conv, _ = _layers(2)
    ref_conv, _ = _layers(2)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    qconv = quantize_model(nn.Sequential(conv), QuantConfig(act=RoleQuant("e4m3")))[0]
    qconv(x).sum().backward()
    F.conv2d(quantize(x_ref.detach(), "e4m3"), ref_conv.weight, padding=1).sum().backward()
    assert torch.equal(x.grad, F.conv_transpose2d(torch.ones(2, 16, 6, 6), ref_conv.weight,
                                                  padding=1))
    assert torch.equal(conv.weight.grad, ref_conv.weight.grad)


def test_an_fp32_role_has_one_name_whatever_its_rounding_and_scaling():
    """fp32 casts nothing, so a rounding or scale given to it cannot act: the role reads (name,
    label, record) as plain fp32 instead of claiming a scale that never happens."""
    from common.qat_cli import describe
    plain = RoleQuant("fp32")
    for rq in (RoleQuant("fp32", "stochastic"), RoleQuant("fp32", "nearest", "tensor"),
               RoleQuant("none", "stochastic", "channel")):
        assert rq == plain and rq.short() == "fp32" and rq.to_dict() == plain.to_dict()
    q = QuantConfig(weight=RoleQuant("e4m3", scaling="tensor"), grad=RoleQuant("fp32", "stochastic",
                                                                            "tensor"))
    assert describe(q).split() == ["w=e4m3(t)", "a=fp32", "g=fp32"]


def test_first_last_fp32_leaves_exactly_first_conv_and_last_linear():
    model = quantize_model(resnet20(), QuantConfig(weight=RoleQuant("e4m3"), first_last_fp32=True))
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    float_layers = {n for n, m in convs + linears if type(m) in (nn.Conv2d, nn.Linear)}
    assert float_layers == {convs[0][0], linears[-1][0]}
    assert len(quantized_layers(model)) == len(convs) + len(linears) - 2
    everything = quantize_model(resnet20(), QuantConfig(weight=RoleQuant("e4m3")))
    assert len(quantized_layers(everything)) == len(convs) + len(linears)


def test_wrapping_keeps_parameters_and_state_dict():
    model = resnet20()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    quantize_model(model, QuantConfig(weight=RoleQuant("e4m3"), act=RoleQuant("e4m3")))
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())


def test_all_fp32_config_leaves_model_plain():
    model = quantize_model(resnet20(), QuantConfig())
    assert quantized_layers(model) == []


def test_each_role_uses_its_own_format_rounding_and_scaling():
    """Weight per-channel scaled e2m1, activation tensor-scaled posit8es1, gradient stochastic
    e5m2."""
    _, lin = _layers(3)
    w0 = lin.weight.detach().clone()
    x = torch.randn(6, 32, requires_grad=True)
    upstream = torch.randn(6, 10) * 1e-3
    qcfg = QuantConfig(weight=RoleQuant("e2m1", scaling="channel"),
                       act=RoleQuant("posit8es1", scaling="tensor"),
                       grad=RoleQuant("e5m2", rounding="stochastic"))
    qlin = quantize_model(nn.Sequential(lin), qcfg)[0]
    torch.manual_seed(123)
    y = qlin(x)
    y.backward(upstream)

    # weights: every row (output channel) has its own power-of-two scale with the row's amax at E2M1
    wq = quantize_scaled(w0, "e2m1", scaling="channel", channel_dim=0)
    xq = quantize_scaled(x.detach(), "posit8es1", scaling="tensor")
    assert torch.equal(_bits(y), _bits(F.linear(xq, wq, lin.bias)))
    for row, qrow in zip(w0, wq):
        s = 6.0 / row.abs().max()
        scaled = set((qrow.abs() * 2 ** torch.floor(torch.log2(s))).tolist())
        assert scaled <= {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}   # E2M1 magnitudes
    # gradient: stochastic e5m2: every value is one of the two e5m2 neighbours of the float
    # gradient, not always the nearest one, and the same seed gives the same bits
    g_float = upstream @ wq
    g = x.grad
    assert torch.equal(_bits(_ml_cast(g, ml_dtypes.float8_e5m2)), _bits(g))
    nearest = _ml_cast(g_float, ml_dtypes.float8_e5m2)
    grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e5m2).astype(np.float32)
    grid = torch.from_numpy(np.unique(grid[np.isfinite(grid)]))      # every finite e5m2 value
    hi_idx = torch.searchsorted(grid, g_float, right=False)
    lo, hi = grid[(hi_idx - 1).clamp(min=0)], grid[hi_idx.clamp(max=len(grid) - 1)]
    on_grid = grid[hi_idx.clamp(max=len(grid) - 1)] == g_float
    assert bool(((g == lo) | (g == hi) | (on_grid & (g == g_float))).all())
    assert not torch.equal(g, nearest)
    x2 = x.detach().clone().requires_grad_(True)
    torch.manual_seed(123)
    qlin(x2).backward(upstream)
    assert torch.equal(_bits(x2.grad), _bits(g))


def test_master_cast_puts_weights_on_the_master_grid():
    model = quantize_model(resnet20(), QuantConfig(weight=RoleQuant("e4m3"),
                                                   master=RoleQuant("bf16")))
    master_cast(model)
    for _, layer in quantized_layers(model):
        w = layer.weight.detach()
        assert torch.equal(w, w.to(torch.bfloat16).float())


@pytest.mark.parametrize("bad", [dict(rounding="up"), dict(scaling="row"), dict(fmt="e4m9x")])
def test_bad_role_settings_raise_value_error(bad):
    with pytest.raises(ValueError, match="accepted"):
        RoleQuant(**{"fmt": "e4m3", **bad})


# --- --backend qtorch: the layer casts through QPyTorch / qtorch-plus --------------------------

def _qtorch_or_skip(pkg):
    from common.qtorch_backend import import_isolated

    try:
        return import_isolated(pkg)
    except Exception as err:  # not installed or no compiler
        pytest.skip(f"{pkg} unavailable ({type(err).__name__})")


@pytest.mark.slow
def test_qtorch_backend_casts_with_the_libraries():
    qfloat = _qtorch_or_skip("qtorch")
    qposit = _qtorch_or_skip("qtorch_plus")
    _, lin = _layers(4)
    x = torch.randn(5, 32)
    qlin = quantize_model(nn.Sequential(lin), QuantConfig(weight=RoleQuant("e4m3"),
                                                          act=RoleQuant("posit8es1"),
                                                          backend="qtorch"))[0]
    ref = F.linear(qposit.posit_quantize(x, nsize=8, es=1, rounding="nearest"),
                   qfloat.float_quantize(lin.weight.detach(), exp=4, man=3, rounding="nearest"),
                   lin.bias)
    assert torch.equal(_bits(qlin(x)), _bits(ref))


def test_qtorch_backend_refuses_stochastic_posits_and_reports_missing_libraries(monkeypatch):
    from common import qtorch_backend
    from common.errors import UserError

    _qtorch_or_skip("qtorch")
    _qtorch_or_skip("qtorch_plus")
    sr = QuantConfig(grad=RoleQuant("posit8es1", rounding="stochastic"), backend="qtorch")
    with pytest.raises(UserError, match="no stochastic posit rounding"):
        qtorch_backend.require_qtorch(sr)

    def broken(pkg):
        raise ImportError(f"No module named '{pkg}'")

    monkeypatch.setattr(qtorch_backend, "import_isolated", broken)
    with pytest.raises(UserError, match="pip install qtorch"):
        qtorch_backend.require_qtorch(QuantConfig(weight=RoleQuant("e4m3"), backend="qtorch"))


# --- block formats in the layers: blocks along dim 1, whatever the memory layout -------------

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])   # OCP MX FP4 magnitudes


def _mxfp4_reference(t: torch.Tensor, k: int = 32) -> torch.Tensor:
    """OCP MX FP4 written out from the spec (independent of common.blocks): blocks of k along
    dim 1 (the last one shorter), scale X = 2^(floor(log2 amax) - 2), each x/X to the nearest
    E2M1 value (random inputs: no ties), saturating at 6. Returns a contiguous tensor."""
    moved = t.detach().movedim(1, -1).contiguous()
    out = torch.empty_like(moved)
    for start in range(0, moved.shape[-1], k):
        block = moved[..., start:start + k]
        amax = block.abs().amax(dim=-1, keepdim=True)
        scale = torch.exp2(torch.floor(torch.log2(amax)) - 2)
        scaled = (block / scale).abs().clamp(max=6.0)
        nearest = E2M1_VALUES[(scaled.unsqueeze(-1) - E2M1_VALUES).abs().argmin(-1)]
        out[..., start:start + k] = torch.copysign(nearest, block) * scale
    return out.movedim(-1, 1).contiguous()


@pytest.mark.slow
def test_block_format_conv_channels_last_blocks_along_input_channels():
    """mxfp4 weights [out, in, kh, kw], channels-last activations and gradients: every cast
    blocks along dim 1 (48 channels: a block of 32 and a short one of 16), so the layer equals a
    float conv on operands cast by the spec's rule; the gradients are that rule applied to the
    float gradients (straight-through)."""
    torch.manual_seed(5)
    conv = nn.Conv2d(48, 16, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(2, 48, 6, 6).to(memory_format=torch.channels_last).requires_grad_(True)
    upstream = torch.randn(2, 16, 6, 6).to(memory_format=torch.channels_last)
    fp4 = RoleQuant("mxfp4")
    qconv = quantize_model(nn.Sequential(conv), QuantConfig(weight=fp4, act=fp4, grad=fp4,
                                                            weight_grad=fp4))[0]
    y = qconv(x)
    y.backward(upstream)

    cl = torch.channels_last
    xq = _mxfp4_reference(x).to(memory_format=cl).requires_grad_(True)
    wq = _mxfp4_reference(conv.weight).to(memory_format=cl).requires_grad_(True)
    ref = F.conv2d(xq, wq, padding=1)
    ref.backward(upstream)
    assert torch.equal(_bits(y), _bits(ref))
    assert torch.equal(_bits(x.grad), _bits(_mxfp4_reference(xq.grad)))
    assert torch.equal(_bits(conv.weight.grad), _bits(_mxfp4_reference(wq.grad)))
    assert y.is_contiguous(memory_format=cl)            # the layout is kept


def test_block_format_linear_blocks_along_in_features():
    """Linear [out, in] and its input [N, in]: nvfp4 blocks of 16 along in-features, equal to
    quantize() of each operand (the cast tested bit for bit against torchao in test_blocks)."""
    torch.manual_seed(6)
    lin = nn.Linear(80, 10)
    x = torch.randn(4, 80, requires_grad=True)
    upstream = torch.randn(4, 10)
    nv = RoleQuant("nvfp4")
    qlin = quantize_model(nn.Sequential(lin), QuantConfig(weight=nv, act=nv, grad=nv))[0]
    y = qlin(x)
    y.backward(upstream)
    wq, xq = quantize(lin.weight.detach(), "nvfp4"), quantize(x.detach(), "nvfp4")
    assert torch.equal(_bits(y), _bits(F.linear(xq, wq, lin.bias)))
    assert torch.equal(_bits(x.grad), _bits(quantize(upstream @ wq, "nvfp4")))
    # blocks run along dim 1: growing in-features 16..31 changes MX block 0..31 only
    x2 = x.detach().clone()
    x2[:, 16:32] *= 1024.0
    mx = quantize(x2, "mxfp4")
    assert torch.equal(mx[:, 32:64], quantize(x.detach(), "mxfp4")[:, 32:64])
    assert not torch.equal(mx[:, :32], quantize(x.detach(), "mxfp4")[:, :32])


def test_qtorch_backend_refuses_block_formats_before_importing(monkeypatch):
    """QPyTorch has no block formats: refused up front (its libraries are not even needed)."""
    from common import qtorch_backend
    from common.errors import UserError

    def unavailable(pkg):
        raise AssertionError("imported the libraries before checking the formats")

    monkeypatch.setattr(qtorch_backend, "import_isolated", unavailable)
    with pytest.raises(UserError, match="no block formats; act is mxfp8"):
        qtorch_backend.require_qtorch(QuantConfig(act=RoleQuant("mxfp8"), backend="qtorch"))
