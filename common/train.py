"""The training loop every script shares: SGD on CIFAR-10, evaluation every epoch, runs/<name>/.

``run(config, model_transform=None, autocast_dtype=None, after_step=None) -> summary dict``

* Builds ``config.model``, applies ``model_transform(model)`` (issue 4's quantized-layer wrap; it
  may modify in place or return a new module) before the model moves to the device and the
  optimizer sees its parameters, then trains under ``torch.autocast(device, autocast_dtype)``
  when a dtype is given (float16 also gets a GradScaler). ``after_step(model)`` runs after every
  optimizer step (e.g. to cast the master weights).
* Defaults follow He et al. 2016: SGD momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by
  10 at 50% and 75% of the epochs (or cosine), 164 epochs (= the paper's 64k iterations).
* Prints one line per epoch (and a progress bar when stdout is a terminal); the last line is
  ``final test accuracy: XX.XX% (N test images)``. The reported accuracy is the last epoch's,
  never the best epoch's (choosing the best on the test set would be selection on the test set).
* Writes ``runs/<name>/`` (see ``common.runs``); checkpoints after every epoch; ``--resume``
  continues bit for bit on CPU (all RNG states, the optimizer and the data generator are saved;
  the learning rate is a pure function of (epoch, step), so there is no scheduler state to lose).

Outcomes: returns the summary (status "finished"), also when ``--resume`` finds the run already
finished. A NaN/inf loss raises ``Diverged`` (summary status "diverged", last.pt left at the last
good epoch; scripts exit 1). Ctrl-C (and SIGTERM/SIGHUP under ``cli.run_main``) writes status
"interrupted" and re-raises (exit 130, 143, 129). Bad input and file-system trouble (a run folder
that cannot be written, a full disk, a corrupt checkpoint) raise ``UserError`` (exit 2). Any other
exception writes status "failed".

The run folder is locked (``runs.lock_run``) from before it is read until the run ends, so a
second process on the same folder is refused; a summary left at "running" by a dead process is
rewritten as "interrupted" when the folder is next opened.

Hot path: nothing is copied to the host inside an epoch. Loss and accuracy are summed on the
device; finiteness is checked every ``DIVERGENCE_CHECK_EVERY`` steps and at the end of the epoch
(one scalar sync, all-reduced under DDP so every rank stops together).

Multi-GPU: under ``torchrun`` (``WORLD_SIZE`` > 1) the loop joins a process group (NCCL on CUDA,
gloo on CPU), wraps the model in DistributedDataParallel and gives each rank its slice of every
global batch (``--batch-size`` is the global batch, split evenly; see ``data.TrainBatches``).
BatchNorm statistics are per rank (no SyncBN), as usual for DDP; buffers are broadcast from rank 0
before each evaluation. Evaluation is sharded and its sums all-reduced; rank 0 alone logs and
writes files.
"""
from __future__ import annotations

import copy
import math
import os
import platform
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import data as data_mod
from . import hardware
from . import runs
from .cli import CHANNELS_LAST_DEFAULT, REPO_ROOT, RESUME_FREE_FIELDS, RunConfig, with_defaults
from .errors import Diverged, Interrupted, RunFileError, UserError
from .resnet import build_model, count_parameters

DIVERGENCE_CHECK_EVERY = 50          # steps between finiteness checks (one host sync each)
PROGRESS_EVERY_S = 0.5               # progress-bar refresh period on a terminal

__all__ = ["run", "lr_at", "resolve_device", "evaluate", "Diverged", "CHANNELS_LAST_DEFAULT"]


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------
def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without CUDA -> UserError."""
    if spec not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {spec!r}: choose auto, cpu or cuda")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
                        f"built for CUDA {torch.version.cuda}); use --device cpu or --device auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def lr_at(config: RunConfig, epoch: int, step: int, steps: int) -> float:
    """Learning rate of step ``step`` (0-based) of epoch ``epoch`` (0-based), ``steps`` per epoch.

    step: ``lr`` until 50% of the epochs, ``lr/10`` until 75%, then ``lr/100`` (He et al. 2016:
    32k and 48k of 64k iterations); the change happens at the first epoch at or past the mark.
    cosine: ``lr * (1 + cos(pi * t / epochs)) / 2`` with t the fractional epoch, per step.
    linear: after the warm-up, ``lr`` decays linearly to 0 at the end, per step (with a warm-up:
    the one-cycle schedule of Smith & Topin 2019, without its momentum cycle).
    A linear warm-up over ``warmup_epochs`` scales step and cosine; linear rises to ``lr`` over it.
    """
    t = epoch + step / steps
    if config.schedule == "step":
        lr = config.lr * (0.1 ** sum(epoch >= m * config.epochs for m in (0.5, 0.75)))
    elif config.schedule == "cosine":
        lr = config.lr * 0.5 * (1.0 + math.cos(math.pi * t / config.epochs))
    elif config.schedule == "linear":
        decay = max(config.epochs - config.warmup_epochs, 1e-9)
        lr = config.lr * max(0.0, min(1.0, (config.epochs - t) / decay))
    else:
        raise UserError(f"unknown schedule {config.schedule!r}; choose step, cosine or linear")
    if config.warmup_epochs > 0 and t < config.warmup_epochs:
        lr *= (epoch * steps + step + 1) / (config.warmup_epochs * steps)
    return lr


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _setup_distributed(device_spec: str) -> _Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), local, False)
    use_cuda = device_spec == "cuda" or (device_spec == "auto" and torch.cuda.is_available())
    if use_cuda and torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return _Dist(rank, world, local, True)


def _all_reduce(t: torch.Tensor, ctx: _Dist, op=None) -> torch.Tensor:
    if ctx.active:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def compile_mode(config: RunConfig, device: torch.device) -> Optional[str]:
    """How the model is compiled: None (``--compile`` off), "reduce-overhead" (CUDA graphs: on
    CUDA with ``--cuda-graphs``, the default) or "default" (CPU, or ``--no-cuda-graphs``)."""
    if not config.compile:
        return None
    return "reduce-overhead" if device.type == "cuda" and config.cuda_graphs else "default"


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP wrappers (what checkpoints hold)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def build_run_model(config: RunConfig, device: torch.device, channels_last: bool,
                    model_transform: Optional[Callable[[nn.Module], Optional[nn.Module]]] = None
                    ) -> nn.Module:
    """The model a run trains: ``config.model`` built, its layers swapped by ``model_transform``
    (a format script's quantization), on ``device`` in the run's memory layout. Training and the
    evaluation of saved weights (``common.evaluation``) both build it here, so they match."""
    try:
        model = build_model(config.model, num_classes=data_mod.NUM_CLASSES, shortcut=config.shortcut)
    except ValueError as e:
        raise UserError(str(e)) from None
    if model_transform is not None:
        out = model_transform(model)
        model = out if out is not None else model
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def evaluate(model: nn.Module, data: data_mod.DeviceData, normalizer: data_mod.Normalizer,
             batch_size: int, autocast_dtype: Optional[torch.dtype] = None,
             ctx: Optional[_Dist] = None, predictions: bool = False,
             split: str = "test") -> Dict[str, Any]:
    """Test loss (mean cross-entropy) and accuracy (%) on the whole test set (``split="val"``:
    the validation images held out of training); sharded under DDP.

    ``predictions=True`` adds ``"predictions"``: the predicted class of every test image, in the
    test set's order (gathered from every rank), for paired comparisons between runs.
    """
    ctx = ctx or _Dist()
    model.eval()
    dev = data.device
    sums = torch.zeros(3, dtype=torch.float64, device=dev)       # loss sum, correct, count
    preds = []
    with torch.no_grad(), torch.autocast(dev.type, dtype=autocast_dtype or torch.float32,
                                         enabled=autocast_dtype is not None):
        for x, y in data_mod.eval_batches(data, batch_size, normalizer, ctx.rank, ctx.world_size,
                                          split):
            out = model(x)
            pred = out.argmax(1)
            sums[0] += F.cross_entropy(out.float(), y, reduction="sum").double()
            sums[1] += (pred == y).sum()
            sums[2] += y.shape[0]
            if predictions:
                preds.append(pred)
    _all_reduce(sums, ctx)
    loss, correct, n = sums.tolist()
    result = {"test_loss": loss / n, "test_acc": 100.0 * correct / n, "test_images": int(n)}
    if predictions:
        mine = torch.cat(preds).tolist() if preds else []
        if ctx.active:                   # shards are contiguous and in rank order
            shards: List[Any] = [None] * ctx.world_size
            dist.all_gather_object(shards, mine)
            mine = [p for shard in shards for p in shard]
        result["predictions"] = mine
    return result


class WeightEMA:
    """Exponential moving average of a model's parameters and floating-point buffers.

    After every optimizer step ``ema = decay * ema + (1 - decay) * live``; integer buffers
    (BatchNorm's step counter) are copied. The copy is a whole model (same quantized layers), so
    it is evaluated exactly like the live one.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        self._float = [(e, m) for e, m in self._pairs if e.is_floating_point()]
        self._other = [(e, m) for e, m in self._pairs if not e.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        ema, live = zip(*self._float)
        torch._foreach_lerp_(list(ema), list(live), 1.0 - self.decay)
        for e, m in self._other:
            e.copy_(m)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _differences(where: str, new: Any, old: Any) -> List[tuple]:
    """(where, new, old) for each differing leaf: dicts are compared key by key (``format.w``), so
    a resume mismatch names only what differs."""
    if isinstance(new, dict) and isinstance(old, dict):
        return [d for k in sorted(set(new) | set(old), key=str)
                for d in _differences(f"{where}.{k}", new.get(k), old.get(k))]
    return [] if new == old else [(where, new, old)]


class _Progress:
    """A one-line progress bar, drawn only when stdout is a terminal (no dependency)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stdout.isatty()
        self.last = 0.0

    def update(self, epoch: int, epochs: int, step: int, steps: int, images: int, t0: float):
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < PROGRESS_EVERY_S and step < steps:
            return
        self.last = now
        width = 30
        done = int(width * step / steps)
        ips = images / max(now - t0, 1e-9)
        sys.stdout.write(f"\r  epoch {epoch}/{epochs} [{'#' * done}{'.' * (width - done)}] "
                         f"{step}/{steps}  {ips:,.0f} img/s ")
        sys.stdout.flush()

    def clear(self):
        if self.enabled:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def run(config: RunConfig, model_transform: Optional[Callable[[nn.Module], Optional[nn.Module]]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        after_step: Optional[Callable[[nn.Module], None]] = None) -> Dict[str, Any]:
    """Train ``config`` to the end (or resume it) and return its summary dict (see module doc)."""
    # --device cuda without CUDA is refused before a process group exists (NCCL would fail first,
    # with a traceback from every rank)
    resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    ctx = _setup_distributed(config.device)
    saved = _global_flags()
    all_ranks_done = False
    trainer = None
    try:
        trainer = _Trainer(config, ctx, model_transform, autocast_dtype, after_step)
        summary = trainer.execute()
        all_ranks_done = True
        return summary
    except Diverged:
        all_ranks_done = True            # every rank saw it (the check is all-reduced)
        raise
    finally:
        if trainer is not None:
            trainer.unlock()
        _restore_global_flags(saved)     # a later run in the same process starts from the defaults
        if ctx.initialized_here and dist.is_initialized():
            if all_ranks_done:
                # no rank tears its process group down while a peer still writes its files or
                # uses the group: a gloo rank that left first was once aborted at exit (SIGABRT)
                dist.barrier()
            dist.destroy_process_group()


def _global_flags():
    return (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


def _restore_global_flags(saved):
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, det, warn) = saved
    torch.use_deterministic_algorithms(det, warn_only=warn)


class _Trainer:
    def __init__(self, config, ctx, model_transform, autocast_dtype, after_step):
        self.cfg = config
        self.ctx = ctx
        self.model_transform = model_transform
        self.autocast_dtype = autocast_dtype
        self.after_step = after_step
        self.rank0 = ctx.rank == 0
        self.run_dir = config.run_dir
        self.ckpt_path = self.run_dir / runs.CHECKPOINT
        self.made_run_dir = False       # rank 0 created the run folder (see unlock)
        self.metrics: List[Dict[str, Any]] = []
        self.wall_prev = 0.0            # seconds spent in earlier sessions of this run (resume)
        self.train_prev = 0.0
        # CPU seconds of this process (all its threads) in earlier sessions; None when a session
        # before this field existed left it unknown
        self.cpu_prev: Optional[float] = 0.0
        self.started_at = _now()
        self.t_start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.train_seconds = 0.0
        self.resolved: Dict[str, Any] = {}
        self.lock = None                # the run folder's lock file (rank 0), see runs.lock_run
        self.saved_epoch = 0            # the epoch last.pt holds

    def unlock(self) -> None:
        """Release the run folder; one this run made and left empty (it stopped before writing
        anything, e.g. on a data error) is removed, so no run folder holds only ``.lock``."""
        if self.lock is None:
            return
        self.lock.close()
        self.lock = None
        if self.made_run_dir:
            runs.remove_if_empty(self.run_dir)

    # -- output ---------------------------------------------------------------------------------
    def log(self, msg: str, err: bool = False) -> None:
        if self.rank0:
            print(msg, file=sys.stderr if err else sys.stdout, flush=True)

    def cpu_seconds(self) -> Optional[float]:
        """CPU time of this run so far, over all its sessions (None if one of them did not count
        it): unlike wall time, it does not grow when other work shares the machine."""
        if self.cpu_prev is None:
            return None
        return round(self.cpu_prev + time.process_time() - self.cpu_start, 1)

    def summary(self, status: str, message: str = "") -> Dict[str, Any]:
        last = self.metrics[-1] if self.metrics else {}
        finished = status == "finished"
        train_time = self.train_prev + self.train_seconds
        images = sum(m["train_images"] for m in self.metrics)
        return {
            "name": self.cfg.name,
            "status": status,
            "message": message,
            "label": self.cfg.label,
            "format": self.cfg.format,
            "model": self.cfg.model,
            "params": self.resolved.get("params"),
            "epochs": self.cfg.epochs,
            "epochs_done": len(self.metrics),
            "final_test_acc": last.get("test_acc") if finished else None,
            "final_test_loss": last.get("test_loss") if finished else None,
            **({"final_val_acc": last.get("val_acc") if finished else None,
                "val_images": last.get("val_images")} if self.cfg.val_split else {}),
            "last_test_acc": last.get("test_acc"),
            "last_test_loss": last.get("test_loss"),
            "last_train_loss": last.get("train_loss"),
            "last_train_acc": last.get("train_acc"),
            "test_images": last.get("test_images"),
            "train_images_per_epoch": self.resolved.get("train_images_per_epoch"),
            "wall_seconds": round(self.wall_prev + time.perf_counter() - self.t_start, 3),
            "train_seconds": round(train_time, 3),
            "cpu_seconds": self.cpu_seconds(),
            "mean_images_per_s": round(images / train_time, 1) if train_time > 0 and images else None,
            "device": self.resolved.get("device"),
            "device_name": self.resolved.get("device_name"),
            "world_size": self.ctx.world_size,
            "autocast": self.resolved.get("autocast"),
            "channels_last": self.resolved.get("channels_last"),
            "git_hash": self.resolved.get("git", {}).get("hash"),
            "git_dirty": self.resolved.get("git", {}).get("dirty"),
            "torch_version": torch.__version__,
            "started_at": self.started_at,
            "updated_at": _now(),
            "run_dir": str(self.run_dir),
            "config": self.cfg.to_dict(),
            **self._weights_fields(finished),
        }

    def _weights_fields(self, finished: bool) -> Dict[str, Any]:
        """The finished model's weights file and its sha256, for the summary (and the record)."""
        path = self.run_dir / runs.WEIGHTS
        if not (finished and path.is_file()):
            return {}
        return {"weights_file": runs.WEIGHTS, "weights_sha256": runs.file_sha256(path)}

    def write_summary(self, status: str, message: str = "") -> Dict[str, Any]:
        s = self.summary(status, message)
        if self.rank0:
            runs.write_json(self.run_dir / runs.SUMMARY, s)
        return s

    def _try_write_summary(self, status: str, message: str) -> None:
        """write_summary on the way out of a stopped run: a failing write (disk full) must not
        hide why the run stopped; the lock then tells readers that the run is dead."""
        try:
            self.write_summary(status, message)
        except RunFileError:
            pass

    # -- existing run folder ----------------------------------------------------------------------
    def _check_resume_config(self, ckpt: Dict[str, Any], device: torch.device) -> None:
        old, new = with_defaults(ckpt["config"]), runs.jsonable(self.cfg.to_dict())
        differing = [k for k in sorted(set(old) | set(new))
                     if k not in RESUME_FREE_FIELDS and old.get(k) != new.get(k)]
        if len(differing) > 1 and "label" in differing:
            differing.remove("label")    # the label only describes the other fields
        diffs = []
        for k in differing:
            flag = "--" + k.replace("_", "-") if k not in ("format", "label") else k
            diffs += [f"{where} {n!r} (checkpoint: {o!r})"
                      for where, n, o in _differences(flag, new.get(k), old.get(k))]
        if ckpt.get("device_type") != device.type:
            diffs.append(f"device {device.type} (checkpoint: {ckpt.get('device_type')})")
        if ckpt.get("world_size", 1) != self.ctx.world_size:
            diffs.append(f"{self.ctx.world_size} processes (checkpoint: {ckpt.get('world_size', 1)})")
        if ckpt.get("autocast") != self.resolved["autocast"]:
            diffs.append(f"autocast {self.resolved['autocast']} (checkpoint: {ckpt.get('autocast')})")
        if diffs:
            raise UserError(f"cannot resume {self.run_dir}: the run differs from its checkpoint in "
                            f"{'; '.join(diffs)}. Use the original flags, or a new --name")
        if bool(old.get("compile")) != bool(new.get("compile")):
            self.log(f"note: resuming {'with' if new.get('compile') else 'without'} --compile, "
                     f"unlike the epochs before: the same training, but other kernels (and, for "
                     f"stochastic rounding, another random stream), so not bit for bit the run "
                     f"that was not interrupted")

    def _lock_run_dir(self) -> None:
        """Rank 0 locks the run folder for the run's life (every rank learns if that failed);
        a summary still saying "running" was left by a dead process: say "interrupted"."""
        error = None
        if self.rank0:
            try:
                self.made_run_dir = not self.run_dir.exists()
                self.lock = runs.lock_run(self.run_dir)
                prev = runs.read_summary(self.run_dir, live=False)
                if prev is not None and prev.get("status") == "running":
                    runs.write_json(self.run_dir / runs.SUMMARY,
                                    prev | {"status": "interrupted", "message": runs.DEAD_RUN_MESSAGE})
            except UserError as e:
                error = str(e)
        if self.ctx.active:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error is not None:
            raise UserError(error)

    def _prepare_run_dir(self, device: torch.device) -> Optional[Dict[str, Any]]:
        """Decide between resume / fresh / refuse; returns the checkpoint to resume from, if any."""
        self._lock_run_dir()
        have_ckpt = self.ckpt_path.is_file()
        have_run = have_ckpt or (self.run_dir / runs.SUMMARY).is_file()
        if self.cfg.resume:
            if have_ckpt:
                ckpt = self._load_checkpoint()
                if ckpt.get("version") != runs.CHECKPOINT_VERSION:
                    raise UserError(f"{self.ckpt_path}: checkpoint version {ckpt.get('version')} "
                                    f"is not {runs.CHECKPOINT_VERSION}; pass --overwrite to start over")
                self._check_resume_config(ckpt, device)
                return ckpt
            prev = runs.read_summary(self.run_dir, live=False) or {}
            if prev.get("epochs_done"):     # epochs were trained, but nothing can continue them
                raise UserError(f"{self.run_dir} holds a run with {prev['epochs_done']}/"
                                f"{prev.get('epochs', '?')} epochs (status {prev.get('status', '?')}) "
                                f"but no {runs.CHECKPOINT} to resume from; pass --overwrite to "
                                f"start it over, or a new --name")
            self.log(f"--resume: no checkpoint at {self.ckpt_path}: starting fresh")
        elif have_run:
            if not self.cfg.overwrite:
                prev = runs.read_summary(self.run_dir, live=False) or {}
                raise UserError(f"{self.run_dir} already holds a run (status {prev.get('status', '?')}, "
                                f"{prev.get('epochs_done', '?')}/{prev.get('epochs', '?')} epochs); "
                                f"pass --resume to continue it, --overwrite to start over, or a new --name")
            if self.rank0:
                runs.clear_run_dir(self.run_dir)
        if self.ctx.active:
            dist.barrier()
        return None

    def _load_checkpoint(self) -> Dict[str, Any]:
        """last.pt for --resume; a file that is not one of this project's checkpoints is refused
        with one line naming it and the choices (torch's own advice does not apply here)."""
        try:
            ckpt = runs.load_checkpoint(self.ckpt_path)
        except OSError as e:
            raise UserError(f"cannot read checkpoint {self.ckpt_path}: {e.strerror or e}") from None
        except Exception:
            ckpt = None
        if not isinstance(ckpt, dict) or not {"epoch", "config", "model"} <= set(ckpt):
            raise UserError(f"{self.ckpt_path} is not a checkpoint of this project (corrupt or "
                            f"truncated); pass --overwrite to start the run over, or delete the file")
        return ckpt

    # -- main -----------------------------------------------------------------------------------
    def execute(self) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        device = resolve_device(cfg.device, ctx.local_rank)
        if device.type == "cuda":
            # FP32 means FP32: TF32 tensor-core arithmetic only with --tf32.
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
            # Autotuned cuDNN kernels are fastest but may differ from run to run (and some use
            # atomics); --deterministic trades that speed for GPU runs that repeat exactly.
            torch.backends.cudnn.benchmark = not cfg.deterministic
            torch.backends.cudnn.deterministic = cfg.deterministic
            if cfg.deterministic:
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True, warn_only=True)   # warn, not fail
        channels_last = (CHANNELS_LAST_DEFAULT[device.type] if cfg.channels_last is None
                         else cfg.channels_last)
        self.resolved = {
            "device": str(device), "device_name": hardware.device_name(device),
            "channels_last": channels_last, "world_size": ctx.world_size,
            "autocast": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None,
            "tf32": bool(cfg.tf32 and device.type == "cuda"),
            "git": runs.git_info(REPO_ROOT),
        }
        ckpt = self._prepare_run_dir(device)
        if ckpt is not None and ckpt["epoch"] >= cfg.epochs:
            return self._already_finished(ckpt)

        # Seeds: weights' initialisation (torch CPU RNG) and anything using python/numpy RNGs.
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        data = data_mod.load_device_data(device, cfg.data_dir, cfg.synthetic,
                                         val_split=cfg.val_split)
        model = build_run_model(cfg, device, channels_last, self.model_transform)
        raw_model = model
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        generator = data_mod.make_generator(device, cfg.seed)
        self.ema = WeightEMA(raw_model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        start_epoch = 0
        if ckpt is not None:
            raw_model.load_state_dict(ckpt["model"])
            if self.ema is not None:
                self.ema.model.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            runs.set_rng_state(ckpt["rng"], generator)
            self.metrics = list(ckpt["metrics"])
            self.wall_prev = ckpt.get("wall_seconds", 0.0)
            self.train_prev = ckpt.get("train_seconds", 0.0)
            self.cpu_prev = ckpt.get("cpu_seconds")
            self.started_at = ckpt.get("started_at", self.started_at)
            start_epoch = self.saved_epoch = ckpt["epoch"]

        normalizer = data_mod.Normalizer(device, channels_last=channels_last)
        try:
            batches = data_mod.TrainBatches(data, cfg.batch_size, generator, normalizer,
                                            rank=ctx.rank, world_size=ctx.world_size,
                                            max_steps=cfg.max_steps_per_epoch)
        except ValueError as e:
            raise UserError(str(e)) from None
        train_model = model
        if ctx.active:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        eval_model = raw_model
        mode = compile_mode(cfg, device)
        self.resolved["compile_mode"] = mode
        if mode is not None:
            options = {"mode": mode} if mode != "default" else {}
            train_model = torch.compile(train_model, **options)
            eval_model = train_model if not ctx.active else torch.compile(raw_model, **options)

        n_params = count_parameters(raw_model)
        self.resolved.update({
            "params": n_params, "steps_per_epoch": len(batches),
            "train_images_per_epoch": len(batches) * cfg.batch_size,
            "train_images": int(data.train_x.shape[0]), "test_images": int(data.test_x.shape[0]),
            "data_source": data.source,
        })
        if self.rank0:
            runs.write_json(self.run_dir / runs.CONFIG, {
                "config": cfg.to_dict(), "resolved": self.resolved,
                "torch_version": torch.__version__, "python_version": platform.python_version(),
                "numpy_version": np.__version__, "argv": sys.argv, "cwd": os.getcwd(),
                "resumed_from_epoch": start_epoch if ckpt is not None else None, "written_at": _now(),
            })
            if ckpt is not None:
                runs.write_jsonl(self.run_dir / runs.METRICS, self.metrics)
        shortcut = getattr(raw_model, "shortcut_option", None)
        self.log(f"run {cfg.name}: {cfg.model} ({n_params / 1e6:.2f}M params"
                 f"{', shortcut ' + shortcut if shortcut else ''}) on {device} "
                 f"({self.resolved['device_name']}{', ' + str(ctx.world_size) + ' processes' if ctx.active else ''}"
                 f", channels-last {'on' if channels_last else 'off'}"
                 f"{', autocast ' + self.resolved['autocast'] if self.autocast_dtype else ''})")
        self.log(f"  data: {data.train_x.shape[0]} train / {data.test_x.shape[0]} test images from "
                 f"{data.source}; {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} x {len(batches)} steps "
                 f"of {cfg.batch_size}, "
                 f"{cfg.schedule} schedule from lr {cfg.lr:g}; writing {self.run_dir}")
        if ckpt is not None:
            self.log(f"  resuming after epoch {start_epoch} from {self.ckpt_path}")
        self.write_summary("running")

        try:
            self._loop(start_epoch, train_model, eval_model, raw_model, optimizer, scaler, generator,
                       batches, data, normalizer, device)
        except Diverged:
            raise
        except KeyboardInterrupt as e:
            how = (f"stopped by {signal.Signals(e.signum).name}" if isinstance(e, Interrupted)
                   else "stopped by the user (Ctrl-C)")
            self._try_write_summary("interrupted", f"{how}; last.pt keeps the last finished epoch; "
                                                   f"rerun with --resume to continue")
            raise
        except RunFileError as e:        # disk full, folder made read-only, ...
            kept = (f"last.pt keeps epoch {self.saved_epoch}" if self.saved_epoch
                    else "no epoch was saved")
            raise RunFileError(f"{e}; {kept}: fix that, then rerun with --resume") from None
        except UserError:
            raise
        except Exception as e:
            self._try_write_summary("failed", f"{type(e).__name__}: {e}")
            raise
        summary = self.write_summary("finished")
        last = self.metrics[-1]
        self.log(f"final test accuracy: {last['test_acc']:.2f}% ({last['test_images']} test images)")
        return summary

    def _already_finished(self, ckpt: Dict[str, Any]) -> Dict[str, Any]:
        self.metrics = list(ckpt["metrics"])
        self.wall_prev = ckpt.get("wall_seconds", 0.0)
        self.train_prev = ckpt.get("train_seconds", 0.0)
        self.cpu_prev = ckpt.get("cpu_seconds")
        self.started_at = ckpt.get("started_at", self.started_at)
        self.t_start = time.perf_counter()
        self.cpu_start = time.process_time()
        if self.rank0 and len(runs.read_jsonl(self.run_dir / runs.METRICS)) != len(self.metrics):
            runs.write_jsonl(self.run_dir / runs.METRICS, self.metrics)   # stopped before it
        prev = runs.read_json(self.run_dir / runs.SUMMARY) or {}
        self.resolved.setdefault("params", prev.get("params"))
        self.resolved.setdefault("train_images_per_epoch", prev.get("train_images_per_epoch"))
        if prev.get("status") == "finished":
            summary = prev
            # a run finished by older code has no weights.pt: write it from last.pt's model
            if self.rank0 and "weights_sha256" not in prev and runs.ensure_weights(self.run_dir):
                summary = runs.read_json(self.run_dir / runs.SUMMARY) or prev
        else:   # stopped after the last checkpoint but before its summary: finish the paperwork
            summary = self.summary("finished")
            summary["wall_seconds"] = round(self.wall_prev, 3)
            summary["cpu_seconds"] = self.cpu_prev
            if self.rank0:
                runs.write_json(self.run_dir / runs.SUMMARY, summary)
        last = self.metrics[-1]
        self.log(f"run {self.cfg.name} already finished ({len(self.metrics)}/{self.cfg.epochs} epochs "
                 f"in {self.run_dir}); nothing to do")
        self.log(f"final test accuracy: {last['test_acc']:.2f}% ({last['test_images']} test images)")
        return summary

    def _check_finite(self, value: torch.Tensor, epoch: int, step: int, steps: int,
                      what: str = "training loss") -> None:
        """Stop the run if ``value`` is NaN/inf on any rank (one host sync)."""
        bad = (~torch.isfinite(value)).to(torch.float32).reshape(1)
        if what == "training loss":          # the test loss is already the same on every rank
            _all_reduce(bad, self.ctx, dist.ReduceOp.MAX if self.ctx.active else None)
        if bad.item() == 0:
            return
        good = len(self.metrics)
        where = f"step {step}/{steps} of epoch {epoch + 1}" if what == "training loss" else f"epoch {epoch + 1}"
        kept = (f"last.pt keeps epoch {good}, the last good one" if good
                else "no epoch had finished, so there is no last.pt")
        msg = f"diverged: {what} became NaN/inf (detected at {where}); {kept}"
        self.log(msg, err=True)
        summary = self.write_summary("diverged", msg)
        raise Diverged(msg, summary)

    def _loop(self, start_epoch, train_model, eval_model, raw_model, optimizer, scaler, generator,
              batches, data, normalizer, device) -> None:
        cfg, ctx = self.cfg, self.ctx
        steps = len(batches)
        progress = _Progress(self.rank0)
        ac_enabled = self.autocast_dtype is not None
        ac_dtype = self.autocast_dtype or torch.float32
        for epoch in range(start_epoch, cfg.epochs):
            train_model.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)   # sum of batch means
            correct = torch.zeros((), dtype=torch.int64, device=device)
            lr0 = lr_at(cfg, epoch, 0, steps)
            for step, (x, y) in enumerate(batches):
                lr = lr_at(cfg, epoch, step, steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with torch.autocast(device.type, dtype=ac_dtype, enabled=ac_enabled):
                    out = train_model(x)
                    loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if self.after_step is not None:
                    self.after_step(raw_model)
                if self.ema is not None:
                    self.ema.update()
                with torch.no_grad():            # on the device: no host sync per step
                    loss_sum += loss.detach().float()
                    correct += (out.argmax(1) == y).sum()
                if (step + 1) % DIVERGENCE_CHECK_EVERY == 0:
                    self._check_finite(loss_sum, epoch, step + 1, steps)
                progress.update(epoch + 1, cfg.epochs, step + 1, steps,
                                (step + 1) * cfg.batch_size, t0)
            self._check_finite(loss_sum, epoch, steps, steps)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time = time.perf_counter() - t0
            progress.clear()
            # every step has the same global batch (the last partial batch is dropped), so the
            # epoch's mean loss is the mean of the batch means; ranks' sums are added up
            sums = _all_reduce(torch.stack([loss_sum.double(), correct.double()]), ctx)
            batch_loss_sum, train_correct = sums.tolist()
            images = steps * cfg.batch_size
            train_loss = batch_loss_sum / (steps * ctx.world_size)

            if ctx.active:                      # evaluate the same BN statistics on every rank
                for buf in raw_model.buffers():
                    dist.broadcast(buf, 0)
            last_epoch = epoch + 1 == cfg.epochs
            ev = evaluate(eval_model, data, normalizer, cfg.eval_batch_size, self.autocast_dtype, ctx,
                          predictions=last_epoch)
            if not math.isfinite(ev["test_loss"]):
                self._check_finite(torch.tensor(ev["test_loss"]), epoch, steps, steps, "test loss")
            val = (evaluate(eval_model, data, normalizer, cfg.eval_batch_size, self.autocast_dtype,
                            ctx, split="val") if cfg.val_split else None)
            epoch_time = time.perf_counter() - t0
            self.train_seconds += train_time
            row = {
                "epoch": epoch + 1, "lr": lr0,
                "train_loss": train_loss, "train_acc": 100.0 * train_correct / images,
                "test_loss": ev["test_loss"], "test_acc": ev["test_acc"],
                **({"ema_test_acc": evaluate(self.ema.model, data, normalizer, cfg.eval_batch_size,
                                             self.autocast_dtype, ctx)["test_acc"]}
                   if self.ema is not None else {}),
                **({"val_loss": val["test_loss"], "val_acc": val["test_acc"],
                    "val_images": val["test_images"]} if val else {}),
                "train_images": images, "test_images": ev["test_images"],
                "epoch_seconds": round(epoch_time, 3), "train_seconds": round(train_time, 3),
                "images_per_s": round(images / train_time, 1),
                "wall_seconds": round(self.wall_prev + time.perf_counter() - self.t_start, 3),
            }
            if self.rank0:
                if last_epoch:      # before last.pt: a finished checkpoint has its predictions
                    runs.write_predictions(self.run_dir, ev["predictions"], data.test_y)
                    runs.save_weights(self.run_dir / runs.WEIGHTS, raw_model.state_dict())
                runs.save_checkpoint(self.ckpt_path, {
                    "version": runs.CHECKPOINT_VERSION, "epoch": epoch + 1,
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    **({"ema": self.ema.model.state_dict()} if self.ema is not None else {}),
                    "scaler": scaler.state_dict(), "rng": runs.rng_state(generator),
                    "metrics": self.metrics + [row], "config": runs.jsonable(cfg.to_dict()),
                    "device_type": device.type,
                    "world_size": ctx.world_size, "autocast": self.resolved["autocast"],
                    "wall_seconds": row["wall_seconds"],
                    "train_seconds": self.train_prev + self.train_seconds,
                    "cpu_seconds": self.cpu_seconds(),
                    "started_at": self.started_at,
                })
            # only once saved: a run stopped during the save never counts the epoch as done
            self.metrics.append(row)
            if self.rank0:
                self.saved_epoch = epoch + 1
                runs.write_jsonl(self.run_dir / runs.METRICS, self.metrics)
                self.write_summary("running")
            self.log(f"epoch {epoch + 1:>{len(str(cfg.epochs))}}/{cfg.epochs}  lr {lr0:.5f}  "
                     f"train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%  "
                     f"test loss {row['test_loss']:.4f} acc {row['test_acc']:6.2f}%  "
                     + (f"val acc {row['val_acc']:6.2f}%  " if val else "")
                     + f"{epoch_time:6.1f}s  {row['images_per_s']:,.0f} img/s")
