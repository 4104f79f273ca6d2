"""Post-training quantization: evaluate trained checkpoints with weights and activations cast to
each format, with and without scaling, without retraining.

    python ptq_eval.py fp32_resnet20_e164_s0                      # a run name in runs/
    python ptq_eval.py runs/fp32_resnet20_e164_s*                 # every seed of the baseline
    python ptq_eval.py runs/x/last.pt --formats e4m3,posit8es1 --scalings scaled
    python ptq_eval.py results/runs/fp32_resnet20_fast_e20_s0 --out ptq.json   # a record's weights

Writes ptq.json into each run's (or record's) folder (ptq_first-last-fp32.json with that flag,
...); ``python report.py`` shows it beside the trained results.
Details: common/ptq.py.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import cli, ptq  # noqa: E402  (after the sys.path line)
from common.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="ptq_eval.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="RUN",
                   help="run names (in --runs-dir), run or record folders (their weights.pt, else "
                        "last.pt) or .pt files")
    g = p.add_argument_group("formats")
    g.add_argument("--formats", default=",".join(ptq.DEFAULT_FORMATS), metavar="LIST",
                   help=f"comma-separated formats (any spec of the scripts' --w-fmt) "
                        f"(default: {','.join(ptq.DEFAULT_FORMATS)})")
    g.add_argument("--scalings", default=",".join(ptq.SCALING_MODES), metavar="LIST",
                   help="none = the format's own range; scaled = power-of-two scale (floats: from "
                        "the absolute maximum; posits: from the rms, to 1), weights per "
                        "--weight-scaling, activations per tensor (per test batch); a block format "
                        "(mxfp8, mxfp4, nvfp4, ...) gets one row, "
                        "none, whatever this says: it carries its own scale per block "
                        f"(default: {','.join(ptq.SCALING_MODES)})")
    g.add_argument("--weight-scaling", choices=ptq.WEIGHT_SCALINGS, default="channel",
                   help="granularity of the weights' scale in scaled rows (default: channel)")
    g.add_argument("--first-last-fp32", action="store_true",
                   help="keep the first conv and the last Linear in float32 (default: off)")
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
    g.add_argument("--out", default=None, metavar="FILE",
                   help="where to write the JSON, for a single source (default: ptq.json next to "
                        "the checkpoint; ptq_first-last-fp32.json, ptq_wtensor.json, ... when "
                        "those flags are given)")
    return p


def _row_line(row):
    fmt = row["format"] if row["format"] != "fp32" else "fp32 (reference)"
    scaling = (row["scaling"] if row["scaling"] == "none"
               else f"w/{row['weight_scaling']} a/{row['act_scaling']}")
    return (f"  {fmt:<17} {scaling:<20} {row['test_acc']:7.2f}%  loss {row['test_loss']:.4f}  "
            f"{row['seconds']:6.1f}s")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    formats = ptq.parse_formats(args.formats)
    scalings = [s.strip() for s in args.scalings.split(",") if s.strip()]
    bad = [s for s in scalings if s not in ptq.SCALING_MODES]
    if bad or not scalings:
        raise UserError(f"--scalings {args.scalings!r}: accepted: {', '.join(ptq.SCALING_MODES)}")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise UserError("--eval-batch-size must be >= 1")
    if args.out and len(args.sources) > 1:
        raise UserError("--out takes a single source; without it each run gets its own ptq.json")
    paths = [ptq.resolve_checkpoint(s, args.runs_dir) for s in args.sources]   # all checked first
    for path in paths:
        print(f"post-training quantization of {path}", flush=True)
        res = ptq.run_ptq(path, formats, scalings, args.weight_scaling, args.first_last_fp32,
                          args.device, args.data_dir, args.eval_batch_size, args.out,
                          log=lambda row: print(_row_line(row), flush=True))
        src = res["source"]
        trained = (f"; the run's own last evaluation: {src['trained_test_acc']:.2f}%"
                   if src["trained_test_acc"] is not None else "")
        print(f"  {res['test_images']} test images on {res['device_name']}; checkpoint of run "
              f"{src['name']} ({src['model']}, recipe {src['recipe']}), epoch {src['epoch']}/"
              f"{src['epochs']}{trained}; wrote {res['path']}", flush=True)


if __name__ == "__main__":
    cli.run_main(main)
