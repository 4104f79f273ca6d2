"""Paired differences between configurations scored on the same test images, with a 95% interval.

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 20161        # fixed: the same runs always give the same interval


@dataclass(frozen=True)
class PairedDiff:
    """Mean accuracy difference (points) of a configuration to the baseline, with its interval."""

    diff: float
    ci_low: float
    ci_high: float

    @property
    def resolved(self) -> bool:
        """True when the interval excludes 0: the data tell the two apart."""
        return self.ci_low > 0 or self.ci_high < 0


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
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    diff = 100.0 * float(a.mean() - b.mean())
    stats = np.empty(resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // n)          # bounded memory: chunk x n floats at a time
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        per_image = (_seed_resample(a, m, rng) - _seed_resample(b, m, rng))      # m x n
        images = rng.integers(0, n, size=(m, n))
        stats[start:start + m] = np.take_along_axis(per_image, images, axis=1).mean(axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(100.0 * stats, [tail, 100.0 - tail])
    return PairedDiff(diff, float(lo), float(hi))


def _seed_resample(m: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``draws`` rows, each the per-image mean over a with-replacement resample of m's seeds."""
    k = m.shape[0]
    if k == 1:
        return np.broadcast_to(m[0], (draws, m.shape[1]))
    picks = rng.integers(0, k, size=(draws, k))
    counts = np.stack([(picks == s).sum(axis=1) for s in range(k)], axis=1) / k   # draws x k
    return counts @ m
