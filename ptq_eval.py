"""Post-training quantization: evaluate trained checkpoints with weights and activations cast to
each format, with and without scaling, without retraining.

    python ptq_eval.py fp32_resnet20_e164_s0                      # a run name in runs/
    python ptq_eval.py runs/fp32_resnet20_e164_s*                 # every seed of the baseline
    python ptq_eval.py runs/x/last.pt --formats e4m3,posit8es1 --scalings scaled
    python ptq_eval.py results/runs/fp32_resnet20_fast_e20_s0 --out ptq.json   # a record's weights
    python ptq_eval.py results/runs/fp32_resnet20_fast_e20_s0 \
        --acc fp16,bf16,e5m7,e8m13:p4 --acc-chunks 1,16,32,128   # low-precision accumulation

Writes ptq.json into each run's (or record's) folder (ptq_first-last-fp32.json with that flag,
...), or with --acc ptq_acc.json (float32 operands, forward GEMMs accumulated in each format at
each chunk size); ``python report.py`` shows them beside the trained results.
Details: common/ptq.py, common/ptq_acc.py.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import cli, ptq, ptq_acc  # noqa: E402  (after the sys.path line)
from common.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="ptq_eval.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="RUN",
                   help="run names (in --runs-dir), run or record folders (their weights.pt, else "
                        "last.pt) or .pt files")
    g = p.add_argument_group("formats")
    g.add_argument("--formats", default=None, metavar="LIST",
                   help=f"comma-separated formats (any spec of the scripts' --w-fmt) "
                        f"(default: {','.join(ptq.DEFAULT_FORMATS)})")
    g.add_argument("--scalings", default=None, metavar="LIST",
                   help="none = the format's own range; scaled = power-of-two scale (floats: from "
                        "the absolute maximum; posits: from the rms, to 1), weights per "
                        "--weight-scaling, activations per tensor (per test batch); a block format "
                        "(mxfp8, mxfp4, nvfp4, ...) gets one row, "
                        "none, whatever this says: it carries its own scale per block "
                        f"(default: {','.join(ptq.SCALING_MODES)})")
    g.add_argument("--weight-scaling", choices=ptq.WEIGHT_SCALINGS, default="channel",
                   help="granularity of the weights' scale in scaled rows (default: channel)")
    g.add_argument("--first-last-fp32", action="store_true",
                   help="keep the first conv and the last Linear in float32 (with --acc: they "
                        "accumulate in float32) (default: off)")
    g = p.add_argument_group("accumulation (instead of the format casts)")
    g.add_argument("--acc", default=None, metavar="LIST",
                   help="evaluate with float32 operands and the forward GEMM of every conv/linear "
                        "layer accumulated in each of these formats instead of the casts above "
                        "(--formats, --scalings and --weight-scaling do not apply): comma-"
                        "separated format specs, each with an optional :pN for promotion to a "
                        "float32 total every N chunks, e.g. the README's experiment: "
                        f"{ptq_acc.README_ACCUMULATORS}; writes ptq_acc.json after every row, "
                        "and a rerun into the same file adds only the rows it lacks (default: "
                        "none, the format casts run)")
    g.add_argument("--acc-chunks", default=None, metavar="LIST",
                   help="comma-separated chunk sizes k (products summed exactly before each "
                        "rounding to the accumulator; 1 = sequential, the slowest to emulate); "
                        "one row per accumulator and k "
                        f"(default: {','.join(map(str, ptq_acc.DEFAULT_CHUNKS))})")
    g = p.add_argument_group("run")
    g.add_argument("--runs-dir", default=str(cli.DEFAULT_RUNS_DIR), metavar="DIR",
                   help="where run names are looked up (default: runs/ in the repo root)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda if available, else cpu (default: auto)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="CIFAR-10 folder (default: the run's own, else $CIFAR10_DIR, else data/)")
    g.add_argument("--eval-batch-size", type=int, default=None, metavar="N",
                   help="test batch size; it sets the activations' scale in scaled rows "
                        "(default: the run's own)")
    g.add_argument("--limit-images", type=int, default=None, metavar="N",
                   help="evaluate the first N test images only, for timing and smoke tests; "
                        "reported results use all images (recorded in the JSON, and the file "
                        "name gets _nN) (default: all)")
    g.add_argument("--out", default=None, metavar="FILE",
                   help="where to write the JSON, for a single source (default: ptq.json next to "
                        "the checkpoint, ptq_acc.json with --acc; ptq_first-last-fp32.json, "
                        "ptq_wtensor.json, ptq_acc_n128.json ... when those flags are given)")
    return p


def _row_line(row):
    fmt = row["format"] if row["format"] != "fp32" else "fp32 (reference)"
    scaling = (row["scaling"] if row["scaling"] == "none"
               else f"w/{row['weight_scaling']} a/{row['act_scaling']}")
    return (f"  {fmt:<17} {scaling:<20} {row['test_acc']:7.2f}%  loss {row['test_loss']:.4f}  "
            f"{row['seconds']:6.1f}s")


def _acc_row_line(row, index, total):
    name = ("fp32 (reference)" if row["reference"]
            else f"{row['accumulator']} k={row['chunk']}")
    return (f"  [{index}/{total}] {name:<20} {row['test_acc']:7.2f}%  loss "
            f"{row['test_loss']:.4f}  {row['seconds']:7.1f}s")


def _check_args(args):
    """One-line errors for flags that do not go together or are out of range."""
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise UserError("--eval-batch-size must be >= 1")
    if args.limit_images is not None and args.limit_images < 1:
        raise UserError(f"--limit-images {args.limit_images}: accepted: an integer >= 1")
    if args.out and len(args.sources) > 1:
        raise UserError("--out takes a single source; without it each run gets its own ptq.json")
    if args.acc is not None and (args.formats is not None or args.scalings is not None
                                 or args.weight_scaling != "channel"):
        raise UserError("--acc evaluates float32 operands: --formats, --scalings and "
                        "--weight-scaling apply without --acc only")
    if args.acc is None and args.acc_chunks is not None:
        raise UserError("--acc-chunks applies with --acc only (name the accumulators, e.g. "
                        f"--acc {ptq_acc.README_ACCUMULATORS})")


def _print_done(res):
    src = res["source"]
    trained = (f"; the run's own last evaluation: {src['trained_test_acc']:.2f}%"
               if src["trained_test_acc"] is not None else "")
    print(f"  {res['test_images']} test images on {res['device_name']}; checkpoint of run "
          f"{src['name']} ({src['model']}, recipe {src['recipe']}), epoch {src['epoch']}/"
          f"{src['epochs']}{trained}; wrote {res['path']}", flush=True)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args)
    if args.acc is not None:
        accumulators = ptq_acc.parse_accumulators(args.acc)
        chunks = ptq_acc.parse_chunks(args.acc_chunks or ptq_acc.DEFAULT_CHUNKS)
    else:
        formats = ptq.parse_formats(args.formats or ",".join(ptq.DEFAULT_FORMATS))
        scalings = [s.strip() for s in (args.scalings or ",".join(ptq.SCALING_MODES)).split(",")
                    if s.strip()]
        bad = [s for s in scalings if s not in ptq.SCALING_MODES]
        if bad or not scalings:
            raise UserError(f"--scalings {args.scalings!r}: accepted: "
                            f"{', '.join(ptq.SCALING_MODES)}")
    paths = [ptq.resolve_checkpoint(s, args.runs_dir) for s in args.sources]   # all checked first
    for path in paths:
        if args.acc is not None:
            print(f"low-precision accumulation of {path}: {len(accumulators)} accumulators x "
                  f"{len(chunks)} chunk sizes + the float32 row", flush=True)
            res = ptq_acc.run_ptq_acc(path, accumulators, chunks, args.first_last_fp32,
                                      args.device, args.data_dir, args.eval_batch_size,
                                      args.limit_images, args.out,
                                      log=lambda *a: print(_acc_row_line(*a), flush=True))
        else:
            print(f"post-training quantization of {path}", flush=True)
            res = ptq.run_ptq(path, formats, scalings, args.weight_scaling, args.first_last_fp32,
                              args.device, args.data_dir, args.eval_batch_size, args.out,
                              log=lambda row: print(_row_line(row), flush=True),
                              limit_images=args.limit_images)
        _print_done(res)


if __name__ == "__main__":
    cli.run_main(main)
