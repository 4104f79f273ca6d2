"""Flags of the quantized-training scripts (FP8, FP4, Posit, BF16 emulated): one place for all.

Every format script accepts the same per-role flags, one set per row of ``common.qat.ROLES``;
it only changes their defaults:

    --w-fmt/--a-fmt/--g-fmt/--wg-fmt/--master-fmt   formats of weight, activation (layer input),
                                                    error gradient, weight gradient, master weights
    --w-rounding ... --master-rounding              nearest | stochastic
    --w-scaling/--a-scaling/--g-scaling/--wg-scaling none | tensor (| channel for weights)
    --first-last-fp32                               keep the first conv and the last Linear float32
    --backend                                       native (this project's casts) | qtorch
    --gemm, --gemm-recipe, --weight-blocks-2d,      GEMM mode: each of a layer's three GEMMs
    --wgrad-hadamard, --acc FMT, --acc-chunk ...    casts its own operands (docs/gemm.md)

A block format (mxfp8, mxfp4, nvfp4, ...; docs/block-formats.md) carries its own scale per block,
so its role is cast with scaling none: the script's default scaling gives way to none, and an
explicit --<role>-scaling other than none is refused. A bad value exits 2 with one line naming
what is accepted.
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional, Union

from common import cli
from common.accumulate import Accumulator
from common.config import FormatRecord
from common.formats import NAMED_BLOCK_SPECS, NAMED_FLOAT_SPECS, parse_format
from common.gemm import GEMMS, RECIPES, GemmConfig
from common.qat import (
    BACKENDS,
    ROLES,
    QuantConfig,
    Role,
    RoleQuant,
    master_cast,
    quantize_model,
    storage_bits,
)
from common.quant import ROUNDINGS
from common.scaling import Scaling

# What each scaling means, for --help.
SCALING_HELP = {"none": "the format's own range", "tensor": "per tensor",
                "channel": "per output channel"}


def format_type(spec: str) -> str:
    """argparse type: a valid format spec, canonicalised ('FP4' -> 'e2m1')."""
    try:
        return parse_format(spec).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def accepted_formats(max_bits: Optional[int] = None) -> str:
    """The --<role>-fmt values a script takes, for --help: every spec, or those of at most
    ``max_bits`` bits (what ``check_widths`` lets through; a block format's width is its
    element's) plus fp32."""
    def named(names):
        return ", ".join(n for n in names if max_bits is None or parse_format(n).bits <= max_bits)

    if max_bits is None:
        return (f"fp32, {named(NAMED_FLOAT_SPECS)}, eXmY, posit<n>es<k>, block formats "
                f"{named(NAMED_BLOCK_SPECS)}, mx<k>-eXmY")
    return (f"fp32 (unquantized), {named(NAMED_FLOAT_SPECS)}, eXmY with X+Y <= {max_bits - 1}, "
            f"posit<n>es<k> with n <= {max_bits}, block formats {named(NAMED_BLOCK_SPECS)}, "
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
    for role in ROLES:
        fmt_d = defaults.get(f"{role.key}_fmt", "fp32")
        accepted = accepted_formats(max_bits.get(role.key))
        g.add_argument(f"--{role.key}-fmt", type=format_type, default=fmt_d, metavar="FMT",
                       help=f"format of the {role.what}: {accepted} "
                            f"(default: {shown.get(f'{role.key}_fmt', fmt_d)})")
    for role in ROLES:
        d = defaults.get(f"{role.key}_rounding", "nearest")
        g.add_argument(f"--{role.key}-rounding", choices=ROUNDINGS, default=d,
                       help=f"rounding of the {role.key} cast (default: {d})")
    for role in (r for r in ROLES if has_scaling_flag(r)):
        d = defaults.get(f"{role.key}_scaling", "none")
        meanings = ", ".join(f"{s} = {SCALING_HELP[s]}" for s in role.scalings)
        g.add_argument(f"--{role.key}-scaling", choices=role.scalings, default=d,
                       action=_ScalingFlag,
                       help=f"power-of-two scaling of the {role.key} cast (floats: absolute "
                            f"maximum to the format's max; posits: rms to 1): {meanings}; a block "
                            f"format takes none only (default: "
                            f"{shown.get(f'{role.key}_scaling', d)}; none for a block format)")
    d = defaults.get("first_last_fp32", False)
    g.add_argument("--first-last-fp32", action=argparse.BooleanOptionalAction, default=d,
                   help=f"keep the first conv and the last Linear in float32 "
                        f"(default: {'on' if d else 'off'})")
    g.add_argument("--backend", choices=BACKENDS, default="native",
                   help="native = this project's exact casts; qtorch = QPyTorch float_quantize and "
                        "qtorch-plus posit_quantize, for parity with results made with them (their "
                        "own semantics, e.g. QPyTorch's e4m3 max is 480) (default: native)")
    add_gemm_args(parser)
    return g


def _gemm_presets() -> dict:
    """--gemm-recipe NAME -> the flag defaults it sets (explicit flags keep their value)."""
    return {name: dict(r.flags, gemm=True, weight_blocks_2d=r.weight_blocks_2d,
                       wgrad_hadamard=r.hadamard_wgrad) for name, r in RECIPES.items()}


def add_gemm_args(parser: argparse.ArgumentParser):
    """Add the 'GEMM mode' group (docs/gemm.md)."""
    g = parser.add_argument_group(
        "GEMM mode", "Each quantized layer runs its three GEMMs (forward, dgrad, wgrad) with their "
        "own operand casts: --w-* casts the weight, --a-* the input, --g-* the output gradient dy, "
        "block formats along each GEMM's reduction dimension (docs/gemm.md).")
    g.add_argument("--gemm", action=argparse.BooleanOptionalAction, default=False,
                   help="GEMM mode: cast each GEMM's operands; off = the tensor-role mode (cast "
                        "weight and input once in the forward, the error in the backward) "
                        "(default: off)")
    recipes = "; ".join(f"{name}: {r.source}" for name, r in RECIPES.items())
    g.add_argument("--gemm-recipe", choices=tuple(RECIPES), default=None,
                   help=f"a published recipe in one flag (implies --gemm and sets the role "
                        f"flags; explicit flags win): {recipes} (default: none)")
    g.add_argument("--weight-blocks-2d", action=argparse.BooleanOptionalAction, default=False,
                   help="k x k weight blocks over (out, in) at each kernel tap, one scale each, so "
                        "forward and dgrad share one quantized weight (block formats) "
                        "(default: off)")
    g.add_argument("--wgrad-hadamard", action=argparse.BooleanOptionalAction, default=False,
                   help="random 16x16 Hadamard transform of both wgrad operands along the "
                        "positions (default: off)")
    g.add_argument("--hadamard-seed", type=int, default=0, metavar="N",
                   help="seed of the Hadamard transform's random signs (default: 0)")
    g.add_argument("--acc", type=format_type, default=None, metavar="FMT",
                   help="emulate accumulation in FMT (fp16, bf16, e5m7, e8m13, ...) "
                        "(default: float32 GEMMs)")
    g.add_argument("--acc-chunk", type=int, default=32, metavar="K",
                   help="products summed exactly before each rounding to --acc (default: 32)")
    g.add_argument("--acc-promote", type=int, default=None, metavar="P",
                   help="add the accumulator into float32 every P chunks (default: never)")
    g.add_argument("--acc-rounding", choices=ROUNDINGS, default="nearest",
                   help="rounding of the accumulator (default: nearest)")
    g.add_argument("--acc-gemms", default=",".join(GEMMS), metavar="LIST",
                   help=f"GEMMs that accumulate in --acc, comma-separated from {', '.join(GEMMS)} "
                        f"(default: all three)")
    parser.presets = {**getattr(parser, "presets", {}), "--gemm-recipe": _gemm_presets()}
    return g


def gemm_config(args: argparse.Namespace) -> Optional[GemmConfig]:
    """The GemmConfig the GEMM-mode flags describe (None: tensor-role mode); exits 2 on a bad
    combination."""
    gemm_only = {"--weight-blocks-2d": args.weight_blocks_2d, "--wgrad-hadamard":
                 args.wgrad_hadamard, "--acc": args.acc is not None}
    if not args.gemm:
        given = [flag for flag, on in gemm_only.items() if on]
        if given:
            cli.fail(f"{given[0]} needs GEMM mode; accepted: add --gemm (or a --gemm-recipe)")
        return None
    try:
        acc = None
        if args.acc is not None:
            acc = Accumulator(args.acc, args.acc_chunk, args.acc_promote, args.acc_rounding)
        return GemmConfig(weight_blocks_2d=args.weight_blocks_2d,
                          hadamard_wgrad=args.wgrad_hadamard, hadamard_seed=args.hadamard_seed,
                          accumulator=acc,
                          accumulate=tuple(x for x in args.acc_gemms.split(",") if x))
    except ValueError as e:
        cli.fail(str(e))


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


def has_scaling_flag(role: Role) -> bool:
    """Whether the role has a --<key>-scaling flag: it accepts more than "none"."""
    return role.scalings != ("none",)


def role_scaling(args: argparse.Namespace, role: Role) -> Scaling:
    """The scaling of one role's cast: its --<key>-scaling, except that a block format, which
    carries its own scale per block, gets none: in place of a default scaling, while an explicit
    other scaling is refused (exit 2, one line)."""
    if not has_scaling_flag(role):
        return Scaling()
    value = getattr(args, f"{role.key}_scaling")
    requested = Scaling.parse(value)
    fmt = parse_format(getattr(args, f"{role.key}_fmt"))
    if not (fmt.is_block and requested.rescales):
        return requested
    if f"{role.key}_scaling" in getattr(args, "scalings_given", ()):
        cli.fail(f"--{role.key}-scaling {value}: --{role.key}-fmt {fmt.name} is a block format "
                 f"with its own scale per block of {fmt.block_size}; accepted with a block "
                 f"format: --{role.key}-scaling none (or leave the flag out)")
    return Scaling()


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig that the parsed flags describe (bad combinations exit 2, one line)."""
    try:
        roles = {role.field: RoleQuant(fmt=getattr(args, f"{role.key}_fmt"),
                                       rounding=getattr(args, f"{role.key}_rounding"),
                                       scaling=role_scaling(args, role))
                 for role in ROLES}
        return QuantConfig(first_last_fp32=args.first_last_fp32, backend=args.backend,
                           gemm=gemm_config(args), **roles)
    except ValueError as e:
        cli.fail(str(e))


def run_tag(q: QuantConfig) -> str:
    """Run-name part from the config, e.g. 'w-e5m2_a-e4m3_g-e5m2-t_fl32'."""
    parts = [f"{role.name_tag}-{rq.short()}" for role, rq in q.named_roles()]
    if q.first_last_fp32:
        parts.append("fl32")
    if q.backend != "native":
        parts.append(q.backend)
    if q.gemm is not None:
        parts.append(q.gemm.tag())
    return "_".join(parts)


def bits_per_element(q: QuantConfig) -> Union[int, float]:
    """Storage bits per element of the forward operands (the wider of weight and activation
    formats), block scales included: 4.25 for mxfp4, 4.5 for nvfp4; an int where it is whole
    (as recorded before block formats existed, so that old and new runs group together)."""
    return max(storage_bits(q.weight.fmt), storage_bits(q.act.fmt))


def describe(q: QuantConfig) -> str:
    """Human label for tables, e.g. 'w=e5m2 a=e4m3 g=e5m2(t), first/last fp32'."""
    def one(role, rq):
        tag = rq.fmt.name + ("(sr)" if rq.rounding == "stochastic" else "")
        tag += f"({rq.scaling.tag})" if rq.scaling.tag else ""
        return f"{role.key}={tag}"
    text = " ".join(one(role, rq) for role, rq in q.named_roles())
    if q.first_last_fp32:
        text += ", first/last fp32"
    if q.backend != "native":
        text += f", {q.backend}"
    if q.gemm is not None:
        text += f", {q.gemm.describe()}"
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
    fmt = FormatRecord.quantized(family, bits_per_element(q), q.to_dict()).to_dict()
    config = cli.make_config(args, name=cli.script_run_name(f"{family}_{run_tag(q)}", args),
                             label=f"{title} {describe(q)}", format=fmt, script=script)
    return {"config": config, "model_transform": lambda m: quantize_model(m, q),
            "after_step": master_cast if q.master.active else None}
