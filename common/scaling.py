"""What a scaled cast's scale is: one typed description instead of strings checked everywhere.

A ``Scaling`` says where one scale applies (``granularity``: none, tensor, channel or block),
along which dimension (``axis``: the channel dim with one scale per slice, or the dim the blocks
run along) and how the scale is chosen (``rule``), as docs/formats.md ("Scaling") and
docs/block-formats.md ("Scale rules") define them:

- ``AMAX_TO_MAX`` (floats): a power of two that puts the absolute maximum in (max/2, max],
  within a factor 2 of the format's largest value;
- ``RMS_TO_ONE`` (posits): a power of two that puts the root mean square at the power of two
  nearest to 1, where a posit is most precise;
- ``MX_BLOCK`` / ``NVFP4_BLOCK`` (block formats): the format's own scale per block (E8M0 from
  the block's maximum; E4M3 on a float32 tensor scale), computed by common/blocks.py.

Users keep writing strings (``scaling="tensor"``, ``--w-scaling channel``): ``Scaling.parse``
turns one into a request (granularity and axis), ``Scaling.for_format`` resolves the request for
a format (its rule; ``block`` for a block format, which carries its own scaling, so it takes
only "none"; ``none`` for fp32, which casts nothing). ``flag`` gives the string back for run
names and records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .formats import Format

__all__ = ["Scaling", "SCALINGS", "AMAX_TO_MAX", "RMS_TO_ONE", "MX_BLOCK", "NVFP4_BLOCK",
           "BLOCK_AXIS"]

# The strings users pass (scaling=..., --<role>-scaling): block scaling comes with a block format.
SCALINGS = ("none", "tensor", "channel")
GRANULARITIES = SCALINGS + ("block",)

AMAX_TO_MAX = "amax-to-max"
RMS_TO_ONE = "rms-to-1"
MX_BLOCK = "mx-block"
NVFP4_BLOCK = "nvfp4-block"
BLOCK_RULES = {"e8m0": MX_BLOCK, "e4m3": NVFP4_BLOCK}   # Format.scale_kind -> rule

BLOCK_AXIS = 1           # blocks run along dim 1: the reduction dim of the forward GEMM
WEIGHT_CHANNEL_AXIS = 0  # "channel": one scale per output channel of a weight

_DEFAULT_AXES = {"channel": WEIGHT_CHANNEL_AXIS, "block": BLOCK_AXIS}

# Short marks of the string forms, for run names ("e2m1-c") and labels ("e2m1(c)").
_TAGS = {"none": "", "tensor": "t", "channel": "c"}


@dataclass(frozen=True)
class Scaling:
    """One scaling: granularity (none | tensor | channel | block), axis (channel: the dim with
    one scale per slice; block: the dim the blocks run along; else None) and rule (one of the
    module's rule constants; None before ``for_format`` and for none)."""

    granularity: str = "none"
    axis: Optional[int] = None
    rule: Optional[str] = None

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown scaling {self.granularity!r}; accepted: "
                             f"{', '.join(SCALINGS)}")
        if self.axis is None and self.granularity in _DEFAULT_AXES:
            object.__setattr__(self, "axis", _DEFAULT_AXES[self.granularity])

    @classmethod
    def parse(cls, spec: Union[str, "Scaling"],
              channel_dim: int = WEIGHT_CHANNEL_AXIS) -> "Scaling":
        """A request from a string ("none", "tensor", "channel"; channel_dim: the channel
        scaling's axis) or a Scaling (returned as it is). Bad input: ValueError naming what is
        accepted."""
        if isinstance(spec, Scaling):
            return spec
        if spec not in SCALINGS:
            raise ValueError(f"unknown scaling {spec!r}; accepted: {', '.join(SCALINGS)}")
        return cls(spec, channel_dim if spec == "channel" else None)

    def for_format(self, fmt: Format) -> "Scaling":
        """This request resolved for ``fmt``: the rule that chooses its scale. A block format
        gives block scaling along dim 1 and refuses any other (it carries its own); fp32 and
        none give none."""
        if fmt.is_block:
            if self.rescales:
                raise ValueError(f"{self.granularity} scaling of {fmt}: a block format carries "
                                 f"its own scaling (one scale per block of {fmt.block_size}); "
                                 f"accepted: scaling='none'")
            return Scaling("block", BLOCK_AXIS, BLOCK_RULES[fmt.scale_kind])
        if self.granularity == "block":
            raise ValueError(f"block scaling of {fmt}: only a block format (mxfp8, mxfp4, nvfp4, "
                             f"...) scales per block; accepted: {', '.join(SCALINGS)}")
        if self.granularity == "none" or fmt.is_identity:
            return Scaling()
        return Scaling(self.granularity, self.axis, RMS_TO_ONE if fmt.is_posit else AMAX_TO_MAX)

    @property
    def rescales(self) -> bool:
        """Whether the cast is wrapped in a power-of-two scale (tensor, channel): none casts the
        format's own range, block leaves the scales to the format."""
        return self.granularity in ("tensor", "channel")

    @property
    def flag(self) -> str:
        """The string form (--<role>-scaling, records, run names): a block format's own scaling
        is "none", nothing on top of it."""
        return "none" if self.granularity == "block" else self.granularity

    @property
    def tag(self) -> str:
        """Short mark of ``flag``: "" (none), "t" (tensor), "c" (channel)."""
        return _TAGS[self.flag]

    def __str__(self) -> str:
        return self.flag
