"""The comparison table: runs/ -> results.md + plots (accuracy per epoch, accuracy against bits).

    python report.py                         # runs/ -> results/results.md, results/*.png
    python report.py --model resnet20 --epochs 164 --data real

What it reads: every ``runs/*/summary.json`` (with the run's ``metrics.jsonl`` for the curves) and
every ``runs/*/ptq*.json`` written by ``ptq_eval.py``.

How runs are grouped: runs whose configs agree on everything that defines the experiment (model,
epochs, batch, learning-rate schedule, data ..., see ``common.sweep.compared_values``) and that
were scored on the same number of test images (the 1,000-image subset and the full 10,000 make two
tables) form a section; inside it, runs with the same format (the config's ``format`` dict and
``label``) form a row, whatever their seed, device or run name.

Each row: final test accuracy (the last epoch's, never the best epoch's) as mean and sample
standard deviation over the finished seeds (n-1 in the denominator; "-" for one seed), the
difference of the mean to the section's FP32 row with two 95% intervals (the paired two-level
bootstrap and, as an independent check, Welch's t-interval over seeds; common/stats.py) and
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
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import runs
from .cli import REPO_ROOT
from .errors import UserError
from .stats import (PairedDiff, one_sample_bootstrap, paired_bootstrap, t_interval,
                    welch_interval)
from .sweep import CONFIGS, compared_values

RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
EPOCHS_CSV = "acc_vs_epochs.csv"
EPOCHS_COLUMNS = ("config", "label", "recipe", "model", "epochs", "seeds", "test_images",
                  "acc_mean", "acc_std", "ema_acc_mean", "hours_per_run")
CSV_COLUMNS = ("config", "label", "recipe", "model", "epochs", "seeds", "test_images", "acc_mean",
               "acc_std", "diff_vs_fp32", "ci_low", "ci_high", "ci_half_width", "resolved",
               "t_ci_low", "t_ci_high", "t_df", "t_resolved", "methods_disagree", "bits",
               "ema_acc_mean", "hours_per_run", "hardware", "not_finished")
PLOT_EPOCHS = "acc_per_epoch.png"
PLOT_BITS = "acc_vs_bits.png"
PLOT_FOREST = "forest.png"
# He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, Table 6:
# ResNet-20 on CIFAR-10, 8.75% test error (164 epochs, the paper recipe), i.e. 91.25% accuracy.
PAPER_RESNET20_ACC = 91.25
PAPER_EPOCHS = 164
DATA_CHOICES = ("all", "real", "synthetic")


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One run folder: its summary, config and per-epoch metrics."""

    name: str
    path: Path
    summary: Dict[str, Any]
    config: Dict[str, Any]
    metrics: List[Dict[str, Any]]
    test_set: Optional[int] = None        # number of test images it was scored on

    @property
    def status(self) -> str:
        return self.summary.get("status") or "no summary"

    @property
    def finished(self) -> bool:
        return self.status == "finished" and self.summary.get("final_test_acc") is not None

    @property
    def label(self) -> str:
        return self.config.get("label") or self.summary.get("label") or self.name

    @property
    def format(self) -> Dict[str, Any]:
        return self.config.get("format") or self.summary.get("format") or {}

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def updated(self) -> str:
        return str(self.summary.get("updated_at") or "")

    def correct(self) -> Optional[Tuple[str, Any]]:
        """(test labels hash, 0/1 per test image) of the final model, if the run stored them."""
        return runs.read_correct(self.path)

    @property
    def config_key(self) -> Optional[str]:
        """The sweep's key of this run's configuration (its name starts with it), else None."""
        keys = [k for k in CONFIGS if self.name.startswith(k + "_")]
        return max(keys, key=len) if keys else None

    @property
    def experiment_key(self) -> str:
        return _key(compared_values(self.config))

    @property
    def section_key(self) -> str:
        return _key([self.experiment_key, self.test_set])

    @property
    def group_key(self) -> str:
        return _key({"section": self.section_key, "format": self.format, "label": self.label})


def _key(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def is_fp32(fmt: Dict[str, Any]) -> bool:
    """The FP32 baseline's format dict (FP32/train_cifar10_fp32.py: name fp32)."""
    return fmt.get("name") == "fp32" or fmt.get("family") == "fp32"


def load_runs(runs_dirs: Union[Path, Sequence[Path]]) -> Tuple[List[Run], List[Path]]:
    """Every run folder of the ``runs_dirs`` with a summary.json, and folders that look like runs
    (a config.json, last.pt or stdout.log) but have none: they are named in the report too."""
    found, broken = [], []
    dirs = [runs_dirs] if isinstance(runs_dirs, (str, Path)) else list(runs_dirs)
    folders = [p for d in dirs if Path(d).is_dir() for p in sorted(Path(d).iterdir()) if p.is_dir()]
    for d in folders:
        # read_summary: a corrupt file reads as "unreadable" (named), a dead "running" run as
        # "interrupted"
        summary = runs.read_summary(d)
        cfg_file = runs.read_json(d / runs.CONFIG) or {}
        config = (summary or {}).get("config") or cfg_file.get("config") or {}
        if summary is None or not config:
            if summary is not None or any((d / f).exists()
                                          for f in (runs.CONFIG, runs.CHECKPOINT, "stdout.log")):
                broken.append(d)
            continue
        found.append(Run(summary.get("name") or d.name, d, summary, config,
                         runs.read_jsonl(d / runs.METRICS), summary.get("test_images")))
    place_test_sets(found)
    return found, broken


def place_test_sets(all_runs: Sequence[Run]) -> None:
    """A run that stopped before its first evaluation does not know its test set: it joins the
    other runs of its experiment when they were all scored on the same number of images."""
    sizes: Dict[str, set] = {}
    for r in all_runs:
        if r.test_set:
            sizes.setdefault(r.experiment_key, set()).add(r.test_set)
    for r in all_runs:
        known = sizes.get(r.experiment_key, set())
        if not r.test_set and len(known) == 1:
            r.test_set = next(iter(known))


def load_ptq(runs_dirs: Union[Path, Sequence[Path]]) -> List[Dict[str, Any]]:
    """Every ``ptq*.json`` one level under the ``runs_dirs`` (one per source run and cast settings:
    a record's copy wins over the run folder's), with its path."""
    out, seen = [], set()
    dirs = [runs_dirs] if isinstance(runs_dirs, (str, Path)) else list(runs_dirs)
    for p in (p for d in dirs for p in sorted(Path(d).glob("*/ptq*.json"))):
        d = runs.read_json(p)
        if isinstance(d, dict) and d.get("results") and d.get("source"):
            ident = _key([d["source"].get("name"), d.get("first_last_fp32"),
                          d.get("weight_scaling"), d.get("eval_batch_size")])
            if ident in seen:
                continue
            seen.add(ident)
            d["path"] = str(p)
            out.append(d)
    return out


def dedupe(all_runs: Sequence[Run]) -> Tuple[List[Run], List[str]]:
    """One run per (configuration, seed), whatever the folder names: a repeat of the same
    configuration and seed (a script run beside the sweep's, a rerun, a record beside its run
    folder) is not another seed. Keeps a finished run over an unfinished one, then the most
    recently updated; returns the kept runs and one line per ignored duplicate."""
    by_id: Dict[str, List[Run]] = {}
    for r in all_runs:
        by_id.setdefault(_key([r.group_key, r.seed]), []).append(r)
    kept, notes = [], []
    for same in by_id.values():
        best = max(same, key=lambda r: (r.finished, r.updated))
        kept.append(best)
        for r in same:
            if r is not best:
                newer = best.finished == r.finished and best.updated != r.updated
                notes.append(f"{_shown(r.path)} (seed {r.seed} of {r.label}, {r.status}): ignored, "
                             f"a repeat of {_shown(best.path)} ({best.status}"
                             f"{', newer' if newer else ''}), which is kept")
    return [r for r in all_runs if any(r is k for k in kept)], notes


def keep(config: Dict[str, Any], model: Optional[str], epochs: Optional[int], data: str,
         recipe: Optional[str] = None) -> bool:
    """The report's filters (--model, --epochs, --data, --recipe)."""
    if model and config.get("model") != model:
        return False
    if recipe and config.get("recipe", "paper") != recipe:
        return False
    if epochs and config.get("epochs") != epochs:
        return False
    if data == "real" and config.get("synthetic"):
        return False
    if data == "synthetic" and not config.get("synthetic"):
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n-1); std None for fewer than two values."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _shown(path) -> str:
    """A folder as results.md shows it: relative to the repo root when inside it (the file is
    committed and read elsewhere), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT)) + "/"
    except ValueError:
        return str(path)


@dataclass
class Group:
    """The runs of one format in one section (one table row)."""

    key: str
    label: str
    format: Dict[str, Any]
    runs: List[Run] = field(default_factory=list)
    paired: Optional[PairedDiff] = None      # difference to the section's FP32 row, with its CI
    paired_note: str = ""                    # why there is no interval, when there is none
    welch: Optional[PairedDiff] = None       # the same difference, Welch t-interval over seeds

    @property
    def methods_disagree(self) -> Optional[bool]:
        """Whether the bootstrap and the t-interval disagree on resolved (None: one is missing)."""
        if self.paired is None or self.welch is None:
            return None
        return self.paired.resolved != self.welch.resolved

    @property
    def finished(self) -> List[Run]:
        return [r for r in self.runs if r.finished]

    @property
    def config_key(self) -> str:
        """The sweep's key of the configuration (fp32, fp8-e5m2w, ...), else a slug of the label."""
        keys = {r.config_key for r in self.runs} - {None}
        if keys:
            return min(keys, key=len)
        return "".join(c if c.isalnum() else "-" for c in self.label.lower()).strip("-")

    @property
    def ema_acc(self) -> Optional[float]:
        """Mean final-epoch accuracy of the weights' EMA (runs with --ema-decay), else None."""
        vals = [r.metrics[-1].get("ema_test_acc") for r in self.finished if r.metrics]
        return _mean(vals) if vals and None not in vals else None

    def correct_matrix(self) -> Tuple[Optional[str], Optional[List[Any]], str]:
        """(labels hash, one 0/1 row per finished seed, ""), or (None, None, why not): a run
        without per-image predictions, seeds scored on different images, or predictions whose
        accuracy is not the summary's (a stale or foreign predictions.json)."""
        rows, digests = [], set()
        for r in self.finished:
            c = r.correct()
            if c is None:
                return None, None, "no per-image predictions"
            if round(100 * float(c[1].mean()), 2) != round(r.summary["final_test_acc"], 2):
                return None, None, f"predictions of {r.name} disagree with its accuracy"
            digests.add(c[0])
            rows.append(c[1])
        if len(digests) != 1:
            return None, None, "seeds scored on different test images"
        return digests.pop(), rows, ""

    @property
    def bits(self) -> Optional[float]:
        return self.format.get("bits_per_element")

    @property
    def final_accs(self) -> List[float]:
        """Each finished seed's final test accuracy (points)."""
        return [r.summary["final_test_acc"] for r in self.finished]

    @property
    def acc(self) -> Tuple[Optional[float], Optional[float]]:
        return mean_std(self.final_accs)

    def mean_of(self, field_name: str) -> Optional[float]:
        return _mean(r.summary.get(field_name) for r in self.finished)

    @property
    def seconds_per_epoch(self) -> Optional[float]:
        """Mean time of one epoch (training + evaluation, from metrics.jsonl: start-up and data
        loading excluded), over the finished runs' epochs; wall time / epochs where not logged."""
        per_run = []
        for r in self.finished:
            times = _epoch_times(r)
            if times:
                per_run.append(statistics.fmean(times))
            elif r.summary.get("wall_seconds") and r.summary.get("epochs_done"):
                per_run.append(r.summary["wall_seconds"] / r.summary["epochs_done"])
        return _mean(per_run)

    @property
    def hardware(self) -> List[str]:
        return sorted({str(r.summary.get("device_name")) for r in self.finished or self.runs
                       if r.summary.get("device_name")})

    @property
    def test_images(self) -> List[int]:
        return sorted({r.summary.get("test_images") for r in self.finished
                       if r.summary.get("test_images")})

    @property
    def notes(self) -> str:
        counts: Dict[str, int] = {}
        for r in self.runs:
            if not r.finished:
                counts[r.status] = counts.get(r.status, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))

    def curve(self) -> Tuple[List[int], List[float], List[float], List[float], bool]:
        """Epochs and mean/min/max test accuracy over the finished runs (or, when none finished,
        over every run, up to where each got: the bool says which)."""
        use = self.finished or self.runs
        per_epoch: Dict[int, List[float]] = {}
        for r in use:
            for m in r.metrics:
                if m.get("test_acc") is not None and math.isfinite(m["test_acc"]):
                    per_epoch.setdefault(int(m["epoch"]), []).append(m["test_acc"])
        epochs = sorted(per_epoch)
        return (epochs, [statistics.fmean(per_epoch[e]) for e in epochs],
                [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs],
                bool(self.finished))


@dataclass
class Section:
    """Runs of one experiment (same model, epochs, schedule, data ...): one table."""

    key: str
    config: Dict[str, Any]
    groups: List[Group] = field(default_factory=list)

    @property
    def baseline(self) -> Optional[Group]:
        for g in self.groups:
            if is_fp32(g.format) and g.finished:
                return g
        return None

    def compare_to_baseline(self) -> None:
        """Fill each row's paired difference to FP32 with its bootstrap interval (common.stats),
        where every finished run of both rows stored its per-image predictions on the same
        test images, and its Welch t-interval over seeds, where both rows have 2+ seeds."""
        base = self.baseline
        if base is None:
            return
        base_digest, base_rows, base_why = base.correct_matrix()
        for g in self.groups:
            if g is base or not g.finished:
                continue
            g.welch = welch_interval(g.final_accs, base.final_accs)
            digest, rows, why = g.correct_matrix()
            if base_rows is None or rows is None:
                g.paired_note = why or f"FP32: {base_why}"
            elif digest != base_digest:
                g.paired_note = "other test images than FP32"
            else:
                g.paired = paired_bootstrap(rows, base_rows)

    def title(self) -> str:
        c = self.config
        parts = [f"{c.get('model')}", _epochs(c.get("epochs")), f"batch {c.get('batch_size')}",
                 f"{c.get('schedule')} schedule from lr {c.get('lr'):g}" if c.get("lr") is not None
                 else f"{c.get('schedule')} schedule",
                 f"momentum {c.get('momentum'):g}" if c.get("momentum") is not None else None,
                 f"weight decay {c.get('weight_decay'):g}" if c.get("weight_decay") is not None else None]
        if c.get("nesterov"):
            parts.append("Nesterov")
        if c.get("warmup_epochs"):
            parts.append(f"{c['warmup_epochs']:g} warm-up epoch{'' if c['warmup_epochs'] == 1 else 's'}")
        if c.get("label_smoothing"):
            parts.append(f"label smoothing {c['label_smoothing']:g}")
        if c.get("ema_decay"):
            parts.append(f"weight EMA {c['ema_decay']:g}")
        if c.get("shortcut"):
            parts.append(f"shortcut {c['shortcut']}")
        if c.get("tf32"):
            parts.append("TF32")
        if c.get("max_steps_per_epoch"):
            parts.append(f"at most {c['max_steps_per_epoch']} steps per epoch")
        parts.append("synthetic data" if c.get("synthetic") else "CIFAR-10")
        if c.get("test_images"):
            parts.append(f"{c['test_images']:,} test images")
        parts.append(f"recipe {c.get('recipe', 'paper')}")
        return ", ".join(p for p in parts if p)

    def short_title(self, differing: Iterable[str] = ()) -> str:
        """Model and epochs, plus the fields in ``differing`` (those that tell sections apart)."""
        c = self.config
        s = f"{c.get('model')}, {_epochs(c.get('epochs'))}"
        for k in sorted(set(differing) - {"model", "epochs"}):
            v = c.get(k)
            if k == "synthetic":
                s += ", synthetic data" if v else ", CIFAR-10"
            else:
                s += f", {k.replace('_', ' ')} {v if not isinstance(v, float) else f'{v:g}'}"
        return s


def differing_fields(sections: Sequence[Section]) -> List[str]:
    """Config fields whose values differ between sections (for telling their plots apart)."""
    keys = set().union(*(s.config for s in sections)) if sections else set()
    return [k for k in sorted(keys)
            if len({json.dumps(s.config.get(k), default=str) for s in sections}) > 1]


def _epochs(n: Any) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def _sort_key(g: Group):
    return (not is_fp32(g.format), -(g.bits or 0), g.label)


def build_sections(all_runs: Sequence[Run]) -> List[Section]:
    """Group runs into sections (experiments) and rows (formats)."""
    sections: Dict[str, Section] = {}
    for r in all_runs:
        sec = sections.setdefault(r.section_key, Section(
            r.section_key, compared_values(r.config) | {"test_images": r.test_set}))
        group = next((g for g in sec.groups if g.key == r.group_key), None)
        if group is None:
            group = Group(r.group_key, r.label, r.format)
            sec.groups.append(group)
        group.runs.append(r)
    out = list(sections.values())
    for s in out:
        s.groups.sort(key=_sort_key)
    out.sort(key=lambda s: (bool(s.config.get("synthetic")), str(s.config.get("model")),
                            -(s.config.get("epochs") or 0), -(s.config.get("test_images") or 0),
                            -sum(len(g.runs) for g in s.groups),
                            s.key))
    return out


def epoch_curves(all_runs: Sequence[Run]) -> List[List[List[Run]]]:
    """Finished runs of one format trained to several epoch counts, otherwise with the same flags
    and test images: one list per epoch count, each format's lists in order of epochs. A short
    recipe's length is chosen from such a curve, so the report shows it beside the main table."""
    curves: Dict[str, Dict[int, List[Run]]] = {}
    for r in all_runs:
        if not r.finished:
            continue
        setup = {k: v for k, v in compared_values(r.config).items() if k != "epochs"}
        key = _key([setup, r.test_set, r.format, r.label])
        curves.setdefault(key, {}).setdefault(r.config.get("epochs") or 0, []).append(r)
    out = [[by_epochs[e] for e in sorted(by_epochs)] for by_epochs in curves.values()
           if len(by_epochs) > 1]
    out.sort(key=lambda c: (not is_fp32(c[0][0].format), -(c[0][0].format.get("bits_per_element")
                                                             or 0), c[0][0].label))
    return out


EPOCHS_HEADER = ("configuration", "config", "recipe", "epochs", "seeds", "test acc (%)", "std",
                 "EMA acc (%)", "time/run", "test images")


def epoch_rows(curves: Sequence[List[List[Run]]]) -> List[Dict[str, Any]]:
    """One row per format and epoch count of ``epoch_curves``; time/run is the runs' mean of
    epochs x median epoch time (pauses and busy stretches hardly move it)."""
    rows = []
    for curve in curves:
        for same in curve:
            g = Group("", same[0].label, same[0].format, list(same))
            acc, std = g.acc
            typical = [_median_epoch_time(r) for r in same]
            rows.append({"config": g.config_key, "label": g.label,
                         "recipe": same[0].config.get("recipe", "paper"),
                         "model": same[0].config.get("model"),
                         "epochs": same[0].config.get("epochs"),
                         "seeds": ";".join(str(r.seed) for r in same),
                         "test_images": same[0].test_set, "acc_mean": acc, "acc_std": std,
                         "ema_acc_mean": g.ema_acc,
                         "hours_per_run": (_mean(typical) / 3600 if None not in typical
                                           else None)})
    return rows


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------
def fmt_num(v: Optional[float], digits: int = 2, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def fmt_bits(bits: Optional[float]) -> str:
    if bits is None:
        return "-"
    return f"{bits:g}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> List[str]:
    """A GitHub markdown table; ``align`` has one l/r per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "--:" for a in align]
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return lines


RESULT_HEADER = ("configuration", "config", "bits", "n", "test acc (%)", "std", "vs FP32",
                 "95% CI", "±", "resolved", "t-interval", "t resolved", "EMA acc (%)",
                 "wall/run", "time/epoch", "img/s", "hardware", "test images", "not finished")
RESULT_ALIGN = "llrrrrrlrlllrrrrlrl"


def _interval(p: PairedDiff) -> str:
    return f"[{fmt_num(p.ci_low, signed=True)}, {fmt_num(p.ci_high, signed=True)}]"


def _diff_cells(g: Group, base: Optional[Group]) -> List[str]:
    """'vs FP32', '95% CI', '±', 'resolved' (bootstrap), 't-interval' and 't resolved' cells."""
    if base is None or g is base:
        return [("baseline" if g is base else "-"), "", "", "", "", ""]
    p, w = g.paired, g.welch
    if w is None:
        t_cells = ["-", "-: needs 2+ seeds a side" if g.finished else "-"]
    else:
        t_res = "yes" if w.resolved else "no"
        if g.methods_disagree:
            t_res += f": bootstrap {'does not' if w.resolved else 'does'}"
        t_cells = [_interval(w), t_res]
    if p is not None:
        return [fmt_num(p.diff, signed=True), _interval(p), fmt_num(p.half_width),
                "yes" if p.resolved else "no: within noise", *t_cells]
    acc, base_acc = g.acc[0], base.acc[0]
    diff = fmt_num(acc - base_acc, signed=True) if acc is not None and base_acc is not None else "-"
    return [diff, "-", "-", g.paired_note or "-", *t_cells]


def disagreement_line(sec: Section) -> Optional[str]:
    """The sentence under a table on where bootstrap and t-interval disagree (None: no FP32 or no
    row has both intervals)."""
    both = [g for g in sec.groups if g.methods_disagree is not None]
    if sec.baseline is None or not both:
        return None
    differ = [g for g in both if g.methods_disagree]
    if not differ:
        return (f"The bootstrap and the t-interval agree on whether the difference is resolved "
                f"in every row that has both ({len(both)}).")
    return ("The bootstrap and the t-interval disagree on whether the difference is resolved "
            "for: " + "; ".join(f"{g.label} (bootstrap {_interval(g.paired)}, "
                               f"t {_interval(g.welch)})" for g in differ) + ".")


def paper_gap(sec: Section) -> Optional[Dict[str, Any]]:
    """FP32's mean accuracy against He et al.'s ResNet-20 figure, for a section of ResNet-20 on
    the real CIFAR-10 scored on all 10,000 test images (a subset's accuracy is not comparable):
    the gap with the one-sample two-level bootstrap interval (seeds, then test images) and the
    one-sample t-interval over seeds. None for any other section."""
    base, c = sec.baseline, sec.config
    if base is None or c.get("test_images") != 10000 or c.get("model") != "resnet20" \
            or c.get("synthetic"):
        return None
    _, rows, why = base.correct_matrix()
    boot = one_sample_bootstrap(rows, PAPER_RESNET20_ACC) if rows is not None else None
    t = t_interval(base.final_accs, PAPER_RESNET20_ACC)
    n = len(base.finished)
    line = (f"FP32 mean {fmt_num(base.acc[0])}% ({n} seed{'s' if n != 1 else ''}, 10,000 test "
            f"images, recipe {c.get('recipe', 'paper')}, {_epochs(c.get('epochs'))}) vs He et al. "
            f"2016 {PAPER_RESNET20_ACC}% ({PAPER_EPOCHS} epochs): gap "
            f"{fmt_num(base.acc[0] - PAPER_RESNET20_ACC, signed=True)} points, 95% CI "
            + (f"{_interval(boot)} (bootstrap over seeds and test images)" if boot
               else f"- ({why})")
            + (f", t-interval {_interval(t)}" if t else ", t-interval - (undefined with one seed)"))
    return {"line": line, "acc": base.acc[0], "seeds": n, "gap": base.acc[0] - PAPER_RESNET20_ACC,
            "bootstrap": boot, "t": t}


def section_rows(sec: Section) -> List[List[str]]:
    """The table rows of one section (see RESULT_HEADER)."""
    base = sec.baseline
    rows = []
    for g in sec.groups:
        acc, std = g.acc
        ips = g.mean_of("mean_images_per_s")
        rows.append([g.label, g.config_key, fmt_bits(g.bits), f"{len(g.finished)}", fmt_num(acc),
                     fmt_num(std), *_diff_cells(g, base), fmt_num(g.ema_acc),
                     fmt_duration(g.mean_of("wall_seconds")),
                     fmt_duration(g.seconds_per_epoch), f"{ips:,.0f}" if ips else "-",
                     "; ".join(g.hardware) or "-",
                     ", ".join(map(str, g.test_images)) or "-", g.notes or ""])
    return rows


def csv_rows(sections: Sequence[Section]) -> List[Dict[str, Any]]:
    """One row per configuration and experiment (``CSV_COLUMNS``); empty cells where a value
    does not exist (no finished seed, no FP32 row, no per-image predictions)."""
    out = []
    for sec in sections:
        base = sec.baseline
        for g in sec.groups:
            acc, std = g.acc
            p, w = g.paired, g.welch
            diff = p.diff if p else (acc - base.acc[0] if base and g is not base and acc is not None
                                     else (0.0 if g is base else None))
            wall = g.mean_of("wall_seconds")
            out.append({
                "config": g.config_key, "label": g.label,
                "recipe": sec.config.get("recipe", "paper"), "model": sec.config.get("model"),
                "epochs": sec.config.get("epochs"), "seeds": len(g.finished),
                "test_images": "/".join(map(str, g.test_images)),
                "acc_mean": acc, "acc_std": std, "diff_vs_fp32": diff,
                "ci_low": p.ci_low if p else None, "ci_high": p.ci_high if p else None,
                "ci_half_width": p.half_width if p else None,
                "resolved": (p.resolved if p else None),
                "t_ci_low": w.ci_low if w else None, "t_ci_high": w.ci_high if w else None,
                "t_df": w.df if w else None, "t_resolved": w.resolved if w else None,
                "methods_disagree": g.methods_disagree, "bits": g.bits,
                "ema_acc_mean": g.ema_acc,
                "hours_per_run": wall / 3600 if wall else None,
                "hardware": "; ".join(g.hardware), "not_finished": g.notes,
            })
    return out


def write_csv(path: Path, rows: Sequence[Dict[str, Any]],
              columns: Sequence[str] = CSV_COLUMNS) -> None:
    """``rows`` as CSV with the ``columns`` header; floats with 4 decimals, None empty."""
    import csv
    import io

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, bool):
            return "yes" if v else "no"
        return f"{v:.4f}" if isinstance(v, float) else v

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([cell(r.get(c)) for c in columns])
    path.write_text(buf.getvalue(), encoding="utf-8")


def unfinished_rows(all_runs: Sequence[Run], broken: Sequence[Path]) -> List[List[str]]:
    order = {"diverged": 0, "failed": 1, "interrupted": 2, "running": 3}
    rows = []
    for r in sorted((r for r in all_runs if not r.finished),
                    key=lambda r: (order.get(r.status, 9), r.name)):
        s = r.summary
        status = r.status
        if status == "running":
            status = "running (or killed)"
        rows.append([r.name, r.label, status, f"{s.get('epochs_done', '?')}/{s.get('epochs', '?')}",
                     fmt_num(s.get("last_test_acc")), str(s.get("updated_at") or "-"),
                     (s.get("message") or "").replace("\n", " ")])
    for d in broken:
        summary = runs.read_summary(d, live=False)
        if summary is not None:           # unreadable, and no config.json to place it
            rows.append([d.name, "-", summary.get("status", "?"), "-", "-", "-",
                         summary.get("message", "")])
            continue
        rows.append([d.name, "-", "no summary.json", "-", "-", "-",
                     "the script stopped before its first summary; see stdout.log"
                     if (d / "stdout.log").exists() else "no summary.json"])
    return rows


# ----------------------------------------------------------------------------------------------
# Post-training quantization
# ----------------------------------------------------------------------------------------------
def trained_weight_format(fmt: Dict[str, Any]) -> Optional[str]:
    """The format a trained configuration keeps its weights in (for 'trained in this format')."""
    w = fmt.get("weight")
    if isinstance(w, dict) and w.get("fmt"):
        return w["fmt"]
    if fmt.get("family") == "bf16" or fmt.get("name") == "bf16":
        return "bf16"
    if is_fp32(fmt):
        return "fp32"
    return None


@dataclass
class PtqGroup:
    """The ptq.json files of the checkpoints of one trained configuration (its seeds)."""

    key: str
    section_key: str
    label: str
    config: Dict[str, Any]
    files: List[Dict[str, Any]] = field(default_factory=list)

    def settings(self) -> str:
        ws = {d.get("weight_scaling") for d in self.files}
        fl = {bool(d.get("first_last_fp32")) for d in self.files}
        eb = {d.get("eval_batch_size") for d in self.files}
        text = ("weights and input activations of every conv/linear layer"
                + (" except the first and last" if fl == {True} else "")
                + ", round to nearest even; scaled = power-of-two scale (floats: absolute maximum "
                "within a factor 2 of the format's max; posits: rms near 1), "
                f"weights per {'/'.join(sorted(map(str, ws)))}, activations per tensor (per test "
                f"batch of {'/'.join(sorted(map(str, eb)))}); block formats (mx..., nvfp4) "
                f"carry their own block scales: their row is under 'unscaled', with nothing on top")
        if len(fl) > 1:
            text += "; mixed --first-last-fp32 settings"
        return text

    @property
    def default_cast(self) -> bool:
        """Whether ptq_eval.py's default cast settings made it: every layer, weights per channel."""
        return all(not d.get("first_last_fp32") and d.get("weight_scaling", "channel") == "channel"
                   for d in self.files)

    def rows_by_format(self) -> List[Tuple[str, float, Dict[str, List[float]]]]:
        """(format, bits, {scaling: [acc per checkpoint]}) in the files' order of formats."""
        table: Dict[str, Dict[str, List[float]]] = {}
        bits: Dict[str, float] = {}
        for d in self.files:
            for row in d["results"]:
                table.setdefault(row["format"], {}).setdefault(row["scaling"], []).append(row["test_acc"])
                bits[row["format"]] = row.get("bits")
        return [(f, bits[f], table[f]) for f in table]


def group_ptq(ptq_files: Sequence[Dict[str, Any]]) -> List[PtqGroup]:
    groups: Dict[str, PtqGroup] = {}
    for d in ptq_files:
        cfg = d["source"].get("config") or {}
        # the section of the trained runs scored on the same test images
        sec = _key([_key(compared_values(cfg)), d.get("test_images")])
        label = d["source"].get("label") or cfg.get("label") or d["source"].get("name")
        k = _key({"section": sec, "format": cfg.get("format"), "label": label,
                  "fl": bool(d.get("first_last_fp32")), "ws": d.get("weight_scaling"),
                  "eb": d.get("eval_batch_size")})
        groups.setdefault(k, PtqGroup(k, sec, label, cfg)).files.append(d)
    return list(groups.values())


def ptq_lines(pg: PtqGroup, sections: Sequence[Section]) -> List[str]:
    """The markdown of one PTQ group: per format, PTQ accuracy unscaled/scaled beside training."""
    sec = next((s for s in sections if s.key == pg.section_key), None)
    trained: Dict[str, List[Group]] = {}
    if sec is not None:
        for g in sec.groups:
            wf = trained_weight_format(g.format)
            if wf:
                trained.setdefault(wf, []).append(g)
    n = len(pg.files)
    epochs = {(d["source"].get("epoch"), d["source"].get("epochs")) for d in pg.files}
    unfinished = [f"{e}/{t}" for e, t in epochs if e != t]
    hw = sorted({d.get("device_name", "-") for d in pg.files})
    imgs = sorted({d.get("test_images") for d in pg.files})
    c = pg.config
    names = [d["source"].get("name", "?") for d in pg.files]
    lines = [f"### Post-training quantization of {pg.label} ({c.get('model')}, "
             f"{_epochs(c.get('epochs'))}, recipe {c.get('recipe', 'paper')}"
             f"{', synthetic data' if c.get('synthetic') else ''})", "",
             f"{n} checkpoint{'s' if n != 1 else ''} ({', '.join(names)})"
             f"{'; NOT finished: epoch ' + ', '.join(unfinished) if unfinished else ''}; "
             f"{', '.join(map(str, imgs))} test images on {'; '.join(hw)}. Cast: {pg.settings()}. "
             f"Accuracy in %, mean over the checkpoints (± sample std when there are several).", ""]
    rows = []

    def cell(vals):
        if not vals:
            return "-"
        m, s = mean_std(vals)
        return fmt_num(m) + (f" ± {fmt_num(s)}" if s is not None else "")

    for fmt, bits, by_scaling in pg.rows_by_format():
        t = "; ".join(f"{cell([r.summary['final_test_acc'] for r in g.finished])} ({g.label})"
                      for g in trained.get(fmt, []) if g.finished) or "-"
        rows.append([fmt if fmt != "fp32" else "fp32 (no cast)", fmt_bits(bits),
                     cell(by_scaling.get("none", [])),
                     cell(by_scaling.get("scaled", [])) if fmt != "fp32" else "-", t])
    lines += md_table(("format", "bits", "PTQ, unscaled", "PTQ, scaled",
                       "trained in this format (weights)"), rows, "lrrrl")
    return lines


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colors(n: int):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _text_color(color):
    """``color`` darkened until text in it reads on white (tab20's pale half is too light)."""
    from matplotlib.colors import to_rgb
    rgb = to_rgb(color)
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return tuple(c * min(1.0, 0.5 / luminance) for c in rgb) if luminance else rgb


def _legend_below(ax, ncol: int = 2) -> None:
    """Legend under the panel (two columns by default): the labels are long, the panel keeps its
    width."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16),
                  ncol=ncol, frameon=False)


FAMILY_TITLES = {"bf16": "BF16", "fp8": "FP8", "fp4": "FP4 (E2M1 elements: scaled, MXFP4, NVFP4)",
                 "posit": "Posits",
                 "other": "Other formats"}


def family(fmt: Dict[str, Any]) -> str:
    """Plot panel of a format: bf16, fp8, fp4, posit (every posit width), fp32 or other."""
    fam = str(fmt.get("family") or fmt.get("name") or "other")
    if fam.startswith("posit"):
        return "posit"
    return fam if fam in FAMILY_TITLES or fam == "fp32" else "other"


def _epoch_axis(ax, epochs: Sequence[int]) -> None:
    """Integer epoch ticks; a short run (1-2 epochs) gets a sensible range instead of
    matplotlib's fractional ticks."""
    from matplotlib.ticker import MaxNLocator
    last = max(epochs) if epochs else 1
    ax.set_xlim(0.5, last + 0.5)
    if last <= 12:
        ax.set_xticks(range(1, last + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _draw_curve(ax, g: Group, color, lw: float = 1.6) -> List[int]:
    ep, mean, lo, hi, finished = g.curve()
    if not ep:
        return []
    k = len(g.finished) if finished else len(g.runs)
    ax.plot(ep, mean, color=color, lw=lw, ls="-" if finished else "--",
            label=f"{g.label} (n={k}{'' if finished else ', not finished'})",
            marker="o" if len(ep) <= 12 else None, ms=3)
    if k > 1:
        ax.fill_between(ep, lo, hi, color=color, alpha=0.15, lw=0)
    return ep


def plot_epochs(sections: Sequence[Section], path: Path) -> List[Dict[str, Any]]:
    """Test accuracy per epoch: one small panel per format family (BF16, FP8, FP4, posits ...),
    the FP32 curve in every panel, so each line can be told apart; one row of panels per
    section (experiment). Mean over the finished seeds, band min-max. Returns what each panel
    shows (title, line labels, x ticks), for tests."""
    plt = _pyplot()
    layout = []
    for sec in sections:
        fams = list(dict.fromkeys(family(g.format) for g in sec.groups if family(g.format) != "fp32"))
        layout.append(fams or ["fp32"])
    ncols = min(2, max(len(f) for f in layout))
    nrows = sum(-(-len(f) // ncols) for f in layout)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    differing = differing_fields(sections)
    row = 0
    panels = []
    for sec, fams in zip(sections, layout):
        base = next((g for g in sec.groups if family(g.format) == "fp32"), None)
        for i, fam in enumerate(fams):
            ax = axes[row + i // ncols, i % ncols]
            ax.set_visible(True)
            epochs: List[int] = []
            if base is not None:
                epochs += _draw_curve(ax, base, "black", lw=1.2)
            members = [g for g in sec.groups if family(g.format) == fam and g is not base]
            for g, color in zip(members, _colors(len(members))):
                epochs += _draw_curve(ax, g, color)
            _epoch_axis(ax, epochs)
            ax.set_title(f"{FAMILY_TITLES.get(fam, fam.upper())}: {sec.short_title(differing)}",
                         fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
            panels.append({"title": ax.get_title(), "xticks": [float(t) for t in ax.get_xticks()],
                           "lines": [h.get_label() for h in ax.get_lines()]})
        row += -(-len(fams) // ncols)
    fig.suptitle("Test accuracy per epoch (mean over seeds, band: min-max; black: FP32)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return panels


def _spread_labels(ys: Sequence[float], gap: float) -> List[float]:
    """Label heights near ``ys`` (same order) at least ``gap`` apart, as close to each y as
    that allows: points at one bit width with similar accuracies get readable labels."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed: List[float] = []
    for i in order:
        placed.append(max(ys[i], placed[-1] + gap) if placed else ys[i])
    # centre the stack on the points' mean, so labels do not all drift upwards
    shift = (sum(placed) - sum(ys[i] for i in order)) / len(order)
    out = [0.0] * len(ys)
    for i, y in zip(order, placed):
        out[i] = y - shift
    return out


def _label_columns(points: Sequence[Tuple]) -> List[List[Tuple]]:
    """Labels grouped by bit-width column, each with the side it is written on and its anchor.

    Bit widths each within 30% of the next (6.25, 8, 8.25) form one column. The leftmost column's
    labels go left of it, into the margin, every other column's go right of it, into the gap
    before the next column, which no other column writes into: columns never share a gap, so
    one panel's labels cannot overwrite each other. Returns per column
    [(x, y, text, side, color, anchor x)], side -1 (left, anchored at the column's smallest
    width) or +1 (right, at its largest)."""
    columns: List[List[float]] = []
    for x in sorted({p[0] for p in points}):
        if columns and x <= columns[-1][-1] * 1.3:
            columns[-1].append(x)
        else:
            columns.append([x])
    col_of = {x: i for i, col in enumerate(columns) for x in col}
    out: List[List[Tuple]] = [[] for _ in columns]
    for x, y, text, color in points:
        i = col_of[x]
        side = -1 if i == 0 else 1
        out[i].append((x, y, text, side, color, min(columns[i]) if side < 0 else max(columns[i])))
    return out


def _draw_labels(ax, points: Sequence[Tuple], lo: float, hi: float, gap: float) -> None:
    """Each point's text beside its column (``_label_columns``), at least ``gap`` apart and
    inside the y range [lo, hi] the panel shows, with a thin line to its marker."""
    top, bottom = hi + 2 * gap, lo - 2 * gap      # a label's height from the axes' edges
    for column in _label_columns(points):
        ly_all = _spread_labels([p[1] for p in column], gap)
        # keep the stack inside the axes (the top wins when it is taller than they are)
        shift = max(bottom - min(ly_all), 0.0) - max(max(ly_all) - top, 0.0)
        for (px, py, text, side, color, anchor), ly in zip(column, ly_all):
            ax.annotate(text, (px, py), xytext=(anchor * 2 ** (0.2 * side), ly + shift),
                        textcoords="data", fontsize=8, color=_text_color(color), va="center",
                        ha="left" if side > 0 else "right",
                        arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6})


def plot_bits(sections: Sequence[Section], ptq_groups: Sequence[PtqGroup],
              path: Path) -> List[Tuple[float, float, str, str]]:
    """Final accuracy against bits per element (log2 axis), two panels side by side on one y
    axis: configurations trained in each format (filled, error bar 1 std over seeds) and, when
    there are ptq_eval.py results, FP32 checkpoints cast to each format after training (open
    markers: triangles unscaled, squares scaled). Every marker sits at its true bit width, its
    label beside its column. Apart, the two sets' 25-odd labels no longer crowd the narrow gap
    between 4.5 and 6.25 bits. Only the casts with the default settings are drawn (every layer,
    weights per channel); the tables show the others (e.g. --first-last-fp32).
    Returns the plotted points (x, y, label, panel: "trained" or "ptq"), for tests."""
    plt = _pyplot()
    n = max(1, len(sections))
    ptq_of = {sec.key: [pg for pg in ptq_groups if pg.section_key == sec.key and pg.default_cast]
              for sec in sections}
    ncols = 2 if any(ptq_of.values()) else 1
    fig, axes = plt.subplots(n, ncols, figsize=(7.5 * ncols, 7.5 * n), squeeze=False,
                             sharey="row")
    differing = differing_fields(sections)
    plotted = []
    for row, sec in zip(axes, sections):
        groups = [g for g in sec.groups if g.finished and g.bits]
        colors = dict(zip((g.key for g in sec.groups), _colors(len(sec.groups))))
        trained, cast = [], []        # (x, y, label, color)
        for g in groups:
            acc, std = g.acc
            row[0].errorbar([g.bits], [acc], yerr=[std] if std is not None else None, fmt="o",
                            ms=7, color=colors[g.key], capsize=3,
                            label=f"{g.label} (n={len(g.finished)})")
            trained.append((g.bits, acc, g.config_key, colors[g.key]))
        for pg in ptq_of[sec.key]:
            for scaling, marker in (("none", "^"), ("scaled", "s")):
                px, py = [], []
                for fmt, bits, by_scaling in pg.rows_by_format():
                    vals = by_scaling.get(scaling)
                    if fmt == "fp32" or not bits or not vals:
                        continue
                    px.append(bits)
                    py.append(statistics.fmean(vals))
                    cast.append((bits, py[-1], f"{fmt}{' sc.' if scaling == 'scaled' else ''}",
                                 "black"))
                if px:
                    row[1].scatter(px, py, marker=marker, facecolors="none", edgecolors="black",
                                   s=55, lw=1.2, zorder=3,
                                   label=f"{pg.label} checkpoints cast after training, "
                                         f"{'unscaled' if scaling == 'none' else 'scaled'}")
        plotted += [(p[0], p[1], p[2], "trained") for p in trained]
        plotted += [(p[0], p[1], p[2], "ptq") for p in cast]
        ys = [p[1] for p in trained + cast] or [0.0, 100.0]
        lo, hi = min(ys), max(ys)
        gap = max(hi - lo, 10.0) * 0.045
        base = sec.baseline
        xs = [p[0] for p in trained + cast] or [4.0, 32.0]     # one x range for both panels
        ticks = [b for b in (2, 4, 8, 16, 32) if min(xs) / 1.3 <= b <= max(xs) * 1.3]
        panels = [(row[0], trained, f"trained in the format: {sec.short_title(differing)}")]
        if ncols == 2:
            panels.append((row[1], cast, "FP32 checkpoints cast after training (PTQ)"))
        for ax, points, title in panels:
            if base is not None:
                ax.axhline(base.acc[0], color="gray", ls=":", lw=1, label="FP32 mean (trained)")
            _draw_labels(ax, points, lo, hi, gap)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(t) for t in ticks])
            ax.set_xlim(min(xs) / 2 ** 1.5, max(xs) * 2 ** 1.1)  # room for the labels each side
            ax.set_ylim(lo - 3 * gap, hi + 3 * gap)
            ax.set_xlabel("bits per element (block formats include their shared scales)")
            ax.set_title(title if points else f"{title}: none", fontsize=10)
            ax.grid(True, alpha=0.3)
            _legend_below(ax, ncol=1)
        row[0].set_ylabel("final test accuracy (%)")
    fig.suptitle("Final test accuracy against bits per element (error bar: 1 std over seeds)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")    # "tight" keeps the outside legend
    plt.close(fig)
    return plotted


def main_section(sections: Sequence[Section]) -> Optional[Section]:
    """The section the forest plot shows: the largest test set among sections with an FP32 row
    and at least one row with a bootstrap interval (the first such in the report's order on a
    tie); None when there is none."""
    usable = [s for s in sections if s.baseline is not None and any(g.paired for g in s.groups)]
    return max(usable, key=lambda s: s.config.get("test_images") or 0, default=None)


def plot_forest(sec: Section, path: Path) -> Dict[str, Any]:
    """Forest plot of one section: per configuration (FP32 excepted, labelled by its config key
    as in the table), its difference to FP32 in points with the bootstrap 95% CI (thick bar) and
    the Welch t-interval (thin line), grouped by bits per element (widest first), a zero line and
    a band of ± the median bootstrap half-width (the resolution limit: a typical row cannot tell
    a difference inside it from 0). The x range is the bootstrap intervals': with 2 seeds a side
    a t-interval has about one degree of freedom and can be ten times wider, so such a line is
    cut at the edge with an arrow, and every row's numbers are written on the right. Returns
    what it drew (row labels top to bottom, group labels, the band, the x range), for tests."""
    plt = _pyplot()
    from matplotlib.transforms import blended_transform_factory
    base = sec.baseline
    rows = sorted((g for g in sec.groups if g is not base and (g.paired or g.welch)),
                  key=lambda g: (-(g.bits or 0), g.config_key))
    band = statistics.median(g.paired.half_width for g in rows if g.paired)
    slots: List[Tuple[str, Optional[Group]]] = []       # top to bottom: group headers and rows
    header = None
    for g in rows:                                      # rows are sorted by bits
        label = f"{fmt_bits(g.bits)} bits" if g.bits else "bits unknown"
        if label != header:
            header = label
            slots.append((header, None))
        slots.append((f"{g.config_key} (n={len(g.finished)})", g))
    ends = [-band, band]
    for g in rows:
        shown = g.paired or g.welch
        ends += [shown.ci_low, shown.ci_high]
    pad = 0.08 * (max(ends) - min(ends))
    x0, x1 = min(ends) - pad, max(ends) + pad

    fig, ax = plt.subplots(figsize=(9.0, 1.9 + 0.34 * len(slots)))
    ys = list(range(len(slots), 0, -1))
    ax.axvspan(-band, band, color="0.87", lw=0,
               label=f"resolution ±{band:.2f} (median 95% CI half-width)")
    ax.axvline(0.0, color="black", lw=1.0)
    right = blended_transform_factory(ax.transAxes, ax.transData)
    clipped = False
    for y, (_, g) in zip(ys, slots):
        if g is None:
            continue
        p, w = g.paired, g.welch
        if w:
            ax.plot([max(w.ci_low, x0), min(w.ci_high, x1)], [y, y], color="black", lw=1.0,
                    label="Welch t 95% interval (seeds only)")
            for end, edge, marker in ((w.ci_low, x0, "<"), (w.ci_high, x1, ">")):
                if (end < edge) if marker == "<" else (end > edge):
                    ax.plot([edge], [y], marker=marker, ls="none", color="black", ms=5,
                            clip_on=False,
                            label="t-interval goes on beyond the axis (numbers on the right)")
                    clipped = True
        if p:
            ax.plot([p.ci_low, p.ci_high], [y, y], color="tab:blue", lw=6, alpha=0.85,
                    solid_capstyle="butt", label="bootstrap 95% CI (seeds, then test images)")
        ax.plot([(p or w).diff], [y], "o", color="white", mec="black", ms=5, zorder=3)
        ax.text(1.04, y, f"{(p or w).diff:+6.2f}  {_interval(p) if p else '-':<17} "
                         f"{_interval(w) if w else '-'}", transform=right, va="center",
                fontsize=8, family="monospace")
    # the column heads share the first group header's line, which has no numbers
    ax.text(1.04, ys[0], "  diff  bootstrap CI      t-interval", transform=right, va="center",
            fontsize=8, family="monospace", fontweight="bold")
    ax.set_yticks(ys)
    ax.set_yticklabels([t for t, _ in slots])
    for tick, (_, g) in zip(ax.get_yticklabels(), slots):
        if g is None:
            tick.set_fontweight("bold")
    ax.tick_params(axis="y", length=0)
    ax.set_xlim(x0, x1)
    ax.set_ylim(0.4, len(slots) + 0.6)
    ax.set_xlabel("difference to FP32 (percentage points of test accuracy)")
    ax.grid(True, axis="x", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.5 / len(slots) - 0.08), ncol=2, frameon=False)
    c = sec.config
    others = sorted({len(g.finished) for g in rows})
    seeds = f"{others[0]}" if len(others) == 1 else f"{others[0]}-{others[-1]}"
    ax.set_title(f"Difference to FP32: {c.get('model')}, recipe {c.get('recipe', 'paper')}, "
                 f"{_epochs(c.get('epochs'))}, {c.get('test_images') or 0:,} test images; "
                 f"seeds: FP32 {len(base.finished)}, others {seeds}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return {"rows": [t for t, g in slots if g is not None],
            "groups": [t for t, g in slots if g is None], "band": band, "xlim": (x0, x1),
            "clipped": clipped}


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def _epoch_times(r: "Run") -> List[float]:
    """A run's logged epoch times (training + evaluation), from metrics.jsonl."""
    return [m["epoch_seconds"] for m in r.metrics if m.get("epoch_seconds") is not None]


def _median_epoch_time(r: Run) -> Optional[float]:
    """A run's median epoch time (training + evaluation) times its epochs: its duration without
    the pauses and busy stretches that inflate wall time; None if its epochs are not timed."""
    times = _epoch_times(r)
    return statistics.median(times) * len(times) if times else None


def make_report(runs_dirs: Union[Path, Sequence[Path]], out_dir: Path, model: Optional[str] = None,
                epochs: Optional[int] = None, data: str = "all", plots: bool = True,
                command: str = "python report.py", recipe: Optional[str] = None) -> Dict[str, Any]:
    """Write ``out_dir``/results.md, results.csv (and the PNGs); return what went where, with
    FP32's gap to the paper (``paper_gap``: one dict per 10,000-image section, see paper_gap)."""
    dirs = [Path(runs_dirs)] if isinstance(runs_dirs, (str, Path)) else [Path(d) for d in runs_dirs]
    if not any(d.is_dir() for d in dirs):
        raise UserError(f"--runs-dir {', '.join(map(str, dirs))}: no such folder (run sweep.py or "
                        f"a format script first)")
    if data not in DATA_CHOICES:
        raise UserError(f"--data {data!r}: accepted: {', '.join(DATA_CHOICES)}")
    runs_dir = ", ".join(_shown(d) for d in dirs if d.is_dir())
    all_runs, broken = load_runs([d for d in dirs if d.is_dir()])
    curves = epoch_curves(dedupe([r for r in all_runs
                                  if keep(r.config, model, None, data, recipe)])[0])
    all_runs = [r for r in all_runs if keep(r.config, model, epochs, data, recipe)]
    all_runs, repeats = dedupe(all_runs)
    filtered = bool(model or epochs or recipe or data != "all")
    if filtered:        # a folder without summary: its config.json, if any, decides
        broken = [d for d in broken
                  if keep((runs.read_json(d / runs.CONFIG) or {}).get("config") or {}, model, epochs,
                          data, recipe) and (d / runs.CONFIG).is_file()]
    ptq_files = [d for d in load_ptq([d for d in dirs if d.is_dir()])
                 if keep(d["source"].get("config") or {}, model, epochs, data, recipe)]
    if not all_runs and not broken:
        filt = " matching the filters" if filtered else ""
        raise UserError(f"no runs{filt} in {runs_dir} (run sweep.py or a format script first)")
    sections = build_sections(all_runs)
    for sec in sections:
        sec.compare_to_baseline()
    ptq_groups = group_ptq(ptq_files)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot create it ({e.strerror}); pick a writable folder")

    n_fin = sum(r.finished for r in all_runs)
    lines = ["# Results", "",
             f"Written by `{command}` from {len(all_runs)} runs in `{runs_dir}` "
             f"({n_fin} finished) on {time.strftime('%Y-%m-%d')}; the same rows as CSV in "
             f"`{RESULTS_CSV}`.", "",
             "Test accuracy is the final epoch's (never the best epoch's), as mean and sample standard "
             "deviation (n-1) over the n finished seeds; \"vs FP32\" is the difference of the means "
             "to the FP32 row of the same table, in points. wall/run is a run's wall time (start-up "
             "and evaluations included); time/epoch is one epoch's training and evaluation; img/s "
             "is the training throughput. Runs that did not finish are not in the means: the last "
             "column counts them and the section \"Runs not in the means\" names "
             "them.", "",
             "The difference to FP32 comes with two 95% intervals from independent methods. "
             "\"95% CI\" is a two-level paired bootstrap: every run is scored on the same test "
             "images, so the seeds of each configuration are resampled, then the test images, the "
             "same images for both sides (10,000 resamples, percentile interval; "
             "`common/stats.py`); \"±\" is its half-width, and \"resolved\" says whether it "
             "excludes 0. \"t-interval\" is Welch's t-interval of the difference of the mean "
             "accuracies over seeds (each seed's final accuracy one observation, unequal "
             "variances, Welch-Satterthwaite degrees of freedom), and \"t resolved\" whether it "
             "excludes 0. Welch, not a paired t over seeds: seed s of one format has nothing to do "
             "with seed s of FP32 (training diverges from the first step), and Welch uses every "
             "FP32 seed however many the other row has. It takes the test images as fixed and "
             "sees only the seed-to-seed spread, which the bootstrap resamples together with the "
             "images, so the two can disagree near the edge; the sentence under each table names "
             "the rows where they do. With one seed on either side the t-interval is undefined "
             "(\"-\"). Rows marked \"no: within noise\" cannot be told apart from FP32 with these "
             "seeds and test images (with 1,000 test images, differences under about 2 points "
             "often cannot), so do not rank them. With few seeds a \"yes\" is provisional: the "
             "bootstrap sees the seed-to-seed spread only through the seeds there are (with 2 "
             "seeds about half of it, with 1 none), and with 2 seeds a side the t-interval has 1 "
             "to 2 degrees of freedom (t up to 12.7) and is very wide, so a row needs 3 or more "
             "seeds on both sides before either covers seed noise well. EMA acc is the final "
             "accuracy of an exponential moving average of the weights (`--ema-decay`), logged "
             "beside the trained model's; the table's accuracy is always the trained model's.",
             ""]
    gaps: List[Dict[str, Any]] = []
    for sec in sections:
        lines += [f"## {sec.title()}", ""]
        lines += md_table(RESULT_HEADER, section_rows(sec), RESULT_ALIGN)
        disagree = disagreement_line(sec)
        if disagree:
            lines += ["", disagree]
        gap = paper_gap(sec)
        if gap:
            gaps.append(gap)
            lines += ["", gap["line"] + "."]
        per_epoch = [g.seconds_per_epoch for g in sec.groups if g.seconds_per_epoch]
        if per_epoch:
            hw = sorted({h for g in sec.groups for h in g.hardware})
            capped = sec.config.get("max_steps_per_epoch")
            lines += ["", f"One epoch{f' (capped at {capped} steps)' if capped else ''} of every "
                          f"configuration above, one seed each: {fmt_duration(sum(per_epoch))} ({len(per_epoch)} "
                          f"configuration{'s' if len(per_epoch) != 1 else ''}; hardware: {'; '.join(hw)})."]
        finished = [r for g in sec.groups for r in g.finished]
        walls = [r.summary.get("wall_seconds") for r in finished]
        if finished and all(walls):
            typical = [_median_epoch_time(r) for r in finished]
            lines += ["", f"The {len(finished)} finished run{'s' if len(finished) != 1 else ''} "
                          f"of this table took {fmt_duration(sum(walls))} of wall time in all "
                          f"(one after another; a run that shared its machine counts its slower "
                          f"time)."
                      + (f" At each run's median epoch time, which a pause or a busy stretch "
                         f"hardly moves, they take {fmt_duration(sum(typical))}."
                         if all(typical) else "")]
        cpu = [r.summary["cpu_seconds"] for r in finished if r.summary.get("cpu_seconds")]
        if cpu:
            lines += ["", f"{len(cpu)} of them count their CPU time (all threads of the run's "
                          f"process, which other work on the machine does not inflate as it does "
                          f"wall time): {fmt_duration(sum(cpu))} of CPU time in all."]
        lines.append("")
    curve_rows = epoch_rows(curves)
    if curve_rows:
        lines += ["## Accuracy against epochs", "",
                  "Formats trained to several epoch counts with otherwise the same flags (the "
                  "schedule stretched to each length) and scored on the same test images: final "
                  "accuracy, mean and sample standard deviation over the seeds listed. time/run is "
                  "epochs x the median epoch time, averaged over those runs"
                  + (f"; this table ignores --epochs {epochs}" if epochs else "") + ". The same rows "
                  f"as CSV in `{EPOCHS_CSV}`.", ""]
        lines += md_table(EPOCHS_HEADER, [
            [r["label"], r["config"], str(r["recipe"]), str(r["epochs"]),
             r["seeds"].replace(";", ", "), fmt_num(r["acc_mean"]), fmt_num(r["acc_std"]),
             fmt_num(r["ema_acc_mean"]),
             fmt_duration(r["hours_per_run"] * 3600 if r["hours_per_run"] is not None else None),
             f"{r['test_images']:,}" if r["test_images"] else "-"] for r in curve_rows],
            "lllrlrrrrr")
        lines.append("")
    plotted: List[Path] = []
    (out_dir / PLOT_FOREST).unlink(missing_ok=True)     # an earlier report's would mislead
    if plots and sections:
        plot_epochs(sections, out_dir / PLOT_EPOCHS)
        plot_bits(sections, ptq_groups, out_dir / PLOT_BITS)
        plotted = [out_dir / PLOT_EPOCHS, out_dir / PLOT_BITS]
        lines += ["## Plots", ""]
        main = main_section(sections)
        if main is not None:
            plot_forest(main, out_dir / PLOT_FOREST)
            plotted.append(out_dir / PLOT_FOREST)
            lines += [f"![difference to FP32 with both 95% intervals]({PLOT_FOREST})", "",
                      f"Difference to FP32 in the table \"{main.title()}\": thick bar the "
                      "bootstrap 95% CI, thin line the t-interval, shaded the resolution limit "
                      "(± the median bootstrap half-width of the rows).", ""]
        lines += [f"![test accuracy per epoch]({PLOT_EPOCHS})", "",
                  f"![final accuracy against bits per element]({PLOT_BITS})", ""]
    if ptq_groups:
        lines += ["## Post-training quantization", "",
                  "Trained weights evaluated with weights and activations cast to each format, "
                  "without retraining (`ptq_eval.py`), beside the runs trained in that format "
                  "(matched by the format of their weights; their other operands may differ, see "
                  "the label).", ""]
        for pg in ptq_groups:
            lines += ptq_lines(pg, sections) + [""]
    if repeats:
        lines += ["## Repeats not counted as seeds", "",
                  "Runs of the same configuration and seed count once (the finished one, else the "
                  "most recent):", ""] + [f"- {n}" for n in repeats] + [""]
    lost = unfinished_rows(all_runs, broken)
    if lost:
        lines += ["## Runs not in the means", ""]
        lines += md_table(("run", "configuration", "status", "epochs", "last test acc (%)",
                           "updated", "message"), lost, "lllrrll")
        lines.append("")
    text = "\n".join(lines)
    (out_dir / RESULTS_MD).write_text(text, encoding="utf-8")
    write_csv(out_dir / RESULTS_CSV, csv_rows(sections))
    if curve_rows:
        write_csv(out_dir / EPOCHS_CSV, curve_rows, EPOCHS_COLUMNS)
    else:      # a curve of an earlier report in this folder would read as this one's
        (out_dir / EPOCHS_CSV).unlink(missing_ok=True)
    return {"results": out_dir / RESULTS_MD, "csv": out_dir / RESULTS_CSV, "repeats": repeats,
            "plots": plotted, "paper_gap": gaps,
            "runs": len(all_runs), "finished": n_fin, "sections": len(sections),
            "not_finished": len(lost), "ptq": len(ptq_files)}
