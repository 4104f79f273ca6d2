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
for timing and smoke tests (reported results use all images). The file is written after every
row, and a rerun into the same file evaluates only the (accumulator, k) pairs it lacks, after
checking that the file is of the same weights, layers and images (its float32 row must score the
same): a long evaluation can be stopped and split over sessions, e.g. one accumulator at k = 1
per session.
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
           "acc_file_name", "is_acc_file", "earlier_rows", "reference_row", "run_ptq_acc"]

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
                          log=None, skip=frozenset(),
                          reference: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """The float32 row, then one row per (accumulator, k), accumulator-major: a copy of ``model``
    whose forward GEMMs accumulate in that accumulator, evaluated with ``common.train.evaluate``.
    ``skip``: (accumulator spec, k) pairs not to evaluate (rows an earlier run wrote);
    ``reference``: the float32 row where it was already evaluated. ``log(row, index, total)``
    is called after each row. ``model`` is left unchanged."""
    todo = [(parse_format(fmt), promote, k) for fmt, promote in accumulators for k in chunks
            if (acc_spec(parse_format(fmt).name, promote), k) not in skip]
    total = 1 + len(todo)
    rows = [reference or reference_row(model, data, normalizer, batch_size)]
    if log:
        log(rows[-1], 1, total)
    for f, promote, k in todo:
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


def is_acc_file(d: Any) -> bool:
    """Whether a JSON dict is an accumulation evaluation (rows with a chunk size)."""
    return (isinstance(d, dict) and isinstance(d.get("results"), list) and bool(d["results"])
            and bool(d.get("source"))
            and all(isinstance(r, dict) and "chunk" in r for r in d["results"]))


# What must match for an earlier file's rows to be kept: the same trained weights (run name,
# epoch, and their recorded accuracy), the same layers and the same test images in batches of
# the same size.
SAME_EVALUATION = (("source", "name"), ("source", "epoch"), ("source", "trained_test_acc"),
                   ("first_last_fp32",), ("eval_batch_size",), ("test_images",),
                   ("limit_images",))


def _field(d: Dict[str, Any], keys: Tuple[str, ...]) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def earlier_rows(path: Path, fresh: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The rows of an earlier accumulation file at ``path`` of the same evaluation as ``fresh``
    (``SAME_EVALUATION``; its float32 row must score as the new one, image count and accuracy),
    which the new run keeps and does not repeat; [] where there is no file. A file of another
    evaluation, or one that cannot be read, is refused with one line naming it."""
    if not path.exists():
        return []
    old = runs.read_json(path)
    if not (is_acc_file(old) and old.get("kind") == "accumulation"):
        raise UserError(f"{path} exists and is not an accumulation evaluation: move it away or "
                        f"pass --out")
    differs = [".".join(k) for k in SAME_EVALUATION if _field(old, k) != _field(fresh, k)]
    ref_old, ref_new = old["results"][0], fresh["results"][0]
    if not differs and (ref_old.get("test_acc"), ref_old.get("test_images")) != (
            ref_new["test_acc"], ref_new["test_images"]):
        differs = ["the float32 row's accuracy"]
    if differs:
        raise UserError(f"{path} holds an evaluation with another {', '.join(differs)}: move it "
                        f"away or pass --out to keep both")
    return [r for r in old["results"] if not r.get("reference")]


def _merged(rows: Sequence[Dict[str, Any]], order: Sequence[str]) -> List[Dict[str, Any]]:
    """The float32 row first, then the others by accumulator (``order``) and chunk size."""
    ref = [r for r in rows if r.get("reference")][:1]
    rest = sorted((r for r in rows if not r.get("reference")),
                  key=lambda r: (order.index(r["accumulator"]), r["chunk"]))
    return ref + rest


def reference_row(model: nn.Module, data: data_mod.DeviceData, normalizer: data_mod.Normalizer,
                  batch_size: int) -> Dict[str, Any]:
    """The float32 row: ``model`` evaluated as trained, with its time."""
    t0 = time.perf_counter()
    ev = evaluate(model, data, normalizer, batch_size)
    return _reference_row(ev, time.perf_counter() - t0)


def run_ptq_acc(checkpoint: Path, accumulators: Sequence[Tuple[str, Optional[int]]],
                chunks: Sequence[int] = DEFAULT_CHUNKS, first_last_fp32: bool = False,
                device: str = "auto", data_dir: Optional[str] = None,
                eval_batch_size: Optional[int] = None, limit_images: Optional[int] = None,
                out: Optional[Path] = None, log=None) -> Dict[str, Any]:
    """Evaluate one checkpoint with every (accumulator, k); write and return the JSON dict.

    The file is written after every row, so an interrupted run keeps the rows it finished, and
    a rerun of the same evaluation into the same file (``earlier_rows``) evaluates only the
    (accumulator, k) pairs it lacks: the file holds the union. A run of hours (k = 1 on all
    test images) can so be split over sessions, by accumulator or by chunk size."""
    setup = prepare(checkpoint, device, data_dir, eval_batch_size, limit_images)
    path = Path(out) if out else setup.checkpoint.parent / acc_file_name(first_last_fp32,
                                                                         limit_images)
    ref = reference_row(setup.model, setup.data, setup.normalizer, setup.batch)
    result = {
        "kind": "accumulation",
        **source_record(setup, ref["test_images"]),
        "first_last_fp32": first_last_fp32,
        "casts": "none: weights and activations in float32; the forward GEMM of every "
                 "Conv2d/Linear"
                 + (" except the first conv and the last Linear" if first_last_fp32 else "")
                 + " accumulated in the row's format (exact products, exact chunk sums of k "
                   "products, one rounding to nearest even per chunk, promotion to a float32 "
                   "total every promote_every chunks); BatchNorm, residual adds and pooling in "
                   "float32",
        "results": [ref],
    }
    kept = earlier_rows(path, result)
    specs = [acc_spec(parse_format(f).name, p) for f, p in accumulators]
    order = specs + [a for a in dict.fromkeys(r["accumulator"] for r in kept) if a not in specs]
    result["accumulators"] = order
    result["chunks"] = sorted({*chunks, *(r["chunk"] for r in kept)})
    rows = [ref, *kept]

    def save(row, index, total):   # after every row: an interrupted run keeps what it finished
        if not row["reference"]:
            rows.append(row)
        result.update(provenance())
        result["results"] = _merged(rows, order)
        runs.write_json(path, result)
        if log:
            log(row, index, total)

    evaluate_accumulators(setup.model, setup.data, setup.normalizer, setup.batch, accumulators,
                          chunks, first_last_fp32, save,
                          skip={(r["accumulator"], r["chunk"]) for r in kept}, reference=ref)
    result["path"] = str(path)
    return result
