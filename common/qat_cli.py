"""Flags of the quantized-training scripts (FP8, FP4, Posit, BF16 emulated): one place for all.

Every format script accepts the same per-role flags; it only changes their defaults:

    --w-fmt/--a-fmt/--g-fmt/--wg-fmt/--master-fmt   formats of weight, activation (layer input),
                                                    error gradient, weight gradient, master weights
    --w-rounding ... --master-rounding              nearest | stochastic
    --w-scaling/--a-scaling/--g-scaling/--wg-scaling none | tensor (| channel for weights)
    --first-last-fp32                               keep the first conv and the last Linear float32
    --backend                                       native (this project's casts) | qtorch

A block format (mxfp8, mxfp4, nvfp4, ...; docs/block-formats.md) carries its own scale per block,
so its role is cast with scaling none: the script's default scaling gives way to none, and an
explicit --<role>-scaling other than none is refused. A bad value exits 2 with one line naming
what is accepted.
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional, Union

from common import cli
from common.formats import Format, parse_format
from common.qat import (BACKENDS, QuantConfig, RoleQuant, master_cast, quantize_model,
                        storage_bits)
from common.quant import ROUNDINGS, SCALINGS

# role key -> (QuantConfig field, what the flag casts)
ROLE_FLAGS = {
    "w": ("weight", "weight of each Conv2d/Linear (forward)"),
    "a": ("act", "input activation of each Conv2d/Linear (forward)"),
    "g": ("grad", "gradient flowing to each layer's input, the error (backward)"),
    "wg": ("weight_grad", "weight gradient (backward)"),
    "master": ("master", "weights kept by the optimizer, cast after every step"),
}


def format_type(spec: str) -> str:
    """argparse type: a valid format spec, canonicalised ('FP4' -> 'e2m1')."""
    try:
        return parse_format(spec).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# Named formats listed in --help: element formats, then block formats (docs/block-formats.md).
NAMED_FORMATS = ("bf16", "fp16", "e4m3", "e5m2", "e2m1")
NAMED_BLOCK_FORMATS = ("mxfp8", "mx-e5m2", "mxfp6", "mx-e3m2", "mxfp4", "nvfp4")


def accepted_formats(max_bits: Optional[int] = None) -> str:
    """The --<role>-fmt values a script takes, for --help: every spec, or those of at most
    ``max_bits`` bits (what ``check_widths`` lets through; a block format's width is its
    element's) plus fp32."""
    def named(names):
        return ", ".join(n for n in names if max_bits is None or parse_format(n).bits <= max_bits)

    if max_bits is None:
        return (f"fp32, {named(NAMED_FORMATS)}, eXmY, posit<n>es<k>, block formats "
                f"{named(NAMED_BLOCK_FORMATS)}, mx<k>-eXmY")
    return (f"fp32 (unquantized), {named(NAMED_FORMATS)}, eXmY with X+Y <= {max_bits - 1}, "
            f"posit<n>es<k> with n <= {max_bits}, block formats {named(NAMED_BLOCK_FORMATS)}, "
            f"mx<k>-eXmY with X+Y <= {max_bits - 1}")


class _ScalingFlag(argparse.Action):
    """Store a --<role>-scaling value and remember that it was given: a block format replaces a
    default scaling by none but refuses an explicit one (``role_scaling``)."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, value)
        namespace.scalings_given = set(getattr(namespace, "scalings_given", ())) | {self.dest}


def add_quant_args(parser: argparse.ArgumentParser, defaults: Dict[str, str],
                   why: str = "", fmt_defaults_shown: Optional[Dict[str, str]] = None,
                   max_bits: Optional[Dict[str, int]] = None):
    """Add the 'quantization' group. `defaults` maps '<role>_fmt|_rounding|_scaling' to defaults.

    `why` is printed under the group title: each script says there why its defaults are what
    they are (docs/formats.md asks for it). `fmt_defaults_shown` overrides how a default is shown in
    --help, by the same keys (the Posit script derives its formats from --bits/--es).
    `max_bits` (role -> bits, as given to `check_widths`) narrows the formats --help lists.
    """
    shown = fmt_defaults_shown or {}
    max_bits = max_bits or {}
    g = parser.add_argument_group("quantization", why or None)
    for role, (_, what) in ROLE_FLAGS.items():
        fmt_d = defaults.get(f"{role}_fmt", "fp32")
        g.add_argument(f"--{role}-fmt", type=format_type, default=fmt_d, metavar="FMT",
                       help=f"format of the {what}: {accepted_formats(max_bits.get(role))} "
                            f"(default: {shown.get(f'{role}_fmt', fmt_d)})")
    for role in ROLE_FLAGS:
        d = defaults.get(f"{role}_rounding", "nearest")
        g.add_argument(f"--{role}-rounding", choices=ROUNDINGS, default=d,
                       help=f"rounding of the {role} cast (default: {d})")
    for role in ("w", "a", "g", "wg"):
        d = defaults.get(f"{role}_scaling", "none")
        choices = SCALINGS if role == "w" else tuple(s for s in SCALINGS if s != "channel")
        g.add_argument(f"--{role}-scaling", choices=choices, default=d, action=_ScalingFlag,
                       help=f"power-of-two scaling of the {role} cast (floats: absolute maximum "
                            f"to the format's max; posits: rms to 1): none = the format's own "
                            f"range, tensor = per tensor"
                            + (", channel = per output channel" if role == "w" else "")
                            + f"; a block format takes none only (default: "
                              f"{shown.get(f'{role}_scaling', d)}; none for a block format)")
    d = defaults.get("first_last_fp32", False)
    g.add_argument("--first-last-fp32", action=argparse.BooleanOptionalAction, default=d,
                   help=f"keep the first conv and the last Linear in float32 "
                        f"(default: {'on' if d else 'off'})")
    g.add_argument("--backend", choices=BACKENDS, default="native",
                   help="native = this project's exact casts; qtorch = QPyTorch float_quantize and "
                        "qtorch-plus posit_quantize, for parity with results made with them (their "
                        "own semantics, e.g. QPyTorch's e4m3 max is 480) (default: native)")
    return g


def check_widths(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 max_bits: Dict[str, int], family: str) -> None:
    """Refuse (exit 2, one line) a role format wider than the script's family, e.g. a 14-bit
    e4m9 given to the FP8 script (most likely a typo of e4m3); fp32 (unquantized) stays allowed."""
    for role, bits in max_bits.items():
        fmt = parse_format(getattr(args, f"{role}_fmt"))
        if not fmt.is_identity and fmt.bits > bits:
            parser.error(f"--{role}-fmt {fmt.name} is a {fmt.bits}-bit format; the {family} script "
                         f"takes formats of at most {bits} bits for --{role}-fmt (or fp32 to leave "
                         f"it unquantized)")


def role_scaling(args: argparse.Namespace, role: str) -> str:
    """The scaling of one role's cast: its --<role>-scaling, except that a block format, which
    carries its own scale per block, gets none: in place of a default scaling, while an explicit
    other scaling is refused (exit 2, one line)."""
    scaling = getattr(args, f"{role}_scaling")
    fmt = parse_format(getattr(args, f"{role}_fmt"))
    if not fmt.is_block or scaling == "none":
        return scaling
    if f"{role}_scaling" in getattr(args, "scalings_given", ()):
        cli.fail(f"--{role}-scaling {scaling}: --{role}-fmt {fmt.name} is a block format with its "
                 f"own scale per block of {fmt.block_size}; accepted with a block format: "
                 f"--{role}-scaling none (or leave the flag out)")
    return "none"


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig that the parsed flags describe (bad combinations exit 2, one line)."""
    roles = {}
    for role, (field, _) in ROLE_FLAGS.items():
        kw = {"fmt": getattr(args, f"{role}_fmt"), "rounding": getattr(args, f"{role}_rounding")}
        if role != "master":
            kw["scaling"] = role_scaling(args, role)
        roles[field] = RoleQuant(**kw)
    try:
        return QuantConfig(first_last_fp32=args.first_last_fp32, backend=args.backend, **roles)
    except ValueError as e:
        cli.fail(str(e))


def run_tag(q: QuantConfig) -> str:
    """Run-name part from the config, e.g. 'w-e5m2_a-e4m3_g-e5m2-t_fl32'."""
    parts = [f"w-{q.weight.short()}", f"a-{q.act.short()}", f"g-{q.grad.short()}"]
    if q.weight_grad.active:
        parts.append(f"wg-{q.weight_grad.short()}")
    if q.master.active:
        parts.append(f"m-{q.master.short()}")
    if q.first_last_fp32:
        parts.append("fl32")
    if q.backend != "native":
        parts.append(q.backend)
    return "_".join(parts)


def bits_per_element(q: QuantConfig) -> Union[int, float]:
    """Storage bits per element of the forward operands (the wider of weight and activation
    formats), block scales included: 4.25 for mxfp4, 4.5 for nvfp4; an int where it is whole
    (as recorded before block formats existed, so that old and new runs group together)."""
    return max(storage_bits(q.weight.fmt), storage_bits(q.act.fmt))


def describe(q: QuantConfig) -> str:
    """Human label for tables, e.g. 'w=e5m2 a=e4m3 g=e5m2(t), first/last fp32'."""
    def one(key, role):
        tag = role.fmt.name + ("(sr)" if role.rounding == "stochastic" else "")
        tag += {"none": "", "tensor": "(t)", "channel": "(c)"}[role.scaling]
        return f"{key}={tag}"
    parts = [one("w", q.weight), one("a", q.act), one("g", q.grad)]
    if q.weight_grad.active:
        parts.append(one("wg", q.weight_grad))
    if q.master.active:
        parts.append(one("master", q.master))
    text = " ".join(parts)
    if q.first_last_fp32:
        text += ", first/last fp32"
    if q.backend != "native":
        text += f", {q.backend}"
    return text


def plan_quantized(args: argparse.Namespace, family: str, title: str, script: str,
                   q: Optional[QuantConfig] = None) -> dict:
    """Resolve a quantized run from its flags: the keyword arguments of `train.run`.

    family names the run (e.g. 'fp8'), title starts its label (e.g. 'FP8'), script is the path
    recorded in config.json. The model's layers are swapped by `quantize_model`; with a master
    format the weights are cast after every optimizer step. Scripts return this from their
    `plan(argv)`, so the step-time benchmark builds exactly what a script trains.
    """
    q = q or quant_config(args)
    if q.backend == "qtorch":
        from common.qtorch_backend import require_qtorch

        require_qtorch(q)
    fmt = {"family": family, "bits_per_element": bits_per_element(q), **q.to_dict()}
    config = cli.make_config(args, name=cli.script_run_name(f"{family}_{run_tag(q)}", args),
                             label=f"{title} {describe(q)}", format=fmt, script=script)
    return {"config": config, "model_transform": lambda m: quantize_model(m, q),
            "after_step": master_cast if q.master.active else None}
