"""Reading runs: run folders and ptq.json files -> ``Run`` objects, which configuration each is
(from its stored config, not its folder name), the report's filters and de-duplication, and the
grouping into sections (experiments, one table each) and rows (``Group``: one format's seeds).

A run's number format is read through ``common.config.FormatRecord``, the schema every format
script writes ``RunConfig.format`` with; the sweep's key of a run (fp32, fp8-e5m2w ...) is the
configuration whose script, given its sweep flags, records the same script and format
(``config_key``).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .. import runs
from ..config import CONFIGS, REPO_ROOT, FormatRecord, compared_values
from .stats import PairedDiff, mean_or_none, mean_std, paired_bootstrap, welch_interval

DATA_CHOICES = ("all", "real", "synthetic")
# Flags put before a configuration's own when the report plans it, so that its record does not
# depend on the machine making the report: without --mode the BF16 script probes this CPU and may
# choose emulated, while the sweep's "bf16" configuration is the autocast one.
PLAN_PRESETS: Dict[str, Tuple[str, ...]] = {"BF16/bf16_train.py": ("--mode", "autocast")}


def _key(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


# ----------------------------------------------------------------------------------------------
# Which configuration a run is
# ----------------------------------------------------------------------------------------------
def _load_script(script: str):
    """A format script (path from the repo root) imported as a module, for its ``plan``."""
    spec = importlib.util.spec_from_file_location(f"_report_plan_{Path(script).stem}",
                                                  REPO_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def known_configs() -> Tuple[Tuple[str, str, FormatRecord], ...]:
    """(key, script, format record) of every ``sweep.CONFIGS`` entry: what its script records
    when run with the entry's flags, from the script's own ``plan`` (so a script that changes
    its record changes this too). Computed once per process."""
    modules: Dict[str, Any] = {}
    out = []
    for key, cfg in CONFIGS.items():
        if cfg.script not in modules:
            modules[cfg.script] = _load_script(cfg.script)
        argv = [*PLAN_PRESETS.get(cfg.script, ()), *cfg.flags, "--synthetic"]
        try:
            planned = modules[cfg.script].plan(argv)["config"]
        except SystemExit as e:          # argparse refused the flags: a bug, not a user error
            raise RuntimeError(f"python {cfg.script} {' '.join(argv)} exits {e.code}: the sweep's "
                               f"configuration {key} no longer plans") from None
        out.append((key, planned.script, FormatRecord.from_dict(planned.format)))
    return tuple(out)


def config_key(config: Mapping[str, Any]) -> Optional[str]:
    """The sweep's key of the configuration a stored run config is (same format record, same
    script), else None. A config that names no script (written by hand or by older code) is
    matched on its format record alone."""
    record = FormatRecord.from_dict(config.get("format"))
    script = config.get("script")
    for key, known_script, known in known_configs():
        if known == record and (not script or script == known_script):
            return key
    return None


def label_slug(label: str) -> str:
    """A configuration key made from a label, for runs of no known configuration."""
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def is_fp32(fmt: Optional[Mapping[str, Any]]) -> bool:
    """The FP32 baseline's format record (FP32/train_cifar10_fp32.py)."""
    return FormatRecord.from_dict(fmt).family == "fp32"


def trained_weight_format(fmt: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The format a trained configuration keeps its weights in (for 'trained in this format')."""
    record = FormatRecord.from_dict(fmt)
    if record.role_fmt("weight"):
        return record.role_fmt("weight")
    if record.family in ("bf16", "fp32"):
        return record.family
    return None


# ----------------------------------------------------------------------------------------------
# Run folders
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
        """The stored format record, as stored (grouping compares it whole)."""
        return self.config.get("format") or self.summary.get("format") or {}

    @property
    def record(self) -> FormatRecord:
        return FormatRecord.from_dict(self.format)

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
        """The sweep's key of this run's configuration (``config_key``), else None."""
        return config_key({**self.config, "format": self.format})

    @property
    def experiment_key(self) -> str:
        return _key(compared_values(self.config))

    @property
    def section_key(self) -> str:
        return _key([self.experiment_key, self.test_set])

    @property
    def group_key(self) -> str:
        return _key({"section": self.section_key, "format": self.format, "label": self.label})


@dataclass
class Broken:
    """A folder that looks like a run but cannot be read as one: no or a corrupt summary.json,
    or a damaged metrics.jsonl. ``config`` is what is known of its config (None: nothing, and
    the report's filters then leave it out); ``warning`` is set for what report.py prints."""

    path: Path
    status: str
    message: str
    config: Optional[Dict[str, Any]] = None
    summary: Optional[Dict[str, Any]] = None
    warning: Optional[str] = None


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The objects of a metrics.jsonl ([] when it is missing). A line that is not a JSON object
    (a run killed while writing it leaves it truncated) raises ValueError naming the file and
    the line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)       # bad JSON and undecodable bytes are both ValueErrors
        except ValueError as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise ValueError(f"{path}, line {number}: not JSON ({why})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}, line {number}: a JSON {type(obj).__name__}, not an object")
        out.append(obj)
    return out


def _broken_without_config(d: Path, summary: Optional[Dict[str, Any]]) -> Optional[Broken]:
    """A folder with no usable summary: a Broken when it looks like a run, else None."""
    cfg_file = d / runs.CONFIG
    config = ((runs.read_json(cfg_file) or {}).get("config") or {}) if cfg_file.is_file() else None
    if summary is not None:
        again = runs.read_summary(d, live=False) or {}      # unreadable, or no config to place it
        return Broken(d, again.get("status", "?"), again.get("message", ""), config)
    if any((d / f).exists() for f in (runs.CONFIG, runs.CHECKPOINT, "stdout.log")):
        why = ("the script stopped before its first summary; see stdout.log"
               if (d / "stdout.log").exists() else "no summary.json")
        return Broken(d, "no summary.json", why, config)
    return None


def _dirs(runs_dirs: Union[Path, str, Sequence[Path]]) -> List[Path]:
    return [Path(runs_dirs)] if isinstance(runs_dirs, (str, Path)) else [Path(d) for d in runs_dirs]


def load_runs(runs_dirs: Union[Path, Sequence[Path]]) -> Tuple[List[Run], List[Broken]]:
    """Every run folder of the ``runs_dirs`` with a summary.json, and the folders that look like
    runs but cannot be read as one (``Broken``; the report names them too)."""
    found, broken = [], []
    folders = [p for d in _dirs(runs_dirs) if d.is_dir() for p in sorted(d.iterdir()) if p.is_dir()]
    for d in folders:
        # read_summary: a corrupt file reads as "unreadable" (named), a dead "running" run as
        # "interrupted"
        summary = runs.read_summary(d)
        cfg_file = runs.read_json(d / runs.CONFIG) or {}
        config = (summary or {}).get("config") or cfg_file.get("config") or {}
        if summary is None or not config:
            b = _broken_without_config(d, summary)
            broken += [b] if b else []
            continue
        try:
            metrics = read_metrics(d / runs.METRICS)
        except ValueError as e:
            broken.append(Broken(d, "unreadable", f"{e}; the run is left out of the tables",
                                 config, summary, warning=f"{e}: run {d.name} left out"))
            continue
        found.append(Run(summary.get("name") or d.name, d, summary, config, metrics,
                         summary.get("test_images")))
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


def load_evaluations(runs_dirs: Union[Path, Sequence[Path]], pattern: str,
                     accept: Callable[[Path, Any], bool],
                     identity: Callable[[Dict[str, Any]], Sequence[Any]]) -> List[Dict[str, Any]]:
    """Every JSON file matching ``pattern`` under the ``runs_dirs`` that ``accept`` takes, with
    its path, one per ``identity``: the first found wins, so a record's copy (records folder
    listed first) wins over the run folder's."""
    out, seen = [], set()
    for p in (p for d in _dirs(runs_dirs) for p in sorted(d.glob(pattern))):
        d = runs.read_json(p)
        if not accept(p, d):
            continue
        ident = _key(list(identity(d)))
        if ident in seen:
            continue
        seen.add(ident)
        d["path"] = str(p)
        out.append(d)
    return out


def load_ptq(runs_dirs: Union[Path, Sequence[Path]]) -> List[Dict[str, Any]]:
    """Every ``ptq*.json`` one level under the ``runs_dirs`` (one per source run, cast settings
    and test-set size: a record's copy wins over the run folder's), with its path; the
    accumulation evaluations (``ptq_acc*.json``) are ``accumulation.load_acc``'s."""
    return load_evaluations(
        runs_dirs, "*/ptq*.json",
        accept=lambda p, d: (not p.name.startswith("ptq_acc") and isinstance(d, dict)
                             and bool(d.get("results")) and bool(d.get("source"))),
        identity=lambda d: [d["source"].get("name"), d.get("first_last_fp32"),
                            d.get("weight_scaling"), d.get("eval_batch_size"),
                            d.get("test_images")])


def shown(path) -> str:
    """A folder as results.md shows it: relative to the repo root when inside it (the file is
    committed and read elsewhere), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT)) + "/"
    except ValueError:
        return str(path)


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
                notes.append(f"{shown(r.path)} (seed {r.seed} of {r.label}, {r.status}): ignored, "
                             f"a repeat of {shown(best.path)} ({best.status}"
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


def epoch_times(r: Run) -> List[float]:
    """A run's logged epoch times (training + evaluation), from metrics.jsonl."""
    return [m["epoch_seconds"] for m in r.metrics if m.get("epoch_seconds") is not None]


def median_epoch_time(r: Run) -> Optional[float]:
    """A run's median epoch time (training + evaluation) times its epochs: its duration without
    the pauses and busy stretches that inflate wall time; None if its epochs are not timed."""
    times = epoch_times(r)
    return statistics.median(times) * len(times) if times else None


# ----------------------------------------------------------------------------------------------
# Rows and sections
# ----------------------------------------------------------------------------------------------
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
        return label_slug(self.label)

    @property
    def ema_acc(self) -> Optional[float]:
        """Mean final-epoch accuracy of the weights' EMA (runs with --ema-decay), else None."""
        vals = [r.metrics[-1].get("ema_test_acc") for r in self.finished if r.metrics]
        return mean_or_none(vals) if vals and None not in vals else None

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
        return FormatRecord.from_dict(self.format).bits_per_element

    @property
    def final_accs(self) -> List[float]:
        """Each finished seed's final test accuracy (points)."""
        return [r.summary["final_test_acc"] for r in self.finished]

    @property
    def acc(self) -> Tuple[Optional[float], Optional[float]]:
        return mean_std(self.final_accs)

    def mean_of(self, field_name: str) -> Optional[float]:
        return mean_or_none(r.summary.get(field_name) for r in self.finished)

    @property
    def seconds_per_epoch(self) -> Optional[float]:
        """Mean time of one epoch (training + evaluation, from metrics.jsonl: start-up and data
        loading excluded), over the finished runs' epochs; wall time / epochs where not logged."""
        per_run = []
        for r in self.finished:
            times = epoch_times(r)
            if times:
                per_run.append(statistics.fmean(times))
            elif r.summary.get("wall_seconds") and r.summary.get("epochs_done"):
                per_run.append(r.summary["wall_seconds"] / r.summary["epochs_done"])
        return mean_or_none(per_run)

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
        """Epochs and mean/min/max test accuracy over the finished runs, at the epochs that every
        one of them scored (runs trained with --eval-every score fewer), so each point averages
        the same runs; when none finished, over every run, up to where each got (the bool says
        which)."""
        use = self.finished or self.runs
        per_epoch: Dict[int, List[float]] = {}
        for r in use:
            for m in r.metrics:
                if m.get("test_acc") is not None and math.isfinite(m["test_acc"]):
                    per_epoch.setdefault(int(m["epoch"]), []).append(m["test_acc"])
        if self.finished:
            per_epoch = {e: v for e, v in per_epoch.items() if len(v) == len(use)}
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
        """Fill each row's paired difference to FP32 with its bootstrap interval (``stats``),
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


def main_section(sections: Sequence[Section]) -> Optional[Section]:
    """The section the forest plot shows: the largest test set among sections with an FP32 row
    and at least one row with a bootstrap interval (the first such in the report's order on a
    tie); None when there is none."""
    usable = [s for s in sections if s.baseline is not None and any(g.paired for g in s.groups)]
    return max(usable, key=lambda s: s.config.get("test_images") or 0, default=None)


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
    out.sort(key=lambda c: (not is_fp32(c[0][0].format), -(c[0][0].record.bits_per_element or 0),
                            c[0][0].label))
    return out


# ----------------------------------------------------------------------------------------------
# Post-training quantization
# ----------------------------------------------------------------------------------------------
@dataclass
class PtqGroup:
    """The ptq.json files of the checkpoints of one trained configuration (its seeds)."""

    key: str
    section_key: str
    label: str
    config: Dict[str, Any]
    files: List[Dict[str, Any]] = field(default_factory=list)

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
                accs = table.setdefault(row["format"], {}).setdefault(row["scaling"], [])
                accs.append(row["test_acc"])
                bits[row["format"]] = row.get("bits")
        return [(f, bits[f], table[f]) for f in table]


def group_ptq(ptq_files: Sequence[Dict[str, Any]]) -> List[PtqGroup]:
    """ptq.json files grouped by trained configuration, section and cast settings."""
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
