"""The bootstrap and t-intervals of common.report.stats against cases computed by hand."""
import math

import numpy as np
import pytest

from common.report.stats import (
    one_sample_bootstrap,
    paired_bootstrap,
    t_cdf,
    t_interval,
    t_quantile,
    welch_interval,
)


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


@pytest.mark.parametrize("p, df, want", [
    (0.975, 1, 12.706205),      # df 1 is Cauchy: tan(0.475 pi)
    (0.975, 2, 4.302653),       # df 2 in closed form: (2p - 1) / sqrt(2 p (1 - p))
    (0.975, 4, 2.776445),
    (0.975, 30, 2.042272),
    (0.995, 5, 4.032143),
    (0.025, 4, -2.776445),      # the lower tail by symmetry
])
def test_t_quantile_matches_the_tables(p, df, want):
    assert t_quantile(p, df) == pytest.approx(want, abs=1e-6)
    assert t_cdf(want, df) == pytest.approx(p, abs=1e-7)


def test_t_quantile_closed_forms_and_normal_limit():
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-10)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-10)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)


def test_t_quantile_at_a_welch_df_by_integrating_the_density():
    """Welch's degrees of freedom are not whole numbers: at df = 100/17 the quantile lies between
    the tables' t_5 = 2.570582 and t_6 = 2.446912, and the t density, integrated from 0 to it
    (Simpson's rule, independent of the incomplete beta function), holds 0.475."""
    df = 100 / 17
    q = t_quantile(0.975, df)
    assert 2.446912 < q < 2.570582
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n = 2000
    xs = [q * i / n for i in range(n + 1)]
    f = [c * (1 + x * x / df) ** (-(df + 1) / 2) for x in xs]
    area = q / n / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    assert area == pytest.approx(0.475, abs=1e-9)


def test_welch_interval_equal_sizes_and_spreads():
    """a = 89, 90, 91 and b = 90, 91, 92: means 90 and 91, both variances 1, so each squared
    standard error is 1/3 and their sum 2/3; Welch's df = (2/3)^2 / (2 (1/3)^2 / 2) = 4, and the
    half-width t_{0.975,4} sqrt(2/3) = 2.776445 * 0.816497 = 2.266958: [-3.266958, +1.266958]."""
    w = welch_interval([89.0, 90.0, 91.0], [90.0, 91.0, 92.0])
    assert w.diff == pytest.approx(-1.0)
    assert w.df == pytest.approx(4.0)
    assert (w.ci_low, w.ci_high) == (pytest.approx(-3.266958, abs=1e-5),
                                     pytest.approx(1.266958, abs=1e-5))
    assert not w.resolved
    # 5 points apart with the same spreads: [-7.266958, -2.733042], resolved
    w = welch_interval([85.0, 86.0, 87.0], [90.0, 91.0, 92.0])
    assert (w.ci_low, w.ci_high) == (pytest.approx(-7.266958, abs=1e-5),
                                     pytest.approx(-2.733042, abs=1e-5))
    assert w.resolved


def test_welch_interval_unequal_sizes_and_spreads():
    """a = 89, 90, 91 (variance 1, n 3: squared SE 1/3) against b = 90 .. 94 (variance 2.5, n 5:
    squared SE 1/2): difference -2, SE sqrt(5/6) = 0.912871, df = (5/6)^2 / ((1/3)^2/2 +
    (1/2)^2/4) = (25/36) / (17/144) = 100/17 = 5.882353, fewer than the pooled 6.
    Against b = 92, 92 (no spread) the df is a's alone, 2, and the half-width
    t_{0.975,2} / sqrt(3) = 4.302653 * 0.577350 = 2.484138: [-4.484138, +0.484138]."""
    w = welch_interval([89.0, 90.0, 91.0], [90.0, 91.0, 92.0, 93.0, 94.0])
    assert w.diff == pytest.approx(-2.0)
    assert w.df == pytest.approx(100 / 17)
    assert w.half_width == pytest.approx(t_quantile(0.975, 100 / 17) * math.sqrt(5 / 6))
    w = welch_interval([89.0, 90.0, 91.0], [92.0, 92.0])
    assert w.df == pytest.approx(2.0)
    assert (w.ci_low, w.ci_high) == (pytest.approx(-4.484138, abs=1e-5),
                                     pytest.approx(0.484138, abs=1e-5))


def test_welch_interval_needs_two_seeds_a_side():
    assert welch_interval([90.0], [91.0, 92.0]) is None
    assert welch_interval([90.0, 91.0], [91.0]) is None
    w = welch_interval([90.0, 90.0], [91.0, 91.0])          # no spread at all: the point
    assert (w.diff, w.ci_low, w.ci_high) == (-1.0, -1.0, -1.0)


def test_one_sample_t_interval():
    """90, 91, 92 against 91.25: mean 91, gap -0.25, s = 1, SE 1/sqrt(3) = 0.577350, df 2,
    half-width 4.302653 * 0.577350 = 2.484138: [-2.734138, +2.234138]."""
    t = t_interval([90.0, 91.0, 92.0], 91.25)
    assert (t.diff, t.df) == (pytest.approx(-0.25), 2.0)
    assert (t.ci_low, t.ci_high) == (pytest.approx(-2.734138, abs=1e-5),
                                     pytest.approx(2.234138, abs=1e-5))
    assert t_interval([90.0], 91.25) is None


def test_one_sample_bootstrap_matches_the_binomial_standard_error():
    """One seed, 900 of 1,000 images right: accuracy 90, standard error sqrt(0.9 * 0.1 / 1000)
    = 0.949 points, so 90 +- 1.86; against 91.25 the gap is -1.25 with the interval shifted.
    Two seeds at 88 and 92 on the same images: the seed level reaches both."""
    a = np.zeros((1, 1000), dtype=int)
    a[0, :900] = 1
    r = one_sample_bootstrap(a, 91.25)
    se = 100 * math.sqrt(0.9 * 0.1 / 1000)
    assert r.diff == pytest.approx(-1.25)
    assert r.ci_low == pytest.approx(-1.25 - 1.96 * se, abs=0.15)
    assert r.ci_high == pytest.approx(-1.25 + 1.96 * se, abs=0.15)
    b = np.zeros((2, 1000), dtype=int)
    b[0, :880] = 1
    b[1, :920] = 1
    r = one_sample_bootstrap(b)
    assert r.diff == pytest.approx(90.0)
    assert r.ci_low <= 88.0 + 0.5 and r.ci_high >= 92.0 - 0.5
