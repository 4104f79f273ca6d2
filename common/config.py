"""What defines a run, with no command line in it: the frozen ``RunConfig``, the named recipes,
the defaults and the repo's paths. ``common.cli`` builds a ``RunConfig`` from flags; the loop,
the sweep, the report and the evaluation read it from here.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

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

@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run, resolved once from the flags and saved as
    runs/<name>/config.json.

    Fields a format script sets (beyond the shared flags): ``label`` (human-readable, for tables and
    plots, e.g. "FP8 w=e5m2(t) a=e4m3"), ``format`` (the JSON-able format record: ``family``,
    ``bits_per_element`` and, for quantized runs, ``QuantConfig.to_dict()``'s roles; recorded in
    config.json and summary.json for the report and ``common.evaluation``) and ``script``. Treat
    ``format`` as read-only.
    ``channels_last=None`` means the device's default (``CHANNELS_LAST_DEFAULT``).
    """

    name: str
    model: str = "resnet20"
    shortcut: Optional[str] = None
    epochs: int = PAPER_EPOCHS
    batch_size: int = 128
    eval_batch_size: int = 1000
    eval_every: int = 1
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
                                "cuda_graphs", "device", "script", "eval_every"})


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


@dataclass(frozen=True)
class FormatRecord:
    """The schema of ``RunConfig.format``: the number format a run trained in, as config.json and
    summary.json record it. Every format script builds its record here, and the report reads
    records through ``from_dict``, so the writers and the readers agree on one set of fields.

    ``family``: the script's family ("fp32", "bf16", "fp8", "fp4") or a posit's name
    ("posit8es1"). ``bits_per_element``: storage bits of the forward operands, block scales
    included (4.25 for mxfp4; an int where whole). ``mode``: "autocast" for BF16 under
    torch.autocast, else None. ``roles``: for runs with quantized layers, role -> {"fmt",
    "rounding", "scaling"} as ``common.qat.QuantConfig.to_dict`` writes them (plain dicts: this
    module stays free of torch), else None; ``first_last_fp32`` and ``backend`` are theirs too.
    Fields that are None are not written, so ``to_dict`` gives exactly the dicts stored so far.
    """

    family: str
    bits_per_element: Optional[float] = None
    mode: Optional[str] = None
    roles: Optional[Dict[str, Dict[str, Any]]] = None
    first_last_fp32: Optional[bool] = None
    backend: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """The JSON-able record, keys in the order the scripts have always written them."""
        d: Dict[str, Any] = {"family": self.family}
        if self.mode is not None:
            d["mode"] = self.mode
        d["bits_per_element"] = self.bits_per_element
        d.update({role: dict(v) for role, v in (self.roles or {}).items()})
        if self.first_last_fp32 is not None:
            d["first_last_fp32"] = self.first_last_fp32
        if self.backend is not None:
            d["backend"] = self.backend
        return d

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "FormatRecord":
        """A stored record (None or {} reads as an unknown family ""). Tolerates older records:
        the family under "name" (the FP32 script's first records), a missing bits_per_element
        (None); other plain keys are dropped, and every dict-valued key is a role."""
        d = d or {}
        roles = {k: dict(v) for k, v in d.items() if isinstance(v, Mapping)}
        return cls(family=str(d.get("family") or d.get("name") or ""),
                   bits_per_element=d.get("bits_per_element"), mode=d.get("mode"),
                   roles=roles or None, first_last_fp32=d.get("first_last_fp32"),
                   backend=d.get("backend"))

    @classmethod
    def quantized(cls, family: str, bits_per_element: float,
                  quant: Mapping[str, Any]) -> "FormatRecord":
        """The record of a run with quantized layers: ``quant`` is ``QuantConfig.to_dict()``."""
        return cls.from_dict({"family": family, "bits_per_element": bits_per_element, **quant})

    def role_fmt(self, role: str) -> Optional[str]:
        """The format name of one role ("weight", "act", ...), None when the record has none."""
        return (self.roles or {}).get(role, {}).get("fmt") or None


# ----------------------------------------------------------------------------------------------
# The configurations of the results table (what ``sweep.py --configs`` names and the report
# identifies runs by)
# ----------------------------------------------------------------------------------------------
class SweepConfig(NamedTuple):
    """One configuration of a sweep: a format script (path from the repo root) and its flags."""

    script: str
    flags: Tuple[str, ...] = ()
    about: str = ""
    compared_with: str = ""   # the configuration this one changes, its row of comparison


# The configurations a sweep can run, by key (the key starts the run's name). Adding one is one
# line.
CONFIGS: Dict[str, SweepConfig] = {
    "fp32": SweepConfig("FP32/train_cifar10_fp32.py", (), "FP32 baseline"),
    # --mode pinned: without it the script picks emulated on a CPU without bf16 arithmetic, and
    # a bf16_* run would hold bf16-emu's configuration
    "bf16": SweepConfig("BF16/bf16_train.py", ("--mode", "autocast"),
                        "BF16 mixed precision (torch.autocast)"),
    "bf16-emu": SweepConfig("BF16/bf16_train.py", ("--mode", "emulated"),
                            "BF16 emulated: w/a/g cast to bf16"),
    "fp8-e5m2w": SweepConfig("FP8/train_cifar10_fp8.py",
                             ("--w-fmt", "e5m2", "--a-fmt", "e4m3", "--first-last-fp32"),
                             "FP8: e5m2 weights, e4m3 activations, e5m2 gradients, "
                             "first/last fp32"),
    "fp8-e4m3w": SweepConfig("FP8/train_cifar10_fp8.py",
                             ("--w-fmt", "e4m3", "--a-fmt", "e4m3", "--first-last-fp32"),
                             "FP8: e4m3 weights and activations, e5m2 gradients, first/last fp32"),
    "fp4": SweepConfig("FP4/train_cifar10_fp4.py", (), "FP4 E2M1, scaled (the script's defaults)"),
    "fp4-mx": SweepConfig("FP4/train_cifar10_fp4.py",
                          ("--w-fmt", "mxfp4", "--a-fmt", "mxfp4", "--g-fmt", "mxfp4"),
                          "MXFP4 (32 E2M1 per E8M0 scale) w/a/g, gradients stochastic"),
    "fp4-nv": SweepConfig("FP4/train_cifar10_fp4.py",
                          ("--w-fmt", "nvfp4", "--a-fmt", "nvfp4", "--g-fmt", "nvfp4"),
                          "NVFP4 (16 E2M1 per E4M3 scale, float32 per tensor) w/a/g, "
                          "gradients stochastic"),
    "fp4-nv-fl": SweepConfig("FP4/train_cifar10_fp4.py",
                             ("--w-fmt", "nvfp4", "--a-fmt", "nvfp4", "--g-fmt", "nvfp4",
                              "--first-last-fp32"),
                             "NVFP4 w/a/g, gradients stochastic, first/last fp32 (extra: the "
                             "4-bit candidate closest to FP32 after training, by its PTQ)"),
    "fp8-te-gemm": SweepConfig("FP8/train_cifar10_fp8.py",
                               ("--gemm-recipe", "te-fp8", "--first-last-fp32"),
                               "FP8 GEMM mode, TransformerEngine recipe: e4m3 x and w, e5m2 dy, "
                               "per-tensor scales, first/last fp32", compared_with="fp8-e4m3w"),
    "fp8-te-gemm-acc16": SweepConfig("FP8/train_cifar10_fp8.py",
                                     ("--gemm-recipe", "te-fp8", "--first-last-fp32",
                                      "--acc", "fp16", "--acc-chunk", "32"),
                                     "fp8-te-gemm with fp16 accumulation, chunks of 32, in all "
                                     "three GEMMs", compared_with="fp8-te-gemm"),
    "fp4-nv-gemm-fl": SweepConfig("FP4/train_cifar10_fp4.py",
                                  ("--gemm-recipe", "nvfp4", "--first-last-fp32"),
                                  "NVFP4 GEMM mode, NVIDIA's recipe (2D weight blocks, Hadamard "
                                  "on wgrad, SR on gradients), first/last fp32",
                                  compared_with="fp4-nv-fl"),
    "fp4-nv-gemm": SweepConfig("FP4/train_cifar10_fp4.py", ("--gemm-recipe", "nvfp4"),
                               "NVFP4 GEMM mode, NVIDIA's recipe on every layer",
                               compared_with="fp4-nv"),
    "fp4-mx-gemm": SweepConfig("FP4/train_cifar10_fp4.py", ("--gemm-recipe", "mxfp4"),
                               "MXFP4 GEMM mode with the NVFP4 recipe's treatment, every layer",
                               compared_with="fp4-mx"),
    "posit4": SweepConfig("Posit/train_cifar10_posit.py",
                          ("--bits", "4", "--es", "0", "--first-last-fp32"),
                          "posit(4,0), scaled, first/last fp32"),
    "posit8": SweepConfig("Posit/train_cifar10_posit.py",
                          ("--bits", "8", "--es", "1", "--first-last-fp32"),
                          "posit(8,1), gradients scaled, first/last fp32"),
    "posit16": SweepConfig("Posit/train_cifar10_posit.py",
                           ("--bits", "16", "--es", "1", "--first-last-fp32"),
                           "posit(16,1), unscaled, first/last fp32"),
}

# RunConfig fields that define what is trained; an existing run must agree on them to be reused
# (the others: the run's identity, where it lives, or how fast it runs), and runs that agree on
# them share a table of the report.
COMPARED_EXCLUDE = RESUME_FREE_FIELDS | {"seed", "label", "format", "channels_last",
                                         "deterministic"}


def compared_values(config: Mapping[str, Any]) -> Dict[str, object]:
    """The fields of a RunConfig dict that must agree for an existing run to be reused."""
    return {k: v for k, v in config.items() if k not in COMPARED_EXCLUDE}
