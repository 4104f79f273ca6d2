"""The comparison table: run folders -> results.md, results.csv and plots (accuracy per epoch,
accuracy against bits, differences to FP32).

    python report.py                         # runs/ -> runs/report/results.md, *.png
    python report.py --model resnet20 --epochs 164 --data real

What it reads: every ``runs/*/summary.json`` (with the run's ``metrics.jsonl`` for the curves) and
every ``runs/*/ptq*.json`` written by ``ptq_eval.py`` (``ptq_acc*.json``: its low-precision
accumulation evaluations, ``--acc``). A folder that cannot be read as a run (no
or a corrupt summary.json, a damaged metrics.jsonl) is left out and named in the report.

How runs are grouped: runs whose configs agree on everything that defines the experiment (model,
epochs, batch, learning-rate schedule, data ..., see ``common.config.compared_values``) and that
were scored on the same number of test images (the 1,000-image subset and the full 10,000 make two
tables) form a section; inside it, runs with the same format (the config's format record and
``label``) form a row, whatever their seed, device or run name. A row's configuration key is the
sweep's (fp32, fp8-e5m2w ...) whose script records the same format, else a slug of its label.

Each row: final test accuracy (the last epoch's, never the best epoch's) as mean and sample
standard deviation over the finished seeds (n-1 in the denominator; "-" for one seed), the
difference of the mean to the section's FP32 row with two 95% intervals (the paired two-level
bootstrap and, as an independent check, Welch's t-interval over seeds; ``stats``) and
where they disagree on whether it excludes 0, mean wall time per run and per epoch, mean
training throughput, hardware and test-set size. Runs that did not finish (diverged, interrupted,
still running or killed, failed) are not averaged in; the row notes them and a section of the
report names each one with its status, epochs done and last accuracy.

Plots (PNG, next to results.md): ``acc_per_epoch.png``, test accuracy after every epoch, mean over
the finished seeds with the min-max band; ``acc_vs_bits.png``, final accuracy (mean, error bar 1
std) against bits per element on a log2 axis, with post-training quantization results as open
markers; ``forest.png``, each configuration's difference to FP32 with both intervals, grouped by
bits per element, for the table on the largest test set. A table of ResNet-20 on all 10,000 test
images also compares FP32's mean with the accuracy He et al. report.

Accumulation (``ptq_eval.py --acc``): a table per trained configuration (accumulator x chunk
size k) and ``acc_vs_mantissa.png``, accuracy against the accumulator's mantissa bits.

Modules: ``records`` reads runs and groups them, ``stats`` holds the intervals, ``tables`` writes
the markdown and CSV, ``plots`` the figures, ``accumulation`` the accumulation table and plot;
``make_report`` here puts them together.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .. import runs
from ..config import REPO_ROOT
from ..errors import UserError
from . import accumulation, plots, records, stats, tables
from .accumulation import ACC_PLOT, group_acc, load_acc, plot_accumulation
from .compare import compare_partners
from .plots import (
    PLOT_BITS,
    PLOT_EPOCHS,
    PLOT_FOREST,
    config_colors,
    plot_bits,
    plot_epochs,
    plot_forest,
)
from .records import (
    DATA_CHOICES,
    Broken,
    Run,
    Section,
    build_sections,
    dedupe,
    epoch_curves,
    group_ptq,
    keep,
    load_ptq,
    load_runs,
    main_section,
    shown,
)
from .tables import CSV_COLUMNS, EPOCHS_COLUMNS, PAPER_RESNET20_ACC

__all__ = ["ACC_PLOT", "CSV_COLUMNS", "DATA_CHOICES", "EPOCHS_COLUMNS", "EPOCHS_CSV",
           "PAPER_RESNET20_ACC", "PLOT_BITS", "PLOT_EPOCHS", "PLOT_FOREST", "REPO_ROOT",
           "RESULTS_CSV", "RESULTS_MD", "accumulation", "build_sections", "config_colors",
           "group_acc", "group_ptq", "load_acc", "load_ptq", "load_runs", "main_section",
           "make_report", "plot_accumulation", "plot_bits", "plot_epochs", "plot_forest", "plots",
           "records", "runs", "shown", "stats", "tables"]

RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
EPOCHS_CSV = "acc_vs_epochs.csv"


@dataclass
class _Loaded:
    """The runs a report uses, after its filters."""

    runs: List[Run]
    broken: List[Broken]
    curves: List[List[List[Run]]]        # epoch_curves, over every epoch count
    repeats: List[str]
    ptq_files: List[Dict[str, Any]]
    acc_files: List[Dict[str, Any]]


def _load(dirs: Sequence[Path], model: Optional[str], epochs: Optional[int], data: str,
          recipe: Optional[str]) -> _Loaded:
    """Runs, unreadable folders and ptq files of ``dirs`` that pass the filters (a folder
    without a usable summary passes on its config.json, and only with one)."""
    all_runs, broken = load_runs(dirs)
    curves = epoch_curves(dedupe([r for r in all_runs
                                  if keep(r.config, model, None, data, recipe)])[0])
    all_runs, repeats = dedupe([r for r in all_runs if keep(r.config, model, epochs, data, recipe)])
    filtered = bool(model or epochs or recipe or data != "all")
    if filtered:
        broken = [b for b in broken
                  if b.config is not None and keep(b.config, model, epochs, data, recipe)]
    ptq_files, acc_files = ([d for d in found
                             if keep(d["source"].get("config") or {}, model, epochs, data, recipe)]
                            for found in (load_ptq(dirs), load_acc(dirs)))
    if not all_runs and not broken:
        filt = " matching the filters" if filtered else ""
        raise UserError(f"no runs{filt} in {', '.join(shown(d) for d in dirs)} (run sweep.py or "
                        f"a format script first)")
    return _Loaded(all_runs, broken, curves, repeats, ptq_files, acc_files)


def _draw(sections: Sequence[Section], ptq_groups, out_dir: Path) -> Tuple[List[Path], List[str]]:
    """The PNGs, one colour per configuration throughout; returns their paths and the 'Plots'
    section of results.md."""
    colors = config_colors(g.config_key for s in sections for g in s.groups)
    plot_epochs(sections, out_dir / PLOT_EPOCHS, colors)
    plot_bits(sections, ptq_groups, out_dir / PLOT_BITS, colors)
    plotted = [out_dir / PLOT_EPOCHS, out_dir / PLOT_BITS]
    main = main_section(sections)
    if main is not None:
        plot_forest(main, out_dir / PLOT_FOREST, colors)
        plotted.append(out_dir / PLOT_FOREST)
    names = {"epochs": PLOT_EPOCHS, "bits": PLOT_BITS, "forest": PLOT_FOREST}
    return plotted, tables.plot_lines(names, main)


def make_report(runs_dirs: Union[Path, Sequence[Path]], out_dir: Path, model: Optional[str] = None,
                epochs: Optional[int] = None, data: str = "all", plots: bool = True,
                command: str = "python report.py", recipe: Optional[str] = None) -> Dict[str, Any]:
    """Write ``out_dir``/results.md, results.csv (and the PNGs); return what went where, with
    FP32's gap to the paper (``paper_gap``: one dict per 10,000-image section) and one warning
    per run left out for a damaged metrics.jsonl."""
    dirs = [Path(runs_dirs)] if isinstance(runs_dirs, (str, Path)) else [Path(d) for d in runs_dirs]
    if not any(d.is_dir() for d in dirs):
        raise UserError(f"--runs-dir {', '.join(map(str, dirs))}: no such folder (run sweep.py or "
                        f"a format script first)")
    if data not in DATA_CHOICES:
        raise UserError(f"--data {data!r}: accepted: {', '.join(DATA_CHOICES)}")
    dirs = [d for d in dirs if d.is_dir()]
    got = _load(dirs, model, epochs, data, recipe)
    sections = build_sections(got.runs)
    for sec in sections:
        sec.compare_to_baseline()
    comparisons = {sec.key: compare_partners(sec) for sec in sections}
    ptq_groups = group_ptq(got.ptq_files)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot create it ({e.strerror}); pick a writable folder")

    gaps = [tables.paper_gap(sec) for sec in sections]
    lines = tables.intro_lines(command, got.runs, ", ".join(shown(d) for d in dirs), RESULTS_CSV)
    for sec, gap in zip(sections, gaps):
        lines += tables.section_lines(sec, gap, comparisons[sec.key])
    curve_rows = tables.epoch_rows(got.curves)
    lines += tables.curve_lines(curve_rows, epochs, EPOCHS_CSV)
    plotted: List[Path] = []
    (out_dir / PLOT_FOREST).unlink(missing_ok=True)     # an earlier report's would mislead
    if plots and sections:
        plotted, plot_lines = _draw(sections, ptq_groups, out_dir)
        lines += plot_lines
    acc_groups = group_acc(got.acc_files)
    (out_dir / ACC_PLOT).unlink(missing_ok=True)        # likewise
    if plots and acc_groups:
        plot_accumulation(acc_groups, out_dir / ACC_PLOT)
        plotted.append(out_dir / ACC_PLOT)
    acc_lines = accumulation.acc_lines(acc_groups, ACC_PLOT if plots else None)
    lost = tables.unfinished_rows(got.runs, got.broken)
    lines += tables.closing_lines(ptq_groups, sections, got.repeats, lost, acc_lines)
    (out_dir / RESULTS_MD).write_text("\n".join(lines), encoding="utf-8")
    tables.write_csv(out_dir / RESULTS_CSV, tables.csv_rows(sections, comparisons))
    if curve_rows:
        tables.write_csv(out_dir / EPOCHS_CSV, curve_rows, EPOCHS_COLUMNS)
    else:      # a curve of an earlier report in this folder would read as this one's
        (out_dir / EPOCHS_CSV).unlink(missing_ok=True)
    return {"results": out_dir / RESULTS_MD, "csv": out_dir / RESULTS_CSV, "repeats": got.repeats,
            "plots": plotted, "paper_gap": [g for g in gaps if g],
            "warnings": [b.warning for b in got.broken if b.warning],
            "runs": len(got.runs), "finished": sum(r.finished for r in got.runs),
            "sections": len(sections), "not_finished": len(lost), "ptq": len(got.ptq_files),
            "ptq_acc": len(got.acc_files)}
