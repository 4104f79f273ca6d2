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

import functools
from dataclasses import dataclass, field, fields
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.formats import Format, parse_format
from common.gemm import GemmConfig, gemm_conv2d, gemm_linear
from common.quant import ROUNDINGS, SCALINGS, quantize_scaled
from common.scaling import Scaling

__all__ = [
    "Role",
    "ROLES",
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


@dataclass(frozen=True)
class Role:
    """One tensor role of a quantized model, as every part of the code names it.

    key: the flags' prefix (--w-fmt, --w-rounding, --w-scaling) and the label's (w=e4m3);
    field: the QuantConfig field; name_tag: the run name's prefix (w-e4m3); what: what the cast
    applies to, for --help; scalings: the scalings it accepts (only "none": no --<key>-scaling
    flag); always_named: run names and labels name it even unquantized (else only when active);
    in_layer: the quantized layer casts it (the master weights are cast by ``master_cast``).
    """

    key: str
    field: str
    name_tag: str
    what: str
    scalings: Tuple[str, ...]
    always_named: bool
    in_layer: bool = True


# The roles, in the order of flags, run names and labels. Adding a role: one row here and its
# QuantConfig field (checked at import); the flags, names, labels, checks and backends follow.
ROLES = (
    Role("w", "weight", "w", "weight of each Conv2d/Linear (forward)",
         SCALINGS, True),
    Role("a", "act", "a", "input activation of each Conv2d/Linear (forward)",
         ("none", "tensor"), True),
    Role("g", "grad", "g", "gradient flowing to each layer's input, the error (backward)",
         ("none", "tensor"), True),
    Role("wg", "weight_grad", "wg", "weight gradient (backward)",
         ("none", "tensor"), False),
    Role("master", "master", "m", "weights kept by the optimizer, cast after every step",
         ("none",), False, in_layer=False),
)


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
    scaling: Scaling = Scaling()     # a string ("tensor") is parsed into one

    def __post_init__(self):
        object.__setattr__(self, "fmt", parse_format(self.fmt))
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; "
                             f"accepted: {', '.join(ROUNDINGS)}")
        object.__setattr__(self, "scaling", Scaling.parse(self.scaling))
        self.scaling.for_format(self.fmt)    # a block format refuses tensor/channel scaling
        if self.fmt.is_identity:   # fp32 casts nothing: its rounding and scale cannot act, so
            # names, labels and records say plain fp32 (one setting, one name)
            object.__setattr__(self, "rounding", "nearest")
            object.__setattr__(self, "scaling", Scaling())

    @property
    def active(self) -> bool:
        return not self.fmt.is_identity

    def short(self) -> str:
        """Compact name for run names and logs, e.g. 'e4m3', 'e5m2-sr-t'."""
        s = self.fmt.name
        if self.rounding == "stochastic":
            s += "-sr"
        if self.scaling.tag:
            s += "-" + self.scaling.tag
        return s

    def to_dict(self) -> dict:
        return {"fmt": self.fmt.name, "rounding": self.rounding, "scaling": self.scaling.flag}


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
    gemm: Optional[GemmConfig] = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; accepted: {', '.join(BACKENDS)}")
        for role, rq in self.roles():
            if rq.scaling.flag not in role.scalings:
                raise ValueError(f"{rq.scaling} scaling of the {role.what}: accepted for "
                                 f"{role.field}: {', '.join(role.scalings)}")
        if self.gemm is not None:
            self.gemm.check(self)

    def roles(self) -> List[Tuple[Role, RoleQuant]]:
        """(role, its settings) for every role of ``ROLES``, in order."""
        return [(role, getattr(self, role.field)) for role in ROLES]

    def named_roles(self) -> List[Tuple[Role, RoleQuant]]:
        """The roles run names and labels name: the always-named ones and the active others."""
        return [(role, rq) for role, rq in self.roles() if role.always_named or rq.active]

    @property
    def active(self) -> bool:
        """Whether the model changes at all: a role casts, or GEMM mode accumulates."""
        accumulates = self.gemm is not None and self.gemm.accumulator is not None
        return accumulates or any(rq.active for _, rq in self.roles())

    @functools.cached_property
    def operand_casts(self):
        """GEMM mode's six operand casts (common.gemm.OperandCasts), resolved once per config:
        every layer's forward reads them."""
        return self.gemm.operand_casts(self)

    def to_dict(self) -> dict:
        d = {role.field: rq.to_dict() for role, rq in self.roles()}
        d.update(first_last_fp32=self.first_last_fp32, backend=self.backend)
        if self.gemm is not None:   # absent in the tensor-role mode: older records compare equal
            d["gemm"] = self.gemm.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """Inverse of ``to_dict`` (a run record's ``format``; its other keys, such as family and
        bits_per_element, are ignored; a role it lacks is fp32; no "gemm" key: tensor-role
        mode)."""
        roles = {role.field: RoleQuant(**d[role.field]) for role in ROLES if role.field in d}
        gemm = GemmConfig.from_dict(d["gemm"], RoleQuant) if d.get("gemm") else None
        return cls(first_last_fp32=bool(d.get("first_last_fp32", False)),
                   backend=d.get("backend", "native"), gemm=gemm, **roles)


NO_CAST = RoleQuant()   # fp32: a role that casts nothing


def _check_role_table() -> None:
    """ROLES and QuantConfig's RoleQuant fields name the same roles in the same order."""
    config_fields = [f.name for f in fields(QuantConfig) if f.type == "RoleQuant"]
    if config_fields != [role.field for role in ROLES]:
        raise AssertionError(f"qat.ROLES {[r.field for r in ROLES]} and QuantConfig's role "
                             f"fields {config_fields} differ")


_check_role_table()


def _cast(x: torch.Tensor, role: RoleQuant, backend: str) -> torch.Tensor:
    """Cast one tensor per its role (channel scaling: per output channel, dim 0); identity for
    fp32 roles."""
    if not role.active:
        return x
    if backend == "qtorch":
        from common.qtorch_backend import qtorch_quantize_scaled

        return qtorch_quantize_scaled(x, role.fmt, role.scaling, role.rounding)
    return quantize_scaled(x, role.fmt, scaling=role.scaling, rounding=role.rounding)


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

    def _gemm_weight(self):
        """The weight a GEMM-mode layer hands to its GEMMs: itself, with dw cast per the
        weight-gradient role (straight through when that role is fp32)."""
        return fake_quant(self.weight, NO_CAST, self.qconfig.weight_grad)

    def extra_repr(self) -> str:
        roles = ", ".join(f"{role.key}={rq.short()}" for role, rq in self.qconfig.roles()
                          if role.in_layer)
        mode = f", {self.qconfig.gemm.tag()}" if self.qconfig.gemm is not None else ""
        return f"{super().extra_repr()}, {roles}{mode}"


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """Conv2d whose weight and input are fake-quantized (module docstring), or whose three GEMMs
    cast their own operands (GEMM mode)."""

    def forward(self, x):
        q = self.qconfig
        if q.gemm is not None:
            return gemm_conv2d(x, self._gemm_weight(), self.bias, self.stride, self.padding,
                               q.operand_casts, q.gemm)
        x, w = self._quantized_operands(x)
        return self._conv_forward(x, w, self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """Linear whose weight and input are fake-quantized (module docstring), or whose three GEMMs
    cast their own operands (GEMM mode)."""

    def forward(self, x):
        q = self.qconfig
        if q.gemm is not None:
            return gemm_linear(x, self._gemm_weight(), self.bias, q.operand_casts, q.gemm)
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

