"""The numbers of an ``srpo eval`` table, pure (numpy only): per-prompt values in, no models.

- :func:`bootstrap_ci`: the percentile bootstrap interval of the mean over prompts, from a
  fixed-seed generator (the same table every time);
- :func:`win_rate`: the paired win rate of a checkpoint against the base, prompt by prompt (a tie
  counts one half).

Each prompt's value is the mean over its seeds, so prompts (not images) are the resampled unit:
the seeds of one prompt are not independent draws of the prompt distribution.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95


def per_prompt(scores, seeds: int) -> np.ndarray:
    """Scores of image i = prompt i // seeds at seed i % seeds -> the mean of each prompt ``[P]``."""
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim != 1 or seeds < 1 or a.size % seeds:
        raise ValueError(f"{a.size} scores do not split into prompts of {seeds} seeds")
    return a.reshape(-1, seeds).mean(1)


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``[resamples, n]`` prompt indices drawn with replacement (numpy's PCG64 at ``seed``)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(values)``: the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (numpy's linear interpolation) of the means of ``resamples``
    resamples of the values with replacement. One value: the interval is that value."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-d array")
    means = v[resample_indices(v.size, resamples, seed)].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def win_rate(values, base) -> float:
    """Fraction of prompts on which ``values`` beat ``base`` (paired, same prompt), ties one half."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"win_rate needs two equal-length 1-d arrays (got {a.shape} and {b.shape})")
    return float(((a > b) + 0.5 * (a == b)).mean())


def summary(values, base=None, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """``{"mean", "ci95": [lo, hi], "win_rate", "n_prompts"}`` of per-prompt values (``win_rate``
    None without ``base``, i.e. for the base itself)."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(v, level, resamples, seed)
    return {"mean": float(v.mean()), "ci95": [lo, hi], "win_rate": None if base is None else win_rate(v, base),
            "n_prompts": int(v.size)}
