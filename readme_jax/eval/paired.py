"""Paired uncertainty for model comparisons on the same held-out windows.

Two models scored on the same N windows give per-window mean NLLs a_N and b_N; their difference
d_N = a_N - b_N removes the variation between windows that both models share (a hard window is
hard for both), so the interval of mean(d) is much tighter than comparing two separate intervals.
The interval is the percentile bootstrap over windows (Efron & Tibshirani, "An Introduction to
the Bootstrap", 1993, ch. 13): resample the N windows with replacement, take the mean, repeat.

"Better" in this project's comparisons means the interval of the difference excludes 0.
"""

from __future__ import annotations

import math

import numpy as np


def paired_bootstrap(
    diff_N: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of per-window differences diff_N [N] (nats per token, model
    minus control) and its `level` percentile-bootstrap interval over windows.

    Deterministic for a given seed. Raises ValueError for an empty or non-finite input, or a
    level outside (0, 1)."""
    d = np.asarray(diff_N, np.float64).ravel()
    if d.size == 0:
        raise ValueError("paired_bootstrap: no windows")
    if not np.all(np.isfinite(d)):
        raise ValueError("paired_bootstrap: non-finite per-window difference")
    if not 0.0 < level < 1.0:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(d.mean()), float(lo), float(hi)


def ppl_ratio_ci(diff_N: np.ndarray, **kw) -> tuple[float, float, float]:
    """The paired interval of `paired_bootstrap` as perplexity ratios model / control:
    exp(mean), exp(lo), exp(hi) (windows weighted equally; equal-length windows make this the
    ratio of all-token perplexities)."""
    m, lo, hi = paired_bootstrap(diff_N, **kw)
    return math.exp(m), math.exp(lo), math.exp(hi)
