"""What the report writes as text: the markdown tables and prose of results.md, the CSV rows of
results.csv and acc_vs_epochs.csv, and the titles the plots share with the tables."""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .compare import COMPARE_ALIGN, COMPARE_HEADER, Comparison, compare_rows, csv_fields
from .records import Broken, Group, PtqGroup, Run, Section, median_epoch_time, trained_weight_format
from .stats import PairedDiff, mean_or_none, mean_std, one_sample_bootstrap, t_interval

EPOCHS_COLUMNS = ("config", "label", "recipe", "model", "epochs", "seeds", "test_images",
                  "acc_mean", "acc_std", "ema_acc_mean", "hours_per_run")
CSV_COLUMNS = ("config", "label", "recipe", "model", "epochs", "seeds", "test_images", "acc_mean",
               "acc_std", "diff_vs_fp32", "ci_low", "ci_high", "ci_half_width", "resolved",
               "t_ci_low", "t_ci_high", "t_df", "t_resolved", "methods_disagree", "bits",
               "ema_acc_mean", "hours_per_run", "hardware", "not_finished", "compared_with",
               "diff_vs_compared", "cmp_ci_low", "cmp_ci_high", "cmp_t_ci_low", "cmp_t_ci_high")
# He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, Table 6:
# ResNet-20 on CIFAR-10, 8.75% test error (164 epochs, the paper recipe), i.e. 91.25% accuracy.
PAPER_RESNET20_ACC = 91.25
PAPER_EPOCHS = 164
RESULT_HEADER = ("configuration", "config", "bits", "n", "test acc (%)", "std", "vs FP32",
                 "95% CI", "±", "resolved", "t-interval", "t resolved", "EMA acc (%)",
                 "wall/run", "time/epoch", "img/s", "hardware", "test images", "not finished")
RESULT_ALIGN = "llrrrrrlrlllrrrrlrl"
EPOCHS_HEADER = ("configuration", "config", "recipe", "epochs", "seeds", "test acc (%)", "std",
                 "EMA acc (%)", "time/run", "test images")


# ----------------------------------------------------------------------------------------------
# Cells
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


def epochs_text(n: Any) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def interval(p: PairedDiff) -> str:
    return f"[{fmt_num(p.ci_low, signed=True)}, {fmt_num(p.ci_high, signed=True)}]"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> List[str]:
    """A GitHub markdown table; ``align`` has one l/r per column (default: first left, rest
    right)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "--:" for a in align]

    def esc(s: Any) -> str:
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return lines


# ----------------------------------------------------------------------------------------------
# Titles (tables and plots)
# ----------------------------------------------------------------------------------------------
def section_title(sec: Section) -> str:
    """A section's heading: every flag that defines the experiment, and its test set."""
    c = sec.config
    parts = [f"{c.get('model')}", epochs_text(c.get("epochs")), f"batch {c.get('batch_size')}",
             f"{c.get('schedule')} schedule from lr {c.get('lr'):g}" if c.get("lr") is not None
             else f"{c.get('schedule')} schedule",
             f"momentum {c.get('momentum'):g}" if c.get("momentum") is not None else None,
             f"weight decay {c.get('weight_decay'):g}" if c.get("weight_decay") is not None
             else None]
    optional = (("nesterov", lambda v: "Nesterov"),
                ("warmup_epochs", lambda v: f"{v:g} warm-up epoch{'' if v == 1 else 's'}"),
                ("label_smoothing", lambda v: f"label smoothing {v:g}"),
                ("ema_decay", lambda v: f"weight EMA {v:g}"),
                ("shortcut", lambda v: f"shortcut {v}"),
                ("tf32", lambda v: "TF32"),
                ("max_steps_per_epoch", lambda v: f"at most {v} steps per epoch"))
    parts += [text(c[k]) for k, text in optional if c.get(k)]
    parts.append("synthetic data" if c.get("synthetic") else "CIFAR-10")
    if c.get("test_images"):
        parts.append(f"{c['test_images']:,} test images")
    parts.append(f"recipe {c.get('recipe', 'paper')}")
    return ", ".join(p for p in parts if p)


def short_title(sec: Section, differing: Iterable[str] = ()) -> str:
    """Model and epochs, plus the fields in ``differing`` (those that tell sections apart)."""
    c = sec.config
    s = f"{c.get('model')}, {epochs_text(c.get('epochs'))}"
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


# ----------------------------------------------------------------------------------------------
# The main tables
# ----------------------------------------------------------------------------------------------
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
        t_cells = [interval(w), t_res]
    if p is not None:
        return [fmt_num(p.diff, signed=True), interval(p), fmt_num(p.half_width),
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
            "for: " + "; ".join(f"{g.label} (bootstrap {interval(g.paired)}, "
                               f"t {interval(g.welch)})" for g in differ) + ".")


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
            f"images, recipe {c.get('recipe', 'paper')}, {epochs_text(c.get('epochs'))}) vs He et "
            f"al. 2016 {PAPER_RESNET20_ACC}% ({PAPER_EPOCHS} epochs): gap "
            f"{fmt_num(base.acc[0] - PAPER_RESNET20_ACC, signed=True)} points, 95% CI "
            + (f"{interval(boot)} (bootstrap over seeds and test images)" if boot
               else f"- ({why})")
            + (f", t-interval {interval(t)}" if t else ", t-interval - (undefined with one seed)"))
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


def csv_rows(sections: Sequence[Section],
             comparisons: Optional[Dict[str, Sequence[Comparison]]] = None
             ) -> List[Dict[str, Any]]:
    """One row per configuration and experiment (``CSV_COLUMNS``); empty cells where a value
    does not exist (no finished seed, no FP32 row, no per-image predictions, no row it is
    compared with: ``comparisons`` by section key)."""
    out = []
    for sec in sections:
        base = sec.baseline
        compared = csv_fields((comparisons or {}).get(sec.key, ()))
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
                **compared.get(id(g), {}),
            })
    return out


def write_csv(path: Path, rows: Sequence[Dict[str, Any]],
              columns: Sequence[str] = CSV_COLUMNS) -> None:
    """``rows`` as CSV with the ``columns`` header; floats with 4 decimals, None empty."""
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


def unfinished_rows(all_runs: Sequence[Run], broken: Sequence[Broken]) -> List[List[str]]:
    """Rows of 'Runs not in the means': runs that did not finish, then folders that could not
    be read as runs (with what is known of them)."""
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
    for b in broken:               # what is known of them: a summary only with damaged metrics
        s = b.summary or {}
        label = (s.get("config") or {}).get("label") or s.get("label") or "-"
        epochs = f"{s.get('epochs_done', '?')}/{s.get('epochs', '?')}" if s else "-"
        rows.append([b.path.name, label, b.status, epochs, fmt_num(s.get("last_test_acc")),
                     str(s.get("updated_at") or "-"), b.message])
    return rows


def epoch_rows(curves: Sequence[List[List[Run]]]) -> List[Dict[str, Any]]:
    """One row per format and epoch count of ``epoch_curves``; time/run is the runs' mean of
    epochs x median epoch time (pauses and busy stretches hardly move it)."""
    rows = []
    for curve in curves:
        for same in curve:
            g = Group("", same[0].label, same[0].format, list(same))
            acc, std = g.acc
            typical = [median_epoch_time(r) for r in same]
            rows.append({"config": g.config_key, "label": g.label,
                         "recipe": same[0].config.get("recipe", "paper"),
                         "model": same[0].config.get("model"),
                         "epochs": same[0].config.get("epochs"),
                         "seeds": ";".join(str(r.seed) for r in same),
                         "test_images": same[0].test_set, "acc_mean": acc, "acc_std": std,
                         "ema_acc_mean": g.ema_acc,
                         "hours_per_run": (mean_or_none(typical) / 3600 if None not in typical
                                           else None)})
    return rows


# ----------------------------------------------------------------------------------------------
# Post-training quantization
# ----------------------------------------------------------------------------------------------
def ptq_settings(pg: PtqGroup) -> str:
    """How the checkpoints of a PTQ group were cast, in words."""
    ws = {d.get("weight_scaling") for d in pg.files}
    fl = {bool(d.get("first_last_fp32")) for d in pg.files}
    eb = {d.get("eval_batch_size") for d in pg.files}
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


def _mean_cell(vals: Sequence[float]) -> str:
    if not vals:
        return "-"
    m, s = mean_std(vals)
    return fmt_num(m) + (f" ± {fmt_num(s)}" if s is not None else "")


def ptq_lines(pg: PtqGroup, sections: Sequence[Section]) -> List[str]:
    """The markdown of one PTQ group: per format, PTQ accuracy unscaled/scaled beside training."""
    sec = next((s for s in sections if s.key == pg.section_key), None)
    trained: Dict[str, List[Group]] = {}
    for g in sec.groups if sec is not None else []:
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
             f"{epochs_text(c.get('epochs'))}, recipe {c.get('recipe', 'paper')}"
             f"{', synthetic data' if c.get('synthetic') else ''})", "",
             f"{n} checkpoint{'s' if n != 1 else ''} ({', '.join(names)})"
             f"{'; NOT finished: epoch ' + ', '.join(unfinished) if unfinished else ''}; "
             f"{', '.join(map(str, imgs))} test images on {'; '.join(hw)}. Cast: "
             f"{ptq_settings(pg)}. Accuracy in %, mean over the checkpoints (± sample std when "
             f"there are several).", ""]
    rows = []
    for fmt, bits, by_scaling in pg.rows_by_format():
        t = "; ".join(f"{_mean_cell([r.summary['final_test_acc'] for r in g.finished])} "
                      f"({g.label})" for g in trained.get(fmt, []) if g.finished) or "-"
        rows.append([fmt if fmt != "fp32" else "fp32 (no cast)", fmt_bits(bits),
                     _mean_cell(by_scaling.get("none", [])),
                     _mean_cell(by_scaling.get("scaled", [])) if fmt != "fp32" else "-", t])
    lines += md_table(("format", "bits", "PTQ, unscaled", "PTQ, scaled",
                       "trained in this format (weights)"), rows, "lrrrl")
    return lines


# ----------------------------------------------------------------------------------------------
# results.md
# ----------------------------------------------------------------------------------------------
METHODS = (
    "Test accuracy is the final epoch's (never the best epoch's), as mean and sample standard "
    "deviation (n-1) over the n finished seeds; \"vs FP32\" is the difference of the means "
    "to the FP32 row of the same table, in points. wall/run is a run's wall time (start-up "
    "and evaluations included); time/epoch is one epoch's training and evaluation; img/s "
    "is the training throughput. Runs that did not finish are not in the means: the last "
    "column counts them and the section \"Runs not in the means\" names "
    "them.")
INTERVALS = (
    "The difference to FP32 comes with two 95% intervals from independent methods. "
    "\"95% CI\" is a two-level paired bootstrap: every run is scored on the same test "
    "images, so the seeds of each configuration are resampled, then the test images, the "
    "same images for both sides (10,000 resamples, percentile interval; "
    "`common/report/stats.py`); \"±\" is its half-width, and \"resolved\" says whether it "
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
    "beside the trained model's; the table's accuracy is always the trained model's.")


def intro_lines(command: str, all_runs: Sequence[Run], runs_dir: str, csv_name: str) -> List[str]:
    """The heading and the paragraphs on how to read the tables."""
    n_fin = sum(r.finished for r in all_runs)
    return ["# Results", "",
            f"Written by `{command}` from {len(all_runs)} runs in `{runs_dir}` "
            f"({n_fin} finished) on {time.strftime('%Y-%m-%d')}; the same rows as CSV in "
            f"`{csv_name}`.", "", METHODS, "", INTERVALS, ""]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def cost_lines(sec: Section) -> List[str]:
    """The paragraphs under a table on what it cost: one epoch of each row, the finished runs'
    wall time (and at their median epoch time), and CPU time where runs count it."""
    lines = []
    per_epoch = [g.seconds_per_epoch for g in sec.groups if g.seconds_per_epoch]
    if per_epoch:
        hw = sorted({h for g in sec.groups for h in g.hardware})
        capped = sec.config.get("max_steps_per_epoch")
        lines += ["", f"One epoch{f' (capped at {capped} steps)' if capped else ''} of every "
                      f"configuration above, one seed each: {fmt_duration(sum(per_epoch))} "
                      f"({_plural(len(per_epoch), 'configuration')}; hardware: {'; '.join(hw)})."]
    finished = [r for g in sec.groups for r in g.finished]
    walls = [r.summary.get("wall_seconds") for r in finished]
    if finished and all(walls):
        typical = [median_epoch_time(r) for r in finished]
        lines += ["", f"The {_plural(len(finished), 'finished run')} of this table took "
                      f"{fmt_duration(sum(walls))} of wall time in all (one after another; a run "
                      f"that shared its machine counts its slower time)."
                  + (f" At each run's median epoch time, which a pause or a busy stretch "
                     f"hardly moves, they take {fmt_duration(sum(typical))}."
                     if all(typical) else "")]
    cpu = [r.summary["cpu_seconds"] for r in finished if r.summary.get("cpu_seconds")]
    if cpu:
        lines += ["", f"{len(cpu)} of them count their CPU time (all threads of the run's "
                      f"process, which other work on the machine does not inflate as it does "
                      f"wall time): {fmt_duration(sum(cpu))} of CPU time in all."]
    return lines


def section_lines(sec: Section, gap: Optional[Dict[str, Any]],
                  comparisons: Sequence[Comparison] = ()) -> List[str]:
    """One section of results.md: heading, table, the sentences under it (``gap``: its
    ``paper_gap``), and the table of rows compared with another row than FP32."""
    lines = [f"## {section_title(sec)}", ""]
    lines += md_table(RESULT_HEADER, section_rows(sec), RESULT_ALIGN)
    disagree = disagreement_line(sec)
    if disagree:
        lines += ["", disagree]
    if gap:
        lines += ["", gap["line"] + "."]
    if comparisons:
        lines += ["", "Against the configuration each one changes (GEMM mode against its "
                  "tensor-role row; the same two intervals as against FP32):", ""]
        lines += md_table(COMPARE_HEADER, compare_rows(comparisons), COMPARE_ALIGN)
    return lines + cost_lines(sec) + [""]


def curve_lines(curve_rows: Sequence[Dict[str, Any]], epochs: Optional[int],
                csv_name: str) -> List[str]:
    """The 'Accuracy against epochs' section ([] without a curve)."""
    if not curve_rows:
        return []
    lines = ["## Accuracy against epochs", "",
             "Formats trained to several epoch counts with otherwise the same flags (the "
             "schedule stretched to each length) and scored on the same test images: final "
             "accuracy, mean and sample standard deviation over the seeds listed. time/run is "
             "epochs x the median epoch time, averaged over those runs"
             + (f"; this table ignores --epochs {epochs}" if epochs else "") + ". The same rows "
             f"as CSV in `{csv_name}`.", ""]
    lines += md_table(EPOCHS_HEADER, [
        [r["label"], r["config"], str(r["recipe"]), str(r["epochs"]),
         r["seeds"].replace(";", ", "), fmt_num(r["acc_mean"]), fmt_num(r["acc_std"]),
         fmt_num(r["ema_acc_mean"]),
         fmt_duration(r["hours_per_run"] * 3600 if r["hours_per_run"] is not None else None),
         f"{r['test_images']:,}" if r["test_images"] else "-"] for r in curve_rows],
        "lllrlrrrrr")
    return lines + [""]


def plot_lines(names: Dict[str, str], forest_of: Optional[Section]) -> List[str]:
    """The 'Plots' section: ``names`` maps "epochs", "bits", "forest" to file names;
    ``forest_of`` is the section forest.png shows (None: there is no forest plot)."""
    lines = ["## Plots", ""]
    if forest_of is not None:
        lines += [f"![difference to FP32 with both 95% intervals]({names['forest']})", "",
                  f"Difference to FP32 in the table \"{section_title(forest_of)}\": thick bar the "
                  "bootstrap 95% CI, thin line the t-interval, shaded the resolution limit "
                  "(± the median bootstrap half-width of the rows).", ""]
    return lines + [f"![test accuracy per epoch]({names['epochs']})", "",
                    f"![final accuracy against bits per element]({names['bits']})", ""]


def closing_lines(ptq_groups: Sequence[PtqGroup], sections: Sequence[Section],
                  repeats: Sequence[str], lost: Sequence[Sequence[str]],
                  acc: Sequence[str] = ()) -> List[str]:
    """The sections after the plots: post-training quantization (then ``acc``, the
    low-precision accumulation section's lines), repeats, runs not counted."""
    lines: List[str] = []
    if ptq_groups:
        lines += ["## Post-training quantization", "",
                  "Trained weights evaluated with weights and activations cast to each format, "
                  "without retraining (`ptq_eval.py`), beside the runs trained in that format "
                  "(matched by the format of their weights; their other operands may differ, see "
                  "the label).", ""]
        for pg in ptq_groups:
            lines += ptq_lines(pg, sections) + [""]
    lines += list(acc)
    if repeats:
        lines += ["## Repeats not counted as seeds", "",
                  "Runs of the same configuration and seed count once (the finished one, else the "
                  "most recent):", ""] + [f"- {n}" for n in repeats] + [""]
    if lost:
        lines += ["## Runs not in the means", ""]
        lines += md_table(("run", "configuration", "status", "epochs", "last test acc (%)",
                           "updated", "message"), lost, "lllrrll")
        lines.append("")
    return lines
