"""Bootstrap confidence intervals, resampling the units that were sampled (queries, users, prompts).

Every evaluation reports a mean with a 95% percentile-bootstrap interval. When rows belong to groups (several
pairs of one user, several samples of one query), whole groups are resampled, so the interval reflects the
number of independent units, not the number of rows.
"""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, groups=None, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Mean of `values` (N,) with a (1 - alpha) percentile interval, resampling `groups` (N,) if given, else rows.

    Returns {"mean", "lo", "hi", "n"} where n is the number of resampled units. The resampled statistic is the
    pooled mean over the drawn groups (sum of values / number of rows drawn), i.e. the micro average.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_ci: no values")
    keys = np.arange(len(values)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    sums = np.bincount(keys, weights=values)  # (G,)
    counts = np.bincount(keys).astype(float)  # (G,)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(sums), np.full(len(sums), 1 / len(sums)), size=n_boot)  # (n_boot, G) multiplicities
    stats = (draws @ sums) / (draws @ counts)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(sums))}


def paired_difference_ci(a, b, groups=None, **kw) -> dict:
    """Mean of a - b over paired rows, with a bootstrap interval resampling `groups` (see bootstrap_ci)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference_ci: shapes differ, {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, groups, **kw)


def excludes_zero(ci: dict) -> bool:
    return ci["lo"] > 0 or ci["hi"] < 0


def format_ci(ci: dict, digits: int = 3) -> str:
    return f"{ci['mean']:.{digits}f} [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"
