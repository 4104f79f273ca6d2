"""Configurations compared with another row than FP32: a GEMM-mode recipe against the tensor-role
configuration it changes (``SweepConfig.compared_with`` in common/config.py: fp4-nv-gemm-fl
against fp4-nv-fl, ...). The same two intervals as against FP32 (records.Section's
``compare_to_baseline``): the paired two-level bootstrap over seeds and test images, and Welch's
t-interval over seeds. Results go to one table per section in results.md and to the
``compared_with`` columns of results.csv."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..config import CONFIGS
from .records import Group, Section
from .stats import PairedDiff, paired_bootstrap, welch_interval

COMPARE_HEADER = ("configuration", "config", "seeds", "test acc (%)", "compared with", "seeds",
                  "test acc (%)", "difference", "95% CI (bootstrap)", "±", "t-interval",
                  "resolved")
COMPARE_ALIGN = "llrrlrrrlrll"


@dataclass
class Comparison:
    """One row against its partner row of the same section."""

    group: Group
    partner: Group
    paired: Optional[PairedDiff] = None     # bootstrap; None without per-image predictions
    welch: Optional[PairedDiff] = None      # None with fewer than 2 seeds a side
    note: str = ""                          # why there is no bootstrap interval


def partner_key(config_key: str) -> Optional[str]:
    """The configuration a configuration is compared with, where it names one."""
    cfg = CONFIGS.get(config_key)
    return (cfg.compared_with or None) if cfg else None


def compare_partners(sec: Section) -> List[Comparison]:
    """Every finished row of ``sec`` whose configuration names a partner that has finished runs
    in the same section, with its difference to that partner."""
    by_key: Dict[str, Group] = {g.config_key: g for g in sec.groups if g.finished}
    out = []
    for g in sec.groups:
        partner = by_key.get(partner_key(g.config_key) or "")
        if not g.finished or partner is None:
            continue
        c = Comparison(g, partner, welch=welch_interval(g.final_accs, partner.final_accs))
        digest, rows, why = g.correct_matrix()
        p_digest, p_rows, p_why = partner.correct_matrix()
        if rows is None or p_rows is None:
            c.note = why or f"{partner.config_key}: {p_why}"
        elif digest != p_digest:
            c.note = f"other test images than {partner.config_key}"
        else:
            c.paired = paired_bootstrap(rows, p_rows)
        out.append(c)
    return out


def _num(v: Optional[float], signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _interval(p: Optional[PairedDiff]) -> str:
    return f"[{p.ci_low:+.2f}, {p.ci_high:+.2f}]" if p else "-"


def compare_rows(comparisons: Sequence[Comparison]) -> List[List[str]]:
    """Table rows (``COMPARE_HEADER``)."""
    rows = []
    for c in comparisons:
        acc, p_acc = c.group.acc[0], c.partner.acc[0]
        diff = c.paired.diff if c.paired else (acc - p_acc if None not in (acc, p_acc) else None)
        sure = c.paired or c.welch
        resolved = ("yes" if sure.resolved else "no: within noise") if sure else "-"
        rows.append([c.group.label, c.group.config_key, str(len(c.group.finished)), _num(acc),
                     c.partner.config_key, str(len(c.partner.finished)), _num(p_acc),
                     _num(diff, signed=True), _interval(c.paired) if c.paired else c.note or "-",
                     _num(c.paired.half_width) if c.paired else "-", _interval(c.welch),
                     resolved])
    return rows


def csv_fields(comparisons: Sequence[Comparison]) -> Dict[int, Dict[str, object]]:
    """results.csv's ``compared_with`` columns, keyed by ``id`` of the row's group."""
    out = {}
    for c in comparisons:
        p, w = c.paired, c.welch
        acc, p_acc = c.group.acc[0], c.partner.acc[0]
        out[id(c.group)] = {
            "compared_with": c.partner.config_key,
            "diff_vs_compared": p.diff if p else (acc - p_acc if None not in (acc, p_acc)
                                                  else None),
            "cmp_ci_low": p.ci_low if p else None, "cmp_ci_high": p.ci_high if p else None,
            "cmp_t_ci_low": w.ci_low if w else None, "cmp_t_ci_high": w.ci_high if w else None,
        }
    return out
