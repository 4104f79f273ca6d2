"""The paired bootstrap of common.stats against cases computed by hand."""
import math

import numpy as np
import pytest

from common.stats import paired_bootstrap


def test_identical_differences_give_a_point_interval():
    """Every image right in every seed of the configuration and wrong in every seed of the
    baseline: whatever seeds and images a resample draws, the difference is 100 points, so the
    interval is [100, 100]; the same data the other way round gives [-100, -100]."""
    a = np.ones((2, 400), dtype=int)
    b = np.zeros((3, 400), dtype=int)
    r = paired_bootstrap(a, b, resamples=500)
    assert (r.diff, r.ci_low, r.ci_high) == (100.0, 100.0, 100.0) and r.resolved
    r = paired_bootstrap(b, a, resamples=500)
    assert (r.diff, r.ci_low, r.ci_high) == (-100.0, -100.0, -100.0) and r.resolved


def test_one_seed_each_matches_the_normal_approximation():
    """One seed a side, 1,000 images: 60 only the configuration gets right, 40 only the baseline.
    Per image d is +1, -1 or 0; by hand the mean is 0.02 and the standard error
    sqrt((0.1 - 0.02^2) / 1000) = 0.998 points, so the 95% interval is about 2 +- 1.96 points."""
    a = np.zeros((1, 1000), dtype=int)
    b = np.zeros((1, 1000), dtype=int)
    a[0, :60] = 1
    b[0, 60:100] = 1
    r = paired_bootstrap(a, b)
    se = 100 * math.sqrt((0.1 - 0.02**2) / 1000)
    assert r.diff == pytest.approx(2.0)
    assert r.ci_low == pytest.approx(2.0 - 1.96 * se, abs=0.15)
    assert r.ci_high == pytest.approx(2.0 + 1.96 * se, abs=0.15)
    assert r.resolved                       # 2 +- 1.96: just excludes 0


def test_seed_variation_widens_the_interval():
    """Two seeds that disagree (seed 0 is 4 points better than seed 1 on the same images): the
    seed level of the bootstrap must widen the interval beyond the images-only one."""
    base = np.zeros((2, 1000), dtype=int)
    base[:, :900] = 1
    steady = np.zeros((2, 1000), dtype=int)
    steady[:, :900] = 1
    noisy = steady.copy()
    noisy[0, 900:920] = 1                 # seed 0: +2 points
    noisy[1, :20] = 0                     # seed 1: -2 points
    w_steady = paired_bootstrap(steady, base)
    w_noisy = paired_bootstrap(noisy, base)
    assert w_steady.ci_high - w_steady.ci_low == 0.0
    assert w_noisy.diff == pytest.approx(0.0)
    # resampled seeds give -2, 0 or +2 (probability 1/4, 1/2, 1/4): the interval reaches both
    assert w_noisy.ci_low <= -2.0 + 0.5 and w_noisy.ci_high >= 2.0 - 0.5
    assert not w_noisy.resolved


def test_needs_the_same_images():
    with pytest.raises(ValueError, match="same test images"):
        paired_bootstrap(np.ones((1, 10)), np.ones((1, 11)))
