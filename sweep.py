"""Run a set of configurations x seeds with the format scripts; finished runs are skipped.

    python sweep.py --data-dir ../shared/cifar10                    # seed set x 3 seeds, 164 epochs
    python sweep.py --set smoke --seeds 1 --synthetic --epochs 1 --max-steps-per-epoch 2
    python sweep.py --configs fp32,posit8 --seeds 5 --epochs 30     # adds seeds 3 and 4 to 0..2
    python sweep.py --list

Every flag that is not the sweep's own is a training flag passed to every run (``--epochs``,
``--model``, ``--data-dir``, ``--batch-size`` ...; see ``python FP32/train_cifar10_fp32.py
--help``). Then ``python report.py`` writes the table and the plots. Details: common/sweep.py.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import cli, sweep  # noqa: E402  (after the sys.path line)
from common.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The sweep's own flags; the training flags are listed in the epilog and passed through."""
    training = sweep.training_parser()
    flags = sorted({o for a in training._actions for o in a.option_strings if o.startswith("--")}
                   - {"--help", "--seed", "--name", "--runs-dir", "--resume", "--overwrite"})
    epilog = ("training flags (passed through to every run; meaning and defaults in any format "
              "script's --help):\n  " + " ".join(flags) + "\n\n"
              "Run names: <config>_<model>_<recipe>_e<epochs>_s<seed>[_synthetic][_val][_max<N>]"
              "[_<tag>]. Exit code: 0 nothing failed (diverged runs are results), 1 a run failed, "
              "2 bad flags or existing runs made with other flags, 130 Ctrl-C, 143/129 "
              "SIGTERM/SIGHUP (passed on to the running run, which saves and stops).")
    p = cli.Parser(prog="sweep.py", description=__doc__.split("\n")[0], epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    g = p.add_argument_group("sweep")
    g.add_argument("--set", default=None, metavar="NAME",
                   help=f"named set of configurations: {', '.join(sweep.SETS)} "
                        f"(default: {sweep.DEFAULT_SET})")
    g.add_argument("--configs", default=None, metavar="KEYS",
                   help="comma-separated configuration keys instead of a set, e.g. fp32,posit8 "
                        "(default: none, the set's)")
    g.add_argument("--seeds", type=int, default=sweep.DEFAULT_SEEDS, metavar="N",
                   help=f"run seeds 0..N-1 of every configuration (default: {sweep.DEFAULT_SEEDS})")
    g.add_argument("--runs-dir", default=str(cli.DEFAULT_RUNS_DIR), metavar="DIR",
                   help="where run folders go (default: runs/ in the repo root)")
    g.add_argument("--records-dir", default=str(sweep.DEFAULT_RECORDS_DIR), metavar="DIR",
                   help="where each finished run's small files (config, metrics, summary, "
                        "per-image predictions; never the checkpoint) are kept; a run recorded "
                        "there counts as done. 'none': keep no records (default: results/runs/ "
                        "in the repo, tracked by git)")
    g.add_argument("--tag", default=None, metavar="TAG",
                   help="suffix of every run name, to keep a variant sweep (other --lr, ...) apart "
                        "(default: none)")
    g.add_argument("--gpus", default="auto", metavar="LIST",
                   help="auto = one run per GPU in parallel when there are several, else one after "
                        "another; none = one after another; 0,1,... = these GPUs (default: auto)")
    g.add_argument("--jobs-per-gpu", type=int, default=1, metavar="N",
                   help="concurrent runs on each GPU: a small model leaves a big GPU mostly idle, "
                        "so N runs share it for more total throughput (see benchmarks/"
                        "gpu_checks.sh for the measured gain); each run gets 1/(all runs) of "
                        "the CPU threads (default: 1)")
    g.add_argument("--dry-run", action="store_true",
                   help="print what would run or be skipped, and stop (default: off)")
    g.add_argument("--list", action="store_true",
                   help="list the sets and configurations, and stop (default: off)")
    return p


def main(argv=None):
    """Parse, plan, run, print the summary; returns the exit code."""
    parser = build_parser()
    args, training_flags = parser.parse_known_args(argv)
    if args.list:
        print("\n".join(sweep.list_lines()))
        return 0
    if args.seeds < 1:
        raise UserError("--seeds must be >= 1")
    if args.tag is not None and not cli.NAME_RE.match(args.tag):
        raise UserError(f"--tag {args.tag!r}: use letters, digits and . _ = + - only")
    keys = sweep.resolve_configs(args.set, args.configs)
    training = sweep.parse_training_flags(training_flags)
    gpus = sweep.resolve_gpus(args.gpus, training, args.jobs_per_gpu)
    records = None if args.records_dir == "none" else args.records_dir
    jobs = sweep.plan(keys, range(args.seeds), training_flags, args.runs_dir, args.tag, records)
    if args.dry_run:
        for j in jobs:
            print(f"{j.action:<4} {j.name}: {j.reason}"
                  + (f" (its record in {j.record_dir} is written by the sweep)" if j.record_now
                     else "")
                  + (f"\n     {sweep.shlex.join(j.cmd)}" if j.action == "run" else ""))
        return 0
    res = sweep.execute(jobs, gpus)
    print("\n".join(sweep.summary_lines(res)), flush=True)
    if res.interrupted:
        how = f" by {sweep.signal.Signals(res.signum).name}" if res.signum else ""
        print(f"interrupted{how}: rerun the same command to continue (finished runs are skipped, "
              f"the interrupted one resumes)", file=sys.stderr)
        return 128 + res.signum if res.signum else sweep.EXIT_INTERRUPTED
    return 1 if res.failed else 0


def _entry(argv=None):
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:        # a --runs-dir or --records-dir that cannot be made or written
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e} (check the path, its permissions and the free disk "
              f"space)", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = sweep.EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    _entry()
