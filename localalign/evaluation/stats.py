"""Uncertainty for evaluation scores: Wilson intervals and exact McNemar tests.

Every evaluation metric in localalign is a proportion of binary outcomes (refused or
not, constraint met or not, right choice or not), so two tools cover all of them:

- `wilson_interval(k, n)`: the 95% Wilson score interval of k successes in n trials. It
  stays inside [0, 1] and behaves at k = 0 and k = n, where the normal-approximation
  interval collapses to a point; our held-out sets are small (n of 40-200), exactly where
  that matters.
- `mcnemar_exact(b, c)`: the two-sided exact McNemar test for two models scored on the
  same items, where b and c count the discordant pairs. Pairing removes the item-to-item
  difficulty that dominates the variance of small sets; only the items the two models
  disagree on carry evidence, and under "no difference" each is a fair coin.

Pure functions, no dependencies beyond the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z_95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n; (0, 1) when n == 0 (nothing known)."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # Clamp rounding noise: at k == 0 the lower bound is exactly 0, at k == n the upper is 1.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def proportion(outcomes: list[bool] | list[int]) -> dict:
    """A metric record from binary outcomes: value, k, n and the 95% Wilson interval."""
    n = len(outcomes)
    k = sum(1 for o in outcomes if o)
    low, high = wilson_interval(k, n)
    return {
        "value": k / n if n else None,
        "k": k,
        "n": n,
        "ci_low": low,
        "ci_high": high,
    }


def binomial_cdf(k: int, n: int, p: float = 0.5) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly (n is at most a few thousand here)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts b (A right, B wrong) and c."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0  # the models never disagree: no evidence of a difference
    return min(1.0, 2.0 * binomial_cdf(min(b, c), n))


@dataclass
class PairedComparison:
    """Model A vs model B on the items both were scored on."""

    n: int  # paired items
    a_value: float  # A's proportion on the paired items
    b_value: float  # B's proportion on the paired items
    a_only: int  # items A got right (outcome true) and B did not
    b_only: int  # items B got right and A did not
    p_value: float  # exact McNemar, two-sided

    @property
    def diff(self) -> float:
        return self.b_value - self.a_value

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def compare_paired(a: dict[str, bool | int], b: dict[str, bool | int]) -> PairedComparison:
    """Compare two {item id: outcome} maps on the ids they share (McNemar, exact)."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two results share no items")
    a_only = sum(1 for i in shared if a[i] and not b[i])
    b_only = sum(1 for i in shared if b[i] and not a[i])
    n = len(shared)
    return PairedComparison(
        n=n,
        a_value=sum(1 for i in shared if a[i]) / n,
        b_value=sum(1 for i in shared if b[i]) / n,
        a_only=a_only,
        b_only=b_only,
        p_value=mcnemar_exact(a_only, b_only),
    )
