"""Quantized training: turn any model of `common/resnet.py` into its fake-quantized version.

Each Conv2d and Linear is replaced, in place and sharing its Parameters (so state_dict keys and
checkpoints are unchanged), by a layer that (docs/formats.md, "Quantized training"):

- forward: casts its weight to the weight role's format and its input activation to the
  activation role's format, then runs the ordinary float32 conv/linear on those values;
- backward: the casts are straight-through (identity), then the gradient flowing to the layer's
  input (the "error") is cast to the gradient role's format and, optionally, the weight gradient
  to the weight-gradient role's format.

BatchNorm, residual adds, the loss and the optimizer stay in float32. `--master-fmt` casts the
weights the optimizer keeps after every step (`master_cast`). Every cast goes through
`common.quant.quantize_scaled` (or, with backend "qtorch", through QPyTorch / qtorch-plus for
parity with results made with those libraries).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.formats import Format, parse_format
from common.quant import ROUNDINGS, SCALINGS, quantize_scaled

__all__ = [
    "RoleQuant",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "quantize_model",
    "master_cast",
    "quantized_layers",
    "storage_bits",
    "BACKENDS",
]

BACKENDS = ("native", "qtorch")
ROLES = ("weight", "act", "grad", "weight_grad")


def storage_bits(fmt: Format) -> Union[int, float]:
    """Storage bits per element as run configs and PTQ rows record them: block scales included
    (mxfp4: 4.25, nvfp4: 4.5), an int where whole (8, not 8.0, as recorded before block formats
    existed, so that old and new records compare equal)."""
    bits = fmt.bits_per_element
    return int(bits) if bits.is_integer() else bits


@dataclass(frozen=True)
class RoleQuant:
    """How one tensor role is cast: format, rounding and scaling (docs/formats.md)."""

    fmt: Format = field(default_factory=lambda: parse_format("fp32"))
    rounding: str = "nearest"
    scaling: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "fmt", parse_format(self.fmt))
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; accepted: {', '.join(ROUNDINGS)}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; accepted: {', '.join(SCALINGS)}")

    @property
    def active(self) -> bool:
        return not self.fmt.is_identity

    def short(self) -> str:
        """Compact name for run names and logs, e.g. 'e4m3', 'e5m2-sr-t'."""
        s = self.fmt.name
        if self.rounding == "stochastic":
            s += "-sr"
        if self.scaling != "none":
            s += "-" + self.scaling[0]
        return s

    def to_dict(self) -> dict:
        return {"fmt": self.fmt.name, "rounding": self.rounding, "scaling": self.scaling}


@dataclass(frozen=True)
class QuantConfig:
    """Formats of every role of a quantized model, plus which layers stay float32.

    weight/act/grad/weight_grad: see the module docstring. master: format of the weights the
    optimizer keeps (fp32 = plain float32 master weights). first_last_fp32 keeps the first conv
    and the last Linear unquantized. backend: "native" (this project's casts) or "qtorch".
    """

    weight: RoleQuant = RoleQuant()
    act: RoleQuant = RoleQuant()
    grad: RoleQuant = RoleQuant()
    weight_grad: RoleQuant = RoleQuant()
    master: RoleQuant = RoleQuant()
    first_last_fp32: bool = False
    backend: str = "native"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; accepted: {', '.join(BACKENDS)}")
        if self.master.scaling != "none":
            raise ValueError("the master weights are cast unscaled; accepted master scaling: none")
        for role in ("act", "grad", "weight_grad"):
            if getattr(self, role).scaling == "channel":
                raise ValueError(
                    f"per-channel scaling is for weights only; accepted for {role}: none, tensor")

    @property
    def active(self) -> bool:
        return any(getattr(self, r).active for r in ROLES + ("master",))

    def to_dict(self) -> dict:
        d = {r: getattr(self, r).to_dict() for r in ROLES + ("master",)}
        d.update(first_last_fp32=self.first_last_fp32, backend=self.backend)
        return d


def _cast(x: torch.Tensor, role: RoleQuant, backend: str, channel_dim: int = 0) -> torch.Tensor:
    """Cast one tensor per its role; identity for fp32 roles."""
    if not role.active:
        return x
    if backend == "qtorch":
        from common.qtorch_backend import qtorch_quantize_scaled

        return qtorch_quantize_scaled(x, role.fmt, role.scaling, role.rounding, channel_dim)
    return quantize_scaled(x, role.fmt, scaling=role.scaling, rounding=role.rounding,
                           channel_dim=channel_dim)


class _FakeQuant(torch.autograd.Function):
    """Straight-through cast: forward casts per `fwd`; backward casts the gradient per `bwd`."""

    @staticmethod
    def forward(ctx, x, fwd: RoleQuant, bwd: RoleQuant, backend: str):
        ctx.bwd, ctx.backend = bwd, backend
        return _cast(x, fwd, backend)

    @staticmethod
    def backward(ctx, grad):
        return _cast(grad, ctx.bwd, ctx.backend), None, None, None


def fake_quant(x: torch.Tensor, fwd: RoleQuant, bwd: RoleQuant, backend: str = "native"):
    """Cast x in the forward pass and its gradient in the backward pass (straight-through)."""
    if not (fwd.active or bwd.active):
        return x
    if not torch.is_grad_enabled() or not x.requires_grad:
        return _cast(x, fwd, backend)
    return _FakeQuant.apply(x, fwd, bwd, backend)


class _QuantMixin:
    """Shared by QuantConv2d and QuantLinear: the cast of the input and of the weight."""

    qconfig: QuantConfig

    def _quantized_operands(self, x):
        q = self.qconfig
        x = fake_quant(x, q.act, q.grad, q.backend)
        w = fake_quant(self.weight, q.weight, q.weight_grad, q.backend)
        return x, w

    def extra_repr(self) -> str:
        q = self.qconfig
        return (super().extra_repr() + f", w={q.weight.short()}, a={q.act.short()}, "
                f"g={q.grad.short()}, wg={q.weight_grad.short()}")


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """Conv2d whose weight and input are fake-quantized (module docstring)."""

    def forward(self, x):
        x, w = self._quantized_operands(x)
        return self._conv_forward(x, w, self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """Linear whose weight and input are fake-quantized (module docstring)."""

    def forward(self, x):
        x, w = self._quantized_operands(x)
        return F.linear(x, w, self.bias)


def _swap(module: nn.Module, cls, qconfig: QuantConfig) -> nn.Module:
    """Turn `module` into a `cls` in place: same object, same Parameters, same state_dict keys."""
    module.__class__ = cls
    module.qconfig = qconfig
    return module


def _first_last(model: nn.Module) -> set:
    """Names of the first Conv2d and the last Linear in module order."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return set(convs[:1] + linears[-1:])


def quantize_model(model: nn.Module, qconfig: QuantConfig,
                   keep_float: Optional[Callable[[str, nn.Module], bool]] = None) -> nn.Module:
    """Replace every Conv2d/Linear of `model` in place by its quantized version; returns model.

    keep_float(name, module) -> True leaves that layer in float32; `qconfig.first_last_fp32`
    adds the first conv and the last Linear to those. A model whose config is all fp32 is left
    untouched, so the FP32 baseline runs the plain layers.
    """
    if not qconfig.active:
        return model
    skip = _first_last(model) if qconfig.first_last_fp32 else set()
    swaps = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
    for name, layer in list(model.named_modules()):
        cls = swaps.get(type(layer))
        if cls is None or name in skip or (keep_float is not None and keep_float(name, layer)):
            continue
        _swap(layer, cls, qconfig)
    return model


def quantized_layers(model: nn.Module) -> list:
    """(name, module) of every quantized layer of `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantMixin)]


@torch.no_grad()
def master_cast(model: nn.Module) -> None:
    """Cast the weights of quantized layers to their master format (after each optimizer step)."""
    for _, layer in quantized_layers(model):
        role = layer.qconfig.master
        if role.active:
            layer.weight.copy_(_cast(layer.weight, role, layer.qconfig.backend))

