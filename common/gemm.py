"""GEMM mode: a quantized conv or Linear runs its three GEMMs as FP8/MX/NVFP4 hardware does.

The tensor-role mode (common/qat.py, the scripts' default) casts x and w once in the forward
pass and the gradient flowing out of the layer in the backward pass; the backward GEMMs then
read a float32 dy. In GEMM mode one autograd Function runs the three GEMMs and each casts its
own operands (docs/gemm.md):

    forward  y  = x · w     operands input, weight           reduction: c (x kernel taps)
    dgrad    dx = dy · wᵀ   operands grad_output, weight     reduction: o (x kernel taps)
    wgrad    dw = xᵀ · dy   operands input, grad_output      reduction: n, h', w' (positions)

A block format scales blocks along that GEMM's reduction dimension (``cast_along``). Options:
2D k x k weight blocks, so that forward and dgrad read one quantized weight
(``quantize_weight_2d``); a random Hadamard transform of both wgrad operands along the
positions (``hadamard_transform``, 16 x 16 blocks, signs from a recorded seed); emulated
low-precision accumulation in any of the GEMMs (common/accumulate.py).

Per-operand settings follow torchao's Float8LinearConfig: the roles of common/qat.py give the
primary casts (weight: --w-*, input: --a-*, grad_output: --g-*), ``GemmConfig`` may give the
second use of each operand its own (weight_for_grad_input, input_for_grad_weight,
grad_output_for_grad_weight). The weight-gradient role, when active, still casts dw (the
optimizer's input), and the master role the weights after each step, as in the tensor-role mode.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from common.accumulate import Accumulator
from common.operands import cast_along, hadamard_transform, quantize_weight_2d

__all__ = ["GEMMS", "HADAMARD_BLOCK", "GemmConfig", "OperandCasts", "RECIPES", "gemm_conv2d",
           "gemm_linear"]

GEMMS = ("forward", "dgrad", "wgrad")
HADAMARD_BLOCK = 16  # the NVFP4 recipe's 16 x 16 random Hadamard transform

# The per-GEMM operand slots (torchao Float8LinearConfig's names) and the QuantConfig role each
# one defaults to.
OPERAND_ROLES = {"input": "act", "weight": "weight", "grad_output": "grad",
                 "input_for_grad_weight": "act", "weight_for_grad_input": "weight",
                 "grad_output_for_grad_weight": "grad"}
# The slots GemmConfig may override, with their run-name marks (operand, GEMM: w in dgrad, ...).
OVERRIDE_TAGS = {"weight_for_grad_input": "wd", "input_for_grad_weight": "xw",
                 "grad_output_for_grad_weight": "gw"}
OVERRIDE_SLOTS = tuple(OVERRIDE_TAGS)


@dataclass(frozen=True)
class OperandCasts:
    """The six operand casts of a layer's three GEMMs (each a common.qat.RoleQuant)."""

    input: object               # x in the forward GEMM
    weight: object              # w in the forward GEMM
    grad_output: object         # dy in the dgrad GEMM
    input_for_grad_weight: object   # x in the wgrad GEMM
    weight_for_grad_input: object   # w in the dgrad GEMM
    grad_output_for_grad_weight: object  # dy in the wgrad GEMM


@dataclass(frozen=True)
class GemmConfig:
    """What GEMM mode adds to a QuantConfig (docs/gemm.md).

    weight_for_grad_input / input_for_grad_weight / grad_output_for_grad_weight: the second
    use of an operand, when it differs from its role's cast (None: the role's).
    weight_blocks_2d: k x k blocks over (out, in) at each kernel tap, one scale per tile, shared
    by forward and dgrad (block formats only). hadamard_wgrad: random Hadamard transform of both
    wgrad operands along the positions, HADAMARD_BLOCK at a time, signs from hadamard_seed.
    accumulator: emulated accumulation (None: float32 GEMMs), in the GEMMs named by accumulate.
    """

    weight_for_grad_input: Optional[object] = None
    input_for_grad_weight: Optional[object] = None
    grad_output_for_grad_weight: Optional[object] = None
    weight_blocks_2d: bool = False
    hadamard_wgrad: bool = False
    hadamard_seed: int = 0
    accumulator: Optional[Accumulator] = None
    accumulate: Tuple[str, ...] = GEMMS

    def __post_init__(self):
        if isinstance(self.accumulator, dict):
            object.__setattr__(self, "accumulator", Accumulator.from_dict(self.accumulator))
        object.__setattr__(self, "accumulate", tuple(self.accumulate))
        bad = [g for g in self.accumulate if g not in GEMMS]
        if bad:
            raise ValueError(f"unknown GEMM {bad[0]!r} to accumulate in; accepted: "
                             f"{', '.join(GEMMS)}")
        if not isinstance(self.hadamard_seed, int) or self.hadamard_seed < 0:
            raise ValueError(f"hadamard_seed {self.hadamard_seed!r}: accepted: an int >= 0")

    def operand_casts(self, q) -> OperandCasts:
        """The six casts for QuantConfig q: each slot its override, else its role's cast."""
        casts = {}
        for slot, role_field in OPERAND_ROLES.items():
            override = getattr(self, slot, None)
            casts[slot] = override if override is not None else getattr(q, role_field)
        return OperandCasts(**casts)

    def accumulates(self, gemm: str) -> Optional[Accumulator]:
        """The accumulator of one GEMM, or None (a float32 GEMM)."""
        return self.accumulator if gemm in self.accumulate else None

    def check(self, q) -> None:
        """Refuse settings a GEMM cannot run (one-line ValueError naming what is accepted)."""
        if q.backend != "native":
            raise ValueError(f"GEMM mode runs on the native casts only; got backend "
                             f"{q.backend!r}; accepted: native")
        casts = self.operand_casts(q)
        for slot in ("weight", "weight_for_grad_input"):
            if getattr(casts, slot).scaling.granularity == "channel":
                raise ValueError("GEMM mode: channel scaling of the weight runs along dgrad's "
                                 "reduction dimension, which a GEMM cannot factor out; accepted "
                                 "for the weight: scaling none or tensor, or a block format")
        if self.weight_blocks_2d:
            for slot in ("weight", "weight_for_grad_input"):
                fmt = getattr(casts, slot).fmt
                if not fmt.is_block:
                    raise ValueError(f"2D weight blocks need a block format for the weight, got "
                                     f"{fmt.name}; accepted: mxfp8, mxfp6, mxfp4, nvfp4, ...")
            if casts.weight != casts.weight_for_grad_input:
                raise ValueError("2D weight blocks share one quantized weight between forward "
                                 "and dgrad; accepted: no separate weight_for_grad_input")

    def to_dict(self) -> dict:
        d = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            d[f.name] = value
        return d

    @classmethod
    def from_dict(cls, d: dict, role_quant) -> "GemmConfig":
        """Inverse of ``to_dict``; role_quant builds a cast from its dict (common.qat.RoleQuant,
        passed in so that this module does not import the layers' module)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for slot in OVERRIDE_SLOTS:
            if kw.get(slot) is not None:
                kw[slot] = role_quant(**kw[slot])
        return cls(**kw)

    def tag(self) -> str:
        """Run-name part, e.g. 'gemm', 'gemm-2d-rht', 'gemm-acc-fp16-k32'."""
        parts = ["gemm"]
        if self.weight_blocks_2d:
            parts.append("2d")
        if self.hadamard_wgrad:
            parts.append("rht" + (f"{self.hadamard_seed}" if self.hadamard_seed else ""))
        for slot in OVERRIDE_SLOTS:
            rq = getattr(self, slot)
            if rq is not None:
                parts.append(f"{OVERRIDE_TAGS[slot]}-{rq.short()}")
        if self.accumulator is not None:
            gemms = "" if self.accumulate == GEMMS else "-" + "".join(g[0] for g in self.accumulate)
            parts.append(f"acc-{self.accumulator.short()}{gemms}")
        return "-".join(parts)

    def describe(self) -> str:
        """Label part, e.g. 'GEMM mode, 2D weight blocks, RHT on wgrad, acc fp16 k32'."""
        text = "GEMM mode"
        if self.weight_blocks_2d:
            text += ", 2D weight blocks"
        if self.hadamard_wgrad:
            text += ", RHT on wgrad"
        if self.accumulator is not None:
            where = "" if self.accumulate == GEMMS else f" ({'/'.join(self.accumulate)})"
            text += f", acc {self.accumulator.short()}{where}"
        return text


# ---------------------------------------------------------------------------------------------
# the recipes a user names with one flag (--gemm-recipe): role flags and GemmConfig options
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """A published recipe: the role flags it sets and the GEMM options, with where it is from."""

    flags: dict
    weight_blocks_2d: bool = False
    hadamard_wgrad: bool = False
    source: str = ""


def _role_flags(forward: str, grad: str, scaling: str, grad_rounding: str = "nearest") -> dict:
    """The role flags of a recipe: x and w in `forward`, dy in `grad`, one scaling for all."""
    return {"w_fmt": forward, "a_fmt": forward, "g_fmt": grad, "g_rounding": grad_rounding,
            "w_scaling": scaling, "a_scaling": scaling, "g_scaling": scaling}


RECIPES = {
    "te-fp8": Recipe(
        _role_flags("e4m3", "e5m2", "tensor"),
        source="TransformerEngine's FP8 recipe (HYBRID: e4m3 forward, e5m2 gradients), per-tensor "
               "current scaling"),
    "nvfp4": Recipe(
        _role_flags("nvfp4", "nvfp4", "none", "stochastic"),
        weight_blocks_2d=True, hadamard_wgrad=True,
        source="NVIDIA's NVFP4 pretraining recipe (arXiv:2509.25149): 16x16 2D weight blocks, "
               "16x16 random Hadamard on wgrad, stochastic rounding on gradients"),
    "mxfp8": Recipe(
        _role_flags("mxfp8", "mxfp8", "none"),
        source="OCP MXFP8 for every operand (torchao's MX training, e4m3 elements)"),
    "mxfp4": Recipe(
        _role_flags("mxfp4", "mxfp4", "none", "stochastic"),
        weight_blocks_2d=True, hadamard_wgrad=True,
        source="MXFP4 with the NVFP4 recipe's treatment (Tseng et al., arXiv:2502.20586: "
               "stochastic rounding and random Hadamard in the backward pass)"),
}


# ---------------------------------------------------------------------------------------------
# the operand casts
# ---------------------------------------------------------------------------------------------
def _cast(x: torch.Tensor, rq, axis: int) -> torch.Tensor:
    """x cast per RoleQuant rq, block formats' blocks along `axis`; x itself when inactive."""
    if not rq.active:
        return x
    return cast_along(x, rq.fmt, axis, rounding=rq.rounding, scaling=rq.scaling)


def _elementwise(rq) -> bool:
    """Whether a cast is the same whatever the GEMM's reduction axis: no blocks (none or tensor
    scaling of an element format, or no cast)."""
    return not rq.fmt.is_block


def _reusable(a, b) -> bool:
    """Whether the second use of an operand reads the first use's cast: the same settings and no
    blocks, so only the layout differs (hardware casts such an operand once and transposes it;
    a stochastic cast is then drawn once, too)."""
    return a == b and _elementwise(a)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last where a 4-D t is laid out so (and not also contiguous), else contiguous:
    a GEMM mode result keeps its layer's layout."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _forward_weight(w: torch.Tensor, casts: OperandCasts, gemm: GemmConfig) -> torch.Tensor:
    if gemm.weight_blocks_2d and casts.weight.active:
        return quantize_weight_2d(w, casts.weight.fmt, rounding=casts.weight.rounding)
    return _cast(w, casts.weight, 1)


# ---------------------------------------------------------------------------------------------
# wgrad as a GEMM over positions: [N, ·, L] operands, blocks and Hadamard along L (per image)
# ---------------------------------------------------------------------------------------------
def _cast_positions(t: torch.Tensor, rq) -> torch.Tensor:
    """t [N, R, L] cast per rq with a block format's blocks along its last dim, the positions
    of each image: cast as the 2-D [N*R, L], whose blocks lie contiguous in memory (no copy)."""
    if not rq.active or _elementwise(rq):
        return _cast(t, rq, 1)
    flat = t.reshape(-1, t.shape[-1])
    return _cast(flat, rq, 1).view(t.shape)


def _wgrad_operand(t: torch.Tensor, rq, gemm: GemmConfig) -> torch.Tensor:
    """A wgrad operand [N, R, L] as the wgrad GEMM reads it: the optional Hadamard transform
    along the positions L, then the cast along them."""
    if gemm.hadamard_wgrad:
        t = hadamard_transform(t, -1, gemm.hadamard_seed, HADAMARD_BLOCK)
    return _cast_positions(t, rq)


def _wgrad(x_cols: torch.Tensor, dy_cols: torch.Tensor, gemm: GemmConfig) -> torch.Tensor:
    """dw [O, K] = sum over n, l of dy_cols[n, o, l] * x_cols[n, k, l]: both operands [N, ·, L]
    as the GEMM reads them (``_wgrad_operand``: transformed and cast along the positions l of
    each image, their last dim, which keeps every block contiguous in memory); with an
    accumulator, each image accumulates its positions and the images' float32 results are
    added in order (split-K over the batch). It forms dwᵀ = x_cols · dy_colsᵀ, which reads the
    large operand x_cols along its contiguous positions; each element's products and their
    order are the same."""
    acc = gemm.accumulates("wgrad")
    if acc is None:
        return torch.bmm(dy_cols, x_cols.transpose(1, 2)).sum(0)
    per_image = acc.matmul(x_cols, dy_cols.transpose(1, 2))   # [N, K, O]
    total = per_image[0]
    for i in range(1, per_image.shape[0]):
        total = total + per_image[i]
    return total.t().contiguous()


def _conv_cols(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """x's im2col columns [N, C*kh*kw, L] (F.unfold: index (c, kh, kw), positions last)."""
    return F.unfold(x, tuple(kernel), padding=padding, stride=stride)


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _per_kernel_column(x_shape, kernel, stride, padding, rq, gemm: GemmConfig) -> bool:
    """Whether x's wgrad columns can be transformed and cast before unfolding, once per kernel
    column kw instead of once per tap (``_cast_by_kernel_column``), with the same bits.

    Each block of the columns (and each Hadamard block) then lies inside one output row: the
    output width is a multiple of both block sizes. The rows the taps read, shifted by kh,
    are then whole blocks of one padded input row, the same for every kh. Only scales taken
    from block and tensor maxima (block formats) qualify: the distinct blocks have the
    columns' maxima, but an RMS (a posit's tensor scale) counts repeats. Stochastic rounding
    draws its bits per position of the columns, so it keeps the per-tap cast. Every padded row
    must be read by some tap (kh >= stride), so that none adds to the tensor's maximum."""
    if not (rq.active and rq.fmt.is_block and rq.rounding == "nearest"):
        return False
    wo = _out_size(x_shape[3], kernel[1], stride[1], padding[1])
    blocks = (rq.fmt.block_size, HADAMARD_BLOCK) if gemm.hadamard_wgrad else (rq.fmt.block_size,)
    return kernel[0] >= stride[0] and all(wo % b == 0 for b in blocks)


def _cast_by_kernel_column(x: torch.Tensor, kernel, stride, padding, rq,
                           gemm: GemmConfig) -> torch.Tensor:
    """x's wgrad columns transformed and cast before the unfold, where ``_per_kernel_column``
    allows: [N, C, kw, rows, Wo], for each kernel column j the padded input cut to the
    columns j reads, transformed and cast as one tensor (one tensor scale, as the columns').
    Tap (i, j) reads rows i, i + sh, ... of [:, :, j]; ``_taps`` unfolds them into
    ``_wgrad_operand(_conv_cols(x, ...), rq, gemm)``, bit for bit, at a third of the casting
    work for a 3 x 3 kernel."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c = x.shape[:2]
    ho, wo = _out_size(x.shape[2], kh, sh, ph), _out_size(x.shape[3], kw, sw, pw)
    rows = (ho - 1) * sh + kh
    xp = F.pad(x.contiguous(), (pw, pw, ph, ph))   # NCHW: the cuts below copy whole rows
    by_column = x.new_empty(n, c, kw, rows, wo)
    for j in range(kw):
        by_column[:, :, j] = xp[:, :, :rows, j:j + sw * (wo - 1) + 1:sw]
    return _wgrad_operand(by_column.view(n, -1, wo), rq, gemm).view(by_column.shape)


def _taps(by_column: torch.Tensor, kh: int, sh: int, ho: int) -> torch.Tensor:
    """The columns [N, C*kh*kw, L] (F.unfold's order) of ``_cast_by_kernel_column``'s result."""
    n, c, kw, _, wo = by_column.shape
    cols = by_column.new_empty(n, c, kh, kw, ho, wo)
    for i in range(kh):
        cols[:, :, i] = by_column[:, :, :, i:i + sh * (ho - 1) + 1:sh]
    return cols.view(n, c * kh * kw, ho * wo)


def _wgrad_by_kernel_row(by_column: torch.Tensor, dy_cols: torch.Tensor, kh: int,
                         ho: int) -> torch.Tensor:
    """dw [O, C, kh, kw] of a stride-1 conv from ``_cast_by_kernel_column``'s result without
    unfolding it: kernel row i reads rows i .. i + ho - 1 of every column cut, a strided view
    [N, C*kw, L] that one batched GEMM takes as it is."""
    n, c, kw, _, wo = by_column.shape
    dw = dy_cols.new_empty(dy_cols.shape[1], c, kh, kw)
    for i in range(kh):
        x_rows = by_column[:, :, :, i:i + ho].reshape(n, c * kw, ho * wo)   # a view
        dw[:, :, i] = torch.bmm(dy_cols, x_rows.transpose(1, 2)).sum(0).view(-1, c, kw)
    return dw


def _conv_wgrad(x_saved: torch.Tensor, dy_w: torch.Tensor, kernel, stride, padding,
                casts: OperandCasts, gemm: GemmConfig, x_is_cast: bool,
                dy_is_cast: bool) -> torch.Tensor:
    """A conv's dw [O, C, kh, kw] as the wgrad GEMM over positions: x's columns and dy
    [N, ·, L], each transformed and cast along the positions unless it already holds its
    reusable cast (x_is_cast, dy_is_cast: ``_reusable``)."""
    rq = casts.input_for_grad_weight
    acc = gemm.accumulates("wgrad")
    dy_cols = dy_w.reshape(dy_w.shape[0], dy_w.shape[1], -1)    # [N, O, L]
    if acc is not None and x_is_cast and not gemm.hadamard_wgrad and (
            dy_is_cast or _elementwise(casts.grad_output_for_grad_weight)):
        # x holds its cast, dy's is elementwise: the Accumulator's own wgrad of a conv, which
        # reads the columns of a stride-1 conv from x without unfolding it
        if not dy_is_cast:
            dy_cols = _cast(dy_cols, casts.grad_output_for_grad_weight, 1)
        return acc.conv2d_weight(x_saved, dy_cols.view(dy_w.shape), kernel, stride, padding)
    by_column = cols = None
    if x_is_cast:
        cols = _conv_cols(x_saved, kernel, stride, padding)
    elif _per_kernel_column(x_saved.shape, kernel, stride, padding, rq, gemm):
        by_column = _cast_by_kernel_column(x_saved, kernel, stride, padding, rq, gemm)
    else:
        cols = _wgrad_operand(_conv_cols(x_saved, kernel, stride, padding), rq, gemm)
    if not dy_is_cast:
        dy_cols = _wgrad_operand(dy_cols, casts.grad_output_for_grad_weight, gemm)
    ho = dy_w.shape[2]
    if by_column is not None:
        if stride[0] == 1 and acc is None:
            return _wgrad_by_kernel_row(by_column, dy_cols, kernel[0], ho)
        cols = _taps(by_column, kernel[0], stride[0], ho)
    return _wgrad(cols, dy_cols, gemm).view(dy_w.shape[1], x_saved.shape[1], *kernel)


def _dgrad_conv(dy: torch.Tensor, w: torch.Tensor, x_shape, stride, padding,
                acc: Accumulator) -> torch.Tensor:
    """dx of a conv with accumulation: the transposed conv as a conv of the zero-inserted dy with
    the flipped, transposed weight, reduction order (kh, kw, o), o fastest. The inserted zeros
    take their places in that order (a whole tap's o-run is zero at a stride-2 gap)."""
    n, o, ho, wo = dy.shape
    kh, kw = w.shape[2:]
    sh, sw = stride
    ph, pw = padding
    dil = dy.new_zeros(n, o, (ho - 1) * sh + 1, (wo - 1) * sw + 1)
    dil[:, :, ::sh, ::sw] = dy
    extra_h = x_shape[2] + 2 * ph - kh - (ho - 1) * sh   # rows the forward conv never reached
    extra_w = x_shape[3] + 2 * pw - kw - (wo - 1) * sw
    dil = F.pad(dil, (kw - 1 - pw, kw - 1 - pw + extra_w, kh - 1 - ph, kh - 1 - ph + extra_h))
    w_t = w.transpose(0, 1).flip(2, 3)
    return acc.conv2d(dil, w_t, stride=1, padding=0)


# ---------------------------------------------------------------------------------------------
# the autograd Functions
# ---------------------------------------------------------------------------------------------
class _GemmConv2d(torch.autograd.Function):
    """Conv2d (groups 1, dilation 1) as three GEMMs with their own operand casts."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, casts, gemm):
        xq = _cast(x, casts.input, 1)
        wq = _forward_weight(weight, casts, gemm)
        acc = gemm.accumulates("forward")
        if acc is None:
            y = F.conv2d(xq, wq, None, stride, padding)
        else:
            y = acc.conv2d(xq, wq, stride=stride, padding=padding).contiguous(
                memory_format=_memory_format(x))
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        x_saved = xq if _reusable(casts.input, casts.input_for_grad_weight) and \
            not gemm.hadamard_wgrad else x
        w_saved = wq if gemm.weight_blocks_2d or _reusable(casts.weight,
                                                           casts.weight_for_grad_input) else weight
        ctx.save_for_backward(x_saved, w_saved)
        ctx.x_cast = x_saved is not x
        ctx.w_cast = w_saved is not weight
        ctx.conf = (stride, padding, casts, gemm, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_saved, w_saved = ctx.saved_tensors
        stride, padding, casts, gemm, has_bias = ctx.conf
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        wd = w_saved if ctx.w_cast else _cast(w_saved, casts.weight_for_grad_input, 0)
        dyd = _cast(dy, casts.grad_output, 1)
        fast_wgrad = (gemm.accumulates("wgrad") is None and not gemm.hadamard_wgrad
                      and _elementwise(casts.input_for_grad_weight)
                      and _elementwise(casts.grad_output_for_grad_weight))
        dx = dw = None
        if fast_wgrad:
            xw = x_saved if ctx.x_cast else _cast(x_saved, casts.input_for_grad_weight, 1)
            dyw = dyd if _reusable(casts.grad_output, casts.grad_output_for_grad_weight) \
                else _cast(dy, casts.grad_output_for_grad_weight, 1)
            if dyw is dyd and gemm.accumulates("dgrad") is None:   # one call, both GEMMs
                dx, dw, _ = torch.ops.aten.convolution_backward(
                    dyd, xw, wd, None, stride, padding, (1, 1), False, (0, 0), 1,
                    (need_x, need_w, False))
            elif need_w:
                dw = torch.nn.grad.conv2d_weight(xw, wd.shape, dyw, stride, padding)
        elif need_w:
            dy_reuse = not gemm.hadamard_wgrad and _reusable(casts.grad_output,
                                                             casts.grad_output_for_grad_weight)
            dy_w = dyd if dy_reuse else dy
            dw = _conv_wgrad(x_saved, dy_w, tuple(w_saved.shape[2:]), stride, padding, casts, gemm,
                             x_is_cast=ctx.x_cast, dy_is_cast=dy_reuse)
        if need_x and dx is None:
            acc = gemm.accumulates("dgrad")
            if acc is None:
                dx = torch.nn.grad.conv2d_input(x_saved.shape, wd, dyd, stride, padding)
            else:
                dx = _dgrad_conv(dyd, wd, x_saved.shape, stride, padding, acc).contiguous(
                    memory_format=_memory_format(x_saved))
        if dw is not None:
            dw = dw.contiguous(memory_format=_memory_format(w_saved))
        db = dy.sum((0, 2, 3)) if has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


class _GemmLinear(torch.autograd.Function):
    """Linear (x [B, in], w [out, in]) as three GEMMs with their own operand casts."""

    @staticmethod
    def forward(ctx, x, weight, bias, casts, gemm):
        xq = _cast(x, casts.input, 1)
        wq = _forward_weight(weight, casts, gemm)
        acc = gemm.accumulates("forward")
        y = xq @ wq.t() if acc is None else acc.matmul(xq, wq.t())
        if bias is not None:
            y = y + bias
        x_cast = _reusable(casts.input, casts.input_for_grad_weight) and not gemm.hadamard_wgrad
        ctx.save_for_backward(xq if x_cast else x, weight, wq)
        ctx.conf = (casts, gemm, bias is not None, x_cast)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_saved, weight, wq = ctx.saved_tensors
        casts, gemm, has_bias, x_cast = ctx.conf
        dx = dw = db = None
        dyd = _cast(dy, casts.grad_output, 1)
        if ctx.needs_input_grad[0]:
            reuse_w = gemm.weight_blocks_2d or _reusable(casts.weight, casts.weight_for_grad_input)
            wd = wq if reuse_w else _cast(weight, casts.weight_for_grad_input, 0)
            acc = gemm.accumulates("dgrad")
            dx = dyd @ wd if acc is None else acc.matmul(dyd, wd)
        if ctx.needs_input_grad[1]:   # the reduction runs over the batch: one "image" of B rows
            dy_reuse = not gemm.hadamard_wgrad and _reusable(casts.grad_output,
                                                             casts.grad_output_for_grad_weight)
            dy_w = dyd if dy_reuse else dy
            x_w, dy_w = x_saved.t().unsqueeze(0), dy_w.t().unsqueeze(0)
            if not x_cast:
                x_w = _wgrad_operand(x_w, casts.input_for_grad_weight, gemm)
            if not dy_reuse:
                dy_w = _wgrad_operand(dy_w, casts.grad_output_for_grad_weight, gemm)
            dw = _wgrad(x_w, dy_w, gemm)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db, None, None


def gemm_conv2d(x, weight, bias, stride, padding, casts: OperandCasts, gemm: GemmConfig):
    """A conv (groups 1, dilation 1) in GEMM mode (module docstring)."""
    stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride, stride)
    padding = tuple(padding) if isinstance(padding, (tuple, list)) else (padding, padding)
    return _GemmConv2d.apply(x, weight, bias, stride, padding, casts, gemm)


def gemm_linear(x, weight, bias, casts: OperandCasts, gemm: GemmConfig):
    """A Linear in GEMM mode (module docstring); x of any leading shape [..., in]."""
    lead = x.shape[:-1]
    y = _GemmLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, casts, gemm)
    return y.view(*lead, y.shape[-1])
