"""Wilson intervals, exact McNemar tests and Newcombe's paired interval on known counts; the
minimum detectable difference and the test's power; paired comparison of results."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localalign.evaluation.stats import (binomial_cdf, compare_paired, detectable_difference, mcnemar_exact,
                                        mcnemar_power, min_detectable_difference, min_flips,
                                        paired_difference_interval, proportion, wilson_interval)


def test_wilson_known_values():
    # Textbook values (Newcombe 1998, method 3: 95% Wilson score interval without correction)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


@settings(deadline=None)  # the first example imports scipy
@given(st.integers(0, 400).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_agrees_with_scipy(kn):
    from scipy.stats import binomtest

    k, n = kn
    if n == 0:
        return
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(ci.low, abs=1e-9) and high == pytest.approx(ci.high, abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_proportion_record():
    rec = proportion([True, False, True, True])
    assert rec["value"] == 0.75 and rec["k"] == 3 and rec["n"] == 4
    assert rec["ci_low"] < 0.75 < rec["ci_high"]
    assert proportion([])["value"] is None


def test_mcnemar_known_values():
    assert mcnemar_exact(0, 10) == pytest.approx(2 * 0.5**10)  # 0.00195
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)  # 0.0215
    assert mcnemar_exact(3, 5) == pytest.approx(2 * (1 + 8 + 28 + 56) / 256)  # 0.727
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(7, 2) == mcnemar_exact(2, 7)


@settings(deadline=None)
@given(st.integers(0, 60), st.integers(0, 60))
def test_mcnemar_agrees_with_scipy_binomtest(b, c):
    from scipy.stats import binomtest

    if b + c == 0:
        return
    assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_binomial_cdf_sums_to_one():
    assert binomial_cdf(20, 20) == 1.0
    assert math.isclose(binomial_cdf(9, 20) + binomial_cdf(10, 20) - binomial_cdf(9, 20), binomial_cdf(10, 20))


def test_compare_paired_significant_and_not():
    ids = [f"q{i}" for i in range(40)]
    a = {i: False for i in ids}
    b = {i: (n < 20) for n, i in enumerate(ids)}  # B right on 20 items A got wrong
    sig = compare_paired(a, b)
    assert (sig.n, sig.a_only, sig.b_only) == (40, 0, 20)
    assert sig.diff == pytest.approx(0.5) and sig.significant()
    # same marginal rates as each other, different items: 3 vs 5 discordant, p = 0.73
    a2 = {i: (n < 3 or 10 <= n < 20) for n, i in enumerate(ids)}
    b2 = {i: (3 <= n < 8 or 10 <= n < 20) for n, i in enumerate(ids)}
    ins = compare_paired(a2, b2)
    assert (ins.a_only, ins.b_only) == (3, 5)
    assert ins.p_value == pytest.approx(0.7266, abs=1e-4) and not ins.significant()


def test_compare_paired_uses_shared_items_only():
    res = compare_paired({"a": 1, "b": 0, "x": 1}, {"a": 1, "b": 1, "y": 0})
    assert res.n == 2 and res.b_only == 1
    with pytest.raises(ValueError):
        compare_paired({"a": 1}, {"b": 1})


# --------------------------------------------------------------------------- paired differences


def test_newcombe_paired_interval_matches_the_literature():
    # Cavo et al. (2012), complete response before and after consolidation therapy, 161 patients:
    # 59 responded both times, 6 before only, 16 after only, 80 neither. Newcombe's method 10
    # ("square-and-add") as worked in Fagerland, Lydersen & Laake, Statistical Analysis of
    # Contingency Tables (2017), ch. 8: -0.0621 (95% CI -0.1186 to -0.0046) for before - after.
    low, high = paired_difference_interval(both=59, b_only=6, a_only=16, neither=80)
    assert (low, high) == pytest.approx((-0.1186, -0.0046), abs=5e-5)
    # the same table read the other way round: the interval of the opposite difference
    assert paired_difference_interval(59, 16, 6, 80) == pytest.approx((0.0046, 0.1186), abs=5e-5)


@settings(deadline=None)
@given(st.integers(0, 30), st.integers(0, 30), st.integers(0, 30), st.integers(0, 30))
def test_newcombe_interval_holds_the_estimate_stays_in_range_and_flips_with_the_sides(both, b_only, a_only, neither):
    n = both + b_only + a_only + neither
    if n == 0:
        return
    low, high = paired_difference_interval(both, b_only, a_only, neither)
    assert -1.0 <= low <= (b_only - a_only) / n <= high <= 1.0
    assert low < high  # never a point, even where the two models never disagree
    assert paired_difference_interval(both, a_only, b_only, neither) == pytest.approx((-high, -low), abs=1e-12)


def test_newcombe_interval_refuses_impossible_counts():
    with pytest.raises(ValueError):
        paired_difference_interval(0, 0, 0, 0)
    with pytest.raises(ValueError):
        paired_difference_interval(3, -1, 0, 2)


def test_min_detectable_difference_at_24_items_is_six_flips():
    assert min_flips() == 6  # 2 * 0.5**6 = 0.031 < 0.05; five give 0.0625
    assert mcnemar_exact(0, 5) > 0.05 > mcnemar_exact(0, 6)
    assert min_detectable_difference(24) == pytest.approx(0.25)
    assert min_detectable_difference(20) == pytest.approx(0.30)
    assert min_detectable_difference(5) is None  # no 5-item comparison can ever be significant
    assert min_flips(0.01) == 8 and min_detectable_difference(100, 0.01) == pytest.approx(0.08)


@pytest.mark.parametrize("n", [6, 13, 24, 40])
def test_no_split_of_disagreements_is_significant_below_the_mdd(n):
    """The 'all flips one way' case is the best case: over every b, c with b + c <= n, the
    smallest significant |b - c| / n is the MDD."""
    smallest = min(abs(b - c) / n for b in range(n + 1) for c in range(n + 1 - b) if mcnemar_exact(b, c) < 0.05)
    assert smallest == pytest.approx(min_detectable_difference(n))


def brute_force_power(n: int, discordance: float, diff: float) -> float:
    """Every (b, c) of a multinomial over (A only, B only, agree), the test applied to each."""
    pa, pb, pe = (discordance - diff) / 2, (discordance + diff) / 2, 1 - discordance
    total = 0.0
    for b in range(n + 1):
        for c in range(n + 1 - b):
            prob = math.factorial(n) / (math.factorial(b) * math.factorial(c) * math.factorial(n - b - c))
            total += prob * pa**b * pb**c * pe ** (n - b - c) * (mcnemar_exact(b, c) < 0.05)
    return total


@pytest.mark.parametrize("n,discordance,diff", [(12, 0.5, 0.0), (12, 0.5, 0.3), (16, 0.8, 0.8), (20, 0.3, 0.1), (20, 1.0, 0.4)])
def test_mcnemar_power_matches_brute_force(n, discordance, diff):
    assert mcnemar_power(n, discordance, diff) == pytest.approx(brute_force_power(n, discordance, diff), abs=1e-9)


def test_mcnemar_power_is_the_size_at_no_difference_and_grows_with_it():
    assert mcnemar_power(24, 0.5, 0.0) <= 0.05  # the exact test is conservative
    powers = [mcnemar_power(24, 0.5, d / 20) for d in range(11)]
    assert powers == sorted(powers) and powers[-1] > 0.8


def test_detectable_difference_at_80_percent_power():
    d = detectable_difference(24, 0.5)
    assert d == pytest.approx(0.401, abs=0.002)
    assert mcnemar_power(24, 0.5, d) >= 0.8 > mcnemar_power(24, 0.5, d - 0.001)
    assert detectable_difference(24, 0.3) is None  # 7 disagreements expected: too few for 80% power
    assert detectable_difference(100, 0.3) < detectable_difference(24, 0.5) < 0.5


def test_compare_paired_has_the_interval_and_counts_unpaired_items():
    a = {f"q{i}": int(i < 10) for i in range(24)} | {"only-a": 1}
    b = {f"q{i}": int(i < 16) for i in range(24)} | {"only-b1": 0, "only-b2": 1}
    res = compare_paired(a, b)
    assert (res.n, res.a_only, res.b_only, res.a_unpaired, res.b_unpaired) == (24, 0, 6, 1, 2)
    assert (res.ci_low, res.ci_high) == pytest.approx(paired_difference_interval(10, 6, 0, 8))
    assert res.diff == pytest.approx(0.25) and res.ci_low < res.diff < res.ci_high
    assert res.significant() and res.mdd == pytest.approx(0.25)
