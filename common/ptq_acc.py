"""Post-training evaluation with emulated low-precision accumulation: a trained checkpoint's
float32 model with the sums of its GEMMs rounded to a narrow accumulator, without retraining.

    python ptq_eval.py results/runs/fp32_resnet20_fast_e20_s0 \\
        --acc fp16,bf16,e5m7,e8m13:p4 --acc-chunks 1,16,32,128

For each source (loaded as ``common.ptq`` loads it) the test set is evaluated

* in float32 (the reference row, as ptq.json's: the loop's own ``common.train.evaluate``);
* once per (accumulator, chunk size k): every Conv2d/Linear (but the first conv and the last
  Linear with ``first_last_fp32``, which stay plain float32 layers) runs its forward GEMM
  through ``common.gemm`` with ``common.accumulate.Accumulator(fmt, k, promote_every)``:
  operands float32 (no role format is set), products exact, each chunk of k products summed
  exactly and added into the accumulator with one rounding to the format, promoted to a
  float32 total every P chunks where the spec says ``:pP`` (docs/gemm.md, "Accumulation").
  BatchNorm, residual adds and pooling stay float32.

An accumulator spec is a format (fp16, bf16, e5m7, e8m13, any eXmY of at most 21 mantissa
bits, fp32, a posit) with an optional ``:pN``: promotion every N chunks (``e8m13:p4`` is
Hopper-like: DeepSeek-V3 reports that H800 FP8 GEMMs keep about 14 significant bits in the
tensor cores' accumulator, and promotes the partial sums to float32 every 128 elements, 4 chunks
of 32). The result goes to ``ptq_acc.json`` next to the weights, or a name
that lists the non-default settings (``ptq_acc_first-last-fp32.json``, ``ptq_acc_n128.json``
for ``--limit-images 128``); ``report.py`` shows it as a table (accumulator x k) and the plot
``acc_vs_mantissa.png`` (common/report/accumulation.py).

Emulation on a CPU is slow: float64 chunk sums and one sequential step per chunk, so k = 1
(one step per product) is the slowest; ``limit_images`` evaluates the first N test images only,
for timing and smoke tests (reported results use all images).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from . import data as data_mod
from . import runs
from .accumulate import MAX_MANTISSA_BITS, Accumulator
from .errors import UserError
from .formats import Format, parse_format
from .gemm import GemmConfig
from .ptq import prepare, provenance, ptq_file_name, source_record
from .qat import QuantConfig, quantize_model
from .train import evaluate

__all__ = ["README_ACCUMULATORS", "DEFAULT_CHUNKS", "ACC_STEM", "parse_accumulators",
           "parse_chunks", "acc_spec", "mantissa_bits", "acc_qconfig", "evaluate_accumulators",
           "acc_file_name", "run_ptq_acc"]

# The README's accumulation experiment: the usual 16-bit accumulators, e5m7, and a Hopper-like
# e8m13 promoted to float32 every 4 chunks; chunk sizes from sequential to 128.
README_ACCUMULATORS = "fp16,bf16,e5m7,e8m13:p4"
DEFAULT_CHUNKS = (1, 16, 32, 128)
ACC_STEM = "ptq_acc"
ACCEPTED = (f"comma-separated accumulator formats (fp16, bf16, e5m7, eXmY of at most "
            f"{MAX_MANTISSA_BITS} mantissa bits, fp32, posit<n>es<k>), each with an optional "
            f":pN (promotion to float32 every N chunks, N >= 1), e.g. {README_ACCUMULATORS}")


def _promotion(text: str, part: str) -> int:
    """``"p4"`` -> 4; anything else is a UserError naming what is accepted."""
    if len(text) > 1 and text[0] == "p" and text[1:].isdigit() and int(text[1:]) >= 1:
        return int(text[1:])
    raise UserError(f"--acc {part!r}: after ':' accepted: pN with N >= 1 (promotion to float32 "
                    f"every N chunks), e.g. e8m13:p4")


def parse_accumulators(spec: str) -> List[Tuple[str, Optional[int]]]:
    """``"fp16,e8m13:p4"`` -> [("fp16", None), ("e8m13", 4)] (canonical format names, repeats
    dropped); each checked as an ``Accumulator`` would check it."""
    out: List[Tuple[str, Optional[int]]] = []
    for part in (p.strip() for p in (spec or "").split(",")):
        if not part:
            continue
        name, sep, rest = part.partition(":")
        promote = _promotion(rest, part) if sep else None
        try:
            fmt = parse_format(name.strip())
            Accumulator(fmt, 1, promote)
        except ValueError as e:
            reason = str(e).split(";")[0]
            raise UserError(f"--acc {part!r}: {reason}; accepted: {ACCEPTED}") from None
        if (fmt.name, promote) not in out:
            out.append((fmt.name, promote))
    if not out:
        raise UserError(f"--acc {spec!r}: name at least one accumulator; accepted: {ACCEPTED}")
    return out


def parse_chunks(spec) -> List[int]:
    """``"1,16,32,128"`` (or a sequence of ints) -> [1, 16, 32, 128] (repeats dropped): chunk
    sizes k >= 1."""
    if not isinstance(spec, str):
        spec = ",".join(map(str, spec))
    out: List[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise UserError(f"--acc-chunks {part!r}: accepted: comma-separated integers >= 1, "
                            f"e.g. 1,16,32,128")
        if int(part) not in out:
            out.append(int(part))
    if not out:
        raise UserError(f"--acc-chunks {spec!r}: accepted: comma-separated integers >= 1, e.g. "
                        f"1,16,32,128")
    return out


def acc_spec(fmt: str, promote_every: Optional[int]) -> str:
    """The spec as ``--acc`` takes it: 'fp16', 'e8m13:p4'."""
    return fmt + (f":p{promote_every}" if promote_every is not None else "")


def mantissa_bits(fmt: Format) -> Optional[int]:
    """Mantissa (fraction) bits of an accumulator format: a float's own (fp32: 23); a posit's
    most, near 1 (n - 3 - es); None for anything else."""
    if fmt.man_bits is not None:
        return fmt.man_bits
    if fmt.is_posit:
        return fmt.bits - 3 - fmt.es
    return None


def acc_qconfig(acc: Accumulator, first_last_fp32: bool = False) -> QuantConfig:
    """Float32 operands, the forward GEMM of every quantized layer accumulated in ``acc``."""
    return QuantConfig(gemm=GemmConfig(accumulator=acc, accumulate=("forward",)),
                       first_last_fp32=first_last_fp32)


def _reference_row(ev: Dict[str, Any], seconds: float) -> Dict[str, Any]:
    return {"accumulator": "fp32", "format": "fp32", "name": "float32 (no emulation)",
            "reference": True, "chunk": None, "promote_every": None, "mantissa_bits": 23,
            **ev, "seconds": round(seconds, 3)}


def evaluate_accumulators(model: nn.Module, data: data_mod.DeviceData,
                          normalizer: data_mod.Normalizer, batch_size: int,
                          accumulators: Sequence[Tuple[str, Optional[int]]],
                          chunks: Sequence[int] = DEFAULT_CHUNKS, first_last_fp32: bool = False,
                          log=None) -> List[Dict[str, Any]]:
    """The float32 row, then one row per (accumulator, k), accumulator-major: a copy of ``model``
    whose forward GEMMs accumulate in that accumulator, evaluated with ``common.train.evaluate``.
    ``log(row, index, total)`` is called after each row. ``model`` is left unchanged."""
    total = 1 + len(accumulators) * len(chunks)
    t0 = time.perf_counter()
    rows = [_reference_row(evaluate(model, data, normalizer, batch_size),
                           time.perf_counter() - t0)]
    if log:
        log(rows[-1], 1, total)
    for fmt, promote in accumulators:
        f = parse_format(fmt)
        for k in chunks:
            acc = Accumulator(f, k, promote)
            qmodel = quantize_model(copy.deepcopy(model), acc_qconfig(acc, first_last_fp32))
            t0 = time.perf_counter()
            ev = evaluate(qmodel, data, normalizer, batch_size)
            rows.append({"accumulator": acc_spec(f.name, promote), "format": f.name,
                         "name": acc.short(), "reference": False, "chunk": k,
                         "promote_every": promote, "mantissa_bits": mantissa_bits(f), **ev,
                         "seconds": round(time.perf_counter() - t0, 3)})
            if log:
                log(rows[-1], len(rows), total)
            del qmodel
    return rows


def acc_file_name(first_last_fp32: bool = False, limit_images: Optional[int] = None) -> str:
    """ptq_acc.json for the default settings, else e.g. ptq_acc_first-last-fp32_n128.json."""
    return ptq_file_name("channel", first_last_fp32, limit_images, stem=ACC_STEM)


def run_ptq_acc(checkpoint: Path, accumulators: Sequence[Tuple[str, Optional[int]]],
                chunks: Sequence[int] = DEFAULT_CHUNKS, first_last_fp32: bool = False,
                device: str = "auto", data_dir: Optional[str] = None,
                eval_batch_size: Optional[int] = None, limit_images: Optional[int] = None,
                out: Optional[Path] = None, log=None) -> Dict[str, Any]:
    """Evaluate one checkpoint with every (accumulator, k); write and return the JSON dict."""
    setup = prepare(checkpoint, device, data_dir, eval_batch_size, limit_images)
    rows = evaluate_accumulators(setup.model, setup.data, setup.normalizer, setup.batch,
                                 accumulators, chunks, first_last_fp32, log)
    result = {
        "kind": "accumulation",
        **source_record(setup, rows[0]["test_images"]),
        "first_last_fp32": first_last_fp32,
        "accumulators": [acc_spec(f, p) for f, p in accumulators], "chunks": list(chunks),
        "casts": "none: weights and activations in float32; the forward GEMM of every "
                 "Conv2d/Linear"
                 + (" except the first conv and the last Linear" if first_last_fp32 else "")
                 + " accumulated in the row's format (exact products, exact chunk sums of k "
                   "products, one rounding to nearest even per chunk, promotion to a float32 "
                   "total every promote_every chunks); BatchNorm, residual adds and pooling in "
                   "float32",
        **provenance(),
        "results": rows,
    }
    path = Path(out) if out else setup.checkpoint.parent / acc_file_name(first_last_fp32,
                                                                         limit_images)
    runs.write_json(path, result)
    result["path"] = str(path)
    return result
