"""BF16 training of CIFAR ResNets: real mixed precision (torch.autocast) or exact bf16 emulation.

    cd BF16 && python bf16_train.py                      # autocast: bf16 convs/matmuls, fp32 master
    cd BF16 && python bf16_train.py --mode emulated      # every w/a/g cast to bf16 by the casts

autocast runs convolutions and matmuls in bfloat16 on the hardware (CUDA, or a CPU with bf16
units) with float32 weights, BatchNorm and loss: what a BF16 training run really costs. emulated
casts weights, activations and gradients to bf16 through the quantized layers (float32
arithmetic on bf16 values), comparable bit for bit with the other formats' emulation.

Without --mode, a CPU run first checks (common/hardware.py, a one-time probe of well under a
second) whether this CPU runs bf16 convolutions faster than float32. Where it does not (no AMX or
AVX512-BF16, e.g. an AVX2-only AMD EPYC, where oneDNN's bf16 convolutions ran ten times slower
than float32), the run uses --mode emulated and says so in one line; --mode autocast forces it.
A --resume keeps the mode the run was started in (another CPU's probe may choose the other).
Run folder: runs/bf16_autocast_<model>_<recipe>_e<epochs>_s<seed>/ or
runs/bf16_<roles>_<model>_<recipe>_e<epochs>_s<seed>/.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from common import cli, hardware, qat_cli, runs, train  # noqa: E402  (after the sys.path line)
from common.config import FormatRecord  # noqa: E402

DEFAULTS = {"w_fmt": "bf16", "a_fmt": "bf16", "g_fmt": "bf16"}
WHY = "Used by --mode emulated only (autocast decides its own casts)."
MODES = ("autocast", "emulated")


def choose_mode(device_flag: str) -> str:
    """autocast where the device runs bf16 convolutions fast, else emulated; says which and why
    in one line (rank 0 only under torchrun)."""
    device = train.resolve_device(device_flag)
    fast, ratio = hardware.bf16_autocast_speed(device)
    if device.type == "cuda":
        why = "autocast (CUDA)"
    elif fast:
        why = (f"autocast: this CPU ran a bf16 convolution step in {ratio:.2f}x the float32 time "
               f"(pass --mode emulated for exact bf16 emulation instead)")
    else:
        why = (f"--mode emulated, not autocast: this CPU runs bf16 convolutions {ratio:.1f}x "
               f"slower than float32 (no AMX or AVX512-BF16 path); emulation casts the same bf16 "
               f"operands in float32 arithmetic. Pass --mode autocast to force autocast")
    if os.environ.get("RANK", "0") == "0":
        print(f"bf16: {why}", flush=True)
    return "autocast" if fast else "emulated"


def mode_of_existing_run(args) -> "str | None":
    """For --resume: the mode of the run it continues (its config.json: autocast or emulated),
    found under --name, else under either mode's default name; None when there is none."""
    autocast_name = cli.script_run_name("bf16_autocast", args)
    names = [args.name] if args.name else [
        autocast_name, qat_cli.plan_quantized(args, "bf16", "BF16 emulated", "-")["config"].name]
    for name in names:
        run_dir = cli.make_config(args, name=name).run_dir
        fmt = ((runs.read_json(run_dir / runs.CONFIG) or {}).get("config") or {}).get("format")
        if isinstance(fmt, dict) and fmt.get("family") == "bf16":
            return "autocast" if fmt.get("mode") == "autocast" else "emulated"
    return None


def plan(argv=None):
    """Parse the flags: autocast, or the quantized layers (emulated); returns train.run's kwargs."""
    parser = cli.build_parser(__doc__.split("\n")[0])
    g = parser.add_argument_group("bf16")
    g.add_argument("--mode", choices=MODES, default=None,
                   help="autocast = torch.autocast(bfloat16) mixed precision; emulated = exact "
                        "bf16 casts of w/a/g in float32 arithmetic (default: autocast on CUDA and "
                        "on CPUs that run bf16 convolutions fast, else emulated; checked by a "
                        "short probe; a --resume keeps the run's mode)")
    quant = qat_cli.add_quant_args(parser, DEFAULTS, WHY)
    args = cli.parse_args(parser, argv)
    # any quantization flag off its default (a format, rounding, scaling, --first-last-fp32,
    # --backend) asks for the casts, which only the emulated mode makes
    emulation_flags = [a.option_strings[0] for a in quant._group_actions
                       if getattr(args, a.dest) != parser.get_default(a.dest)]
    if args.mode is None and not emulation_flags and args.resume:
        args.mode = mode_of_existing_run(args)
        if args.mode and os.environ.get("RANK", "0") == "0":
            print(f"bf16: --mode {args.mode}, as the run was started (--resume)", flush=True)
    if args.mode is None and not emulation_flags:
        args.mode = choose_mode(args.device)
    if args.mode == "emulated":
        return qat_cli.plan_quantized(args, "bf16", "BF16 emulated", "BF16/bf16_train.py")
    if emulation_flags:
        parser.error(f"{', '.join(emulation_flags)}: the quantization flags need --mode emulated "
                     f"(autocast makes no casts of its own)")
    fmt = FormatRecord(family="bf16", bits_per_element=16, mode="autocast").to_dict()
    config = cli.make_config(args, name=cli.script_run_name("bf16_autocast", args),
                             label="BF16 autocast", format=fmt, script="BF16/bf16_train.py")
    return {"config": config, "autocast_dtype": torch.bfloat16}


def main(argv=None):
    """Train the run the flags describe; returns its summary dict."""
    return train.run(**plan(argv))


if __name__ == "__main__":
    cli.run_main(main)
