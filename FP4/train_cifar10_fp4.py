r"""FP4 training of CIFAR ResNets: OCP MX E2M1 elements, per-channel/tensor or per-block scales.

    cd FP4 && python train_cifar10_fp4.py                                            # fp4
    cd FP4 && python train_cifar10_fp4.py --w-fmt mxfp4 --a-fmt mxfp4 --g-fmt mxfp4  # fp4-mx
    cd FP4 && python train_cifar10_fp4.py --w-fmt nvfp4 --a-fmt nvfp4 --g-fmt nvfp4  # fp4-nv
    cd FP4 && python train_cifar10_fp4.py --w-fmt nvfp4 --a-fmt nvfp4 --g-fmt nvfp4 \
        --first-last-fp32
    cd FP4 && python train_cifar10_fp4.py --first-last-fp32 --g-fmt e5m2

E2M1 has 15 values: 0, +-0.5, 1, 1.5, 2, 3, 4, 6. FP4 cannot train unscaled: with the format's own
range every weight (|w| < 0.25) rounds to 0 or +-0.5, so the defaults scale weights per output
channel and activations and gradients per tensor. Run folder:
runs/fp4_..._<model>_<recipe>_e<epochs>_s<seed>/.

Three configurations (the sweep's keys; python sweep.py --list):

    fp4     E2M1 for weights, activations and gradients, power-of-two scales per output channel
            (weights) and per tensor (activations, gradients): the seed's configuration, the
            script's defaults
    fp4-mx  MXFP4 (OCP MX: 32 E2M1 elements share a power-of-two E8M0 scale, 4.25 bits) for
            weights, activations and gradients
    fp4-nv  NVFP4 (16 E2M1 elements share an E4M3 scale, times one float32 scale per tensor,
            4.5 bits) likewise

In all three, gradients round stochastically (the default --g-rounding) and every layer is
quantized, the first conv and the last Linear included, as the seed's fp4 configuration does (no
--first-last-fp32): the block formats are compared with E2M1 on the same layers. Blocks run along
dim 1 (input channels, in-features; docs/block-formats.md): the first conv's 3 input channels form
one short block. A block format carries its own scales, so its roles are cast with scaling none.

One extra configuration, fp4-nv-fl, is fp4-nv with the first conv and the last Linear in float32,
as the seed's FP8 and posit configurations keep them: cast after FP32 training, NVFP4 lost 2.4
points on every layer and 0.8 with those two in float32 (MXFP4: 13.2 and 4.6), so it is the
4-bit configuration most likely to train close to FP32.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import cli, qat_cli, train  # noqa: E402  (after the sys.path line)

DEFAULTS = {"w_fmt": "e2m1", "a_fmt": "e2m1", "g_fmt": "e2m1",
            "w_scaling": "channel", "a_scaling": "tensor", "g_scaling": "tensor",
            "g_rounding": "stochastic"}
MAX_BITS = {"w": 4, "a": 4}  # roles that must stay FP4-sized
WHY = ("Defaults: E2M1 for weights, activations and gradients. Scaling is on because FP4 cannot\n"
       "train unscaled (unscaled, every weight rounds to 0 or +-0.5): weights per output channel,\n"
       "activations and gradients per tensor, each by a power of two so the largest value lands\n"
       "at or just below 6. Gradients round stochastically: with 1 mantissa bit, nearest rounding\n"
       "biases every small update away and training stalls. A role given a block format (mxfp4,\n"
       "nvfp4) is cast with scaling none instead: the format scales each block itself.")
EPILOG = __doc__[__doc__.index("Three configurations"):]


def plan(argv=None):
    """Parse the flags; returns the keyword arguments of train.run."""
    parser = cli.build_parser(__doc__.split("\n")[0])
    parser.epilog = EPILOG
    qat_cli.add_quant_args(parser, DEFAULTS, WHY, max_bits=MAX_BITS)
    args = cli.parse_args(parser, argv)
    qat_cli.check_widths(parser, args, MAX_BITS, "FP4")
    return qat_cli.plan_quantized(args, "fp4", "FP4", "FP4/train_cifar10_fp4.py")


def main(argv=None):
    """Train the run the flags describe; returns its summary dict."""
    return train.run(**plan(argv))


if __name__ == "__main__":
    cli.run_main(main)
