"""The training loop every script shares: SGD on CIFAR-10, evaluation every epoch, runs/<name>/.

``run(config, model_transform=None, autocast_dtype=None, after_step=None) -> summary dict``

* Builds ``config.model``, applies ``model_transform(model)`` (a format script's quantized-layer
  swap; it may modify in place or return a new module) before the model moves to the device and the
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

The pieces, in timm's shape: ``setup`` builds a run's state at step 0 (data, model, optimizer,
EMA, wrappers) as a ``Setup``; ``train_one_epoch`` and ``evaluate`` are plain functions;
``common.checkpoint`` owns last.pt (its layout, restoring it, the resume check). ``_Trainer`` only
adds the run folder around them: its lock, logs, summary and per-epoch checkpoints.

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
import gc
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

from . import checkpoint, hardware, runs
from . import data as data_mod
from .config import CHANNELS_LAST_DEFAULT, REPO_ROOT, RunConfig
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
        model = build_model(config.model, num_classes=data_mod.NUM_CLASSES,
                            shortcut=config.shortcut)
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
def run(config: RunConfig,
        model_transform: Optional[Callable[[nn.Module], Optional[nn.Module]]] = None,
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
        trainer = None
        _restore_global_flags(saved)     # a later run in the same process starts from the defaults
        if ctx.initialized_here and dist.is_initialized():
            # DDP's wrapper sits in reference cycles, so it outlives the run until the cyclic
            # garbage collector runs: left to interpreter exit, its reducer and the gloo work it
            # holds were torn down after the process group, and a rank was aborted ("terminate
            # called without an active exception"). Free it here, while the group is alive.
            gc.collect()
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


@dataclass
class Setup:
    """Everything one training run works with, built by ``setup``."""

    device: torch.device
    channels_last: bool
    data: data_mod.DeviceData
    normalizer: data_mod.Normalizer
    batches: data_mod.TrainBatches
    model: nn.Module                  # the plain module: what checkpoints and weights.pt hold
    train_model: nn.Module            # model, wrapped by DDP and/or torch.compile
    eval_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator        # the data pipeline's (shuffling, augmentation)
    ema: Optional[WeightEMA]
    compile_mode: Optional[str]


def configure_backends(config: RunConfig, device: torch.device) -> None:
    """CUDA's global arithmetic flags for this run (``run`` restores them afterwards)."""
    if device.type != "cuda":
        return
    # FP32 means FP32: TF32 tensor-core arithmetic only with --tf32.
    torch.backends.cuda.matmul.allow_tf32 = config.tf32
    torch.backends.cudnn.allow_tf32 = config.tf32
    # Autotuned cuDNN kernels are fastest but may differ from run to run (and some use atomics);
    # --deterministic trades that speed for GPU runs that repeat exactly.
    torch.backends.cudnn.benchmark = not config.deterministic
    torch.backends.cudnn.deterministic = config.deterministic
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)   # warn, not fail


def setup(config: RunConfig, device: torch.device, channels_last: bool, ctx: Optional[_Dist] = None,
          model_transform: Optional[Callable[[nn.Module], Optional[nn.Module]]] = None,
          autocast_dtype: Optional[torch.dtype] = None) -> Setup:
    """Seed, load the data, build the model (``build_run_model``), its optimizer, grad scaler,
    EMA and batches, and wrap it for DDP and ``--compile``: a fresh run's state at step 0."""
    ctx = ctx or _Dist()
    torch.manual_seed(config.seed)       # the weights' initialisation
    random.seed(config.seed)
    np.random.seed(config.seed)
    data = data_mod.load_device_data(device, config.data_dir, config.synthetic,
                                     val_split=config.val_split)
    model = build_run_model(config, device, channels_last, model_transform)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.nesterov)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    generator = data_mod.make_generator(device, config.seed)
    normalizer = data_mod.Normalizer(device, channels_last=channels_last)
    try:
        batches = data_mod.TrainBatches(data, config.batch_size, generator, normalizer,
                                        rank=ctx.rank, world_size=ctx.world_size,
                                        max_steps=config.max_steps_per_epoch)
    except ValueError as e:
        raise UserError(str(e)) from None
    train_model = eval_model = model
    if ctx.active:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    mode = compile_mode(config, device)
    if mode is not None:
        options = {"mode": mode} if mode != "default" else {}
        train_model = torch.compile(train_model, **options)
        eval_model = train_model if not ctx.active else torch.compile(model, **options)
    ema = WeightEMA(model, config.ema_decay) if config.ema_decay > 0 else None
    return Setup(device, channels_last, data, normalizer, batches, model, train_model, eval_model,
                 optimizer, scaler, generator, ema, mode)


@dataclass
class EpochStats:
    """What one pass over the training set measured."""

    train_loss: float
    train_acc: float
    images: int
    seconds: float


def train_one_epoch(s: Setup, config: RunConfig, epoch: int,
                    autocast_dtype: Optional[torch.dtype] = None,
                    after_step: Optional[Callable[[nn.Module], None]] = None,
                    check_finite: Optional[Callable[[torch.Tensor, int], None]] = None,
                    ctx: Optional[_Dist] = None, progress: Optional[_Progress] = None
                    ) -> EpochStats:
    """One epoch of SGD (timm's ``train_one_epoch`` shape). Nothing is copied to the host inside
    it: loss and accuracy are summed on the device, and ``check_finite(loss_sum, step)`` (which
    may stop the run) sees the running loss every ``DIVERGENCE_CHECK_EVERY`` steps and at the
    end."""
    ctx = ctx or _Dist()
    steps = len(s.batches)
    s.train_model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float32, device=s.device)   # sum of batch means
    correct = torch.zeros((), dtype=torch.int64, device=s.device)
    for step, (x, y) in enumerate(s.batches):
        lr = lr_at(config, epoch, step, steps)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(s.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            out = s.train_model(x)
            loss = F.cross_entropy(out, y, label_smoothing=config.label_smoothing)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        if after_step is not None:
            after_step(s.model)
        if s.ema is not None:
            s.ema.update()
        with torch.no_grad():
            loss_sum += loss.detach().float()
            correct += (out.argmax(1) == y).sum()
        if check_finite is not None and (step + 1) % DIVERGENCE_CHECK_EVERY == 0:
            check_finite(loss_sum, step + 1)
        if progress is not None:
            progress.update(epoch + 1, config.epochs, step + 1, steps,
                            (step + 1) * config.batch_size, t0)
    if check_finite is not None:
        check_finite(loss_sum, steps)
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    seconds = time.perf_counter() - t0
    # every step has the same global batch (the last partial batch is dropped), so the epoch's
    # mean loss is the mean of the batch means; ranks' sums are added up
    sums = _all_reduce(torch.stack([loss_sum.double(), correct.double()]), ctx)
    batch_loss_sum, train_correct = sums.tolist()
    images = steps * config.batch_size
    return EpochStats(batch_loss_sum / (steps * ctx.world_size), 100.0 * train_correct / images,
                      images, seconds)


class _Trainer:
    """One run of ``run``: its folder, lock, logs, summary, checkpoints and the epoch loop."""

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
        self.prev = checkpoint.Clock(started_at=_now())   # earlier sessions of this run
        self.metrics: List[Dict[str, Any]] = []
        self.t_start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.train_seconds = 0.0        # this session's
        self.resolved: Dict[str, Any] = {}
        self.lock = None                # the run folder's lock file (rank 0), see runs.lock_run
        self.saved_epoch = 0            # the epoch last.pt holds
        self.ema: Optional[WeightEMA] = None

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
        if self.prev.cpu_seconds is None:
            return None
        return round(self.prev.cpu_seconds + time.process_time() - self.cpu_start, 1)

    def wall_seconds(self) -> float:
        return round(self.prev.wall_seconds + time.perf_counter() - self.t_start, 3)

    def clock(self) -> checkpoint.Clock:
        """This run's totals over all its sessions, as the next checkpoint keeps them."""
        return checkpoint.Clock(len(self.metrics), self.metrics, self.wall_seconds(),
                                self.prev.train_seconds + self.train_seconds, self.cpu_seconds(),
                                self.prev.started_at)

    def summary(self, status: str, message: str = "") -> Dict[str, Any]:
        last = self.metrics[-1] if self.metrics else {}
        # the last epoch that scored the test set (all of them unless --eval-every > 1)
        scored = next((m for m in reversed(self.metrics) if m.get("test_acc") is not None), {})
        finished = status == "finished"
        train_time = self.prev.train_seconds + self.train_seconds
        images = sum(m["train_images"] for m in self.metrics)
        git = self.resolved.get("git", {})
        return {
            "name": self.cfg.name, "status": status, "message": message,
            "label": self.cfg.label, "format": self.cfg.format, "model": self.cfg.model,
            "params": self.resolved.get("params"),
            "epochs": self.cfg.epochs, "epochs_done": len(self.metrics),
            "final_test_acc": last.get("test_acc") if finished else None,
            "final_test_loss": last.get("test_loss") if finished else None,
            **({"final_val_acc": last.get("val_acc") if finished else None,
                "val_images": scored.get("val_images")} if self.cfg.val_split else {}),
            "last_test_acc": scored.get("test_acc"), "last_test_loss": scored.get("test_loss"),
            "last_train_loss": last.get("train_loss"), "last_train_acc": last.get("train_acc"),
            "test_images": scored.get("test_images"),
            "train_images_per_epoch": self.resolved.get("train_images_per_epoch"),
            "wall_seconds": self.wall_seconds(), "train_seconds": round(train_time, 3),
            "cpu_seconds": self.cpu_seconds(),
            "mean_images_per_s": (round(images / train_time, 1) if train_time > 0 and images
                                  else None),
            "device": self.resolved.get("device"), "device_name": self.resolved.get("device_name"),
            "world_size": self.ctx.world_size, "autocast": self.resolved.get("autocast"),
            "channels_last": self.resolved.get("channels_last"),
            "git_hash": git.get("hash"), "git_dirty": git.get("dirty"),
            "torch_version": torch.__version__,
            "started_at": self.prev.started_at, "updated_at": _now(),
            "run_dir": str(self.run_dir), "config": self.cfg.to_dict(),
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
                                    prev | {"status": "interrupted",
                                            "message": runs.DEAD_RUN_MESSAGE})
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
                ckpt = checkpoint.read(self.ckpt_path)
                self._check_resume(ckpt, device)
                return ckpt
            prev = runs.read_summary(self.run_dir, live=False) or {}
            if prev.get("epochs_done"):     # epochs were trained, but nothing can continue them
                raise UserError(f"{self.run_dir} holds a run with {prev['epochs_done']}/"
                                f"{prev.get('epochs', '?')} epochs "
                                f"(status {prev.get('status', '?')}) "
                                f"but no {runs.CHECKPOINT} to resume from; pass --overwrite to "
                                f"start it over, or a new --name")
            self.log(f"--resume: no checkpoint at {self.ckpt_path}: starting fresh")
        elif have_run:
            if not self.cfg.overwrite:
                prev = runs.read_summary(self.run_dir, live=False) or {}
                raise UserError(f"{self.run_dir} already holds a run "
                                f"(status {prev.get('status', '?')}, "
                                f"{prev.get('epochs_done', '?')}/{prev.get('epochs', '?')} "
                                f"epochs); pass --resume to continue it, --overwrite to start "
                                f"over, or a new --name")
            if self.rank0:
                runs.clear_run_dir(self.run_dir)
        if self.ctx.active:
            dist.barrier()
        return None

    def _check_resume(self, ckpt: Dict[str, Any], device: torch.device) -> None:
        diffs = checkpoint.resume_mismatches(ckpt, self.cfg, device.type, self.ctx.world_size,
                                             self.resolved["autocast"])
        if diffs:
            raise UserError(f"cannot resume {self.run_dir}: the run differs from its checkpoint in "
                            f"{'; '.join(diffs)}. Use the original flags, or a new --name")
        if checkpoint.compile_changed(ckpt, self.cfg):
            self.log(f"note: resuming {'with' if self.cfg.compile else 'without'} --compile, "
                     f"unlike the epochs before: the same training, but other kernels (and, for "
                     f"stochastic rounding, another random stream), so not bit for bit the run "
                     f"that was not interrupted")

    # -- main -----------------------------------------------------------------------------------
    def execute(self) -> Dict[str, Any]:
        cfg = self.cfg
        device = resolve_device(cfg.device, self.ctx.local_rank)
        configure_backends(cfg, device)
        channels_last = (CHANNELS_LAST_DEFAULT[device.type] if cfg.channels_last is None
                         else cfg.channels_last)
        self.resolved = {
            "device": str(device), "device_name": hardware.device_name(device),
            "channels_last": channels_last, "world_size": self.ctx.world_size,
            "autocast": (str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype
                         else None),
            "tf32": bool(cfg.tf32 and device.type == "cuda"),
            "git": runs.git_info(REPO_ROOT),
        }
        ckpt = self._prepare_run_dir(device)
        if ckpt is not None and ckpt["epoch"] >= cfg.epochs:
            return self._already_finished(ckpt)
        s = setup(cfg, device, channels_last, self.ctx, self.model_transform, self.autocast_dtype)
        self.ema = s.ema
        start_epoch = 0
        if ckpt is not None:
            started = self.prev.started_at
            self.prev = checkpoint.restore(ckpt, s.model, s.optimizer, s.scaler, s.generator,
                                           s.ema.model if s.ema is not None else None)
            self.prev.started_at = self.prev.started_at or started
            self.metrics = list(self.prev.metrics)
            start_epoch = self.saved_epoch = ckpt["epoch"]
        self._start_log(s, start_epoch, resumed=ckpt is not None)
        self.write_summary("running")
        try:
            self._epochs(s, start_epoch)
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
        self.log(f"final test accuracy: {last['test_acc']:.2f}% "
                 f"({last['test_images']} test images)")
        return summary

    def _start_log(self, s: Setup, start_epoch: int, resumed: bool) -> None:
        """config.json (and, on resume, metrics.jsonl as the checkpoint has it) and the header."""
        cfg = self.cfg
        n_params = count_parameters(s.model)
        self.resolved.update({
            "compile_mode": s.compile_mode, "params": n_params, "steps_per_epoch": len(s.batches),
            "train_images_per_epoch": len(s.batches) * cfg.batch_size,
            "train_images": int(s.data.train_x.shape[0]),
            "test_images": int(s.data.test_x.shape[0]),
            "data_source": s.data.source,
        })
        if self.rank0:
            runs.write_json(self.run_dir / runs.CONFIG, {
                "config": cfg.to_dict(), "resolved": self.resolved,
                "torch_version": torch.__version__, "python_version": platform.python_version(),
                "numpy_version": np.__version__, "argv": sys.argv, "cwd": os.getcwd(),
                "resumed_from_epoch": start_epoch if resumed else None, "written_at": _now(),
            })
            if resumed:
                runs.write_jsonl(self.run_dir / runs.METRICS, self.metrics)
        shortcut = getattr(s.model, "shortcut_option", None)
        procs = f", {self.ctx.world_size} processes" if self.ctx.active else ""
        autocast = f", autocast {self.resolved['autocast']}" if self.autocast_dtype else ""
        self.log(f"run {cfg.name}: {cfg.model} ({n_params / 1e6:.2f}M params"
                 f"{', shortcut ' + shortcut if shortcut else ''}) on {s.device} "
                 f"({self.resolved['device_name']}{procs}, channels-last "
                 f"{'on' if s.channels_last else 'off'}{autocast})")
        self.log(f"  data: {s.data.train_x.shape[0]} train / {s.data.test_x.shape[0]} test images "
                 f"from {s.data.source}; {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} x "
                 f"{len(s.batches)} steps of {cfg.batch_size}, {cfg.schedule} schedule from lr "
                 f"{cfg.lr:g}; writing {self.run_dir}")
        if resumed:
            self.log(f"  resuming after epoch {start_epoch} from {self.ckpt_path}")

    def _already_finished(self, ckpt: Dict[str, Any]) -> Dict[str, Any]:
        started = self.prev.started_at
        self.prev = checkpoint.clock_of(ckpt)
        self.prev.started_at = self.prev.started_at or started
        self.metrics = list(self.prev.metrics)
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
            summary["wall_seconds"] = round(self.prev.wall_seconds, 3)
            summary["cpu_seconds"] = self.prev.cpu_seconds
            if self.rank0:
                runs.write_json(self.run_dir / runs.SUMMARY, summary)
        last = self.metrics[-1]
        self.log(f"run {self.cfg.name} already finished "
                 f"({len(self.metrics)}/{self.cfg.epochs} epochs in {self.run_dir}); nothing to do")
        self.log(f"final test accuracy: {last['test_acc']:.2f}% "
                 f"({last['test_images']} test images)")
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
        where = (f"step {step}/{steps} of epoch {epoch + 1}" if what == "training loss"
                 else f"epoch {epoch + 1}")
        kept = (f"last.pt keeps epoch {good}, the last good one" if good
                else "no epoch had finished, so there is no last.pt")
        msg = f"diverged: {what} became NaN/inf (detected at {where}); {kept}"
        self.log(msg, err=True)
        summary = self.write_summary("diverged", msg)
        raise Diverged(msg, summary)

    def _epochs(self, s: Setup, start_epoch: int) -> None:
        """Train, evaluate, save and log each remaining epoch."""
        cfg, ctx = self.cfg, self.ctx
        steps = len(s.batches)
        progress = _Progress(self.rank0)
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            stats = train_one_epoch(
                s, cfg, epoch, self.autocast_dtype, self.after_step,
                lambda loss_sum, step: self._check_finite(loss_sum, epoch, step, steps), ctx,
                progress)
            progress.clear()
            self.train_seconds += stats.seconds
            if ctx.active:                      # evaluate the same BN statistics on every rank
                for buf in s.model.buffers():
                    dist.broadcast(buf, 0)
            last_epoch = epoch + 1 == cfg.epochs
            scored = last_epoch or (epoch + 1) % cfg.eval_every == 0
            row, predictions = self._evaluate_epoch(s, epoch, stats, last_epoch, scored)
            row["epoch_seconds"] = round(time.perf_counter() - t0, 3)
            if self.rank0:
                self._save_epoch(s, row, predictions)
            # only once saved: a run stopped during the save never counts the epoch as done
            self.metrics.append(row)
            if self.rank0:
                self.saved_epoch = epoch + 1
                runs.write_jsonl(self.run_dir / runs.METRICS, self.metrics)
                self.write_summary("running")
            val = f"val acc {row['val_acc']:6.2f}%  " if "val_acc" in row else ""
            test = (f"test loss {row['test_loss']:.4f} acc {row['test_acc']:6.2f}%  " if scored
                    else f"(test every {cfg.eval_every} epochs)  ")
            self.log(f"epoch {epoch + 1:>{len(str(cfg.epochs))}}/{cfg.epochs}  lr {row['lr']:.5f}  "
                     f"train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%  "
                     f"{test}{val}{row['epoch_seconds']:6.1f}s  {row['images_per_s']:,.0f} img/s")

    def _evaluate_epoch(self, s: Setup, epoch: int, stats: EpochStats, last_epoch: bool,
                        scored: bool = True):
        """The epoch's metrics row (test, EMA and validation accuracy; None where ``scored`` is
        False: --eval-every), and on the last epoch the predicted class of every test image."""
        cfg, ctx = self.cfg, self.ctx
        unscored = {"test_loss": None, "test_acc": None, "test_images": None}
        ev = (evaluate(s.eval_model, s.data, s.normalizer, cfg.eval_batch_size,
                       self.autocast_dtype, ctx, predictions=last_epoch) if scored else unscored)
        if scored and not math.isfinite(ev["test_loss"]):
            self._check_finite(torch.tensor(ev["test_loss"]), epoch, 0, 0, "test loss")
        val = (evaluate(s.eval_model, s.data, s.normalizer, cfg.eval_batch_size,
                        self.autocast_dtype, ctx, split="val")
               if cfg.val_split and scored else None)
        ema = (evaluate(self.ema.model, s.data, s.normalizer, cfg.eval_batch_size,
                        self.autocast_dtype, ctx) if self.ema is not None and scored else None)
        row = {
            "epoch": epoch + 1, "lr": lr_at(cfg, epoch, 0, len(s.batches)),
            "train_loss": stats.train_loss, "train_acc": stats.train_acc,
            "test_loss": ev["test_loss"], "test_acc": ev["test_acc"],
            **({"ema_test_acc": ema["test_acc"]} if ema else {}),
            **({"val_loss": val["test_loss"], "val_acc": val["test_acc"],
                "val_images": val["test_images"]} if val else {}),
            "train_images": stats.images, "test_images": ev["test_images"],
            "epoch_seconds": None, "train_seconds": round(stats.seconds, 3),
            "images_per_s": round(stats.images / stats.seconds, 1),
            "wall_seconds": self.wall_seconds(),
        }
        return row, ev.get("predictions")

    def _save_epoch(self, s: Setup, row: Dict[str, Any], predictions) -> None:
        """Rank 0: predictions and weights.pt after the last epoch, then last.pt (so a finished
        checkpoint always has its predictions and weights beside it)."""
        if predictions is not None:
            runs.write_predictions(self.run_dir, predictions, s.data.test_y)
            runs.save_weights(self.run_dir / runs.WEIGHTS, s.model.state_dict())
        clock = self.clock()
        clock.wall_seconds = row["wall_seconds"]
        runs.save_checkpoint(self.ckpt_path, checkpoint.state(
            row["epoch"], s.model, s.optimizer, s.scaler, s.generator,
            self.ema.model if self.ema is not None else None, self.cfg, self.metrics + [row],
            self.resolved, self.ctx.world_size, clock))
