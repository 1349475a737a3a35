"""Continual-learning metrics over an accuracy matrix (Lopez-Paz & Ranzato, GEM, 2017).

``R[i][j]`` is the accuracy on task ``j``'s test set after training task ``i``. Entries above the
diagonal may be NaN, except ``R[j-1][j]``, which forward transfer needs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike


def _as_matrix(R: ArrayLike) -> np.ndarray:
    m = np.asarray(R, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T×T with T >= 1, got shape {m.shape}")
    return m


def average_accuracy(R: ArrayLike) -> float:
    """AA: mean over tasks of the accuracy after the last task, ``mean_j R[T-1][j]``."""
    m = _as_matrix(R)
    return float(np.mean(m[-1]))


def backward_transfer(R: ArrayLike) -> float:
    """BWT: ``mean_{j<T-1} (R[T-1][j] − R[j][j])``; negative means forgetting. NaN for T = 1."""
    m = _as_matrix(R)
    t = m.shape[0]
    if t < 2:
        return math.nan
    return float(np.mean(m[-1, : t - 1] - np.diag(m)[: t - 1]))


def forward_transfer(R: ArrayLike, baseline: ArrayLike) -> float:
    """FWT: ``mean_{j≥1} (R[j-1][j] − baseline[j])``, how earlier tasks help an unseen one.

    ``baseline[j]`` is the untrained model's accuracy on task ``j``. NaN for T = 1.
    """
    m = _as_matrix(R)
    b = np.asarray(baseline, dtype=float)
    t = m.shape[0]
    if b.shape != (t,):
        raise ValueError(f"baseline must have shape ({t},) to match R, got {b.shape}")
    if t < 2:
        return math.nan
    j = np.arange(1, t)
    return float(np.mean(m[j - 1, j] - b[1:]))


def cl_summary(R: ArrayLike, baseline: ArrayLike | None = None) -> dict[str, Any]:
    """``{"AA", "BWT", "FWT"}`` at once (FWT NaN without a baseline)."""
    return {
        "AA": average_accuracy(R),
        "BWT": backward_transfer(R),
        "FWT": forward_transfer(R, baseline) if baseline is not None else math.nan,
    }
