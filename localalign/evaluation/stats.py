"""Uncertainty for evaluation scores: Wilson intervals, exact McNemar tests, paired differences.

Every evaluation metric in localalign is a proportion of binary outcomes (refused or
not, constraint met or not, right choice or not), so a few tools cover all of them:

- `wilson_interval(k, n)`: the 95% Wilson score interval of k successes in n trials. It
  stays inside [0, 1] and behaves at k = 0 and k = n, where the normal-approximation
  interval collapses to a point; our held-out sets are small (n of 40-200), exactly where
  that matters.
- `mcnemar_exact(b, c)`: the two-sided exact McNemar test for two models scored on the
  same items, where b and c count the discordant pairs. Pairing removes the item-to-item
  difficulty that dominates the variance of small sets; only the items the two models
  disagree on carry evidence, and under "no difference" each is a fair coin.
- `paired_difference_interval(...)`: the 95% interval of the paired difference in
  proportions (Newcombe's method 10), so a comparison says how large, not only whether.
- `min_detectable_difference(n)` and `detectable_difference(n, discordance)`: how large a
  difference must be before the exact McNemar test can declare it, or declares it 80% of
  the time. At n = 24 no difference under 0.25 can be significant.

Pure functions, no dependencies beyond the standard library.
"""

from __future__ import annotations

import functools
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


ALPHA = 0.05  # the significance level of every verdict localalign draws
POWER = 0.8  # the power at which `detectable_difference` is quoted (the usual planning value)


def paired_difference_interval(both: int, b_only: int, a_only: int, neither: int, z: float = Z_95
                               ) -> tuple[float, float]:
    """95% interval of p_B - p_A for paired binary outcomes: Newcombe's method 10, the Wilson
    score intervals of the two marginal proportions combined with their estimated correlation
    (R. G. Newcombe, "Improved confidence intervals for the difference between binomial
    proportions based on paired data", Statistics in Medicine 17:2635-2650, 1998). It stays
    inside [-1, 1], is not degenerate when nobody disagrees, and covers near its nominal level
    at the n of our held-out sets, where the Wald interval (b - c)/n +- z*se does not.

    Counts: `both` items right under A and B, `b_only` right under B alone, `a_only` under A
    alone, `neither`. The interval and the exact McNemar test are separate procedures: near
    p = 0.05 one can exclude 0 while the other does not. Verdicts use the test."""
    n = both + b_only + a_only + neither
    if min(both, b_only, a_only, neither) < 0 or n == 0:
        raise ValueError(f"need counts >= 0 and at least one item, got {(both, b_only, a_only, neither)}")
    p1, p2 = (both + b_only) / n, (both + a_only) / n  # B's and A's proportions
    l1, u1 = wilson_interval(both + b_only, n, z)
    l2, u2 = wilson_interval(both + a_only, n, z)
    margins = (both + b_only) * (a_only + neither) * (both + a_only) * (b_only + neither)
    phi = 0.0
    if margins:
        # Newcombe's corrected phi: a positive cross-product difference is shrunk by n/2 (never
        # below 0), a negative one is kept as it is.
        cross = both * neither - b_only * a_only
        phi = (cross - n / 2 if cross > n / 2 else min(cross, 0)) / math.sqrt(margins)
    diff = p1 - p2
    low = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, low), min(1.0, high)


def min_flips(alpha: float = ALPHA) -> int:
    """The fewest discordant items, all one way, that make the exact McNemar test significant
    (6 at alpha 0.05: 2 * 0.5**6 = 0.031, while 5 give 0.0625)."""
    k = 1
    while mcnemar_exact(0, k) >= alpha:
        k += 1
    return k


def min_detectable_difference(n: int, alpha: float = ALPHA) -> float | None:
    """The smallest difference in proportions that an exact McNemar test at `alpha` can declare
    on n paired items: min_flips(alpha) / n, the best case in which every discordant item moves
    the same way (any flip the other way needs more than one extra flip to make up for it, so no
    other split does better). A floor, not a promise: a real difference of this size is
    declared only when it shows up as exactly that. None where n is too small for any."""
    k = min_flips(alpha)
    return k / n if n >= k else None


def mcnemar_power(n: int, discordance: float, diff: float, alpha: float = ALPHA) -> float:
    """Exact power of the two-sided exact McNemar test on n paired items when a share
    `discordance` of them differ between the models and the true difference is `diff`
    (0 <= diff <= discordance): the discordant count is Binomial(n, discordance), and each
    discordant item favours the better model with probability (1 + diff/discordance) / 2."""
    if not 0 < discordance <= 1 or not 0 <= diff <= discordance:
        raise ValueError(f"need 0 < discordance <= 1 and 0 <= diff <= discordance, got {discordance}, {diff}")
    q = (1 + diff / discordance) / 2
    total = 0.0
    for m, k in enumerate(_significant_minorities(n, alpha)):
        weight = _binomial_pmf(m, n, discordance)
        if k < 0 or weight < 1e-15:  # no split of m is significant, or m (almost) never happens
            continue
        # rejected when the minority side holds k items or fewer, for either model
        total += weight * math.fsum(_binomial_pmf(i, m, q) + _binomial_pmf(i, m, 1 - q) for i in range(k + 1))
    return min(1.0, total)


@functools.lru_cache(maxsize=32)
def _significant_minorities(n: int, alpha: float) -> tuple[int, ...]:
    """For m = 0..n discordant items, the largest minority b with mcnemar_exact(b, m - b) < alpha
    (-1 where no split of m is significant), in exact integer arithmetic: 2 * sum_{i<=b} C(m, i)
    < alpha * 2**m."""
    num, den = float(alpha).as_integer_ratio()
    out = []
    for m in range(n + 1):
        k, total, term = -1, 0, 1  # term = C(m, k + 1)
        while k + 1 < m - (k + 1) and 2 * (total + term) * den < num * 2**m:
            total += term
            k += 1
            term = term * (m - k) // (k + 1)
        out.append(k)
    return tuple(out)


def _binomial_pmf(i: int, n: int, p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return float(i == (0 if p <= 0.0 else n))
    return math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                    + i * math.log(p) + (n - i) * math.log1p(-p))


def detectable_difference(n: int, discordance: float, power: float = POWER, alpha: float = ALPHA) -> float | None:
    """The smallest true difference the exact McNemar test declares with probability `power`
    on n paired items of which a share `discordance` differ (`mcnemar_power`), to 0.001 above; None
    when even every discordant item moving one way (diff = discordance) is not enough."""
    if mcnemar_power(n, discordance, discordance, alpha) < power:
        return None
    low, high = 0.0, discordance
    while high - low > 1e-4:
        mid = (low + high) / 2
        low, high = (mid, high) if mcnemar_power(n, discordance, mid, alpha) < power else (low, mid)
    return math.ceil(high * 1000) / 1000  # rounded up, so the power there is at least `power`


@dataclass
class PairedComparison:
    """Model A vs model B on the items both were scored on."""

    n: int  # paired items
    a_value: float  # A's proportion on the paired items
    b_value: float  # B's proportion on the paired items
    a_only: int  # items A got right (outcome true) and B did not
    b_only: int  # items B got right and A did not
    p_value: float  # exact McNemar, two-sided
    ci_low: float  # 95% interval of b_value - a_value (Newcombe's method 10)
    ci_high: float
    a_unpaired: int = 0  # items only A was scored on (left out of everything above)
    b_unpaired: int = 0  # items only B was scored on

    @property
    def diff(self) -> float:
        return self.b_value - self.a_value

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p_value < alpha

    @property
    def mdd(self) -> float | None:
        """The smallest difference the test could declare at this n (`min_detectable_difference`)."""
        return min_detectable_difference(self.n)


def compare_paired(a: dict[str, bool | int], b: dict[str, bool | int]) -> PairedComparison:
    """Compare two {item id: outcome} maps on the ids they share (McNemar, exact; Newcombe's
    interval); the ids only one side holds are counted, not compared."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two results share no items")
    a_only = sum(1 for i in shared if a[i] and not b[i])
    b_only = sum(1 for i in shared if b[i] and not a[i])
    both = sum(1 for i in shared if a[i] and b[i])
    n = len(shared)
    low, high = paired_difference_interval(both, b_only, a_only, n - both - a_only - b_only)
    return PairedComparison(
        n=n,
        a_value=(both + a_only) / n,
        b_value=(both + b_only) / n,
        a_only=a_only,
        b_only=b_only,
        p_value=mcnemar_exact(a_only, b_only),
        ci_low=low,
        ci_high=high,
        a_unpaired=len(set(a) - set(b)),
        b_unpaired=len(set(b) - set(a)),
    )
