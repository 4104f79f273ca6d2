"""Score finished runs' saved weights on a test file, with each run's own formats, without training.

    python evaluate.py results/runs/fp32_resnet20_fast_e20_s0            # a record or run folder
    python evaluate.py results/runs/*_fast_e20_s* --check                # every record, checked
    python evaluate.py results/runs/fp32_resnet20_fast_e20_s0 --data-dir DIR --out eval.json

Prints each run's accuracy and whether it repeats the run's own final evaluation (on the same test
images it must, to the last image, on the same kind of machine). Exit code: 0; 1 with --check
when a run scored on the same images does not repeat its record; 2 for a missing, corrupt or
mismatched weights file (one line naming it). Details: common/evaluation.py.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import cli, evaluation, runs  # noqa: E402  (after the sys.path line)
from common.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="RUN",
                   help="record or run folders (weights.pt, else last.pt), run names in "
                        "--runs-dir, or .pt files")
    g = p.add_argument_group("evaluation")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="CIFAR-10 folder whose test_batch is scored (default: the run's own if it "
                        "is there, else $CIFAR10_DIR, else data/)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda if available, else cpu (default: auto)")
    g.add_argument("--eval-batch-size", type=int, default=None, metavar="N",
                   help="test batch size; it sets activations' per-tensor scales (default: the "
                        "run's own)")
    g.add_argument("--runs-dir", default=str(cli.DEFAULT_RUNS_DIR), metavar="DIR",
                   help="where run names are looked up (default: runs/ in the repo root)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="FILE",
                   help="write every result, with per-image predictions, as JSON (default: none)")
    g.add_argument("--check", action="store_true",
                   help="exit 1 when a run scored on its own test images does not repeat its "
                        "recorded accuracy exactly (default: off)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise UserError("--eval-batch-size must be >= 1")
    paths = [evaluation.find_weights(s, args.runs_dir) for s in args.sources]   # all checked first
    results, mismatches = [], 0
    for path in paths:
        res = evaluation.evaluate_record(path, args.data_dir, args.device, args.eval_batch_size,
                                         predictions=args.out is not None)
        results.append(res)
        if res["same_test_images"]:
            verdict = ("repeats the record exactly" if res["matches_record"] else
                       f"DIFFERS from the record ({res['recorded_test_acc']:.2f}%)")
            mismatches += not res["matches_record"]
        else:
            verdict = ("other test images than the record's "
                       f"({res['recorded_test_images'] or '?'})")
        print(f"{res['name']}: {res['test_acc']:.2f}% on {res['test_images']:,} test images, "
              f"loss {res['test_loss']:.4f}; {verdict}", flush=True)
    if args.out:
        runs.write_json(args.out, results if len(results) > 1 else results[0])
        print(f"wrote {args.out}")
    if args.check and mismatches:
        print(f"{mismatches} run(s) did not repeat their record", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run_main(main)
