"""The report's figures (matplotlib, PNG): accuracy per epoch, final accuracy against bits per
element, and the forest plot of differences to FP32.

Every figure draws a configuration in the same colour (``config_colors``): FP32 black, each
family of formats one hue family from Paul Tol's colour-blind-safe schemes, its members told
apart by lightness. Legends sit below their panels, never over data, and no label is written
over FP32's line.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ..config import FormatRecord
from .records import Group, PtqGroup, Section
from .tables import differing_fields, epochs_text, fmt_bits, interval, short_title

PLOT_EPOCHS = "acc_per_epoch.png"
PLOT_BITS = "acc_vs_bits.png"
PLOT_FOREST = "forest.png"

FP32_COLOR = "#000000"
# One colour per sweep configuration, from Paul Tol's schemes (personal.sron.nl/~pault). Families:
# BF16 greens, FP8 blues, FP4 warm (red, gold, brown, rose), posits purples. Chosen so that the
# colours of one family, FP32's black, and the configurations that share a bit-width column
# stay at least 24 CIELAB units apart in normal vision and simulated deuteranopia, protanopia and
# tritanopia (Machado et al. 2009), any two at least 12.
CONFIG_COLORS: Dict[str, str] = {
    "fp32": FP32_COLOR,
    "bf16": "#999933", "bf16-emu": "#44BB99",
    "fp8-e5m2w": "#88CCEE", "fp8-e4m3w": "#004488",
    "fp4": "#663333", "fp4-mx": "#DDAA33", "fp4-nv": "#CC3311", "fp4-nv-fl": "#CC6677",
    "posit4": "#9970AB", "posit8": "#882255", "posit16": "#332288",
}
# For configurations the sweep does not know, in order of their keys.
EXTRA_COLORS = ("#EE7733", "#117733", "#AA4499", "#33BBEE", "#555555", "#BBCC33", "#EE3377",
                "#0077BB", "#AA3377", "#999999")
FAMILY_TITLES = {"bf16": "BF16", "fp8": "FP8", "fp4": "FP4 (E2M1 elements: scaled, MXFP4, NVFP4)",
                 "posit": "Posits", "other": "Other formats"}
# Dodging markers that would hide each other: log2 units between them side by side, and the
# fraction of a panel's height within which two markers overlap.
DODGE_STEP = 0.13
DODGE_HEIGHT = 0.03


def config_colors(keys: Iterable[str]) -> Dict[str, str]:
    """Colour of each configuration key: the sweep's own from ``CONFIG_COLORS``, any other one
    of ``EXTRA_COLORS`` in sorted order of the keys. Make it once per report and pass it to
    every figure, so a configuration has one colour throughout."""
    keys = set(keys)
    out = {k: CONFIG_COLORS[k] for k in keys if k in CONFIG_COLORS}
    for i, k in enumerate(sorted(keys - set(out))):
        out[k] = EXTRA_COLORS[i % len(EXTRA_COLORS)]
    return out


def _section_colors(sections: Sequence[Section],
                    given: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """``given`` (a report's ``config_colors``), completed for keys it lacks."""
    return {**config_colors(g.config_key for s in sections for g in s.groups), **(given or {})}


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _text_color(color):
    """``color`` darkened until text in it reads on white (the pale colours are too light)."""
    from matplotlib.colors import to_rgb
    rgb = to_rgb(color)
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return tuple(c * min(1.0, 0.5 / luminance) for c in rgb) if luminance else rgb


def legend_below(ax, ncol: int = 1, handles=None, labels=None, drop: float = 40.0):
    """Legend under the panel, ``drop`` points below its bottom edge (clear of the tick labels
    and the x label), so it never covers data; the panel keeps its width."""
    from matplotlib.transforms import ScaledTranslation
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    fig = ax.get_figure()
    below = ax.transAxes + ScaledTranslation(0, -drop / 72, fig.dpi_scale_trans)
    return ax.legend(handles, labels, fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, 0),
                     bbox_transform=below, ncol=ncol, frameon=False)


def axes_boxes(ax) -> Dict[str, Tuple[float, ...]]:
    """The axes' and its legend's extents in pixels, once the figure is drawn (for tests: the
    legend is outside the axes)."""
    leg = ax.get_legend()
    return {"axes_box": tuple(ax.get_window_extent().extents),
            "legend_box": tuple(leg.get_window_extent().extents) if leg else None}


def family(fmt: Optional[Mapping[str, Any]]) -> str:
    """Plot panel of a format: bf16, fp8, fp4, posit (every posit width), fp32 or other."""
    fam = FormatRecord.from_dict(fmt).family or "other"
    if fam.startswith("posit"):
        return "posit"
    return fam if fam in FAMILY_TITLES or fam == "fp32" else "other"


# ----------------------------------------------------------------------------------------------
# Accuracy per epoch
# ----------------------------------------------------------------------------------------------
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


def _epoch_layout(sections: Sequence[Section]) -> List[List[str]]:
    """Per section, the families it has panels for (FP32 alone when it has no other)."""
    layout = []
    for sec in sections:
        fams = list(dict.fromkeys(family(g.format) for g in sec.groups
                                  if family(g.format) != "fp32"))
        layout.append(fams or ["fp32"])
    return layout


def _epoch_panel(ax, sec: Section, fam: str, colors: Mapping[str, str], title: str) -> Dict:
    """One family's curves with FP32's; returns what it shows."""
    base = next((g for g in sec.groups if family(g.format) == "fp32"), None)
    members = [g for g in sec.groups if family(g.format) == fam and g is not base]
    epochs: List[int] = []
    drawn = {}
    curves = ([(base, 1.2)] if base is not None else []) + [(g, 1.6) for g in members]
    for g, lw in curves:
        epochs += _draw_curve(ax, g, colors[g.config_key], lw=lw)
        drawn[g.label] = colors[g.config_key]
    _epoch_axis(ax, epochs)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    legend_below(ax)
    return {"title": ax.get_title(), "xticks": [float(t) for t in ax.get_xticks()],
            "lines": [h.get_label() for h in ax.get_lines()], "colors": drawn}


def _tight_below_title(fig) -> None:
    """tight_layout under the figure's suptitle: half an inch kept free at the top, so the first
    row's panel titles do not run into it in a tall figure."""
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))


def plot_epochs(sections: Sequence[Section], path, colors: Optional[Mapping[str, str]] = None
                ) -> List[Dict[str, Any]]:
    """Test accuracy per epoch: one small panel per format family (BF16, FP8, FP4, posits ...),
    the FP32 curve in every panel, so each line can be told apart; one row of panels per
    section (experiment). Mean over the finished seeds, band min-max; the legend under each
    panel. Returns what each panel shows (title, line labels and colours, x ticks, the axes'
    and legend's pixel boxes), for tests."""
    plt = pyplot()
    colors = _section_colors(sections, colors)
    layout = _epoch_layout(sections)
    ncols = min(2, max(len(f) for f in layout))
    rows_of = [-(-len(f) // ncols) for f in layout]
    # each panel's legend below it: one line per curve
    legend_in = max(0.17 * (1 + sum(family(g.format) in (fam, "fp32") for g in sec.groups))
                    for sec, fams in zip(sections, layout) for fam in fams)
    fig, axes = plt.subplots(sum(rows_of), ncols, squeeze=False,
                             figsize=(6.2 * ncols, (4.0 + legend_in + 0.6) * sum(rows_of)))
    for ax in axes.flat:
        ax.set_visible(False)
    differing = differing_fields(sections)
    row, placed = 0, []
    for sec, fams, nrows in zip(sections, layout, rows_of):
        for i, fam in enumerate(fams):
            ax = axes[row + i // ncols, i % ncols]
            ax.set_visible(True)
            title = f"{FAMILY_TITLES.get(fam, fam.upper())}: {short_title(sec, differing)}"
            placed.append((ax, _epoch_panel(ax, sec, fam, colors, title)))
        row += nrows
    fig.suptitle("Test accuracy per epoch (mean over seeds, band: min-max; black: FP32)",
                 fontsize=11)
    _tight_below_title(fig)
    fig.canvas.draw()
    panels = [{**info, **axes_boxes(ax)} for ax, info in placed]
    fig.savefig(path, dpi=130, bbox_inches="tight")     # "tight" keeps the legends below
    plt.close(fig)
    return panels


# ----------------------------------------------------------------------------------------------
# Accuracy against bits
# ----------------------------------------------------------------------------------------------
class Point(NamedTuple):
    """A marker of the bits plot: true bit width ``x``, accuracy ``y``, its label, panel
    ("trained" or "ptq"), colour, where it is drawn (``drawn_x``, see ``dodge``), its error bar
    (``std``), marker and legend entry (``series``)."""

    x: float
    y: float
    label: str
    panel: str
    color: str
    drawn_x: float = 0.0
    std: Optional[float] = None
    marker: str = "o"
    series: str = ""


def dodge(xs: Sequence[float], ys: Sequence[float], dy: float, step: float = DODGE_STEP,
          errs: Optional[Sequence[Optional[float]]] = None) -> List[float]:
    """Where to draw markers at bit widths ``xs`` and accuracies ``ys`` (log2 x axis) so that
    none hides another: in order of width, each marker takes the first of its width, then
    ``step``, -``step``, 2 ``step`` ... log2 units beside it, that keeps it ``step`` (log2 x)
    from every marker placed before it whose height overlaps its own (the marker, ``dy`` tall,
    and its error bar of ``errs``). A marker nothing crowds stays at its width; markers at one
    width and accuracy end up side by side."""
    import math
    errs = errs or [None] * len(xs)
    spans = [(y - (e or 0.0) - dy / 2, y + (e or 0.0) + dy / 2) for y, e in zip(ys, errs)]
    placed: List[Tuple[float, Tuple[float, float]]] = []
    out = list(xs)
    for i in sorted(range(len(xs)), key=lambda i: (xs[i], i)):
        lo, hi = spans[i]
        for k in range(2 * len(xs) + 1):
            lx = math.log2(xs[i]) + step * ((k + 1) // 2) * (1 if k % 2 else -1)
            if all(abs(lx - px) >= step * 0.999 or hi <= plo or lo >= phi
                   for px, (plo, phi) in placed):
                break
        placed.append((lx, spans[i]))
        out[i] = 2 ** lx
    return out


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


def _clear_of_line(ys: Sequence[float], line: float, gap: float) -> List[float]:
    """Label heights moved off a horizontal line: labels within ``gap``/2 of it go to that
    distance on their side (those on it, above), their neighbours pushed on to keep ``gap``
    between labels; the order is kept."""
    out = list(ys)
    above = sorted((i for i in range(len(ys)) if ys[i] >= line), key=lambda i: ys[i])
    below = sorted((i for i in range(len(ys)) if ys[i] < line), key=lambda i: -ys[i])
    prev = line + gap / 2 - gap
    for i in above:
        out[i] = prev = max(out[i], prev + gap)
    prev = line - gap / 2 + gap
    for i in below:
        out[i] = prev = min(out[i], prev - gap)
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


def _draw_labels(ax, points: Sequence[Tuple], lo: float, hi: float, gap: float,
                 line: Optional[float]) -> List[float]:
    """Each point's text beside its column (``_label_columns``), at least ``gap`` apart, inside
    the y range [lo, hi] the panel shows as far as it can, off the horizontal ``line`` (FP32's
    mean), with a thin line to its marker. Returns the labels' heights."""
    top, bottom = hi + 2 * gap, lo - 2 * gap      # a label's height from the axes' edges
    heights = []
    for column in _label_columns(points):
        ly_all = _spread_labels([p[1] for p in column], gap)
        # keep the stack inside the axes (the top wins when it is taller than they are)
        shift = max(bottom - min(ly_all), 0.0) - max(max(ly_all) - top, 0.0)
        ly_all = [y + shift for y in ly_all]
        if line is not None:
            ly_all = _clear_of_line(ly_all, line, gap)
        for (px, py, text, side, color, anchor), ly in zip(column, ly_all):
            ax.annotate(text, (px, py), xytext=(anchor * 2 ** (0.2 * side), ly),
                        textcoords="data", fontsize=8, color=_text_color(color), va="center",
                        ha="left" if side > 0 else "right",
                        arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6})
        heights += ly_all
    return heights


def _trained_points(sec: Section, colors: Mapping[str, str]) -> List[Point]:
    """The finished rows of a section: mean accuracy, 1-std error bar, its colour."""
    out = []
    for g in sec.groups:
        if g.finished and g.bits:
            acc, std = g.acc
            out.append(Point(g.bits, acc, g.config_key, "trained", colors[g.config_key],
                             std=std, series=f"{g.label} (n={len(g.finished)})"))
    return out


def _cast_points(ptq_groups: Sequence[PtqGroup]) -> List[Point]:
    """ptq_eval.py's casts of FP32 checkpoints, one per format and scaling, at the mean over
    the checkpoints: open triangles unscaled, squares scaled."""
    out = []
    for pg in ptq_groups:
        for scaling, marker in (("none", "^"), ("scaled", "s")):
            series = (f"{pg.label} checkpoints cast after training, "
                      f"{'unscaled' if scaling == 'none' else 'scaled'}")
            out += [Point(bits, statistics.fmean(by_scaling[scaling]),
                          f"{fmt}{' sc.' if scaling == 'scaled' else ''}", "ptq", FP32_COLOR,
                          marker=marker, series=series)
                    for fmt, bits, by_scaling in pg.rows_by_format()
                    if fmt != "fp32" and bits and by_scaling.get(scaling)]
    return out


def _y_frame(points: Sequence[Point], line: Optional[float]) -> Tuple[float, float, float]:
    """(lowest, highest, label gap) of a panel: its markers with their error bars and the
    FP32 line; 0-100 when it has no marker."""
    ys = [y for p in points for y in (p.y - (p.std or 0.0), p.y + (p.std or 0.0))] or [0.0, 100.0]
    ys += [line] if line is not None else []
    return min(ys), max(ys), max(max(ys) - min(ys), 10.0) * 0.045


def _draw_markers(ax, points: Sequence[Point], dy: float) -> List[Point]:
    """The markers, dodged (``dodge``): trained ones filled with error bars, casts open (they
    may touch: ``step`` is smaller). Returns the points with ``drawn_x`` set."""
    step = DODGE_STEP if all(p.panel == "trained" for p in points) else DODGE_STEP / 2
    xs = dodge([p.x for p in points], [p.y for p in points], dy, step, [p.std for p in points])
    points = [p._replace(drawn_x=x) for p, x in zip(points, xs)]
    for p in points:
        if p.panel == "trained":
            ax.errorbar([p.drawn_x], [p.y], yerr=[p.std] if p.std is not None else None, fmt="o",
                        ms=7, color=p.color, capsize=3, label=p.series)
    for series in dict.fromkeys(p.series for p in points if p.panel != "trained"):
        mine = [p for p in points if p.series == series]
        ax.scatter([p.drawn_x for p in mine], [p.y for p in mine], marker=mine[0].marker,
                   facecolors="none", edgecolors=mine[0].color, s=55, lw=1.2, zorder=3,
                   label=series)
    return points


def _bits_panel(ax, points: Sequence[Point], base: Optional[Group], title: str,
                xs: Sequence[float]) -> List[Point]:
    """One panel of the bits plot: markers, FP32's line, labels, axes and legend. Its y range
    is its own (the trained panel zooms on its accuracies), its x range ``xs``'s. Returns the
    points as drawn."""
    base_acc = base.acc[0] if base is not None else None
    lo, hi, gap = _y_frame(points, base_acc)
    points = _draw_markers(ax, points, dy=DODGE_HEIGHT * (hi - lo + 6 * gap))
    if base_acc is not None:
        ax.axhline(base_acc, color=FP32_COLOR, ls=":", lw=1, label="FP32 mean (trained)")
    labels = _draw_labels(ax, [(p.drawn_x, p.y, p.label, p.color) for p in points], lo, hi, gap,
                          base_acc)
    ticks = [b for b in (2, 4, 8, 16, 32) if min(xs) / 1.3 <= b <= max(xs) * 1.3]
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlim(min(xs) / 2 ** 1.5, max(xs) * 2 ** 1.1)  # room for the labels each side
    ax.set_ylim(min([lo - 3 * gap, *(y - gap for y in labels)]),
                max([hi + 3 * gap, *(y + gap for y in labels)]))
    ax.set_xlabel("bits per element (block formats include their shared scales)")
    ax.set_title(title if points else f"{title}: none", fontsize=10)
    ax.grid(True, alpha=0.3)
    legend_below(ax, drop=34)
    return points


def plot_bits(sections: Sequence[Section], ptq_groups: Sequence[PtqGroup], path,
              colors: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Final accuracy against bits per element (log2 axis), two panels side by side: the
    configurations trained in each format (filled, error bar 1 std over seeds, y range zoomed
    on them) and, when there are ptq_eval.py results, FP32 checkpoints cast to each format after
    training (open markers: triangles unscaled, squares scaled). Markers that would hide each
    other are drawn side by side (``dodge``), labels beside their column. Only the casts with
    the default settings are drawn (every layer, weights per channel); the tables show the
    others (e.g. --first-last-fp32). Returns {"points": [Point], "panels": [{"panel", "ylim",
    "axes_box", "legend_box"}]}, for tests."""
    plt = pyplot()
    colors = _section_colors(sections, colors)
    ptq_of = {sec.key: [pg for pg in ptq_groups if pg.section_key == sec.key and pg.default_cast]
              for sec in sections}
    ncols = 2 if any(ptq_of.values()) else 1
    n = max(1, len(sections))
    fig, axes = plt.subplots(n, ncols, figsize=(7.5 * ncols, 7.5 * n), squeeze=False)
    differing = differing_fields(sections)
    plotted, panels = [], []
    for row, sec in zip(axes, sections):
        trained, cast = _trained_points(sec, colors), _cast_points(ptq_of[sec.key])
        xs = [p.x for p in trained + cast] or [4.0, 32.0]     # one x range for both panels
        todo = [(row[0], trained, f"trained in the format: {short_title(sec, differing)}")]
        if ncols == 2:
            todo.append((row[1], cast, "FP32 checkpoints cast after training (PTQ)"))
        for ax, points, title in todo:
            plotted += _bits_panel(ax, points, sec.baseline, title, xs)
            panels.append((ax, "trained" if ax is row[0] else "ptq"))
        row[0].set_ylabel("final test accuracy (%)")
    fig.suptitle("Final test accuracy against bits per element (error bar: 1 std over seeds)",
                 fontsize=11)
    _tight_below_title(fig)
    fig.canvas.draw()
    info = [{"panel": name, "ylim": ax.get_ylim(), **axes_boxes(ax)} for ax, name in panels]
    fig.savefig(path, dpi=130, bbox_inches="tight")    # "tight" keeps the outside legend
    plt.close(fig)
    return {"points": plotted, "panels": info}


# ----------------------------------------------------------------------------------------------
# Forest plot
# ----------------------------------------------------------------------------------------------
def _forest_slots(sec: Section) -> List[Tuple[str, Optional[Group]]]:
    """Top to bottom: a header per bit width (widest first), then its rows (FP32 excepted)."""
    base = sec.baseline
    rows = sorted((g for g in sec.groups if g is not base and (g.paired or g.welch)),
                  key=lambda g: (-(g.bits or 0), g.config_key))
    slots: List[Tuple[str, Optional[Group]]] = []
    header = None
    for g in rows:
        label = f"{fmt_bits(g.bits)} bits" if g.bits else "bits unknown"
        if label != header:
            header = label
            slots.append((header, None))
        slots.append((f"{g.config_key} (n={len(g.finished)})", g))
    return slots


def _forest_row(ax, y: float, g: Group, x0: float, x1: float, color: str) -> bool:
    """One row: the t-interval (thin, cut at the axis with an arrow), the bootstrap CI (thick,
    in the configuration's colour), the difference, and the numbers on the right. Returns
    whether the t-interval was cut."""
    from matplotlib.transforms import blended_transform_factory
    p, w = g.paired, g.welch
    clipped = False
    if w:
        ax.plot([max(w.ci_low, x0), min(w.ci_high, x1)], [y, y], color="black", lw=1.0,
                label="Welch t 95% interval (seeds only)")
        for end, edge, marker in ((w.ci_low, x0, "<"), (w.ci_high, x1, ">")):
            if (end < edge) if marker == "<" else (end > edge):
                ax.plot([edge], [y], marker=marker, ls="none", color="black", ms=5, clip_on=False,
                        label="t-interval goes on beyond the axis (numbers on the right)")
                clipped = True
    if p:
        ax.plot([p.ci_low, p.ci_high], [y, y], color=color, lw=6, alpha=0.85,
                solid_capstyle="butt")
    ax.plot([(p or w).diff], [y], "o", color="white", mec="black", ms=5, zorder=3)
    right = blended_transform_factory(ax.transAxes, ax.transData)
    ax.text(1.04, y, f"{(p or w).diff:+6.2f}  {interval(p) if p else '-':<17} "
                     f"{interval(w) if w else '-'}", transform=right, va="center",
            fontsize=8, family="monospace")
    return clipped


def _forest_legend(ax, n_slots: int) -> None:
    """The legend under the axes: each kind of mark once, the bootstrap bar in neutral grey
    (each row's is in its configuration's colour)."""
    from matplotlib.lines import Line2D
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    unique["bootstrap 95% CI (seeds, then test images), in the row's colour"] = Line2D(
        [], [], color="0.45", lw=6, alpha=0.85, solid_capstyle="butt")
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.5 / n_slots - 0.08), ncol=2, frameon=False)


def plot_forest(sec: Section, path, colors: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Forest plot of one section: per configuration (FP32 excepted, labelled by its config key
    as in the table), its difference to FP32 in points with the bootstrap 95% CI (thick bar, in
    the configuration's colour) and the Welch t-interval (thin line), grouped by bits per
    element (widest first), a zero line and a band of ± the median bootstrap half-width (the
    resolution limit: a typical row cannot tell a difference inside it from 0). The x range is
    the bootstrap intervals': with 2 seeds a side a t-interval has about one degree of freedom
    and can be ten times wider, so such a line is cut at the edge with an arrow, and every row's
    numbers are written on the right. Returns what it drew (row labels top to bottom, their
    colours, group labels, the band, the x range), for tests."""
    plt = pyplot()
    colors = _section_colors([sec], colors)
    base = sec.baseline
    slots = _forest_slots(sec)
    rows = [g for _, g in slots if g is not None]
    band = statistics.median(g.paired.half_width for g in rows if g.paired)
    ends = [-band, band] + [e for g in rows for e in ((g.paired or g.welch).ci_low,
                                                      (g.paired or g.welch).ci_high)]
    pad = 0.08 * (max(ends) - min(ends))
    x0, x1 = min(ends) - pad, max(ends) + pad

    fig, ax = plt.subplots(figsize=(9.0, 1.9 + 0.34 * len(slots)))
    ys = list(range(len(slots), 0, -1))
    ax.axvspan(-band, band, color="0.87", lw=0,
               label=f"resolution ±{band:.2f} (median 95% CI half-width)")
    ax.axvline(0.0, color="black", lw=1.0)
    clipped = False
    for y, (_, g) in zip(ys, slots):
        if g is not None:
            clipped |= _forest_row(ax, y, g, x0, x1, colors[g.config_key])
    # the column heads share the first group header's line, which has no numbers
    ax.text(1.04, ys[0], "  diff  bootstrap CI      t-interval", fontsize=8, va="center",
            transform=ax.get_yaxis_transform(), family="monospace", fontweight="bold")
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
    _forest_legend(ax, len(slots))
    c = sec.config
    others = sorted({len(g.finished) for g in rows})
    seeds = f"{others[0]}" if len(others) == 1 else f"{others[0]}-{others[-1]}"
    ax.set_title(f"Difference to FP32: {c.get('model')}, recipe {c.get('recipe', 'paper')}, "
                 f"{epochs_text(c.get('epochs'))}, "
                 f"{c.get('test_images') or 0:,} test images; "
                 f"seeds: FP32 {len(base.finished)}, others {seeds}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return {"rows": [t for t, g in slots if g is not None],
            "colors": {t: colors[g.config_key] for t, g in slots if g is not None},
            "groups": [t for t, g in slots if g is None], "band": band, "xlim": (x0, x1),
            "clipped": clipped}
