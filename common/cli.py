"""Command line shared by every training script: argparse groups, the frozen ``RunConfig``, exit codes.

A format script stays thin::

    parser = cli.build_parser("FP8 training of CIFAR ResNets")
    g = parser.add_argument_group("format")
    g.add_argument("--w-fmt", default="e4m3", help="weight format (default: e4m3)")
    args = cli.parse_args(parser, argv)
    config = cli.make_config(args, name=cli.script_run_name(f"fp8_w-{args.w_fmt}", args),
                             label=f"FP8 w={args.w_fmt}", format={"w": args.w_fmt, "bits": 8})
    return train.run(config, model_transform=...)

    if __name__ == "__main__":
        cli.run_main(main)

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
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

from .errors import DataError, Diverged, Interrupted, UserError
from .resnet import MODELS, SHORTCUTS

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS_DIR = REPO_ROOT / "runs"
# He et al. 2016 trained the CIFAR ResNets for 64k iterations at batch 128, dividing the lr by 10
# at 32k and 48k: 64,000 / (50,000 / 128) = 164 epochs, the steps at 50% and 75% of them.
PAPER_EPOCHS = 164
SCHEDULES = ("step", "cosine", "linear")
# Named recipes: presets of ordinary flags (any flag given explicitly wins over its preset).
# paper: He et al. 2016 as published. fast: the short CPU protocol of the results table, chosen
# from an accuracy-against-epochs curve of FP32 ResNet-20 (README, "Results"): a one-cycle
# schedule (short linear warm-up, linear decay to 0), Nesterov momentum, weight decay 5e-4 and
# label smoothing 0.1 reach the paper's 164-epoch accuracy in a fraction of the epochs.
RECIPES: Dict[str, Dict[str, Any]] = {
    "paper": {},
    "fast": {"epochs": 20, "schedule": "linear", "warmup_epochs": 1.0, "lr": 0.1,
             "nesterov": True, "weight_decay": 5e-4, "label_smoothing": 0.1, "ema_decay": 0.999},
}
DEFAULT_RECIPE = "paper"
DEVICES = ("auto", "cpu", "cuda")
# channels-last (NHWC) default per device type, measured with benchmarks/pipeline_speed.py: on CUDA
# it lets cuDNN use its fastest convolution kernels; on the 2-core x86 CPU (oneDNN) ResNet-20's
# forward+backward ran about 20% faster in NHWC too.
CHANNELS_LAST_DEFAULT = {"cuda": True, "cpu": True}
MAX_SEED = 2**32 - 1                  # np.random.seed's range
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")
# Signals that stop a run like Ctrl-C does (status "interrupted", exit 128 + signal number).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

__all__ = ["RunConfig", "Parser", "UserError", "DataError", "Diverged", "build_parser", "parse_args",
           "make_config", "parse_config", "run_main", "fail", "script_run_name", "REPO_ROOT",
           "DEFAULT_RUNS_DIR", "PAPER_EPOCHS", "RECIPES"]


def fail(message: str) -> None:
    """Raise ``UserError(message)``: the entry point prints ``error: message`` and exits 2."""
    raise UserError(message)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run, resolved once from the flags and saved as runs/<name>/config.json.

    Fields a format script sets (beyond the shared flags): ``label`` (human-readable, for tables and
    plots, e.g. "FP8 w=e5m2 a=e4m3"), ``format`` (a JSON-able dict of the script's format settings,
    e.g. ``{"w": "e5m2", "a": "e4m3", "bits_per_element": 8}``; recorded in config.json and
    summary.json for the report) and ``script``. Treat ``format`` as read-only.
    ``channels_last=None`` means the device's default (``CHANNELS_LAST_DEFAULT``).
    """

    name: str
    model: str = "resnet20"
    shortcut: Optional[str] = None
    epochs: int = PAPER_EPOCHS
    batch_size: int = 128
    eval_batch_size: int = 1000
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    schedule: str = "step"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    recipe: str = DEFAULT_RECIPE
    seed: int = 0
    device: str = "auto"
    data_dir: Optional[str] = None
    synthetic: bool = False
    val_split: bool = False
    channels_last: Optional[bool] = None
    compile: bool = False
    cuda_graphs: bool = True
    tf32: bool = False
    deterministic: bool = False
    runs_dir: str = str(DEFAULT_RUNS_DIR)
    resume: bool = False
    overwrite: bool = False
    max_steps_per_epoch: Optional[int] = None
    label: str = ""
    format: Dict[str, Any] = field(default_factory=dict)
    script: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able copy (``format`` deep-copied)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        """Inverse of ``to_dict``; unknown keys are ignored (configs written by older code)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def with_defaults(stored: Mapping[str, Any]) -> Dict[str, Any]:
    """A stored config dict with the fields it lacks at their defaults: a run written before a
    flag existed ran as that flag's default does, so comparing it with today's flags must not
    read a missing field as a difference."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)
                if f.default is not dataclasses.MISSING}
    return {**defaults, **stored}


# Fields that may differ when a run is resumed: they do not change what is trained or measured.
# (Not --eval-batch-size: activations scaled per tensor take their scale per test batch, so it
# changes the test accuracy. --compile may differ, with a note: see train.py.)
RESUME_FREE_FIELDS = frozenset({"name", "runs_dir", "resume", "overwrite", "data_dir", "compile",
                                "cuda_graphs", "device", "script"})


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
        group.add_argument(flag, dest=dest, default=d,
                           help=f"{help} (default: {shown if shown is not None else _fmt_default(d)})",
                           **kw)

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
        "(the paper's on CIFAR), B = 1x1 conv + BN", shown="A for resnet8..110, B for resnet18..152",
        type=str.upper, choices=list(SHORTCUTS))

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
    add(g, "--eval-batch-size", "eval_batch_size", "batch size for evaluation", type=int, metavar="N")
    add(g, "--lr", "lr", "peak learning rate of SGD", type=float)
    add(g, "--momentum", "momentum", "SGD momentum", type=float)
    add(g, "--nesterov", "nesterov", "use Nesterov momentum", action="store_true")
    add(g, "--weight-decay", "weight_decay", "L2 weight decay (on all parameters, as in the paper)",
        type=float)
    add(g, "--schedule", "schedule", "lr schedule: step = divide by 10 at 50%% and 75%% of the epochs "
        "(the paper's); cosine = cosine decay to 0, per step; linear = linear decay to 0, per step "
        "(with --warmup-epochs: the one-cycle schedule)", choices=list(SCHEDULES))
    add(g, "--warmup-epochs", "warmup_epochs", "linear lr warm-up over this many epochs (a smooth "
        "stand-in for He et al.'s ResNet-110 recipe: lr 0.01 for the first ~400 iterations)",
        type=float, metavar="E")
    add(g, "--label-smoothing", "label_smoothing", "label smoothing of the training loss (the "
        "test loss stays plain cross-entropy)", type=float, metavar="EPS")
    add(g, "--ema-decay", "ema_decay", "keep an exponential moving average of the weights with this "
        "decay per step and log its test accuracy as ema_test_acc each epoch (the reported "
        "accuracy stays the trained model's); 0 = off", type=float, metavar="D")

    g = parser.add_argument_group("run")
    add(g, "--seed", "seed", "seed of the weights' initialisation, shuffling and augmentation",
        type=int)
    add(g, "--device", "device", "auto = cuda if available, else cpu", choices=list(DEVICES))
    add(g, "--channels-last", "channels_last", "NHWC memory layout for images and weights",
        shown="auto: " + ", ".join(f"{'on' if v else 'off'} for {k}" for k, v in CHANNELS_LAST_DEFAULT.items()),
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
    add(g, "--max-steps-per-epoch", "max_steps_per_epoch", "cap the steps per epoch (smoke tests and "
        "benchmarks)", shown="none: the full epoch", type=int, metavar="N")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
               ) -> argparse.Namespace:
    """``parser.parse_args`` plus checks of the shared flags; bad values exit 2 via ``parser.error``.

    ``--recipe NAME`` first sets the defaults of its preset flags (``RECIPES``); flags given
    explicitly keep their value.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=parser.get_default("recipe"))
    recipe = pre.parse_known_args(argv)[0].recipe
    if recipe in RECIPES:                # an unknown name is refused by the full parse below
        parser.set_defaults(**RECIPES[recipe])
    args = parser.parse_args(argv)
    checks = [
        (args.epochs >= 1, "--epochs must be >= 1"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.eval_batch_size >= 1, "--eval-batch-size must be >= 1"),
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


def resolve_runs_dir(path: str) -> Path:
    """A ``--runs-dir`` as an absolute path. A relative one is looked up as ``--data-dir`` is: an
    existing folder from the current folder, else one from the repo root (so ``--runs-dir runs``
    typed in FP32/ finds the repo's runs/ instead of making FP32/runs/), else made from the
    current folder."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p.resolve()
    here, root = Path.cwd() / p, REPO_ROOT / p
    return (root if not here.is_dir() and root.is_dir() else here).resolve()


def make_config(args: argparse.Namespace, name: Derived = None, label: Derived = "",
                format: Derived = None, script: Optional[str] = None) -> RunConfig:
    """Resolve parsed flags into a frozen ``RunConfig``.

    ``name`` is the default run name (a string or a function of ``args``; ``--name`` wins); without
    one it is ``script_run_name("", args)``. A ``--synthetic`` or ``--max-steps-per-epoch`` run gets
    a suffix on its default name, so a smoke test never collides with a real run. ``label`` and ``format``
    are recorded with the run (see ``RunConfig``). Flags that are not RunConfig fields (a script's
    own group) are ignored here: put what matters of them into ``format``.
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


def parse_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                 name: Derived = None, label: Derived = "", format: Derived = None) -> RunConfig:
    """``parse_args`` then ``make_config`` in one call, for scripts whose name/label/format are
    functions of the parsed args (scripts that need the args themselves call the two separately)."""
    return make_config(parse_args(parser, argv), name=name, label=label, format=format)


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
