"""CL metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flower_pae.cl_metrics import (
    average_accuracy,
    backward_transfer,
    cl_summary,
    forward_transfer,
)

NAN = float("nan")
R = np.array(
    [
        [0.80, 0.30, NAN],
        [0.70, 0.90, 0.40],
        [0.60, 0.85, 0.95],
    ]
)
BASELINE = np.array([0.25, 0.20, 0.35])


def test_known_matrix() -> None:
    # AA = (0.60 + 0.85 + 0.95) / 3 = 0.8
    assert average_accuracy(R) == pytest.approx(0.8)
    # BWT = ((0.60 - 0.80) + (0.85 - 0.90)) / 2 = -0.125
    assert backward_transfer(R) == pytest.approx(-0.125)
    # FWT = ((0.30 - 0.20) + (0.40 - 0.35)) / 2 = 0.075
    assert forward_transfer(R, BASELINE) == pytest.approx(0.075)
    s = cl_summary(R.tolist(), BASELINE.tolist())
    assert s["AA"] == pytest.approx(0.8) and s["BWT"] == pytest.approx(-0.125)
    assert s["FWT"] == pytest.approx(0.075)
    assert math.isnan(cl_summary(R)["FWT"])


def test_single_task() -> None:
    r = np.array([[0.7]])
    assert average_accuracy(r) == pytest.approx(0.7)
    assert math.isnan(backward_transfer(r))
    assert math.isnan(forward_transfer(r, [0.5]))


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        average_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        backward_transfer(np.zeros(3))
    with pytest.raises(ValueError):
        average_accuracy(np.zeros((0, 0)))
    with pytest.raises(ValueError):
        forward_transfer(R, [0.1, 0.2])
