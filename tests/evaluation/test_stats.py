"""Wilson intervals and exact McNemar tests on known counts; paired comparison of results."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localalign.evaluation.stats import binomial_cdf, compare_paired, mcnemar_exact, proportion, wilson_interval


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
