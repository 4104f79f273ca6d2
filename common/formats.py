"""Number formats of this project: one frozen `Format` object per spec string.

Every low-precision format is emulated in float32 ("fake quantization"), so a format is only
accepted when float32 holds every one of its values exactly: at most 8 exponent and 23 mantissa
bits for floats, a posit scale range inside float32's normal range. Anything else is refused with
a one-line ValueError that names what is accepted, never silently widened
(docs/formats.md; block formats: docs/block-formats.md).

Spec strings (case-insensitive, surrounding blanks ignored):

==========================  =================================================================
``fp32``, ``none``          no quantization (identity); ``e8m23`` is the same format
``bf16``                    bfloat16 (IEEE-like E8M7); ``e8m7`` is the same format
``fp16``                    IEEE binary16 (E5M10); ``e5m10`` is the same format
``e4m3``                    OCP FP8 E4M3 ("E4M3FN"): no inf, NaN only S.1111.111, max 448
``e5m2``                    OCP FP8 E5M2, IEEE-like: inf and NaN, max 57344
``e2m1`` (alias ``fp4``)    OCP MX FP4: no inf, no NaN, max 6
``e2m3``, ``e3m2``          OCP MX FP6: no inf, no NaN, max 7.5 and 28
other ``eXmY``              IEEE 754-like, 2 <= X <= 8, 0 <= Y <= 23: bias 2^(X-1)-1, top
                            exponent reserved for inf/NaN, subnormals kept
``posit<n>es<k>``           posit(n, es), 2 <= n <= 16, useed^(n-2) <= 2^126
``mxfp8`` (``mx-e4m3``)     OCP MX block format: 32 e4m3 elements share one E8M0 scale
``mx-e5m2``                 ... e5m2 elements
``mxfp6`` (``mx-e2m3``)     ... e2m3 elements
``mx-e3m2``                 ... e3m2 elements
``mxfp4`` (``mx-e2m1``)     ... e2m1 elements
``mx<k>-<elem>``            MX with block size k (1 <= k <= 4096) and any eXmY element of at
                            most 8 bits, e.g. ``mx16-e2m1``; ``mx32-<elem>`` = ``mx-<elem>``
``nvfp4``                   NVIDIA FP4: 16 e2m1 elements share one e4m3 scale, times one
                            float32 scale per tensor
==========================  =================================================================

Block formats (``kind == "block"``) are applied by ``common.blocks`` along dim 1 of a tensor; see
docs/block-formats.md. Their Format holds the element's Format (``element``), the block size
(``block_size``), the kind of block scale (``scale_kind``: "e8m0" or "e4m3") and whether a
float32 per-tensor scale comes on top (``tensor_scale``). ``bits`` is the element's width,
``bits_per_element`` adds the block scale's share (mxfp4: 4 + 8/32 = 4.25).

Why aliases collapse to one canonical name (``e8m7`` -> ``bf16``): one format, one name, so run
names and cached kernels never differ for the same set of values.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Union

__all__ = [
    "Format",
    "parse_format",
    "ACCEPTED_SPECS",
    "NAMED_FLOAT_SPECS",
    "NAMED_BLOCK_SPECS",
    "FP32_MAX",
    "BF16_MAX",
    "FP16_MAX",
    "E4M3_MAX",
    "E5M2_MAX",
    "E2M1_MAX",
    "E2M3_MAX",
    "E3M2_MAX",
    "E8M0_MIN_EXP",
    "E8M0_MAX_EXP",
    "E8M0_BITS",
    "MX_BLOCK_SIZE",
    "NVFP4_BLOCK_SIZE",
]

# Largest finite values, named after the standards that define them (IEEE 754, OCP FP8 v1.0,
# OCP Microscaling v1.0). The parser derives every format's max from its bit layout; these named
# constants are what the derivation must reproduce (checked once at import, below).
FP32_MAX = (2.0 - 2.0**-23) * 2.0**127  # IEEE binary32
BF16_MAX = (2.0 - 2.0**-7) * 2.0**127  # bfloat16, 3.3895e38
FP16_MAX = 65504.0  # IEEE binary16
E4M3_MAX = 448.0  # OCP FP8 E4M3 (S.1111.110)
E5M2_MAX = 57344.0  # OCP FP8 E5M2
E2M1_MAX = 6.0  # OCP MX FP4 E2M1
E2M3_MAX = 7.5  # OCP MX FP6 E2M3
E3M2_MAX = 28.0  # OCP MX FP6 E3M2

# Block scales (OCP Microscaling v1.0 section 5.4; NVIDIA NVFP4). E8M0: an 8-bit biased exponent,
# a power of two 2^-127 .. 2^127 (code 0xFF is NaN). NVFP4's block scale is a positive e4m3.
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127
E8M0_BITS = 8
MX_BLOCK_SIZE = 32  # OCP MX v1.0: k = 32 for every concrete format
NVFP4_BLOCK_SIZE = 16
_MAX_BLOCK_SIZE = 4096
_MAX_ELEMENT_BITS = 8
_SCALE_BITS = {"e8m0": E8M0_BITS, "e4m3": 8}
# OCP MX v1.0 names (k = 32) and their element formats; canonical name per element
_MX_NAMES = {"mxfp8": "e4m3", "mxfp6": "e2m3", "mxfp4": "e2m1"}
_MX_CANONICAL = {elem: name for name, elem in _MX_NAMES.items()}

# Float layouts of the named OCP formats. "fn": all exponents finite, only S.1..1.1..1 is NaN
# (OCP FP8 E4M3). "mx": every code is a finite number, no inf and no NaN (OCP MX FP4/FP6).
# Every other eXmY is "ieee": the all-ones exponent is reserved for inf and NaN.
_OCP_LAYOUTS = {(4, 3): "fn", (2, 1): "mx", (2, 3): "mx", (3, 2): "mx"}
_NAMED_FLOATS = {(8, 7): "bf16", (5, 10): "fp16", (8, 23): "fp32"}
_ALIASES = {"none": "e8m23", "fp4": "e2m1", "bf16": "e8m7", "fp16": "e5m10", "fp32": "e8m23"}

# float32: the emulation carrier. Posit scales must stay inside its normal range so that every
# posit value, minpos included, is a normal float32.
_FLOAT32_MIN_NORMAL_EXP = -126
_MAX_POSIT_BITS = 16
_MAX_EXP_BITS = 8
_MAX_MAN_BITS = 23

# The named specs that help texts list (the script flags' --help), in that order: floats, then
# block formats. A new named format is parsed below and listed here.
NAMED_FLOAT_SPECS = ("bf16", "fp16", "e4m3", "e5m2", "e2m1")
NAMED_BLOCK_SPECS = ("mxfp8", "mx-e5m2", "mxfp6", "mx-e3m2", "mxfp4", "nvfp4")

ACCEPTED_SPECS = (
    "fp32/none, bf16, fp16, e4m3, e5m2, e2m1 (fp4), e2m3, e3m2, "
    "eXmY (2<=X<=8, 0<=Y<=23), posit<n>es<k> (2<=n<=16, (n-2)*2^k<=126), "
    "block formats mxfp8 (mx-e4m3), mx-e5m2, mxfp6 (mx-e2m3), mx-e3m2, mxfp4 (mx-e2m1), "
    f"mx<k>-eXmY (1<=k<={_MAX_BLOCK_SIZE}, element of at most {_MAX_ELEMENT_BITS} bits), nvfp4"
)


@dataclass(frozen=True)
class Format:
    """One number format, as parsed from its spec string.

    Fields shared by all kinds: ``name`` (canonical spec, ``str(fmt)``), ``kind``
    ("none" | "float" | "posit"), ``bits`` (storage width), ``max`` (largest finite value),
    ``min_subnormal`` (smallest positive value; minpos for posits), ``has_inf``, ``has_nan``.
    Floats also fill ``exp_bits``, ``man_bits``, ``bias``, ``max_exp`` (unbiased exponent of
    ``max``), ``min_normal`` and ``layout`` ("ieee" | "fn" | "mx", see the module docstring);
    posits fill ``es`` (and ``min_normal`` is None: posits have no subnormals).

    Block formats (kind "block") fill ``element`` (the element's Format), ``block_size``,
    ``scale_kind`` ("e8m0": a power of two 2^-127..2^127, OCP MX; "e4m3": a positive e4m3 in
    [2^-6, 448], NVFP4) and ``tensor_scale`` (NVFP4: one float32 scale per tensor on top).
    ``bits`` is the element's width and ``exp_bits``/``man_bits`` its layout; ``bias``,
    ``max_exp``, ``layout`` and ``es`` are None (see ``element``). The range fields describe
    element value x block scale over every block scale the scale kind allows, which is what a
    user asks of a format ("how large, how small can a value be"):
    MX: ``max`` = element max * 2^127 (beyond float32 for every element: no float32 input
    reaches it, each block saturates at element max * its own scale), ``min_normal`` and
    ``min_subnormal`` = the element's * 2^-127. NVFP4: ``max`` = 6 * 448 = 2688,
    ``min_normal`` = 1 * 2^-6, ``min_subnormal`` = 0.5 * 2^-6, all in units of the per-tensor
    scale g (g = amax/2688 maps the tensor's absolute maximum to ``max``). ``has_nan``: True
    (NaN stays NaN; a block holding NaN or inf becomes NaN); ``has_inf``: False.
    """

    name: str
    kind: str
    bits: int
    max: float
    min_subnormal: float
    min_normal: Optional[float] = None
    exp_bits: Optional[int] = None
    man_bits: Optional[int] = None
    bias: Optional[int] = None
    max_exp: Optional[int] = None
    layout: Optional[str] = None
    es: Optional[int] = None
    has_inf: bool = False
    has_nan: bool = False
    block_size: Optional[int] = None
    scale_kind: Optional[str] = None
    element: Optional["Format"] = None
    tensor_scale: bool = False

    def __str__(self) -> str:
        return self.name

    @property
    def is_identity(self) -> bool:
        """True for fp32/none: quantize() returns its input unchanged."""
        return self.kind == "none"

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def is_posit(self) -> bool:
        return self.kind == "posit"

    @property
    def is_block(self) -> bool:
        """True for block-scaled formats (OCP MX, NVFP4): see common/blocks.py."""
        return self.kind == "block"

    @property
    def bits_per_element(self) -> float:
        """Storage per element, the block scale's share included: bits + 8/block_size for
        block formats (mxfp4: 4.25, nvfp4: 4.5; NVFP4's one float32 per tensor, 32/numel bits,
        is left out as negligible), ``bits`` for every other format."""
        if self.is_block:
            return self.bits + _SCALE_BITS[self.scale_kind] / self.block_size
        return float(self.bits)

    @property
    def min_exp(self) -> Optional[int]:
        """Unbiased exponent of the smallest normal (floats), 1 - bias."""
        return None if self.bias is None else 1 - self.bias


def _bad(spec: str, why: str = "") -> ValueError:
    detail = f" ({why})" if why else ""
    return ValueError(f"unsupported number format {spec!r}{detail}; accepted: {ACCEPTED_SPECS}")


def _float_format(spec: str, x: int, y: int) -> Format:
    """IEEE-like / OCP float with x exponent and y mantissa bits."""
    if not 2 <= x <= _MAX_EXP_BITS:
        raise _bad(spec, f"{x} exponent bits: float32 emulation needs 2..{_MAX_EXP_BITS}")
    if not 0 <= y <= _MAX_MAN_BITS:
        raise _bad(spec, f"{y} mantissa bits: float32 emulation needs 0..{_MAX_MAN_BITS}")
    if (x, y) == (8, 23):
        return _FP32
    layout = _OCP_LAYOUTS.get((x, y), "ieee")
    bias = 2 ** (x - 1) - 1
    if layout == "ieee":
        max_exp = 2**x - 2 - bias  # all-ones exponent reserved for inf/NaN
        max_val = (2.0 - 2.0**-y) * 2.0**max_exp
    elif layout == "fn":
        max_exp = 2**x - 1 - bias  # top exponent finite, all-ones mantissa there is NaN
        max_val = (2.0 - 2.0 ** (1 - y)) * 2.0**max_exp
    else:  # "mx": every code finite
        max_exp = 2**x - 1 - bias
        max_val = (2.0 - 2.0**-y) * 2.0**max_exp
    min_exp = 1 - bias
    return Format(
        name=_NAMED_FLOATS.get((x, y), f"e{x}m{y}"),
        kind="float",
        bits=1 + x + y,
        max=max_val,
        min_subnormal=2.0 ** (min_exp - y),
        min_normal=2.0**min_exp,
        exp_bits=x,
        man_bits=y,
        bias=bias,
        max_exp=max_exp,
        layout=layout,
        has_inf=layout == "ieee",
        has_nan=layout != "mx",
    )


def _posit_format(spec: str, n: int, es: int) -> Format:
    if not 2 <= n <= _MAX_POSIT_BITS:
        raise _bad(spec, f"posit width {n}: accepted 2..{_MAX_POSIT_BITS}")
    if es > 6 or (n - 2) * 2**es > -_FLOAT32_MIN_NORMAL_EXP:
        raise _bad(spec, f"posit({n},{es}) scale range exceeds float32")
    top = (n - 2) * 2**es  # maxpos = useed^(n-2) = 2^top
    return Format(
        name=f"posit{n}es{es}",
        kind="posit",
        bits=n,
        max=2.0**top,
        min_subnormal=2.0**-top,
        es=es,
        has_inf=False,
        has_nan=True,  # NaR, emulated as NaN
    )


_FP32 = Format(
    name="fp32",
    kind="none",
    bits=32,
    max=FP32_MAX,
    min_subnormal=2.0**-149,
    min_normal=2.0**-126,
    exp_bits=8,
    man_bits=23,
    bias=127,
    max_exp=127,
    layout="ieee",
    has_inf=True,
    has_nan=True,
)

_FLOAT_RE = re.compile(r"e(\d{1,3})m(\d{1,3})")
_POSIT_RE = re.compile(r"posit(\d{1,3})es(\d{1,3})")
_MX_RE = re.compile(r"mx(\d{1,6})?-(.+)")


def _mx_format(spec: str, k: int, elem_spec: str) -> Format:
    """OCP MX: blocks of k elements of `elem_spec` (an eXmY of at most 8 bits) and one E8M0
    scale. Range fields: element value * E8M0 scale 2^-127 .. 2^127 (see Format)."""
    if not 1 <= k <= _MAX_BLOCK_SIZE:
        raise _bad(spec, f"block size {k}: accepted 1..{_MAX_BLOCK_SIZE}")
    why = f"block element {elem_spec!r}: accepted an eXmY float of at most {_MAX_ELEMENT_BITS}"
    why += " bits"
    try:
        elem = _parse_str(elem_spec)
    except ValueError:
        raise _bad(spec, why) from None
    if elem.kind != "float" or elem.bits > _MAX_ELEMENT_BITS:
        raise _bad(spec, f"{why}, not {elem.bits}-bit {elem.name}")
    if k == MX_BLOCK_SIZE:
        name = _MX_CANONICAL.get(elem.name, f"mx-{elem.name}")
    else:
        name = f"mx{k}-{elem.name}"
    return Format(
        name=name,
        kind="block",
        bits=elem.bits,
        max=elem.max * 2.0**E8M0_MAX_EXP,
        min_subnormal=elem.min_subnormal * 2.0**E8M0_MIN_EXP,
        min_normal=elem.min_normal * 2.0**E8M0_MIN_EXP,
        exp_bits=elem.exp_bits,
        man_bits=elem.man_bits,
        has_inf=False,
        has_nan=True,
        block_size=k,
        scale_kind="e8m0",
        element=elem,
    )


def _nvfp4_format() -> Format:
    """NVFP4: blocks of 16 e2m1 elements, one positive e4m3 scale per block (clamped to
    [2^-6, 448]), one float32 scale per tensor. Range fields in units of the tensor scale."""
    elem, scale = _parse_str("e2m1"), _parse_str("e4m3")
    return Format(
        name="nvfp4",
        kind="block",
        bits=elem.bits,
        max=elem.max * scale.max,
        min_subnormal=elem.min_subnormal * scale.min_normal,
        min_normal=elem.min_normal * scale.min_normal,
        exp_bits=elem.exp_bits,
        man_bits=elem.man_bits,
        has_inf=False,
        has_nan=True,
        block_size=NVFP4_BLOCK_SIZE,
        scale_kind="e4m3",
        element=elem,
        tensor_scale=True,
    )


def parse_format(spec: Union[str, Format]) -> Format:
    """Turn a spec string (see the module docstring) into its frozen `Format`.

    A `Format` is returned as is, so every API can take either. ``parse_format(str(f)) == f``.
    Raises ValueError (one line, naming what is accepted) for anything else.
    """
    if isinstance(spec, Format):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"number format must be a spec string or Format, got {type(spec).__name__}")
    fmt = _PARSED.get(spec)
    if fmt is None:
        fmt = _parse_str(spec)
        if len(_PARSED) < 4096:
            _PARSED[spec] = fmt
    return fmt


# Parsed spec strings: quantize parses its spec on every call. (A plain dict, not lru_cache:
# torch.compile warns about tracing through lru_cache wrappers.)
_PARSED: dict = {}


def _parse_str(spec: str) -> Format:
    s = spec.strip().lower()
    s = _ALIASES.get(s, s)
    m = _FLOAT_RE.fullmatch(s)
    if m:
        return _float_format(spec, int(m.group(1)), int(m.group(2)))
    m = _POSIT_RE.fullmatch(s)
    if m:
        return _posit_format(spec, int(m.group(1)), int(m.group(2)))
    if s == "nvfp4":
        return _nvfp4_format()
    if s in _MX_NAMES:
        return _mx_format(spec, MX_BLOCK_SIZE, _MX_NAMES[s])
    m = _MX_RE.fullmatch(s)
    if m:
        k = MX_BLOCK_SIZE if m.group(1) is None else int(m.group(1))
        return _mx_format(spec, k, m.group(2))
    raise _bad(spec)


def _self_check() -> None:
    """The layouts above must reproduce the maxima the standards name (cheap, runs at import)."""
    for spec, want in (("bf16", BF16_MAX), ("fp16", FP16_MAX), ("e4m3", E4M3_MAX),
                       ("e5m2", E5M2_MAX), ("e2m1", E2M1_MAX), ("e2m3", E2M3_MAX),
                       ("e3m2", E3M2_MAX)):
        got = parse_format(spec).max
        if got != want:  # pragma: no cover - a broken edit of the layout table
            raise AssertionError(f"{spec}: derived max {got} != standard {want}")
    assert math.isfinite(FP32_MAX)


_self_check()
