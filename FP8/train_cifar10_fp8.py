"""FP8 training of CIFAR ResNets: weights, activations and gradients each in an 8-bit float format.

    cd FP8 && python train_cifar10_fp8.py                                   # e4m3 w/a, e5m2 g
    cd FP8 && python train_cifar10_fp8.py --w-fmt e5m2 --a-fmt e4m3 --first-last-fp32
    cd FP8 && python train_cifar10_fp8.py --w-fmt e4m3 --a-fmt e4m3 --first-last-fp32
    cd FP8 && python train_cifar10_fp8.py --w-fmt mxfp8 --a-fmt mxfp8 --g-fmt mx-e5m2  # OCP MX

Formats are exactly OCP FP8 (e4m3: max 448, no inf; e5m2: IEEE-like, max 57344), rounded to
nearest-even. --w-fmt/--a-fmt/--g-fmt take any format of at most 8 bits (e3m4, posit8es1, ...),
the block formats of such elements (mxfp8 = 32 e4m3 elements per power-of-two scale, mx-e5m2,
...; docs/block-formats.md; cast with scaling none, since they scale each block themselves) or
fp32 (unquantized); --wg-fmt and --master-fmt take any spec. Run folder:
runs/fp8_w-<fmt>_a-<fmt>_g-<fmt>[_fl32]_<model>_<recipe>_e<epochs>_s<seed>/.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import cli, qat_cli, train  # noqa: E402  (after the sys.path line)

DEFAULTS = {"w_fmt": "e4m3", "a_fmt": "e4m3", "g_fmt": "e5m2",
            "w_scaling": "tensor", "a_scaling": "none", "g_scaling": "tensor"}
MAX_BITS = {"w": 8, "a": 8, "g": 8}  # roles that must stay FP8-sized
WHY = ("Defaults: e4m3 (more precision) for the forward operands, e5m2 (more range) for the\n"
       "gradients, as in OCP FP8 training recipes. Weights and gradients are scaled per tensor by\n"
       "a power of two that puts the tensor's largest value within a factor 2 of the format's\n"
       "largest (nothing overflows): unscaled, most conv weights (|w| < 2^-6) fall into e4m3's\n"
       "subnormals and small gradients flush to 0 in e5m2. Activations are not scaled: each\n"
       "layer's input comes out of BatchNorm+ReLU, O(1), well inside e4m3's normal range\n"
       "(2^-6 .. 448); --a-scaling tensor scales them too.\n"
       "A role given a block format (mxfp8, mx-e5m2) is cast with scaling none instead.")


def plan(argv=None):
    """Parse the flags; returns the keyword arguments of train.run."""
    parser = cli.build_parser(__doc__.split("\n")[0])
    qat_cli.add_quant_args(parser, DEFAULTS, WHY, max_bits=MAX_BITS)
    args = cli.parse_args(parser, argv)
    qat_cli.check_widths(parser, args, MAX_BITS, "FP8")
    return qat_cli.plan_quantized(args, "fp8", "FP8", "FP8/train_cifar10_fp8.py")


def main(argv=None):
    """Train the run the flags describe; returns its summary dict."""
    return train.run(**plan(argv))


if __name__ == "__main__":
    cli.run_main(main)
