"""Statistics for tests: is a load balancer's spread even, or only roughly so?"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# Upper 0.1 % points of the chi-square distribution, by degrees of freedom (df = 2 exactly:
# -2 ln 0.001 = 13.816).
CRITICAL_AT_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124}


def chi_square_uniform(counts: Mapping[str, int], categories: Iterable[str]) -> float:
    """Pearson's statistic, sum of (observed - expected)^2 / expected, against an even split
    over ``categories``; a category missing from ``counts`` counts as 0."""
    names = list(categories)
    total = sum(counts.get(name, 0) for name in names)
    expected = total / len(names)
    return sum((counts.get(name, 0) - expected) ** 2 / expected for name in names)


def assert_uniform(counts: Mapping[str, int], categories: Iterable[str], what: str = "spread") -> None:
    """Fail unless ``counts`` (connections per task) fit an even split over ``categories``:
    a chi-square goodness-of-fit test at p = 0.001 (df = len(categories) - 1).

    Why this and not "each task got 60-140 of 300": the classic DNAT bug (every rule with
    probability 1/n instead of 1/(n-i)) gives three tasks 1/3, 2/9, 4/9 of the connections
    (five tasks: .2, .16, .128, .1024, .4096), and 60-140 of 300 lets that through 71 % of
    the time. Simulated with random draws (32,000 runs per line unless said):

        3 tasks, 300 connections:  the 1/n bug fails  87.6 %
        3 tasks, 600 connections:  the 1/n bug fails  99.92 %
        3 tasks, 750 connections:  the 1/n bug fails  99.997 %
        5 tasks, 300 or 500:       the 1/n bug fails 100.0 %
        an even split, 3 x 750 and 5 x 500 (320,000 runs each): passes 99.90 % (measured
        99.898 % +- 0.006 %, i.e. the 0.1 % false alarms p = 0.001 means)

    so use at least 600 connections for three tasks (the tests use 750) and 300 for five.
    Connections that went to something outside ``categories`` fail the check outright.
    """
    names = list(categories)
    stray = set(counts) - set(names)
    assert not stray, f"{what}: answers from outside {sorted(names)}: {dict(counts)}"
    statistic = chi_square_uniform(counts, names)
    critical = CRITICAL_AT_P001[len(names) - 1]
    shown = {name: counts.get(name, 0) for name in names}
    assert statistic <= critical, (
        f"{what} is not even: {shown}, chi-square {statistic:.1f} > {critical} (df {len(names) - 1}, p 0.001)")
