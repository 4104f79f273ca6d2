"""BF16 training of CIFAR ResNets: real mixed precision (torch.autocast) or exact bf16 emulation.

    cd BF16 && python bf16_train.py                      # autocast: bf16 convs/matmuls, fp32 master
    cd BF16 && python bf16_train.py --mode emulated      # every w/a/g cast to bf16 by the casts

autocast runs convolutions and matmuls in bfloat16 on the hardware (CUDA, or a CPU with bf16
units) with float32 weights, BatchNorm and loss: what a BF16 training run really costs. emulated
casts weights, activations and gradients to bf16 through the quantized layers (float32
arithmetic on bf16 values), comparable bit for bit with the other formats' emulation.
Run folder: runs/bf16_autocast_<model>_<recipe>_e<epochs>_s<seed>/ or
runs/bf16_<roles>_<model>_<recipe>_e<epochs>_s<seed>/.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from common import cli, qat_cli, train  # noqa: E402  (after the sys.path line)

DEFAULTS = {"w_fmt": "bf16", "a_fmt": "bf16", "g_fmt": "bf16"}
WHY = "Used by --mode emulated only (autocast decides its own casts)."
MODES = ("autocast", "emulated")


def plan(argv=None):
    """Parse the flags: autocast, or the quantized layers (emulated); returns train.run's kwargs."""
    parser = cli.build_parser(__doc__.split("\n")[0])
    g = parser.add_argument_group("bf16")
    g.add_argument("--mode", choices=MODES, default="autocast",
                   help="autocast = torch.autocast(bfloat16) mixed precision; emulated = exact "
                        "bf16 casts of w/a/g in float32 arithmetic (default: autocast)")
    qat_cli.add_quant_args(parser, DEFAULTS, WHY)
    args = cli.parse_args(parser, argv)
    if args.mode == "emulated":
        return qat_cli.plan_quantized(args, "bf16", "BF16 emulated", "BF16/bf16_train.py")
    changed = [f for f in ("w", "a", "g", "wg", "master")
               if getattr(args, f"{f}_fmt") != parser.get_default(f"{f}_fmt")]
    if changed or args.first_last_fp32 or args.backend != "native":
        parser.error("--<role>-fmt, --first-last-fp32 and --backend need --mode emulated")
    fmt = {"family": "bf16", "mode": "autocast", "bits_per_element": 16}
    config = cli.make_config(args, name=cli.script_run_name("bf16_autocast", args),
                             label="BF16 autocast", format=fmt, script="BF16/bf16_train.py")
    return {"config": config, "autocast_dtype": torch.bfloat16}


def main(argv=None):
    """Train the run the flags describe; returns its summary dict."""
    return train.run(**plan(argv))


if __name__ == "__main__":
    cli.run_main(main)
