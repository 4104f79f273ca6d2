"""FP32 baseline: a CIFAR ResNet trained in plain float32 with the shared loop (He et al. 2016).

    python FP32/train_cifar10_fp32.py --data-dir ../shared/cifar10         # ResNet-20, 164 epochs
    cd FP32 && python train_cifar10_fp32.py --epochs 1                       # uses $CIFAR10_DIR
    torchrun --nproc_per_node 4 FP32/train_cifar10_fp32.py --model resnet56  # DDP

Every number format in this project is compared against this run. It adds nothing to the shared
loop: no quantization, no autocast; on CUDA, TF32 stays off unless --tf32 is given, so the
arithmetic is IEEE float32 everywhere. Run folder: runs/fp32_<model>_<recipe>_e<epochs>_s<seed>/.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import cli, train  # noqa: E402  (after the sys.path line, so it runs from any folder)
from common.config import FormatRecord  # noqa: E402

FORMAT = FormatRecord(family="fp32", bits_per_element=32).to_dict()


def plan(argv=None):
    """Parse the shared flags; returns the keyword arguments of train.run."""
    parser = cli.build_parser(__doc__.split("\n")[0])
    args = cli.parse_args(parser, argv)
    config = cli.make_config(args, name=cli.script_run_name("fp32", args), label="FP32",
                             format=FORMAT, script="FP32/train_cifar10_fp32.py")
    return {"config": config}


def main(argv=None):
    """Train the run the flags describe; returns its summary dict."""
    return train.run(**plan(argv))


if __name__ == "__main__":
    cli.run_main(main)
