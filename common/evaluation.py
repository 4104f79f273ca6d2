"""Score a finished run's saved weights on a test file, with the run's own number formats, without
training.

    python evaluate.py results/runs/fp32_resnet20_fast_e20_s0          # a record (or a run folder)
    python evaluate.py results/runs/fp4-nv_resnet20_fast_e20_s* --check
    python evaluate.py runs/x --data-dir /data/cifar10-c --out x_on_c.json

A source is a record or run folder (``config.json``, ``summary.json`` and ``weights.pt``; a run
folder of older code without ``weights.pt`` is read from ``last.pt``) or one of those ``.pt`` files
inside it. The model is rebuilt as training built it (``common.train.build_run_model``): the
run's network, its format's layer casts (the record's ``format`` read back into a ``QuantConfig``)
or its BF16 autocast, the run's memory layout; then ``common.train.evaluate`` scores it at the
run's evaluation batch size (activations scaled per tensor take their scale per test batch).
Weights whose sha256 differs from the record's, or that do not fit the model, are refused.

On the test images the run was scored on, on the same kind of machine, the accuracy repeats the
recorded one exactly: ``evaluate_record`` says whether it does (``matches_record``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from . import data as data_mod
from . import runs
from .config import CHANNELS_LAST_DEFAULT, RunConfig
from .errors import UserError
from .qat import ROLES, QuantConfig, quantize_model
from .train import build_run_model, evaluate, resolve_device

__all__ = ["Trained", "find_weights", "load_trained", "format_setup", "run_layout", "rebuild_model",
           "evaluate_record"]


@dataclass
class Trained:
    """A finished (or checkpointed) run's weights and what rebuilding its model needs."""

    weights_path: Path
    config: RunConfig
    state_dict: Dict[str, torch.Tensor]
    summary: Dict[str, Any] = field(default_factory=dict)
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    epoch: Optional[int] = None
    autocast: Optional[str] = None            # "bfloat16" for a BF16-autocast run
    channels_last: Optional[bool] = None      # the layout the run used, when it says

    @property
    def folder(self) -> Path:
        return self.weights_path.parent


def find_weights(source: str, runs_dir: Optional[str] = None) -> Path:
    """A record or run folder, a run name in ``runs_dir``, or a ``.pt`` file -> the file holding
    the weights (``weights.pt``, else ``last.pt``)."""
    p = Path(source).expanduser()
    folders = [] if p.suffix == ".pt" else [p] + ([Path(runs_dir) / source] if runs_dir else [])
    candidates = [p] if p.suffix == ".pt" else [f / n for f in folders
                                                for n in (runs.WEIGHTS, runs.CHECKPOINT)]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise UserError(f"{source}: no weights found (looked for {', '.join(map(str, candidates))}); "
                    f"give a record or run folder, a run name in the runs folder, or a .pt file")


def load_trained(path: Path) -> Trained:
    """Read the weights at ``path`` (``weights.pt`` with its folder's config.json and summary, or
    a ``last.pt`` checkpoint); UserError, one line naming the file, when they cannot be used."""
    path = Path(path)
    folder = path.parent
    summary = runs.read_json(folder / runs.SUMMARY) or {}
    if path.name != runs.WEIGHTS:         # a checkpoint carries its own config and metrics
        try:
            ckpt = runs.load_checkpoint(path)
        except Exception as e:
            raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no details'})") from None
        if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
            raise UserError(f"{path} is not a checkpoint of this project's training loop "
                            f"(no model/config)")
        return Trained(path, RunConfig.from_dict(ckpt["config"]), ckpt["model"], summary,
                       list(ckpt.get("metrics") or []), ckpt.get("epoch"), ckpt.get("autocast"),
                       summary.get("channels_last"))
    stored = (runs.read_json(folder / runs.CONFIG) or {}).get("config") or summary.get("config")
    if not stored:
        raise UserError(f"{path}: no readable config.json or summary.json beside it to rebuild "
                        f"the model from")
    state = runs.load_weights(path, summary.get("weights_sha256"))
    return Trained(path, RunConfig.from_dict(stored), state, summary,
                   runs.read_jsonl(folder / runs.METRICS), summary.get("epochs_done"),
                   summary.get("autocast"), summary.get("channels_last"))


def format_setup(fmt: Dict[str, Any]) -> Optional[Callable[[nn.Module], nn.Module]]:
    """The layer swap a run record's ``format`` stands for (None: a float32 or autocast model)."""
    if not any(role.field in fmt for role in ROLES):
        return None
    try:
        q = QuantConfig.from_dict(fmt)
    except (ValueError, TypeError) as e:
        raise UserError(f"the record's format {fmt!r} cannot be rebuilt: {e}") from None
    if q.backend == "qtorch":
        from .qtorch_backend import require_qtorch

        require_qtorch(q)
    return lambda m: quantize_model(m, q)


def run_layout(trained: Trained, device: torch.device) -> bool:
    """Whether the run's images and weights were channels-last (as it recorded, else as its
    flags resolve on ``device``)."""
    if trained.channels_last is not None:
        return bool(trained.channels_last)
    cfg = trained.config
    return CHANNELS_LAST_DEFAULT[device.type] if cfg.channels_last is None else cfg.channels_last


def rebuild_model(trained: Trained, device: torch.device,
                  quantized: bool = True) -> nn.Module:
    """The run's model on ``device`` in its layout with its weights loaded (``quantized=False``:
    the float network alone, as post-training quantization starts from)."""
    cfg = trained.config
    channels_last = run_layout(trained, device)
    transform = (format_setup(cfg.format or trained.summary.get("format") or {}) if quantized
                 else None)
    model = build_run_model(cfg, device, channels_last, transform)
    try:
        model.load_state_dict(trained.state_dict)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"weights {trained.weights_path} do not fit the run's model "
                        f"{cfg.model}: {first}") from None
    return model.eval()


def evaluate_record(source: Path, data_dir: Optional[str] = None, device: str = "auto",
                    eval_batch_size: Optional[int] = None,
                    predictions: bool = False) -> Dict[str, Any]:
    """Score the weights at ``source`` (a file from ``find_weights``) on the test file of
    ``data_dir`` (default: the run's own data folder if it is there, else ``$CIFAR10_DIR`` or
    data/); returns accuracy, loss, images and how they compare with the run's own last
    evaluation."""
    trained = load_trained(source)
    cfg = trained.config
    dev = resolve_device(device)
    if data_dir is None and cfg.data_dir and Path(cfg.data_dir).expanduser().is_dir():
        data_dir = cfg.data_dir
    data = data_mod.load_device_data(dev, data_dir, cfg.synthetic)
    model = rebuild_model(trained, dev)
    normalizer = data_mod.Normalizer(dev, channels_last=run_layout(trained, dev))
    autocast = getattr(torch, trained.autocast) if trained.autocast else None
    batch = eval_batch_size or cfg.eval_batch_size
    ev = evaluate(model, data, normalizer, batch, autocast, predictions=True)
    preds = ev.pop("predictions")
    labels = data.test_y.tolist()
    digest = runs.labels_digest(labels)
    recorded = runs.read_correct(trained.folder)
    last = trained.metrics[-1] if trained.metrics else {}
    same_images = recorded is not None and recorded[0] == digest and len(recorded[1]) == len(labels)
    correct = [int(p == y) for p, y in zip(preds, labels)]
    result = {
        "name": cfg.name, "weights": str(trained.weights_path), "label": cfg.label,
        "format": cfg.format, "epoch": trained.epoch, "device": str(dev),
        "eval_batch_size": batch, "data_source": data.source, **ev,
        "labels_sha256": digest,
        "recorded_test_acc": last.get("test_acc"), "recorded_test_images": last.get("test_images"),
        "same_test_images": same_images,
        # the same images and the same right/wrong answer on each one: the run's own evaluation
        "matches_record": bool(same_images and list(recorded[1]) == correct),
    }
    if predictions:
        result["predicted"] = "".join(map(str, preds))
        result["correct"] = "".join(map(str, correct))
    return result
