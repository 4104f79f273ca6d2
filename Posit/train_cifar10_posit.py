"""Posit training of CIFAR ResNets: weights, activations and gradients in posit(--bits, --es).

    cd Posit && python train_cifar10_posit.py --bits 8 --es 1
    cd Posit && python train_cifar10_posit.py --bits 4 --es 0 --first-last-fp32
    cd Posit && python train_cifar10_posit.py --bits 16 --es 1

Posits as the posit standard and SoftPosit round them: to nearest on the bit string, ties to the
even pattern, never to 0 and never past maxpos. Any role can still take another format
(e.g. --g-fmt e5m2; a block format such as --g-fmt mxfp8 is cast with scaling none, since it
scales each block itself: there is no block posit format). Run folder:
runs/posit<n>es<k>_..._<model>_<recipe>_e<epochs>_s<seed>/.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import cli, qat_cli, train  # noqa: E402  (after the sys.path line)
from common.formats import parse_format  # noqa: E402

POSIT_ROLES = ("w", "a", "g")  # in posit(--bits, --es) unless a --<role>-fmt says otherwise
WHY = ("Formats: posit(--bits, --es) for weights, activations and gradients unless a --<role>-fmt\n"
       "flag says otherwise. --scaling auto picks per role, from the width of that role's\n"
       "format (its --<role>-fmt if given, else --bits): posit(<=5 bits) cannot train unscaled\n"
       "(posit4es0 holds only +-1/4 .. +-4), so all three are scaled "
       "(weights per output channel);\n"
       "from 6 to 11 bits only the gradients are scaled per tensor (unscaled, gradients below\n"
       "minpos, 2^-12 for posit8es1, would round UP to minpos: posits never round to 0);\n"
       "from 12 bits on nothing is scaled. "
       "A posit scale puts the tensor's rms at the power of two\n"
       "nearest to 1, where a posit is most precise (not the absolute maximum at maxpos).")


def auto_scaling(bits: int) -> dict:
    """Per-role scaling that --scaling auto resolves to (see WHY)."""
    if bits <= 5:
        return {"w": "channel", "a": "tensor", "g": "tensor"}
    if bits <= 11:
        return {"w": "none", "a": "none", "g": "tensor"}
    return {"w": "none", "a": "none", "g": "none"}


def plan(argv=None):
    """Parse the flags, resolve the posit format and scaling per role; returns train.run's
    kwargs."""
    parser = cli.build_parser(__doc__.split("\n")[0])
    g = parser.add_argument_group("posit")
    g.add_argument("--bits", type=int, default=8, help="posit width n, 2..16 (default: 8)")
    g.add_argument("--es", type=int, default=1, help="posit exponent bits es (default: 1)")
    g.add_argument("--scaling", choices=("auto", "none", "tensor"), default="auto",
                   help="scaling of the w/a/g casts where no --<role>-scaling flag is given: auto "
                        "(see 'quantization' below), none, or tensor (default: auto)")
    shown = {f"{r}_fmt": "posit<bits>es<es>" for r in POSIT_ROLES}
    shown |= {f"{r}_scaling": "from --scaling" for r in POSIT_ROLES}
    qat_cli.add_quant_args(parser, {f"{r}_fmt": None for r in POSIT_ROLES}
                           | {f"{r}_scaling": None for r in POSIT_ROLES}, WHY, shown)
    args = cli.parse_args(parser, argv)
    try:
        posit = parse_format(f"posit{args.bits}es{args.es}")
    except ValueError as e:
        parser.error(f"--bits {args.bits} --es {args.es}: {e}")
    for role in POSIT_ROLES:
        if getattr(args, f"{role}_fmt") is None:
            setattr(args, f"{role}_fmt", posit.name)
        if getattr(args, f"{role}_scaling") is None:    # auto: from this role's own width
            bits = parse_format(getattr(args, f"{role}_fmt")).bits
            setattr(args, f"{role}_scaling", auto_scaling(bits)[role] if args.scaling == "auto"
                    else args.scaling)
    return qat_cli.plan_quantized(args, posit.name, posit.name.replace("posit", "Posit"),
                                 "Posit/train_cifar10_posit.py")


def main(argv=None):
    """Train the run the flags describe; returns its summary dict."""
    return train.run(**plan(argv))


if __name__ == "__main__":
    cli.run_main(main)
