"""Write the comparison table and plots: results.md, results.csv, acc_per_epoch.png, acc_vs_bits.png,
forest.png (differences to FP32 with both 95% intervals), and acc_vs_epochs.csv when a format was
trained to several epoch counts (the recipe's curve).

    python report.py                                   # -> runs/report/ (nothing committed there)
    python report.py --recipe fast --data real --out results     # the committed results/

Reads the run records kept in results/runs/ (full test set) and results/runs-test1k/ (history:
runs scored on the first 1,000 test images) and the run folders in runs/ (summary.json,
metrics.jsonl, predictions.json, ptq.json and ptq_acc.json from ptq_eval.py: the latter gives a
table of accuracy per accumulator and chunk size and acc_vs_mantissa.png); a run of the same
configuration and seed found twice counts once, and runs on different test sets are kept in
separate tables. A run folder that cannot be read (a corrupt summary.json or metrics.jsonl) is
left out with a warning and named in results.md. Details: common/report/.
"""  # noqa: E501  (its first line is 101 characters; --help prints the first paragraph verbatim)
import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import cli, report, sweep  # noqa: E402  (after the sys.path line)
from common.errors import UserError  # noqa: E402

DEFAULT_OUT = cli.DEFAULT_RUNS_DIR / "report"          # runs/ is not tracked by git


def description() -> str:
    """The first paragraph of this docstring (its first sentence, whole), for --help."""
    return __doc__.split("\n\n")[0].strip()


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="report.py", description=description(),
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--runs-dir", action="append", default=None, metavar="DIR",
                   help="folder of run folders; repeat the flag for several (default: "
                        "results/runs/, results/runs-test1k/ and runs/ in the repo root)")
    g.add_argument("--model", default=None, type=str.lower, metavar="NAME",
                   help="only runs of this model (default: all)")
    g.add_argument("--epochs", default=None, type=int, metavar="N",
                   help="only runs of this many epochs in the main table; the "
                        "accuracy-against-epochs table keeps every length (default: all)")
    g.add_argument("--recipe", default=None, choices=list(cli.RECIPES),
                   help="only runs of this recipe (default: all)")
    g.add_argument("--data", choices=report.DATA_CHOICES, default="all",
                   help="only runs on the real CIFAR-10 or on the synthetic set (default: all)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR",
                   help="folder for results.md, results.csv, acc_vs_epochs.csv and the PNGs; the "
                        "committed tables are made with --out results (default: runs/report/ in "
                        "the repo root, which git ignores, so a bare call never overwrites "
                        "results/)")
    g.add_argument("--no-plots", dest="plots", action="store_false",
                   help="write the tables only (results.md, results.csv and acc_vs_epochs.csv), no "
                        "PNGs (default: plots on)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        raise UserError("--epochs must be >= 1")
    argv = sys.argv[1:] if argv is None else list(argv)
    runs_dirs = args.runs_dir or [str(sweep.DEFAULT_RECORDS_DIR), str(sweep.HISTORY_RECORDS_DIR),
                                     str(cli.DEFAULT_RUNS_DIR)]
    res = report.make_report(runs_dirs, args.out, args.model, args.epochs, args.data,
                             args.plots, command=shlex.join(["python", "report.py", *argv]),
                             recipe=args.recipe)
    for line in res["repeats"]:
        print(f"repeat: {line}")
    for line in res["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    print(f"{res['runs']} runs ({res['finished']} finished, {res['not_finished']} not finished) in "
          f"{res['sections']} table{'s' if res['sections'] != 1 else ''}, {res['ptq']} ptq.json, "
          f"{res['ptq_acc']} ptq_acc.json; "
          f"wrote {res['results']}, {res['csv']}" + "".join(f", {p}" for p in res["plots"]))


if __name__ == "__main__":
    cli.run_main(main)
