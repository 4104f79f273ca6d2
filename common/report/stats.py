"""Differences between configurations scored on the same test images, with 95% intervals: a paired
two-level bootstrap and, as an independent check, Welch's t-interval over seeds.

Every run is evaluated on the same test images, so a configuration's difference to FP32 is a
paired comparison: per image, the fraction of a configuration's seeds that got it right minus the
fraction of FP32's seeds that did. The interval comes from a two-level (hierarchical) paired
bootstrap:

1. resample the seeds of each configuration, with replacement (each configuration its own seeds:
   seed s of one format has nothing to do with seed s of another);
2. resample the test images, with replacement, the same images for both sides (the pairing);
3. the statistic is mean accuracy over the resampled seeds and images, configuration minus FP32.

The 2.5th and 97.5th percentiles of ``RESAMPLES`` such statistics give the 95% interval (the
percentile method). Level 1 carries the seed-to-seed variation of training, level 2 the finite
test set. With a single seed on a side, level 1 has nothing to resample there and the interval
only covers the test set, which understates the uncertainty: the report says how many seeds a row
has. A difference is called resolved when its interval excludes 0.

A second, independent check (``welch_interval``) works on the seeds alone: each seed's final
accuracy is one observation, and the interval is Welch's t-interval for the difference of two
means with unequal variances (Welch-Satterthwaite degrees of freedom). Seeds of two formats are
not paired (training diverges from the first step), so a paired t-test over seeds would pair
arbitrary runs; Welch compares the two groups as they are and uses every FP32 seed. It ignores
which images were right, so it cannot see the test set's share of the noise the way the bootstrap
does, and it needs 2 or more seeds on each side. ``one_sample_bootstrap`` and ``t_interval`` give
the same two intervals for one configuration's accuracy alone (FP32 against a published figure).
``mean_std`` gives a row's mean and sample standard deviation over its seeds.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Tuple

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 20161        # fixed: the same runs always give the same interval


@dataclass(frozen=True)
class PairedDiff:
    """Mean accuracy difference (points) of a configuration to the baseline, with its interval;
    ``df``: the degrees of freedom of a t-interval (None for a bootstrap interval)."""

    diff: float
    ci_low: float
    ci_high: float
    df: Optional[float] = None

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2.0

    @property
    def resolved(self) -> bool:
        """True when the interval excludes 0: the data tell the two apart."""
        return self.ci_low > 0 or self.ci_high < 0


def mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n-1); std None for fewer than two values."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def mean_or_none(values: Iterable[Optional[float]]) -> Optional[float]:
    """The mean of the values that are not None; None when there is none."""
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _as_matrix(correct: Sequence[Sequence[int]]) -> np.ndarray:
    m = np.asarray(correct, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError("expected one row of 0/1 per seed, one column per test image")
    return m


def paired_bootstrap(correct: Sequence[Sequence[int]], baseline: Sequence[Sequence[int]],
                     resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                     seed: int = BOOTSTRAP_SEED) -> PairedDiff:
    """Difference in accuracy (percentage points) of ``correct`` to ``baseline`` with a
    ``confidence`` interval from the two-level paired bootstrap of the module docstring.

    ``correct`` and ``baseline``: one row per seed, one 0/1 column per test image (the same
    images in the same order on both sides).
    """
    a, b = _as_matrix(correct), _as_matrix(baseline)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired comparison needs the same test images: {a.shape[1]} vs "
                         f"{b.shape[1]} columns")
    lo, hi = _two_level(lambda m, rng: _seed_resample(a, m, rng) - _seed_resample(b, m, rng),
                        a.shape[1], resamples, confidence, seed)
    return PairedDiff(100.0 * float(a.mean() - b.mean()), lo, hi)


def one_sample_bootstrap(correct: Sequence[Sequence[int]], reference: float = 0.0,
                         resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                         seed: int = BOOTSTRAP_SEED) -> PairedDiff:
    """Mean accuracy (points) of one configuration minus ``reference`` (e.g. a published
    accuracy), with the two-level bootstrap interval of the module docstring on that side alone:
    seeds resampled, then test images."""
    a = _as_matrix(correct)
    lo, hi = _two_level(lambda m, rng: _seed_resample(a, m, rng), a.shape[1], resamples,
                        confidence, seed)
    return PairedDiff(100.0 * float(a.mean()) - reference, lo - reference, hi - reference)


def _two_level(per_image: Callable[[int, np.random.Generator], np.ndarray], n: int,
               resamples: int, confidence: float, seed: int) -> Tuple[float, float]:
    """Percentile interval (points) of the mean over resampled test images of ``per_image``'s
    rows (m x n: one seed-resampled per-image statistic per row)."""
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // n)          # bounded memory: chunk x n floats at a time
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        rows = per_image(m, rng)
        images = rng.integers(0, n, size=(m, n))
        stats[start:start + m] = np.take_along_axis(rows, images, axis=1).mean(axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(100.0 * stats, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _seed_resample(m: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``draws`` rows, each the per-image mean over a with-replacement resample of m's seeds."""
    k = m.shape[0]
    if k == 1:
        return np.broadcast_to(m[0], (draws, m.shape[1]))
    picks = rng.integers(0, k, size=(draws, k))
    counts = np.stack([(picks == s).sum(axis=1) for s in range(k)], axis=1) / k   # draws x k
    return counts @ m


# ----------------------------------------------------------------------------------------------
# Student-t intervals over seeds
# ----------------------------------------------------------------------------------------------
def welch_interval(values: Sequence[float], baseline: Sequence[float],
                   confidence: float = CONFIDENCE) -> Optional[PairedDiff]:
    """Welch's t-interval for mean(``values``) - mean(``baseline``): one number per seed on each
    side (final accuracy in points), unequal variances, Welch-Satterthwaite degrees of freedom.
    None when a side has fewer than 2 seeds: its variance, and so the interval, is undefined.
    When both sides have zero spread the interval is the point itself."""
    if len(values) < 2 or len(baseline) < 2:
        return None
    a, b = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)      # squared standard errors
    diff = float(a.mean() - b.mean())
    if va + vb == 0.0:
        return PairedDiff(diff, diff, diff, float(len(a) + len(b) - 2))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile(0.5 + confidence / 2.0, df) * math.sqrt(va + vb)
    return PairedDiff(diff, diff - half, diff + half, float(df))


def t_interval(values: Sequence[float], reference: float = 0.0,
               confidence: float = CONFIDENCE) -> Optional[PairedDiff]:
    """One-sample t-interval for mean(``values``) - ``reference`` (n - 1 degrees of freedom);
    None for fewer than 2 values."""
    if len(values) < 2:
        return None
    a = np.asarray(values, dtype=np.float64)
    diff = float(a.mean()) - reference
    half = t_quantile(0.5 + confidence / 2.0, len(a) - 1) * float(a.std(ddof=1)) / math.sqrt(len(a))
    return PairedDiff(diff, diff - half, diff + half, float(len(a) - 1))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom (any real df, as Welch's
    are), from the regularized incomplete beta function: P(|T| > |t|) = I_x(df/2, 1/2) with
    x = df / (df + t^2)."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = ``p`` for Student's t with ``df`` degrees of freedom, by bisection
    on ``t_cdf`` (monotone) to 1e-12."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b): its continued fraction (modified Lentz), on the
    side of the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x)) / a

    def nonzero(v: float) -> float:         # Lentz's guard against dividing by 0
        return v if abs(v) > 1e-300 else 1e-300

    c, d = 1.0, 1.0 / nonzero(1.0 - (a + b) * x / (a + 1.0))
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / nonzero(1.0 + num * d)
            c = nonzero(1.0 + num / c)
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f
