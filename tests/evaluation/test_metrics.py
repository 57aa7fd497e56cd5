"""AUROC, confusion matrices and accuracy against cases computed by hand and by brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tzkcli.errors import BadInputError
from tzkcli.evaluation.metrics import accuracy, auroc, confusion_matrix


def test_auroc_by_hand() -> None:
    # pairs (in, out): 3>0, 3>2, 2>0, 2=2 (one half), 1>0, 1<2  ->  4.5 of 6
    assert auroc(np.array([3.0, 2.0, 1.0]), np.array([0.0, 2.0])) == pytest.approx(0.75)


def test_auroc_extremes_and_ties() -> None:
    assert auroc(np.array([5.0, 6.0]), np.array([1.0, 2.0, 3.0])) == 1.0
    assert auroc(np.array([1.0, 2.0]), np.array([5.0, 6.0])) == 0.0
    assert auroc(np.full(4, 7.0), np.full(3, 7.0)) == 0.5
    assert math.isnan(auroc(np.array([]), np.array([1.0])))


def test_auroc_refuses_nan() -> None:
    with pytest.raises(BadInputError, match="non-finite"):
        auroc(np.array([1.0, np.nan]), np.array([0.0]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=12),
       st.lists(st.integers(-3, 3), min_size=1, max_size=12))
def test_auroc_matches_counting_every_pair(inside: list[int], outside: list[int]) -> None:
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in inside for b in outside]
    assert auroc(np.array(inside, float), np.array(outside, float)) == pytest.approx(
        sum(pairs) / len(pairs))


def test_confusion_by_hand() -> None:
    true = np.array([0, 0, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 2, 0, 2])
    matrix = confusion_matrix(true, predicted, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert accuracy(matrix) == pytest.approx(4 / 6)
    assert math.isnan(accuracy(np.zeros((2, 2), dtype=int)))


def test_confusion_refuses_codes_out_of_range() -> None:
    with pytest.raises(BadInputError, match=r"predicted codes span 0\.\.3, expected 0\.\.2"):
        confusion_matrix(np.array([0, 1]), np.array([0, 3]), 3)
