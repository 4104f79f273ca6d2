"""Write the comparison table and plots from runs/: results.md, acc_per_epoch.png, acc_vs_bits.png.

    python report.py                                   # runs/ -> results/
    python report.py --model resnet20 --epochs 164 --data real --out results

Reads every runs/*/summary.json (+ metrics.jsonl) and runs/*/ptq.json (from ptq_eval.py).
Details: common/report.py.
"""
import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import cli, report  # noqa: E402  (after the sys.path line)
from common.errors import UserError  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "results")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--runs-dir", default=str(cli.DEFAULT_RUNS_DIR), metavar="DIR",
                   help="folder of run folders (default: runs/ in the repo root)")
    g.add_argument("--model", default=None, type=str.lower, metavar="NAME",
                   help="only runs of this model (default: all)")
    g.add_argument("--epochs", default=None, type=int, metavar="N",
                   help="only runs of this many epochs (default: all)")
    g.add_argument("--data", choices=report.DATA_CHOICES, default="all",
                   help="only runs on the real CIFAR-10 or on the synthetic set (default: all)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="folder for results.md and the PNGs (default: results/ in the repo root)")
    g.add_argument("--no-plots", dest="plots", action="store_false",
                   help="write results.md only (default: plots on)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        raise UserError("--epochs must be >= 1")
    argv = sys.argv[1:] if argv is None else list(argv)
    res = report.make_report(args.runs_dir, args.out, args.model, args.epochs, args.data,
                             args.plots, command=shlex.join(["python", "report.py", *argv]))
    print(f"{res['runs']} runs ({res['finished']} finished, {res['not_finished']} not finished) in "
          f"{res['sections']} table{'s' if res['sections'] != 1 else ''}, {res['ptq']} ptq.json; "
          f"wrote {res['results']}" + "".join(f", {p}" for p in res["plots"]))


if __name__ == "__main__":
    cli.run_main(main)
