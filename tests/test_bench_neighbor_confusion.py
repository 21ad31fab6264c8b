"""bench/neighbor_confusion.py's figures on a hand-computed example (2 targets, 2 auxiliary classes)."""

from __future__ import annotations

import numpy as np
import pytest
from bench_helpers import load_bench


@pytest.fixture(scope="module")
def mod():
    return load_bench("neighbor_confusion")


def test_confusion_figures(mod) -> None:
    # classes 0, 1 targets; 2 paired with 0 (given as (aux, target): order must not matter); 3 unpaired
    pairs = np.array([[2, 0]])
    logits = np.log(np.array([[0.1, 0.2, 0.6, 0.1],    # true 0: argmax its paired aux 2; masked -> 1 (wrong)
                              [0.5, 0.1, 0.3, 0.1],    # true 0: correct
                              [0.1, 0.2, 0.3, 0.4]]))  # true 1: argmax unpaired aux 3; masked -> 1 (right)
    out = mod.confusion(logits, np.array([0, 0, 1]), 2, pairs)
    assert out["direct"] == pytest.approx(200 / 3)
    assert out["to aux"] == pytest.approx(200 / 3)
    assert out["to paired aux"] == pytest.approx(100 / 3)
    assert out["paired mass"] == pytest.approx((0.6 + 0.3 + 0.0) / 3)
    # margin over images whose class has a pair (the two of class 0): log(0.1/0.6), log(0.5/0.3)
    assert out["margin"] == pytest.approx((np.log(0.1 / 0.6) + np.log(0.5 / 0.3)) / 2)
