"""Verification budgets: Algorithm 1 on hand-made cases and its properties (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark.scheduler import SpsTable, prefix_schedule, schedule, survival

FLAT = SpsTable((1, 1024), (10.0, 10.0))  # verification is free: the whole block is worth verifying


def test_survival_is_the_cumulative_product():
    assert survival([0.9, 0.5, 0.5]) == pytest.approx([0.9, 0.45, 0.225])


def test_sps_table_lookup():
    t = SpsTable((1, 8, 64), (20.0, 15.0, 5.0))
    assert t(1) == 20.0 and t(5) == 15.0 and t(8) == 15.0 and t(9) == 5.0 and t(128) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        SpsTable((8, 1), (1.0, 2.0))


def test_light_load_verifies_long_prefixes():
    assert prefix_schedule([[0.9, 0.9, 0.9, 0.9]], FLAT) == [4]


def test_heavy_load_prunes_low_confidence_suffixes():
    # free up to B=8 query tokens, then compute-bound (SPS ~ 1/B): past the knee a token pays off only if its
    # survival beats the current accepted-tokens-per-query-token ratio
    knee = SpsTable(tuple(range(1, 65)), tuple(100.0 * min(1.0, 8 / b) for b in range(1, 65)))
    conf = [[0.95, 0.9, 0.2, 0.9], [0.5, 0.9, 0.9, 0.9], [0.99, 0.99, 0.99, 0.99]]
    assert prefix_schedule(conf, knee) == [1, 0, 4]


def test_pure_compute_bound_verifies_nothing():
    steep = SpsTable(tuple(range(1, 65)), tuple(100.0 / b for b in range(1, 65)))
    assert prefix_schedule([[0.99, 0.99], [0.9]], steep) == [0, 0]


def test_early_stop_at_first_non_improvement():
    # SPS drops sharply at B=3, then recovers (a jagged curve): a retrospective search would admit more,
    # Algorithm 1 stops at the first non-improvement
    jagged = SpsTable((1, 2, 3, 4, 5, 6), (10.0, 10.0, 1.0, 10.0, 10.0, 10.0))
    assert prefix_schedule([[0.9, 0.9, 0.9, 0.9]], jagged) == [1]


def test_policies():
    conf = [[0.9, 0.4, 0.9], [0.2]]
    assert schedule("fixed", conf) == [3, 1]
    assert schedule("autoregressive", conf) == [0, 0]
    assert schedule("threshold", conf, threshold=0.35) == [2, 0]
    assert schedule("dspark", conf, FLAT) == [3, 1]
    with pytest.raises(ValueError, match="SPS"):
        schedule("dspark", conf)
    with pytest.raises(ValueError, match="unknown policy"):
        schedule("greedy", conf)


confs = st.lists(st.lists(st.floats(0.0, 1.0), min_size=0, max_size=7), min_size=1, max_size=8)
tables = st.lists(st.floats(0.1, 100.0), min_size=1, max_size=64).map(
    lambda v: SpsTable(tuple(range(1, len(v) + 1)), tuple(v))
)


def theta(conf, lengths, sps):
    tau = sum(1 + sum(survival(c)[:n]) for c, n in zip(conf, lengths))
    return tau * sps(sum(1 + n for n in lengths))


@settings(max_examples=300, deadline=None)
@given(confs, tables)
def test_lengths_are_prefixes_and_never_worse_than_autoregressive(conf, sps):
    lengths = prefix_schedule(conf, sps)
    assert len(lengths) == len(conf)
    assert all(0 <= n <= len(c) for n, c in zip(lengths, conf))
    # admitted tokens are a prefix and all have positive survival
    assert all(all(a > 0 for a in survival(c)[:n]) for n, c in zip(lengths, conf))
    assert theta(conf, lengths, sps) >= theta(conf, [0] * len(conf), sps)
