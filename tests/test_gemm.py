"""GEMM mode (common/gemm.py, docs/gemm.md): each of a layer's three GEMMs casts its own
operands, block formats along that GEMM's reduction dimension.

The references compute each GEMM explicitly from ``common.quant.quantize`` (blocks along dim 1,
tested bit for bit against the oracles in test_blocks.py / test_oracle.py) on tensors laid out
so that dim 1 is the GEMM's reduction dimension, and from torch's own conv gradients; they do
not call the GEMM mode's own cast helpers.
"""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from common import accumulate, cli
from common.accumulate import Accumulator
from common.gemm import RECIPES, GemmConfig, gemm_conv2d, gemm_linear
from common.qat import QuantConfig, RoleQuant, quantize_model, quantized_layers
from common.quant import quantize, quantize_scaled
from common.resnet import resnet8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _casts(fmt, rounding="nearest", scaling="none", **gemm_kw):
    rq = RoleQuant(fmt, rounding, scaling)
    q = QuantConfig(weight=rq, act=rq, grad=rq, gemm=GemmConfig(**gemm_kw))
    return q.gemm.operand_casts(q), q.gemm


def _run_linear(x, w, fmt, **gemm_kw):
    casts, gemm = _casts(fmt, **gemm_kw)
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = gemm_linear(x, w, None, casts, gemm)
    dy = torch.randn_like(y)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, dy


def _run_conv(x, w, fmt, stride=1, padding=1, **gemm_kw):
    casts, gemm = _casts(fmt, **gemm_kw)
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = gemm_conv2d(x, w, None, stride, padding, casts, gemm)
    dy = torch.randn_like(y)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, dy


def _conv_rows_reference(x, kernel, stride, padding):
    """im2col rows [N, L, kh*kw*C], index (kh, kw, c), by explicit slicing of the padded x."""
    n, c, h, w = x.shape
    kh, kw = kernel
    xp = F.pad(x, (padding, padding, padding, padding))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    taps = [xp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
            for i in range(kh) for j in range(kw)]                  # each [N, C, Ho, Wo]
    rows = torch.stack(taps, 1)                                     # [N, taps, C, Ho, Wo]
    return rows.permute(0, 3, 4, 1, 2).reshape(n, ho * wo, kh * kw * c)


# ---------------------------------------------------------------------------------------------
# no casts: GEMM mode is the plain layer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_fp32_gemm_mode_equals_plain_conv(stride, padding):
    torch.manual_seed(0)
    x, w = torch.randn(4, 8, 9, 9), torch.randn(6, 8, 3, 3)
    y, dx, dw, dy = _run_conv(x, w, "fp32", stride, padding)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    yr = F.conv2d(xr, wr, None, stride, padding)
    yr.backward(dy)
    torch.testing.assert_close(y, yr.detach(), rtol=0, atol=0)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw, wr.grad, rtol=1e-6, atol=1e-5)


def test_fp32_gemm_mode_equals_plain_linear_and_wgrad_path():
    """Also the unfold-based wgrad (taken with the Hadamard transform): orthogonal, so dw is
    the plain one to float32 rounding."""
    torch.manual_seed(1)
    x, w = torch.randn(20, 24), torch.randn(10, 24)
    y, dx, dw, dy = _run_linear(x, w, "fp32", hadamard_wgrad=True, hadamard_seed=3)
    torch.testing.assert_close(y, x @ w.t(), rtol=0, atol=0)
    torch.testing.assert_close(dx, dy @ w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw, dy.t() @ x, rtol=1e-5, atol=1e-5)
    xc, wc = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
    _, _, dwc, dyc = _run_conv(xc, wc, "fp32", 1, 1, hadamard_wgrad=True)
    ref = torch.nn.grad.conv2d_weight(xc, wc.shape, dyc, 1, 1)
    torch.testing.assert_close(dwc, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# each GEMM's operands, block formats along its reduction dimension
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4", "mx8-e2m1"])
def test_linear_gemm_operands(fmt):
    torch.manual_seed(2)
    x, w = torch.randn(48, 40), torch.randn(24, 40)
    y, dx, dw, dy = _run_linear(x, w, fmt)
    q = lambda t: quantize(t, fmt)  # noqa: E731  blocks along dim 1 = the reduction dim
    torch.testing.assert_close(y, q(x) @ q(w).t(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, q(dy) @ q(w.t()).t(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw, q(dy.t()) @ q(x.t()).t(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("fmt", ["mx8-e4m3", "nvfp4"])
def test_conv_gemm_operands(fmt, stride):
    torch.manual_seed(3)
    x, w = torch.randn(3, 16, 8, 8), torch.randn(16, 16, 3, 3)
    y, dx, dw, dy = _run_conv(x, w, fmt, stride, 1)
    q = lambda t: quantize(t, fmt)  # noqa: E731
    torch.testing.assert_close(y, F.conv2d(q(x), q(w), None, stride, 1), rtol=1e-5, atol=1e-5)
    w_dgrad = q(w.transpose(0, 1)).transpose(0, 1)          # blocks along the output channels
    ref_dx = torch.nn.grad.conv2d_input(x.shape, w_dgrad, q(dy), stride, 1)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
    rows = _conv_rows_reference(x, (3, 3), stride, 1)        # [N, L, K]
    dy_rows = dy.flatten(2).transpose(1, 2)                  # [N, L, O]

    def along_positions(t):   # [N, L, K] cast with blocks along L, one NVFP4 tensor scale
        n, positions, k = t.shape
        return q(t.transpose(1, 2).reshape(n * k, positions)).view(n, k, positions).transpose(1, 2)
    xq, dyq = along_positions(rows), along_positions(dy_rows)
    ref_dw = torch.einsum("nlo,nlk->ok", dyq, xq).view(16, 3, 3, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 32])   # output width 8 or 4: per tap; 32 or 16: per column
def test_conv_wgrad_hadamard_then_blocks_along_positions(size, stride, channels_last):
    """wgrad with the random Hadamard transform: both operands' positions of each image are
    rotated 16 at a time (a block-diagonal matrix of R, built here), then cast with NVFP4
    blocks along the positions; dw is their product summed over images and positions."""
    from common.operands import hadamard_matrix

    torch.manual_seed(8)
    x, w = torch.randn(2, 16, size, size), torch.randn(16, 16, 3, 3)
    x[1, 3, size // 2, 5] = 40.0   # an outlier: sets the NVFP4 tensor scale of the columns
    if channels_last:
        x, w = (t.to(memory_format=torch.channels_last) for t in (x, w))
    _, _, dw, dy = _run_conv(x, w, "nvfp4", stride, 1, hadamard_wgrad=True, hadamard_seed=5)
    rows = _conv_rows_reference(x, (3, 3), stride, 1)                # [N, L, K]
    dy_rows = dy.flatten(2).transpose(1, 2)                           # [N, L, O]
    positions = rows.shape[1]
    padded = -(-positions // 16) * 16
    rot = torch.block_diag(*[hadamard_matrix(5)] * (padded // 16))  # [padded, padded]

    def rotate_then_cast(t):   # [N, L, ·]: rows l -> (R-blocks)ᵀ t, then blocks along L
        t = F.pad(t, (0, 0, 0, padded - positions))
        t = torch.einsum("lm,nlk->nmk", rot, t)
        n, length, k = t.shape
        q = quantize(t.transpose(1, 2).reshape(n * k, length), "nvfp4")
        return q.view(n, k, length).transpose(1, 2)
    xq, dyq = rotate_then_cast(rows), rotate_then_cast(dy_rows)
    ref_dw = torch.einsum("nlo,nlk->ok", dyq, xq).view(16, 3, 3, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-4)
    if channels_last:
        assert dw.is_contiguous(memory_format=torch.channels_last)


def _cast_columns_reference(x, kernel, stride, padding, fmt, hadamard_seed):
    """x's wgrad columns [N, C*kh*kw, L] in F.unfold's (c, kh, kw) order, built by explicit
    slicing (``_conv_rows_reference``), each image's positions rotated 16 at a time where a
    seed is given (``hadamard_transform``, tested against the matrix in test_operands.py; the
    same float32 arithmetic, so the bits can match), then cast with blocks along the positions
    by ``quantize`` (blocks along dim 1)."""
    from common.operands import hadamard_transform

    rows = _conv_rows_reference(x, (kernel, kernel), stride, padding)       # [N, L, (kh, kw, c)]
    n, positions, k = rows.shape
    c = x.shape[1]
    cols = rows.view(n, positions, kernel, kernel, c).permute(0, 4, 2, 3, 1).reshape(n, k,
                                                                                     positions)
    if hadamard_seed:
        cols = hadamard_transform(cols, -1, hadamard_seed)
    return quantize(cols.reshape(n * k, positions), fmt).view(n, k, positions)


@pytest.mark.parametrize("fmt,rounding,size,kernel,stride,padding,per_column", [
    ("nvfp4", "nearest", 32, 3, 1, 1, True),
    ("nvfp4", "nearest", 32, 3, 2, 1, True),
    ("nvfp4", "nearest", 16, 1, 1, 0, True),
    ("mxfp4", "nearest", 32, 3, 1, 1, True),
    ("mxfp4", "nearest", 16, 3, 1, 1, False),     # output width 16: an MX block spans 2 rows
    ("nvfp4", "nearest", 8, 3, 1, 1, False),      # output width 8: a block spans 2 rows
    ("nvfp4", "nearest", 32, 1, 2, 0, False),     # kh < stride: odd rows are read by no tap
    ("nvfp4", "stochastic", 32, 3, 1, 1, False),  # random bits by position in the columns
    ("e4m3", "nearest", 32, 3, 1, 1, False),      # no blocks
])
@pytest.mark.parametrize("hadamard", [False, True])
def test_wgrad_columns_cast_per_kernel_column(fmt, rounding, size, kernel, stride, padding,
                                              per_column, hadamard):
    """Where allowed, x's wgrad columns are transformed and cast once per kernel column before
    the unfold; the result is the per-tap cast of the unfolded columns, bit for bit, with an
    outlier that sets the tensor scale."""
    from common import gemm as G

    torch.manual_seed(11)
    x = torch.randn(2, 16, size, size).to(memory_format=torch.channels_last)
    x[0, 2, size - 1, 3] = -30.0
    casts, conf = _casts(fmt, rounding, hadamard_wgrad=hadamard, hadamard_seed=3)
    rq, k2, s2, p2 = casts.input_for_grad_weight, (kernel,) * 2, (stride,) * 2, (padding,) * 2
    assert G._per_kernel_column(x.shape, k2, s2, p2, rq, conf) is per_column
    if per_column:
        by_column = G._cast_by_kernel_column(x, k2, s2, p2, rq, conf)
        ho = (size + 2 * padding - kernel) // stride + 1
        seed = 3 if hadamard else None
        reference = _cast_columns_reference(x, kernel, stride, padding, fmt, seed)
        assert torch.equal(G._taps(by_column, kernel, stride, ho), reference)


def test_wgrad_columns_per_kernel_column_needs_every_row_read():
    """Why kh >= stride is required: a 1x1 stride-2 conv reads even rows only, so an outlier in
    an odd row would set the tensor scale of a per-column cast but not of the columns."""
    from common import gemm as G

    x = torch.randn(1, 16, 32, 32)
    x[0, 0, 1, 0] = 1000.0
    casts, conf = _casts("nvfp4")
    rq, k2, s2, p2 = casts.input_for_grad_weight, (1, 1), (2, 2), (0, 0)
    by_column = G._cast_by_kernel_column(x, k2, s2, p2, rq, conf)
    reference = _cast_columns_reference(x, 1, 2, 0, "nvfp4", None)
    assert not torch.equal(G._taps(by_column, 1, 2, 16), reference)


def test_linear_wgrad_blocks_along_the_batch():
    """A Linear's wgrad reduces over the batch: NVFP4 blocks of 16 consecutive samples."""
    torch.manual_seed(9)
    x, w = torch.randn(40, 24), torch.randn(8, 24)
    _, _, dw, dy = _run_linear(x, w, "nvfp4")
    q = lambda t: quantize(t, "nvfp4")  # noqa: E731
    torch.testing.assert_close(dw, q(dy.t()) @ q(x.t()).t(), rtol=1e-5, atol=1e-4)


def test_unblocked_stochastic_dy_is_drawn_once():
    """An unblocked stochastic cast of dy is drawn once and read by both backward GEMMs: dx and
    dw are torch's conv gradients of one quantized dy (the backward's first random draw)."""
    torch.manual_seed(4)
    q = QuantConfig(grad=RoleQuant("e5m2", "stochastic", "tensor"), gemm=GemmConfig())
    casts = q.gemm.operand_casts(q)
    x, w = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
    dy = torch.randn(2, 5, 6, 6)
    for seed in range(3):
        x2, w2 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = gemm_conv2d(x2, w2, None, 1, 1, casts, q.gemm)
        torch.manual_seed(seed)
        y.backward(dy)
        torch.manual_seed(seed)
        dq = quantize_scaled(dy, "e5m2", "tensor", "stochastic")
        assert not torch.equal(dq, dy)
        torch.testing.assert_close(x2.grad, torch.nn.grad.conv2d_input(x.shape, w, dq, 1, 1),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w2.grad, torch.nn.grad.conv2d_weight(x, w.shape, dq, 1, 1),
                                   rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 2D weight blocks, accumulation
# ---------------------------------------------------------------------------------------------
def test_2d_weight_blocks_shared_by_forward_and_dgrad():
    from common.operands import quantize_weight_2d

    torch.manual_seed(5)
    x, w = torch.randn(2, 32, 6, 6), torch.randn(32, 32, 3, 3)
    y, dx, _, dy = _run_conv(x, w, "nvfp4", 1, 1, weight_blocks_2d=True)
    wq = quantize_weight_2d(w, "nvfp4")
    torch.testing.assert_close(y, F.conv2d(quantize(x, "nvfp4"), wq, None, 1, 1),
                               rtol=1e-5, atol=1e-5)
    ref_dx = torch.nn.grad.conv2d_input(x.shape, wq, quantize(dy, "nvfp4"), 1, 1)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("chunk", [4, 32])   # 32: a stride-1 wgrad reads x's columns in place
def test_accumulation_in_every_gemm(stride, chunk):
    """Each GEMM's result is the Accumulator's on its cast operands, in the documented order."""
    assert accumulate.STRIDED_WGRAD_MIN_CHUNK <= 32   # both of conv2d_weight's paths are run
    torch.manual_seed(6)
    acc = Accumulator("fp16", chunk, promote_every=2)
    x, w = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 3, 3)
    y, dx, dw, dy = _run_conv(x, w, "e4m3", stride, 1, accumulator=acc)
    q = lambda t: quantize(t, "e4m3")  # noqa: E731
    torch.testing.assert_close(y, acc.conv2d(q(x), q(w), stride=stride, padding=1),
                               rtol=0, atol=0)
    rows = _conv_rows_reference(q(x), (3, 3), stride, 1)
    dy_rows = q(dy).flatten(2).transpose(1, 2)
    per_image = acc.matmul(dy_rows.transpose(1, 2).contiguous(), rows.contiguous())
    ref_dw = per_image[0] + per_image[1]
    torch.testing.assert_close(dw, ref_dw.view(4, 3, 3, 8).permute(0, 3, 1, 2), rtol=0, atol=0)
    # dgrad: the transposed conv as a conv of dy with zeros inserted between its positions,
    # padded by kh - 1 - padding (plus the rows the forward never reached), flipped weights
    ho = dy.shape[2]
    dil = torch.zeros(2, 4, (ho - 1) * stride + 1, (ho - 1) * stride + 1)
    dil[:, :, ::stride, ::stride] = q(dy)
    extra = 6 + 2 - 3 - (ho - 1) * stride
    dil = F.pad(dil, (1, 1 + extra, 1, 1 + extra))
    ref_dx = acc.conv2d(dil, q(w).transpose(0, 1).flip(2, 3), stride=1, padding=0)
    torch.testing.assert_close(dx, ref_dx, rtol=0, atol=0)
    plain_dx = torch.nn.grad.conv2d_input(x.shape, q(w), q(dy), stride, 1)
    torch.testing.assert_close(dx, plain_dx, rtol=2e-2, atol=5e-2)   # fp16 accumulation


@pytest.mark.parametrize("size,stride", [(16, 1), (32, 2)])
def test_accumulated_wgrad_of_columns_cast_per_kernel_column(size, stride):
    """NVFP4 wgrad with an accumulator where x's columns are cast per kernel column (output
    width 16): the Accumulator's per-image result on the per-position casts, bit for bit."""
    torch.manual_seed(12)
    acc = Accumulator("fp16", 16, promote_every=2)
    x, w = torch.randn(2, 16, size, size), torch.randn(8, 16, 3, 3)
    x[1, 5, 7, 3] = 25.0
    _, _, dw, dy = _run_conv(x, w, "nvfp4", stride, 1, accumulator=acc)
    q = lambda t: quantize(t, "nvfp4")  # noqa: E731

    def along_positions(t):   # [N, L, K] cast with blocks along L, one NVFP4 tensor scale
        n, positions, k = t.shape
        return q(t.transpose(1, 2).reshape(n * k, positions)).view(n, k, positions)
    xq = along_positions(_conv_rows_reference(x, (3, 3), stride, 1))       # [N, K, L]
    dyq = along_positions(dy.flatten(2).transpose(1, 2))                   # [N, O, L]
    per_image = acc.matmul(dyq, xq.transpose(1, 2))
    ref_dw = (per_image[0] + per_image[1]).view(8, 3, 3, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(dw, ref_dw, rtol=0, atol=0)


def test_accumulation_changes_linear_outputs_only_where_named():
    torch.manual_seed(7)
    x, w = torch.randn(16, 64), torch.randn(8, 64) * 100
    acc = Accumulator("e5m2", 1)
    y, dx, dw, dy = _run_linear(x, w, "fp32", accumulator=acc, accumulate=("dgrad",))
    torch.testing.assert_close(y, x @ w.t(), rtol=0, atol=0)
    torch.testing.assert_close(dx, acc.matmul(dy, w), rtol=0, atol=0)
    torch.testing.assert_close(dw, dy.t() @ x, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# configuration, records, flags
# ---------------------------------------------------------------------------------------------
def test_config_round_trip_and_refusals():
    q = QuantConfig(weight=RoleQuant("nvfp4"), act=RoleQuant("nvfp4"),
                    grad=RoleQuant("nvfp4", "stochastic"), first_last_fp32=True,
                    gemm=GemmConfig(weight_blocks_2d=True, hadamard_wgrad=True, hadamard_seed=7,
                                    accumulator=Accumulator("bf16", 16, 4),
                                    input_for_grad_weight=RoleQuant("e4m3", scaling="tensor")))
    assert QuantConfig.from_dict(q.to_dict()) == q
    assert "gemm" not in QuantConfig(weight=RoleQuant("e4m3")).to_dict()
    with pytest.raises(ValueError, match="channel scaling"):
        QuantConfig(weight=RoleQuant("e2m1", scaling="channel"), gemm=GemmConfig())
    with pytest.raises(ValueError, match="2D weight blocks need a block format"):
        QuantConfig(weight=RoleQuant("e4m3"), gemm=GemmConfig(weight_blocks_2d=True))
    with pytest.raises(ValueError, match="accepted: forward, dgrad, wgrad"):
        GemmConfig(accumulate=("fwd",))
    with pytest.raises(ValueError, match="native"):
        QuantConfig(weight=RoleQuant("e4m3"), backend="qtorch", gemm=GemmConfig())


def _load(folder, script):
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, folder, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_flags_and_explicit_overrides():
    fp4 = _load("FP4", "train_cifar10_fp4.py")
    plan = fp4.plan(["--gemm-recipe", "nvfp4", "--first-last-fp32", "--synthetic"])
    fmt = QuantConfig.from_dict(plan["config"].format)
    assert fmt.weight.fmt.name == "nvfp4" and fmt.grad.rounding == "stochastic"
    assert fmt.gemm.weight_blocks_2d and fmt.gemm.hadamard_wgrad and fmt.first_last_fp32
    assert "gemm-2d-rht" in plan["config"].name and "GEMM mode" in plan["config"].label
    plan = fp4.plan(["--gemm-recipe", "nvfp4", "--g-rounding", "nearest", "--synthetic"])
    assert QuantConfig.from_dict(plan["config"].format).grad.rounding == "nearest"
    fp8 = _load("FP8", "train_cifar10_fp8.py")
    plan = fp8.plan(["--gemm-recipe", "te-fp8", "--acc", "fp16", "--acc-chunk", "32",
                     "--synthetic"])
    fmt = QuantConfig.from_dict(plan["config"].format)
    assert (fmt.weight.fmt.name, fmt.act.fmt.name, fmt.grad.fmt.name) == ("e4m3", "e4m3", "e5m2")
    assert fmt.gemm.accumulator == Accumulator("fp16", 32)
    assert set(RECIPES) == {"te-fp8", "nvfp4", "mxfp8", "mxfp4"}


@pytest.mark.parametrize("argv,needle", [
    (["--acc", "fp16"], "needs GEMM mode"),
    (["--gemm", "--acc", "fp16", "--acc-chunk", "0"], "chunk"),
    (["--gemm", "--acc-gemms", "fwd", "--acc", "fp16"], "accepted: forward"),
    (["--gemm"], "channel scaling"),           # the FP4 script's default weight scaling
])
def test_bad_gemm_flags_exit_2_one_line(argv, needle, capsys):
    fp4 = _load("FP4", "train_cifar10_fp4.py")
    with pytest.raises(SystemExit) as e:
        cli.run_main(fp4.plan, [*argv, "--synthetic"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_one_training_step_per_recipe(recipe):
    """One SGD step of a channels-last ResNet-8 in GEMM mode: finite loss and gradients, every
    quantized layer's weights change."""
    torch.manual_seed(0)
    r = RECIPES[recipe]
    f = r.flags
    rq = lambda k: RoleQuant(f[f"{k}_fmt"], f.get(f"{k}_rounding", "nearest"),  # noqa: E731
                             f.get(f"{k}_scaling", "none"))
    q = QuantConfig(weight=rq("w"), act=rq("a"), grad=rq("g"),
                    gemm=GemmConfig(weight_blocks_2d=r.weight_blocks_2d,
                                    hadamard_wgrad=r.hadamard_wgrad))
    model = quantize_model(resnet8().to(memory_format=torch.channels_last), q)
    layers = quantized_layers(model)
    before = [m.weight.detach().clone() for _, m in layers]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 3, 32, 32).to(memory_format=torch.channels_last)
    loss = F.cross_entropy(model(x), torch.randint(0, 10, (16,)))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(m.weight.grad).all() for _, m in layers)
    opt.step()
    assert all(not torch.equal(b, m.weight) for b, (_, m) in zip(before, layers))
