"""Post-training evaluation with low-precision accumulation (``ptq_eval.py --acc``, written to
``ptq_acc*.json`` by common/ptq_acc.py) in the report: a table per trained configuration (rows:
accumulator with its promotion, columns: chunk size k, cells: top-1 accuracy and its difference
to the float32 row) and the plot ``acc_vs_mantissa.png`` (accuracy against the accumulator's
mantissa bits, one line per k, a dashed float32 reference, promoted accumulators marked).

Several checkpoints of one configuration (seeds) with the same settings form one group: cells
are means over them, differences the mean of each checkpoint's own difference to its float32
row.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..config import compared_values
from ..ptq_acc import is_acc_file
from .plots import axes_boxes, legend_below, pyplot
from .records import load_evaluations
from .tables import epochs_text, fmt_num, md_table

__all__ = ["ACC_PLOT", "ACC_GLOB", "AccGroup", "load_acc", "group_acc", "acc_lines",
           "plot_accumulation", "K_COLORS", "BREAK_DROP", "break_points"]

ACC_PLOT = "acc_vs_mantissa.png"
ACC_GLOB = "*/ptq_acc*.json"
# One colour per chunk size, in order of k: Paul Tol's "bright" scheme (colour-blind safe,
# personal.sron.nl/~pault), without its grey, which is too close to the black reference line.
K_COLORS = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377")
REF_COLOR = "#000000"
# Horizontal offset (in mantissa bits) between the lines of neighbouring chunk sizes, so that
# markers at the same accuracy do not hide each other.
K_DODGE = 0.12
# Accumulators that share their mantissa bits (bf16 and e5m7) sit this far apart, and each
# accumulator has its own marker (promoted ones a star).
SHARED_DODGE = 0.3
ACC_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h")
# An accumulator breaks a chunk size where it scores more than this many points below the
# float32 row of the same weights (about three standard errors of an accuracy near 90% on
# 10,000 test images).
BREAK_DROP = 1.0


def _key(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def load_acc(runs_dirs: Union[Path, Sequence[Path]]) -> List[Dict[str, Any]]:
    """Every ``ptq_acc*.json`` one level under the ``runs_dirs`` (one per source run, settings
    and test-set size: a record's copy wins over the run folder's), with its path."""
    return load_evaluations(
        runs_dirs, ACC_GLOB, accept=lambda p, d: is_acc_file(d),
        identity=lambda d: [d["source"].get("name"), bool(d.get("first_last_fp32")),
                            d.get("eval_batch_size"), d.get("test_images")])


@dataclass
class AccGroup:
    """The ptq_acc files of the checkpoints of one trained configuration with the same
    settings (first/last layers, test images, batch)."""

    key: str
    label: str
    config: Dict[str, Any]
    files: List[Dict[str, Any]] = field(default_factory=list)

    def reference(self) -> Optional[float]:
        """Mean float32 accuracy over the checkpoints."""
        accs = [r["test_acc"] for d in self.files for r in d["results"] if r.get("reference")]
        return statistics.fmean(accs) if accs else None

    def chunks(self) -> List[int]:
        return sorted({r["chunk"] for d in self.files for r in d["results"]
                       if not r.get("reference")})

    def accumulators(self) -> List[Tuple[str, Optional[int], Optional[int]]]:
        """(spec, mantissa bits, promote_every): widest first, promoted ones last, ties in the
        files' order of rows (rows added by a later rerun take their place by width)."""
        out: Dict[str, Tuple[str, Optional[int], Optional[int]]] = {}
        for d in self.files:
            for r in d["results"]:
                if not r.get("reference"):
                    out.setdefault(r["accumulator"], (r["accumulator"], r.get("mantissa_bits"),
                                                      r.get("promote_every")))
        return sorted(out.values(), key=lambda a: (a[2] is not None,
                                                   -(a[1] if a[1] is not None else -1)))

    def cell(self, spec: str, chunk: int) -> Tuple[Optional[float], Optional[float]]:
        """(mean accuracy, mean difference to each checkpoint's float32 row), or Nones."""
        accs, diffs = [], []
        for d in self.files:
            ref = next((r["test_acc"] for r in d["results"] if r.get("reference")), None)
            for r in d["results"]:
                if r.get("accumulator") == spec and r.get("chunk") == chunk \
                        and not r.get("reference"):
                    accs.append(r["test_acc"])
                    if ref is not None:
                        diffs.append(r["test_acc"] - ref)
        return (statistics.fmean(accs) if accs else None,
                statistics.fmean(diffs) if diffs else None)


def group_acc(files: Sequence[Dict[str, Any]]) -> List[AccGroup]:
    """ptq_acc files grouped by trained configuration, test-set size and settings."""
    groups: Dict[str, AccGroup] = {}
    for d in files:
        cfg = d["source"].get("config") or {}
        label = d["source"].get("label") or cfg.get("label") or d["source"].get("name")
        k = _key({"experiment": _key(compared_values(cfg)), "images": d.get("test_images"),
                  "format": cfg.get("format"), "label": label,
                  "fl": bool(d.get("first_last_fp32")), "eb": d.get("eval_batch_size")})
        groups.setdefault(k, AccGroup(k, label, cfg)).files.append(d)
    return list(groups.values())


def acc_name(spec: str, promote_every: Optional[int]) -> str:
    """A row's name: 'fp16', 'e8m13 (P = 4)'."""
    fmt = spec.split(":")[0]
    return fmt if promote_every is None else f"{fmt} (P = {promote_every})"


def _cell_text(acc: Optional[float], diff: Optional[float]) -> str:
    if acc is None:
        return "-"
    return fmt_num(acc) + (f" ({fmt_num(diff, signed=True)})" if diff is not None else "")


def group_title(g: AccGroup) -> str:
    c = g.config
    return (f"Low-precision accumulation in {g.label} checkpoints ({c.get('model')}, "
            f"{epochs_text(c.get('epochs'))}, recipe {c.get('recipe', 'paper')}"
            f"{', synthetic data' if c.get('synthetic') else ''})")


def break_points(g: AccGroup) -> Dict[int, Tuple[Optional[int], Optional[int]]]:
    """Per chunk size k: (holds, breaks) in mantissa bits: ``breaks`` the widest accumulator
    that scores more than BREAK_DROP points below float32, ``holds`` the narrowest width
    above it (every accumulator there and wider stays within BREAK_DROP); None where there is
    none. Promoted accumulators are left out: their promotion, not their width, sets their
    error."""
    out: Dict[int, Tuple[Optional[int], Optional[int]]] = {}
    for k in g.chunks():
        drops: Dict[int, float] = {}
        for spec, bits, promote in g.accumulators():
            diff = g.cell(spec, k)[1]
            if promote is None and bits is not None and diff is not None:
                drops[bits] = min(drops.get(bits, diff), diff)
        broken = [b for b, d in drops.items() if d < -BREAK_DROP]
        breaks = max(broken) if broken else None
        holding = [b for b in drops if breaks is None or b > breaks]
        out[k] = (min(holding) if holding else None, breaks)
    return out


def _break_text(holds: Optional[int], breaks: Optional[int]) -> str:
    if breaks is None:
        return "-" if holds is None else f"none (all >= {holds} hold)"
    return f"{breaks} bits" + (f" (>= {holds} hold)" if holds is not None else "")


def group_lines(g: AccGroup) -> List[str]:
    """The markdown of one group: what was evaluated, then the accumulator x k table."""
    n = len(g.files)
    names = ", ".join(d["source"].get("name", "?") for d in g.files)
    imgs = sorted({d.get("test_images") for d in g.files}, key=str)
    limited = sorted({d.get("limit_images") for d in g.files if d.get("limit_images")})
    hw = sorted({d.get("device_name") or "-" for d in g.files})
    first_last = any(d.get("first_last_fp32") for d in g.files)
    chunks = g.chunks()
    lines = [f"### {group_title(g)}", "",
             f"{n} checkpoint{'s' if n != 1 else ''} ({names}); {', '.join(map(str, imgs))} "
             f"test images{' (LIMITED: --limit-images, not a result)' if limited else ''} on "
             f"{'; '.join(hw)}. Operands float32; the forward GEMM of every conv/linear layer"
             f"{' except the first and last' if first_last else ''} sums its exact products in "
             f"chunks of k, each chunk sum added into the accumulator with one rounding to "
             f"nearest even; P = promotion to a float32 total every P chunks (k = 1: sequential "
             f"accumulation). Top-1 accuracy in % (difference to the float32 row in points)"
             f"{', mean over the checkpoints' if n > 1 else ''}.", ""]
    ref = g.reference()
    rows = [["float32 GEMMs (reference)", "23", *([fmt_num(ref)] * len(chunks))]]
    for spec, bits, promote in g.accumulators():
        rows.append([acc_name(spec, promote), "-" if bits is None else str(bits),
                     *(_cell_text(*g.cell(spec, k)) for k in chunks)])
    points = break_points(g)
    rows.append([f"breaks at (widest more than {BREAK_DROP:g} point below float32, unpromoted)",
                 "", *(_break_text(*points[k]) for k in chunks)])
    return lines + md_table(("accumulator", "mantissa bits", *(f"k = {k}" for k in chunks)),
                            rows, "lr" + "r" * len(chunks))


def acc_lines(groups: Sequence[AccGroup], plot: Optional[str] = None) -> List[str]:
    """The results.md section: one table per group, then the plot (when drawn)."""
    if not groups:
        return []
    lines = ["## Low-precision accumulation after training", "",
             "Trained weights evaluated in float32 with the sums of every layer's forward GEMM "
             "rounded to a narrow accumulator (`ptq_eval.py --acc`, docs/gemm.md "
             "\"Accumulation\").", ""]
    for g in groups:
        lines += group_lines(g) + [""]
    if plot:
        lines += [f"![top-1 accuracy against accumulator mantissa bits]({plot})", "",
                  "One line per chunk size k (drawn a little apart so that equal accuracies stay "
                  "visible), stars: accumulators promoted to float32 every P chunks, dashed: the "
                  "float32 reference.", ""]
    return lines


# ----------------------------------------------------------------------------------------------
# The plot
# ----------------------------------------------------------------------------------------------
def _layout(g: AccGroup) -> Dict[str, Tuple[float, str]]:
    """Each accumulator's x position and marker: its mantissa bits, moved a little apart where
    several share them (bf16 and e5m7: 7), in order of the rows; a star for a promoted one."""
    out: Dict[str, Tuple[float, str]] = {}
    plain = iter(ACC_MARKERS * len(g.accumulators()))
    by_bits: Dict[int, List[str]] = {}
    for spec, bits, _ in g.accumulators():
        if bits is not None:
            by_bits.setdefault(bits, []).append(spec)
    for spec, bits, promote in g.accumulators():
        if bits is None:
            continue
        same = by_bits[bits]
        x = bits + (same.index(spec) - (len(same) - 1) / 2) * SHARED_DODGE
        out[spec] = (x, "*" if promote is not None else next(plain))
    return out


def _k_series(g: AccGroup, k: int, dx: float) -> List[Dict[str, Any]]:
    """The points of one chunk size, in order of x (mantissa bits, then the rows)."""
    pts = []
    for spec, (x, marker) in _layout(g).items():
        acc, _ = g.cell(spec, k)
        if acc is not None:
            pts.append({"x": x + dx, "y": acc, "spec": spec, "marker": marker,
                        "promoted": marker == "*"})
    return sorted(pts, key=lambda p: p["x"])


def _marker_legend(ax, g: AccGroup) -> List[str]:
    """One grey legend entry per accumulator's marker; returns the promoted ones' names."""
    layout = _layout(g)
    promoted = []
    for spec, _, promote in g.accumulators():
        if spec not in layout:
            continue
        name = acc_name(spec, promote)
        if promote is not None:
            promoted.append(name)
            name += f": promoted to float32 every {promote} chunks"
        ax.plot([], [], layout[spec][1], color="0.6", mec="black", mew=0.6, ls="none",
                ms=11 if promote is not None else 6, label=name)
    return promoted


def _acc_panel(ax, g: AccGroup) -> Dict[str, Any]:
    """One group's panel: a line per k (markers: the accumulator, a star where promoted), the
    float32 line, the ticks (mantissa bits with the formats there); returns what it drew."""
    chunks = g.chunks()
    drawn: Dict[int, List[Dict[str, Any]]] = {}
    for i, k in enumerate(chunks):
        color = K_COLORS[i % len(K_COLORS)]
        pts = _k_series(g, k, (i - (len(chunks) - 1) / 2) * K_DODGE)
        drawn[k] = pts
        ax.plot([p["x"] for p in pts], [p["y"] for p in pts], "-", color=color, lw=1.4,
                label=f"k = {k}" + (" (sequential)" if k == 1 else ""))
        for p in pts:
            ax.plot([p["x"]], [p["y"]], p["marker"], color=color, ls="none", zorder=3,
                    mec="black" if p["promoted"] else color, mew=0.6,
                    ms=13 if p["promoted"] else 6)
    ref = g.reference()
    if ref is not None:
        ax.axhline(ref, color=REF_COLOR, ls="--", lw=1.0, label="float32 GEMMs (reference)")
    promoted = _marker_legend(ax, g)
    at: Dict[int, List[str]] = {}
    for spec, bits, _ in g.accumulators():
        if bits is not None:
            at.setdefault(bits, []).append(spec)
    ax.set_xticks(sorted(at))
    ax.set_xticklabels([f"{b}\n{', '.join(at[b])}" for b in sorted(at)], fontsize=8)
    if at:
        ax.set_xlim(min(at) - 1, max(at) + 1)
    ax.set_xlabel("accumulator mantissa bits")
    ax.set_ylabel("top-1 test accuracy (%)")
    ax.grid(True, alpha=0.3)
    imgs = sorted({d.get("test_images") for d in g.files}, key=str)
    ax.set_title(f"{group_title(g)}, {', '.join(map(str, imgs))} test images", fontsize=9)
    return {"lines": drawn, "reference": ref, "promoted": promoted}


def plot_accumulation(groups: Sequence[AccGroup], path) -> Dict[str, Any]:
    """Top-1 accuracy against the accumulator's mantissa bits, one panel per group; returns
    {"panels": [{"lines": {k: [point]}, "reference", "promoted", "axes_box", "legend_box"}]},
    for tests."""
    plt = pyplot()
    fig, axes = plt.subplots(len(groups), 1, figsize=(7.5, 5.8 * len(groups)), squeeze=False)
    panels = []
    for ax, g in zip(axes[:, 0], groups):
        info = _acc_panel(ax, g)
        legend_below(ax, ncol=2, drop=44)
        panels.append((ax, info))
    fig.tight_layout()
    fig.canvas.draw()
    out = [{**info, **axes_boxes(ax)} for ax, info in panels]
    fig.savefig(path, dpi=130, bbox_inches="tight")    # "tight" keeps the outside legend
    plt.close(fig)
    return {"panels": out}
