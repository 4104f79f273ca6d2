"""FP4 (OCP MX E2M1) training of CIFAR ResNets, with power-of-two scaling on by default.

    cd FP4 && python train_cifar10_fp4.py                         # e2m1 weights/activations/gradients
    cd FP4 && python train_cifar10_fp4.py --first-last-fp32 --g-fmt e5m2

E2M1 has 15 values: 0, +-0.5, 1, 1.5, 2, 3, 4, 6. FP4 cannot train unscaled: with the format's own
range every weight (|w| < 0.25) rounds to 0 or +-0.5, so the defaults scale weights per output
channel and activations and gradients per tensor. Run folder:
runs/fp4_..._<model>_<recipe>_e<epochs>_s<seed>/.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import cli, qat_cli, train  # noqa: E402  (after the sys.path line, so it runs from any folder)

DEFAULTS = {"w_fmt": "e2m1", "a_fmt": "e2m1", "g_fmt": "e2m1",
            "w_scaling": "channel", "a_scaling": "tensor", "g_scaling": "tensor",
            "g_rounding": "stochastic"}
MAX_BITS = {"w": 4, "a": 4}  # roles that must stay FP4-sized
WHY = ("Defaults: E2M1 for weights, activations and gradients. Scaling is on because FP4 cannot\n"
       "train unscaled (unscaled, every weight rounds to 0 or +-0.5): weights per output channel,\n"
       "activations and gradients per tensor, each by a power of two so the largest value lands\n"
       "at or just below 6. Gradients round stochastically: with 1 mantissa bit, nearest rounding\n"
       "biases every small update away and training stalls.")


def plan(argv=None):
    """Parse the flags; returns the keyword arguments of train.run."""
    parser = cli.build_parser(__doc__.split("\n")[0])
    qat_cli.add_quant_args(parser, DEFAULTS, WHY, max_bits=MAX_BITS)
    args = cli.parse_args(parser, argv)
    qat_cli.check_widths(parser, args, MAX_BITS, "FP4")
    return qat_cli.plan_quantized(args, "fp4", "FP4", "FP4/train_cifar10_fp4.py")


def main(argv=None):
    """Train the run the flags describe; returns its summary dict."""
    return train.run(**plan(argv))


if __name__ == "__main__":
    cli.run_main(main)
