"""Long-tail profile, seeded long-tailed subsets and many/medium/few groups."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neighborlt.data import ImageSet, long_tail_counts, make_long_tailed, shot_groups, shot_totals
from neighborlt.errors import ConfigError, DataError


def test_long_tail_counts_reference_totals() -> None:
    c100 = long_tail_counts(100, 500, 100)
    assert sum(c100) == 10847 and c100[0] == 500 and c100[-1] == 5
    c10 = long_tail_counts(10, 5000, 100)
    assert sum(c10) == 12406 and c10 == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_counts(5, 500, 100) == [500, 158, 50, 15, 5]
    assert long_tail_counts(1, 7, 100) == [7]


@given(st.integers(2, 300), st.integers(1, 5000), st.floats(1.0, 500.0))
@settings(max_examples=60, deadline=None)
def test_long_tail_counts_properties(c: int, n_max: int, ratio: float) -> None:
    counts = long_tail_counts(c, n_max, ratio)
    assert len(counts) == c and counts[0] == n_max
    assert all(a >= b for a, b in itertools.pairwise(counts))
    assert int(n_max / ratio) - 1 <= counts[-1] <= n_max / ratio + 1e-9  # the tail is n_max / ratio


def test_long_tail_counts_rejects_bad_args() -> None:
    with pytest.raises(ConfigError, match="imbalance ratio"):
        long_tail_counts(10, 100, 0.5)
    with pytest.raises(ConfigError):
        long_tail_counts(0, 100, 10)


def _balanced(c: int, n: int) -> ImageSet:
    labels = np.repeat(np.arange(c), n)
    arr = np.arange(len(labels), dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)
    return ImageSet(class_names=[f"c{i}" for i in range(c)], labels=labels, array=arr)


def test_make_long_tailed_seeded() -> None:
    s = _balanced(5, 100)
    a = make_long_tailed(s, 10, 100, seed=1)
    b = make_long_tailed(s, 10, 100, seed=1)
    c = make_long_tailed(s, 10, 100, seed=2)
    assert a.counts().tolist() == long_tail_counts(5, 100, 10) == [100, 56, 31, 17, 10]
    assert np.array_equal(a.array, b.array) and not np.array_equal(a.array, c.array)
    rev = make_long_tailed(s, 10, 100, seed=1, class_order=[4, 3, 2, 1, 0])
    assert rev.counts().tolist() == [10, 17, 31, 56, 100]


def test_make_long_tailed_errors() -> None:
    s = _balanced(3, 10)
    with pytest.raises(DataError, match="has 10 images but the long-tail profile needs 20"):
        make_long_tailed(s, 2, 20)
    with pytest.raises(ConfigError, match="class_order"):
        make_long_tailed(s, 2, 5, class_order=[0, 0, 1])


def test_shot_groups() -> None:
    counts = [500, 101, 100, 20, 19, 5]
    assert shot_groups(counts).tolist() == ["many", "many", "medium", "medium", "few", "few"]
    assert shot_groups(counts, many=5, few=3).tolist() == ["many"] * 5 + ["medium"]
    lt = long_tail_counts(100, 500, 100)
    t = shot_totals(lt)
    assert {k: v["classes"] for k, v in t.items()} == {"many": 35, "medium": 35, "few": 30}
    assert t["many"]["images"] == sum(c for c in lt if c > 100) == 8824
    assert t["few"]["images"] == sum(c for c in lt if c < 20) == 305
    assert sum(v["images"] for v in t.values()) == 10847
    with pytest.raises(ConfigError):
        shot_groups(counts, many=10, few=20)
