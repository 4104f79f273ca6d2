"""``last.pt``: what a run's checkpoint holds, reading it back for ``--resume``, restoring a
training state from it, and the check that a resumed run is the run that was saved.

The checkpoint is written after every epoch (``runs.save_checkpoint``: atomic) and holds the
model, the optimizer, the EMA copy, the grad scaler, every RNG state (``runs.rng_state``), the
metrics so far, the config, what was resolved at start (device type, processes, autocast) and the
time spent (wall, training, CPU) over all sessions. Restoring all of it continues a CPU run bit for
bit: the learning rate is a pure function of (epoch, step), so there is no scheduler state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import runs
from .config import RESUME_FREE_FIELDS, RunConfig, with_defaults
from .errors import UserError

VERSION = runs.CHECKPOINT_VERSION
REQUIRED = {"epoch", "config", "model"}


@dataclass
class Clock:
    """Where a run stands: its metrics and what earlier sessions spent (0 for a fresh run)."""

    epoch: int = 0
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    cpu_seconds: Optional[float] = 0.0    # None: a session before this was counted left it unknown
    started_at: Optional[str] = None


def clock_of(ckpt: Dict[str, Any]) -> Clock:
    """The metrics and time accounting a checkpoint carries (the same for resuming a run and for
    finishing the paperwork of one that is already done)."""
    return Clock(ckpt["epoch"], list(ckpt["metrics"]), ckpt.get("wall_seconds", 0.0),
                 ckpt.get("train_seconds", 0.0), ckpt.get("cpu_seconds"), ckpt.get("started_at"))


def state(epoch: int, model: torch.nn.Module, optimizer, scaler, generator: torch.Generator,
          ema_model: Optional[torch.nn.Module], config: RunConfig, metrics: List[Dict[str, Any]],
          resolved: Dict[str, Any], world_size: int, clock: Clock) -> Dict[str, Any]:
    """The checkpoint after ``epoch`` epochs (``clock``'s times: this and earlier sessions)."""
    return {
        "version": VERSION, "epoch": epoch,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        **({"ema": ema_model.state_dict()} if ema_model is not None else {}),
        "scaler": scaler.state_dict(), "rng": runs.rng_state(generator),
        "metrics": metrics, "config": runs.jsonable(config.to_dict()),
        "device_type": torch.device(resolved["device"]).type, "world_size": world_size,
        "autocast": resolved["autocast"],
        "wall_seconds": clock.wall_seconds, "train_seconds": clock.train_seconds,
        "cpu_seconds": clock.cpu_seconds, "started_at": clock.started_at,
    }


def restore(ckpt: Dict[str, Any], model: torch.nn.Module, optimizer, scaler,
            generator: torch.Generator, ema_model: Optional[torch.nn.Module]) -> Clock:
    """Load every state of ``ckpt`` into the freshly built training objects; returns its clock."""
    model.load_state_dict(ckpt["model"])
    if ema_model is not None:
        ema_model.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    runs.set_rng_state(ckpt["rng"], generator)
    return clock_of(ckpt)


def read(path: Path) -> Dict[str, Any]:
    """``last.pt`` for ``--resume``. A file that is not one of this project's checkpoints (corrupt,
    truncated, another version) is refused with one line naming it and the choices."""
    try:
        ckpt = runs.load_checkpoint(path)
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except Exception:
        ckpt = None
    if not isinstance(ckpt, dict) or not REQUIRED <= set(ckpt):
        raise UserError(f"{path} is not a checkpoint of this project (corrupt or truncated); pass "
                        f"--overwrite to start the run over, or delete the file")
    if ckpt.get("version") != VERSION:
        raise UserError(f"{path}: checkpoint version {ckpt.get('version')} is not {VERSION}; pass "
                        f"--overwrite to start over")
    return ckpt


def _differences(where: str, new: Any, old: Any) -> List[tuple]:
    """(where, new, old) for each differing leaf: dicts are compared key by key (``format.w``), so
    a resume mismatch names only what differs."""
    if isinstance(new, dict) and isinstance(old, dict):
        return [d for k in sorted(set(new) | set(old), key=str)
                for d in _differences(f"{where}.{k}", new.get(k), old.get(k))]
    return [] if new == old else [(where, new, old)]


def resume_mismatches(ckpt: Dict[str, Any], config: RunConfig, device_type: str,
                      world_size: int, autocast: Optional[str]) -> List[str]:
    """What differs between the run being started and the one ``ckpt`` saved (flags, device type,
    processes, autocast), each as ``--flag new (checkpoint: old)``; empty when it may resume.
    Fields that do not change the training (``RESUME_FREE_FIELDS``) are not compared."""
    old, new = with_defaults(ckpt["config"]), runs.jsonable(config.to_dict())
    differing = [k for k in sorted(set(old) | set(new))
                 if k not in RESUME_FREE_FIELDS and old.get(k) != new.get(k)]
    if len(differing) > 1 and "label" in differing:
        differing.remove("label")        # the label only describes the other fields
    diffs = []
    for k in differing:
        flag = "--" + k.replace("_", "-") if k not in ("format", "label") else k
        diffs += [f"{where} {n!r} (checkpoint: {o!r})"
                  for where, n, o in _differences(flag, new.get(k), old.get(k))]
    if ckpt.get("device_type") != device_type:
        diffs.append(f"device {device_type} (checkpoint: {ckpt.get('device_type')})")
    if ckpt.get("world_size", 1) != world_size:
        diffs.append(f"{world_size} processes (checkpoint: {ckpt.get('world_size', 1)})")
    if ckpt.get("autocast") != autocast:
        diffs.append(f"autocast {autocast} (checkpoint: {ckpt.get('autocast')})")
    return diffs


def compile_changed(ckpt: Dict[str, Any], config: RunConfig) -> bool:
    """Whether ``--compile`` differs from the saved run's (allowed, but not bit for bit)."""
    return bool(with_defaults(ckpt["config"]).get("compile")) != bool(config.compile)
