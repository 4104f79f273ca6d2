"""Command line shared by every training script: argparse groups, flags -> ``RunConfig``,
exit codes.

A format script stays thin (FP32/train_cifar10_fp32.py is the whole pattern)::

    def plan(argv=None):
        parser = cli.build_parser("FP32 training of CIFAR ResNets")
        args = cli.parse_args(parser, argv)
        config = cli.make_config(args, name=cli.script_run_name("fp32", args), label="FP32",
                                 format={"family": "fp32", "bits_per_element": 32},
                                 script="FP32/train_cifar10_fp32.py")
        return {"config": config}                  # the keyword arguments of train.run

    if __name__ == "__main__":
        cli.run_main(lambda argv: train.run(**plan(argv)))

Quantized scripts add their format flags with ``common.qat_cli`` and return its
``plan_quantized(args, ...)``. What a run is (``RunConfig``, recipes, defaults, paths) lives in
``common.config``, which library code imports; only entry points and the flag helpers import
this module.

``run_main`` turns the project's exceptions into one line on stderr and an exit code:
0 finished (or already finished on ``--resume``), 1 diverged (NaN/inf loss), 2 user error
(bad flag, missing data, no CUDA, config mismatch on resume, a run folder that cannot be written
or is in use by another process), 130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM, 129 by
SIGHUP (128 + the signal's number, as shells report it; each saves status "interrupted").
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .config import (
    CHANNELS_LAST_DEFAULT,
    DEFAULT_RECIPE,
    DEFAULT_RUNS_DIR,
    DEVICES,
    MAX_SEED,
    NAME_RE,
    PAPER_EPOCHS,
    RECIPES,
    REPO_ROOT,
    RESUME_FREE_FIELDS,
    SCHEDULES,
    RunConfig,
    resolve_runs_dir,
    with_defaults,
)
from .errors import DataError, Diverged, Interrupted, UserError
from .resnet import MODELS, SHORTCUTS

# Signals that stop a run like Ctrl-C does (status "interrupted", exit 128 + signal number).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

__all__ = ["RunConfig", "Parser", "UserError", "DataError", "Diverged", "build_parser",
           "parse_args", "make_config", "run_main", "fail", "script_run_name",
           # re-exported from common.config, where library code imports them
           "REPO_ROOT", "DEFAULT_RUNS_DIR", "PAPER_EPOCHS", "RECIPES", "DEFAULT_RECIPE",
           "CHANNELS_LAST_DEFAULT", "RESUME_FREE_FIELDS", "with_defaults", "resolve_runs_dir"]


def fail(message: str) -> None:
    """Raise ``UserError(message)``: the entry point prints ``error: message`` and exits 2."""
    raise UserError(message)


def _fmt_default(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ... (see prog --help)``), not
    the usage block and then the error: the line that matters is not buried under 20 others."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(description: str, defaults: Optional[Mapping[str, Any]] = None,
                 prog: Optional[str] = None) -> argparse.ArgumentParser:
    """Parser with the shared groups: data, model, optimisation, run.

    ``defaults`` overrides a flag's default by its dest name (e.g. ``{"lr": 0.05}``); the help text
    shows the overridden value. Scripts add their own group afterwards with
    ``parser.add_argument_group``.
    """
    defaults = dict(defaults or {})
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = set(defaults) - set(fields)
    if unknown:
        raise ValueError(f"build_parser: unknown defaults {sorted(unknown)}")

    def dflt(dest):
        if dest in defaults:
            return defaults[dest]
        f = fields[dest]
        return f.default if f.default is not dataclasses.MISSING else None

    parser = Parser(description=description, prog=prog,
                    formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(group, flag, dest, help, shown=None, **kw):
        d = dflt(dest)
        default = shown if shown is not None else _fmt_default(d)
        group.add_argument(flag, dest=dest, default=d, help=f"{help} (default: {default})", **kw)

    for add_group in (_data_and_model_flags, _optimisation_flags, _run_flags):
        add_group(parser, add)
    return parser


def _data_and_model_flags(parser: argparse.ArgumentParser, add: Callable[..., None]) -> None:
    """The data and model groups."""
    g = parser.add_argument_group("data")
    add(g, "--data-dir", "data_dir", "folder holding cifar-10-batches-py, or that folder itself; "
        "a relative DIR (here or in $CIFAR10_DIR) is looked up from the current folder, then from "
        "the repo root", shown=f"${'CIFAR10_DIR'} if set, else data/ in the repo", metavar="DIR")
    add(g, "--synthetic", "synthetic", "use a small generated dataset (512 train / 256 test "
        "images) for smoke tests; results are meaningless", action="store_true")
    add(g, "--val-split", "val_split", "hold out the last 5,000 training images (the second half "
        "of data_batch_5; a tenth of a synthetic set) as a validation set: trained on 45,000, "
        "val_acc reported beside test_acc each epoch. Make every choice (recipe, epochs, "
        "layers kept in higher precision) on it, never on the test set; the run name gets _val",
        action="store_true")

    g = parser.add_argument_group("model")
    add(g, "--model", "model", "network: " + ", ".join(MODELS), type=str.lower,
        choices=list(MODELS), metavar="NAME")
    add(g, "--shortcut", "shortcut", "shortcut where the shape changes: A = zero-padding identity "
        "(the paper's on CIFAR), B = 1x1 conv + BN",
        shown="A for resnet8..110, B for resnet18..152", type=str.upper, choices=list(SHORTCUTS))


def _optimisation_flags(parser: argparse.ArgumentParser, add: Callable[..., None]) -> None:
    """The optimisation group, with the recipes in its description."""
    recipes = "; ".join(f"{k}: " + (", ".join(f"--{f.replace('_', '-')} {_fmt_default(v)}"
                                                for f, v in preset.items()) or "the defaults below")
                        for k, preset in RECIPES.items())
    g = parser.add_argument_group("optimisation", f"recipes ({recipes}); a flag given explicitly "
                                  "overrides its recipe's value")
    add(g, "--recipe", "recipe", "preset of the flags below: " + ", ".join(RECIPES),
        choices=list(RECIPES))
    add(g, "--epochs", "epochs", "training epochs; the paper's 64k iterations at batch 128 on 50k "
        "images are 164 epochs", type=int, metavar="N")
    add(g, "--batch-size", "batch_size", "global batch size (split across DDP processes)",
        type=int, metavar="N")
    add(g, "--eval-batch-size", "eval_batch_size", "batch size for evaluation", type=int,
        metavar="N")
    add(g, "--eval-every", "eval_every", "score the test set (and the EMA weights, and the "
        "validation split) after every N-th epoch and after the last: the same training and final "
        "result for every N, fewer points on the per-epoch curves (except with stochastic "
        "rounding of w or a, whose casts draw random numbers in evaluation too)", type=int,
        metavar="N")
    add(g, "--lr", "lr", "peak learning rate of SGD", type=float)
    add(g, "--momentum", "momentum", "SGD momentum", type=float)
    add(g, "--nesterov", "nesterov", "use Nesterov momentum", action="store_true")
    add(g, "--weight-decay", "weight_decay", "L2 weight decay (on all parameters, as in the paper)",
        type=float)
    add(g, "--schedule", "schedule", "lr schedule: step = divide by 10 at 50%% and 75%% of the "
        "epochs (the paper's); cosine = cosine decay to 0, per step; linear = linear decay to 0, "
        "per step (with --warmup-epochs: the one-cycle schedule)", choices=list(SCHEDULES))
    add(g, "--warmup-epochs", "warmup_epochs", "linear lr warm-up over this many epochs (a smooth "
        "stand-in for He et al.'s ResNet-110 recipe: lr 0.01 for the first ~400 iterations)",
        type=float, metavar="E")
    add(g, "--label-smoothing", "label_smoothing", "label smoothing of the training loss (the "
        "test loss stays plain cross-entropy)", type=float, metavar="EPS")
    add(g, "--ema-decay", "ema_decay", "keep an exponential moving average of the weights with "
        "this decay per step and log its test accuracy as ema_test_acc each epoch (the reported "
        "accuracy stays the trained model's); 0 = off", type=float, metavar="D")


def _run_flags(parser: argparse.ArgumentParser, add: Callable[..., None]) -> None:
    """The run group: seed, device, layout, compile, run folder."""
    g = parser.add_argument_group("run")
    add(g, "--seed", "seed", "seed of the weights' initialisation, shuffling and augmentation",
        type=int)
    add(g, "--device", "device", "auto = cuda if available, else cpu", choices=list(DEVICES))
    add(g, "--channels-last", "channels_last", "NHWC memory layout for images and weights",
        shown="auto: " + ", ".join(f"{'on' if v else 'off'} for {k}"
                                   for k, v in CHANNELS_LAST_DEFAULT.items()),
        action=argparse.BooleanOptionalAction)
    add(g, "--compile", "compile", "torch.compile the model (needs a C++ compiler; slow start)",
        action="store_true")
    add(g, "--cuda-graphs", "cuda_graphs", "with --compile on CUDA, replay the model's forward and "
        "backward as CUDA graphs (torch.compile mode reduce-overhead): a small model's step is "
        "otherwise bound by kernel launches; no effect on a CPU",
        action=argparse.BooleanOptionalAction)
    add(g, "--tf32", "tf32", "allow TF32 matmuls/convolutions on CUDA (faster, but no longer FP32 "
        "arithmetic)", action="store_true")
    add(g, "--deterministic", "deterministic", "CUDA: deterministic cuDNN/cuBLAS kernels, no "
        "autotuning, so GPU runs (and resumes) repeat bit for bit; slower. CPU runs always repeat",
        action="store_true")
    add(g, "--runs-dir", "runs_dir", "where run folders go; a relative DIR is an existing folder "
        "from the current folder, else from the repo root, else made here",
        shown="runs/ in the repo root", metavar="DIR")
    add(g, "--name", "name", "run name, the folder runs/<name>/", shown="derived from the config",
        metavar="NAME")
    add(g, "--resume", "resume", "continue runs/<name>/last.pt if present (a finished run prints "
        "its result and exits 0; no checkpoint: start fresh)", action="store_true")
    add(g, "--overwrite", "overwrite", "start over, deleting an existing runs/<name>/",
        action="store_true")
    add(g, "--max-steps-per-epoch", "max_steps_per_epoch", "cap the steps per epoch (smoke tests "
        "and benchmarks)", shown="none: the full epoch", type=int, metavar="N")


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
               ) -> argparse.Namespace:
    """``parser.parse_args`` plus checks of the shared flags; bad values exit 2 via
    ``parser.error``.

    ``--recipe NAME`` first sets the defaults of its preset flags (``RECIPES``), and likewise
    every flag of ``parser.presets`` ({flag: {name: {dest: default}}}, e.g. --gemm-recipe);
    flags given explicitly keep their value.
    """
    presets = {"--recipe": RECIPES, **getattr(parser, "presets", {})}
    args = parser.parse_args(argv)   # which presets are named, read as argparse reads the flags
    chosen = [(table, getattr(args, flag[2:].replace("-", "_"))) for flag, table in presets.items()]
    named = [table[name] for table, name in chosen if name in table]
    if named:                        # again, on the presets' defaults: explicit flags win
        for defaults in named:
            parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    checks = [
        (args.epochs >= 1, "--epochs must be >= 1"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.eval_batch_size >= 1, "--eval-batch-size must be >= 1"),
        (args.eval_every >= 1, "--eval-every must be >= 1"),
        (0 < args.lr < math.inf, "--lr must be > 0 and finite"),
        (0 <= args.momentum < 1, "--momentum must be in [0, 1)"),
        (0 <= args.weight_decay < math.inf, "--weight-decay must be >= 0 and finite"),
        (0 <= args.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED} (numpy's seed range)"),
        (args.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
        (args.warmup_epochs <= args.epochs,
         f"--warmup-epochs {args.warmup_epochs:g} is longer than --epochs {args.epochs}: the "
         f"learning rate would never reach --lr; use --warmup-epochs <= --epochs"),
        (0 <= args.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
        (0 <= args.ema_decay < 1, "--ema-decay must be in [0, 1)"),
        (args.max_steps_per_epoch is None or args.max_steps_per_epoch >= 1,
         "--max-steps-per-epoch must be >= 1"),
        (not (args.resume and args.overwrite), "--resume and --overwrite exclude each other"),
        (not (args.nesterov and args.momentum == 0), "--nesterov needs --momentum > 0"),
        (args.name is None or bool(NAME_RE.match(args.name)),
         f"--name {args.name!r}: use letters, digits and . _ = + - only"),
    ]
    for ok, msg in checks:
        if not ok:
            parser.error(msg)
    return args


Derived = Union[None, Any, Callable[[argparse.Namespace], Any]]


def _derive(value: Derived, args: argparse.Namespace) -> Any:
    return value(args) if callable(value) else value


def script_run_name(tag: str, args: argparse.Namespace) -> str:
    """A format script's default run name: ``<tag>_<model>_<recipe>_e<epochs>_s<seed>``, the
    pattern of the sweep's names after the format tag (e.g. ``fp32_resnet20_paper_e164_s0``), so
    runs of other lengths or recipes never share a folder."""
    name = f"{args.model}_{args.recipe}_e{args.epochs}_s{args.seed}"
    return f"{tag}_{name}" if tag else name


def make_config(args: argparse.Namespace, name: Derived = None, label: Derived = "",
                format: Derived = None, script: Optional[str] = None) -> RunConfig:
    """Resolve parsed flags into a frozen ``RunConfig``.

    ``name`` is the default run name (a string or a function of ``args``; ``--name`` wins); without
    one it is ``script_run_name("", args)``. A ``--synthetic`` or ``--max-steps-per-epoch`` run gets
    a suffix on its default name, so a smoke test never collides with a real run. ``label`` and
    ``format`` are recorded with the run (see ``RunConfig``). Flags that are not RunConfig fields (a
    script's own group) are ignored here: put what matters of them into ``format``.
    """
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    run_name = values.pop("name", None)
    if run_name is None:
        run_name = _derive(name, args) or script_run_name("", args)
        if values.get("synthetic"):
            run_name += "_synthetic"
        if values.get("val_split"):
            run_name += "_val"
        if values.get("max_steps_per_epoch"):
            run_name += f"_max{values['max_steps_per_epoch']}"
    if not NAME_RE.match(run_name):
        raise UserError(f"run name {run_name!r}: use letters, digits and . _ = + - only")
    if values.get("runs_dir") is not None:
        values["runs_dir"] = str(resolve_runs_dir(values["runs_dir"]))
    fmt = _derive(format, args)
    return RunConfig(name=run_name, label=_derive(label, args) or "", format=dict(fmt or {}),
                     script=script or os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT),
                     **values)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run_main(main: Callable[..., Any], argv: Optional[Sequence[str]] = None) -> None:
    """Call ``main(argv)`` and exit: 0 done, 1 diverged, 2 user error, 128 + signal interrupted.

    User errors print one line ``error: ...`` on stderr, without a traceback; so do file-system
    errors that reach here (a path, permissions, a full disk: not bugs); a divergence's message
    was already printed by the loop. SIGTERM and SIGHUP stop the run like Ctrl-C (status
    "interrupted"). Other exceptions are bugs and keep their traceback.
    """
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in STOP_SIGNALS}
    try:
        main(argv)
    except UserError as e:
        if _is_rank0():
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as e:
        if _is_rank0():
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror or e} (check the path, its permissions and the free "
                  f"disk space)", file=sys.stderr, flush=True)
        sys.exit(2)
    except Diverged:
        sys.exit(1)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        if _is_rank0():
            print(f"interrupted ({signal.Signals(signum).name}): last.pt keeps the last finished "
                  f"epoch; rerun with --resume to continue", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    finally:
        for signum, handler in previous.items():
            if handler is not None:          # None: set outside Python, cannot be restored
                signal.signal(signum, handler)
    sys.exit(0)
