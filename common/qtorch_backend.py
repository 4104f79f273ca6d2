"""`--backend qtorch`: casts through QPyTorch (floats) and qtorch-plus (posits) instead.

For parity with results made with those libraries, with THEIR semantics, not this project's
(docs/formats.md): QPyTorch's float_quantize reserves no exponent for inf/NaN (its "e4m3" max is
480, not 448), rounds ties away from zero and does not saturate like OCP; qtorch-plus has no
stochastic posit rounding (it silently rounds to nearest), so that combination is refused here
rather than run wrongly. Power-of-two scaling is this project's (`quant.quantize_scaled`), only
the cast differs.

Both libraries compile C++ at their first import (needs ninja; README, Install and test), so
they are imported only when this backend is asked for.
"""
from __future__ import annotations

import os
from typing import Union

import torch

from common.errors import UserError
from common.formats import Format
from common.quant import quantize_scaled
from common.scaling import Scaling

INSTALL = "pip install qtorch==0.3.0 qtorch-plus==0.2.0 ninja"


def import_isolated(pkg: str):
    """`<pkg>.quant` for pkg qtorch or qtorch_plus, each JIT-built in its own extension folder.

    Both name their C++ extension "quant_cpu": in torch's shared default folder, importing one
    invalidates the other's build, so every run would rebuild. Raises what the
    import raises (ImportError, or the build's error where no compiler is found).
    """
    old = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(os.path.expanduser("~"), ".cache",
                                                      f"torch_extensions_{pkg}")
    try:
        return __import__(f"{pkg}.quant", fromlist=["quant"])
    finally:
        if old is None:
            os.environ.pop("TORCH_EXTENSIONS_DIR", None)
        else:
            os.environ["TORCH_EXTENSIONS_DIR"] = old


def _libs():
    """(float_quantize, posit_quantize), or a one-line UserError saying how to get them."""
    try:
        float_quantize = import_isolated("qtorch").float_quantize
        posit_quantize = import_isolated("qtorch_plus").posit_quantize
    except Exception as e:  # ImportError, or the C++ build failing at import
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--backend qtorch needs QPyTorch and qtorch-plus ({INSTALL}; they compile "
                        f"C++ at first import): {type(e).__name__}: {first}") from None
    return float_quantize, posit_quantize


def require_qtorch(qconfig) -> None:
    """Check up front that every role of `qconfig` can run on this backend (exit 2 otherwise)."""
    for role, r in qconfig.roles():
        if r.active and r.fmt.is_block:
            raise UserError(f"--backend qtorch: QPyTorch has no block formats; {role.field} is "
                            f"{r.fmt.name}: use --backend native")
        if r.active and r.fmt.is_posit and r.rounding == "stochastic":
            raise UserError(f"--backend qtorch: qtorch-plus has no stochastic posit rounding (it "
                            f"silently rounds to nearest); {role.field} is {r.fmt.name} "
                            f"stochastic: use --backend native")
    _libs()


def qtorch_cast(x: torch.Tensor, fmt: Format, rounding: str = "nearest", saturate: bool = True,
                generator=None) -> torch.Tensor:
    """Cast with the library that the format belongs to (`saturate`/`generator` do not apply)."""
    float_quantize, posit_quantize = _libs()
    x = x.contiguous()
    if fmt.is_posit:
        return posit_quantize(x, nsize=fmt.bits, es=fmt.es, rounding="nearest")
    return float_quantize(x, exp=fmt.exp_bits, man=fmt.man_bits, rounding=rounding)


def qtorch_quantize_scaled(x: torch.Tensor, fmt: Format, scaling: Union[str, Scaling],
                           rounding: str, channel_dim: int = 0) -> torch.Tensor:
    """This project's power-of-two scaling around the library's cast (``quantize_scaled``'s
    arguments)."""
    return quantize_scaled(x, fmt, scaling=scaling, rounding=rounding, channel_dim=channel_dim,
                           cast=qtorch_cast)
