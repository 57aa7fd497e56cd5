"""Plain metrics on arrays: AUROC, confusion matrices, accuracy (numpy only, no model).

AUROC here is the probability that a randomly chosen in-distribution image scores higher than
a randomly chosen out-of-distribution one, ties counting one half (the Mann-Whitney U statistic
divided by ``n_in * n_out``): 1 separates perfectly, 0.5 is chance, and below 0.5 means the
score rates the unseen images *higher*, as plain flow likelihood is known to do for some pairs
of datasets.
"""

from __future__ import annotations

import math

import numpy as np

from tzkcli.errors import BadInputError


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """``P(s_in > s_out) + P(s_in = s_out) / 2`` from mid-ranks, ``O((n + m) log(n + m))``.

    Args:
        inside: scores ``[n]`` of in-distribution images (higher = more typical).
        outside: scores ``[m]`` of out-of-distribution images.

    Returns:
        The AUROC, or NaN when either side is empty.

    Raises:
        BadInputError: a non-finite score (a NaN has no rank).
    """
    inside = np.asarray(inside, dtype=np.float64).ravel()
    outside = np.asarray(outside, dtype=np.float64).ravel()
    if inside.size == 0 or outside.size == 0:
        return math.nan
    both = np.concatenate([inside, outside])
    if not np.isfinite(both).all():
        raise BadInputError(f"scores: found {int((~np.isfinite(both)).sum())} non-finite "
                            "values, expected finite scores to rank")

    ranks = _mid_ranks(both)
    u = ranks[:inside.size].sum() - inside.size * (inside.size + 1) / 2
    return float(u / (inside.size * outside.size))


def _mid_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    stops = np.concatenate([starts[1:], [len(values)]])
    mid = (starts + stops + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mid, stops - starts)
    return ranks


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, n_values: int) -> np.ndarray:
    """Counts ``[n_values, n_values]``: row = true value, column = predicted value.

    Raises:
        BadInputError: a code outside ``0..n_values - 1``.
    """
    true = np.asarray(true, dtype=np.int64).ravel()
    predicted = np.asarray(predicted, dtype=np.int64).ravel()
    if true.shape != predicted.shape:
        raise BadInputError(f"confusion: found {true.size} true and {predicted.size} "
                            "predicted codes, expected as many of each")
    for name, codes in (("true", true), ("predicted", predicted)):
        if codes.size and (codes.min() < 0 or codes.max() >= n_values):
            raise BadInputError(f"confusion: {name} codes span {codes.min()}..{codes.max()}, "
                                f"expected 0..{n_values - 1}")
    flat = np.bincount(true * n_values + predicted, minlength=n_values * n_values)
    return flat.reshape(n_values, n_values)


def accuracy(matrix: np.ndarray) -> float:
    """Fraction on the diagonal of a confusion matrix (NaN when it is empty)."""
    total = int(matrix.sum())
    return float(np.trace(matrix) / total) if total else math.nan
