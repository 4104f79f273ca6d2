"""Post-training quantization: trained weights (a record's weights.pt or a run's last.pt) evaluated
with their weights and activations cast to other formats, without retraining.

    python ptq_eval.py fp32_resnet20_e164_s0                  # a run name in runs/
    python ptq_eval.py runs/fp32_resnet20_e164_s*             # several seeds (folders)
    python ptq_eval.py path/to/last.pt --formats e4m3,posit8es1 --scalings scaled

For each source: the float model is rebuilt from the run's saved config (model name, shortcut) as
``common.evaluation`` does, its weights loaded, and the test set evaluated

* in float32 (the reference row: the same function the training loop evaluates with,
  ``common.train.evaluate``, on the same data, layout and batch size, so for a float32 run it
  repeats the loop's last evaluation bit for bit on the same machine);
* for each format and each scaling mode, with every Conv2d/Linear's weight and input activation
  cast to the format through ``common.qat.quantize_model`` (the training layers; in evaluation
  nothing flows backwards, so only the forward casts act). Scaling ``none`` uses the format's own
  range; ``scaled`` multiplies by a power of two (floats: from the absolute maximum, so it lands in
  (max/2, max], within a factor 2 of the format's largest value; posits: from the rms, so it lands
  near 1, see ``quant.quantize_scaled``): weights per output channel (``--weight-scaling``),
  activations per tensor, which in evaluation means per test batch (so ``--eval-batch-size``
  matters for scaled rows).
  Block formats (``mxfp8``, ``mxfp4``, ``nvfp4``, ...) carry their own scale per block: they get
  one row, scaling ``none`` (no scale on top of theirs), whatever the scaling modes asked for.
  BatchNorm, residual adds and the head's pooling stay float32, as in training.

The result goes to ``ptq.json`` in the run's or record's folder (next to the weights), or a name
that says which non-default cast settings it used (``ptq_first-last-fp32.json``, ...), so
evaluations with other settings sit beside it; ``report.py`` puts each beside the trained results.
A BF16-autocast run's own evaluation ran under autocast: its float32 row here is the same weights
evaluated in plain float32. ``limit_images`` evaluates the first N test images only, for timing and
smoke tests (recorded in the JSON, and the file name gets ``_nN``). Emulated low-precision
accumulation of the GEMMs (``ptq_eval.py --acc``) is common/ptq_acc.py's, on the same loading
(``prepare``) and record fields (``source_record``).
"""
from __future__ import annotations

import copy
import dataclasses
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from . import data as data_mod
from . import runs
from .config import DEFAULT_RUNS_DIR, RunConfig
from .errors import UserError
from .evaluation import Trained, find_weights, load_trained, rebuild_model, run_layout
from .formats import parse_format
from .hardware import device_name
from .qat import QuantConfig, RoleQuant, quantize_model, storage_bits
from .train import build_run_model, evaluate, resolve_device

__all__ = ["DEFAULT_FORMATS", "SCALING_MODES", "WEIGHT_SCALINGS", "PTQ_FILE", "ptq_file_name",
           "resolve_checkpoint", "load_model", "ptq_qconfig", "evaluate_formats", "run_ptq",
           "parse_formats", "Setup", "prepare", "source_record", "provenance"]

# The formats of the seed set, widest first: bf16, the two OCP FP8s, OCP MX FP4; the block
# formats OCP MXFP8/MXFP6/MXFP4 and NVFP4 (docs/block-formats.md); posits 16/8/4.
DEFAULT_FORMATS = ("bf16", "e5m2", "e4m3", "e2m1", "mxfp8", "mxfp6", "mxfp4", "nvfp4",
                   "posit16es1", "posit8es1", "posit4es0")
SCALING_MODES = ("none", "scaled")
WEIGHT_SCALINGS = ("channel", "tensor")
PTQ_FILE = "ptq.json"


def parse_formats(spec: str) -> List[str]:
    """``"bf16,e4m3"`` -> canonical names; fp32 is dropped (it is always the reference row)."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            fmt = parse_format(part)
        except ValueError as e:
            raise UserError(f"--formats {part!r}: {e}") from None
        if not fmt.is_identity and fmt.name not in out:
            out.append(fmt.name)
    if not out:
        raise UserError(f"--formats {spec!r}: name at least one format other than fp32")
    return out


def resolve_checkpoint(source: str, runs_dir: Optional[str] = None) -> Path:
    """A run name (in ``runs_dir``), a record or run folder, or a ``.pt`` file -> the file holding
    the trained weights (``weights.pt``, else ``last.pt``)."""
    return find_weights(source, str(runs_dir or DEFAULT_RUNS_DIR))


def load_model(config: RunConfig, state_dict: Dict[str, torch.Tensor], device: torch.device,
               channels_last: bool) -> nn.Module:
    """Rebuild the float model of ``config``, on ``device`` in the loop's layout, with the weights
    of ``state_dict`` (a quantized run's state_dict loads too: its layers keep the same keys)."""
    model = build_run_model(config, device, channels_last)
    model.load_state_dict(state_dict)
    return model.eval()


def ptq_qconfig(fmt: str, scaling: str, weight_scaling: str = "channel",
                first_last_fp32: bool = False) -> QuantConfig:
    """Weights and activations in ``fmt`` (round to nearest), gradients untouched (none flow)."""
    if scaling not in SCALING_MODES:
        raise UserError(f"scaling {scaling!r}: accepted: {', '.join(SCALING_MODES)}")
    w_scaling, a_scaling = ("none", "none") if scaling == "none" else (weight_scaling, "tensor")
    try:
        return QuantConfig(weight=RoleQuant(fmt, scaling=w_scaling),
                           act=RoleQuant(fmt, scaling=a_scaling), first_last_fp32=first_last_fp32)
    except ValueError as e:          # e.g. a block format, which carries its own scaling
        raise UserError(f"PTQ {scaling!r} of {fmt}: {e}") from None


def evaluate_formats(model: nn.Module, data: data_mod.DeviceData, normalizer: data_mod.Normalizer,
                     batch_size: int, formats: Sequence[str],
                     scalings: Sequence[str] = SCALING_MODES, weight_scaling: str = "channel",
                     first_last_fp32: bool = False, log=None) -> List[Dict[str, Any]]:
    """The float32 row, then one row per (format, scaling): a quantized copy of ``model`` evaluated
    with ``common.train.evaluate``. ``model`` itself is left unchanged."""
    rows = []
    t0 = time.perf_counter()
    ev = evaluate(model, data, normalizer, batch_size)
    rows.append({"format": "fp32", "bits": 32, "scaling": "none", "weight_scaling": "none",
                 "act_scaling": "none", **ev, "seconds": round(time.perf_counter() - t0, 3)})
    if log:
        log(rows[-1])
    for fmt in formats:
        f = parse_format(fmt)
        for scaling in (("none",) if f.is_block else scalings):
            q = ptq_qconfig(f.name, scaling, weight_scaling, first_last_fp32)
            qmodel = quantize_model(copy.deepcopy(model), q)
            t0 = time.perf_counter()
            ev = evaluate(qmodel, data, normalizer, batch_size)
            rows.append({"format": f.name, "bits": storage_bits(f), "scaling": scaling,
                         "weight_scaling": q.weight.scaling.flag, "act_scaling": q.act.scaling.flag,
                         **ev, "seconds": round(time.perf_counter() - t0, 3)})
            if log:
                log(rows[-1])
            del qmodel
    return rows


def ptq_file_name(weight_scaling: str = "channel", first_last_fp32: bool = False,
                  limit_images: Optional[int] = None, stem: str = "ptq") -> str:
    """ptq.json for the default cast settings; otherwise a name that lists the ones changed, so
    one checkpoint's evaluations under different settings do not overwrite each other
    (``stem`` "ptq_acc": the accumulation evaluation's, common/ptq_acc.py)."""
    parts = ([f"w{weight_scaling}"] if weight_scaling != "channel" else []) + \
            (["first-last-fp32"] if first_last_fp32 else []) + \
            ([f"n{limit_images}"] if limit_images is not None else [])
    return f"{stem}.json" if not parts else f"{stem}_{'_'.join(parts)}.json"


@dataclass
class Setup:
    """One checkpoint, ready to evaluate: its float model, the test data and how to batch it."""

    checkpoint: Path
    trained: Trained
    device: torch.device
    channels_last: bool
    batch: int
    data: data_mod.DeviceData
    normalizer: data_mod.Normalizer
    model: nn.Module
    limit_images: Optional[int] = None


def prepare(checkpoint: Path, device: str = "auto", data_dir: Optional[str] = None,
            eval_batch_size: Optional[int] = None, limit_images: Optional[int] = None) -> Setup:
    """Load the weights, rebuild the float model in the loop's layout and load the test set (its
    first ``limit_images`` images only, when given: for timing and smoke tests)."""
    if limit_images is not None and limit_images < 1:
        raise UserError(f"--limit-images {limit_images}: accepted: an integer >= 1")
    checkpoint = Path(checkpoint)
    trained = load_trained(checkpoint)
    config = trained.config
    dev = resolve_device(device)
    channels_last = run_layout(trained, dev)
    data = data_mod.load_device_data(dev, data_dir or config.data_dir, config.synthetic)
    if limit_images is not None:
        data = dataclasses.replace(data, test_x=data.test_x[:limit_images],
                                   test_y=data.test_y[:limit_images])
    return Setup(checkpoint, trained, dev, channels_last, eval_batch_size or config.eval_batch_size,
                 data, data_mod.Normalizer(dev, channels_last=channels_last),
                 rebuild_model(trained, dev, quantized=False), limit_images)


def source_record(setup: Setup, test_images: int) -> Dict[str, Any]:
    """The JSON fields that say what was evaluated, where and on what (shared by ptq.json and
    ptq_acc.json)."""
    trained, config = setup.trained, setup.trained.config
    last = trained.metrics[-1] if trained.metrics else {}
    return {
        "source": {
            "name": config.name, "checkpoint": str(setup.checkpoint), "label": config.label,
            "format": config.format, "model": config.model, "recipe": config.recipe,
            "epoch": trained.epoch,
            "epochs": config.epochs, "status": trained.summary.get("status"),
            "autocast": trained.autocast, "trained_test_acc": last.get("test_acc"),
            "trained_test_loss": last.get("test_loss"), "config": config.to_dict(),
        },
        "device": str(setup.device), "device_name": device_name(setup.device),
        "channels_last": setup.channels_last, "eval_batch_size": setup.batch,
        "data_source": setup.data.source, "test_images": test_images,
        "limit_images": setup.limit_images,
    }


def provenance() -> Dict[str, Any]:
    """Versions, commit and time of writing."""
    return {"torch_version": torch.__version__, "python_version": platform.python_version(),
            "git": runs.git_info(Path(__file__).resolve().parent.parent),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_ptq(checkpoint: Path, formats: Sequence[str] = DEFAULT_FORMATS,
            scalings: Sequence[str] = SCALING_MODES, weight_scaling: str = "channel",
            first_last_fp32: bool = False, device: str = "auto", data_dir: Optional[str] = None,
            eval_batch_size: Optional[int] = None, out: Optional[Path] = None,
            log=None, limit_images: Optional[int] = None) -> Dict[str, Any]:
    """Evaluate one checkpoint in every format; write and return the ptq.json dict."""
    setup = prepare(checkpoint, device, data_dir, eval_batch_size, limit_images)
    rows = evaluate_formats(setup.model, setup.data, setup.normalizer, setup.batch, formats,
                            scalings, weight_scaling, first_last_fp32, log)
    result = {
        **source_record(setup, rows[0]["test_images"]),
        "weight_scaling": weight_scaling, "first_last_fp32": first_last_fp32,
        "casts": "weights and input activations of every Conv2d/Linear"
                 + (" except the first conv and the last Linear" if first_last_fp32 else "")
                 + ", round to nearest even; block formats with their own block scales only; "
                   "BatchNorm, residual adds and pooling in float32",
        **provenance(),
        "results": rows,
    }
    path = Path(out) if out else setup.checkpoint.parent / ptq_file_name(
        weight_scaling, first_last_fp32, limit_images)
    runs.write_json(path, result)
    result["path"] = str(path)
    return result
