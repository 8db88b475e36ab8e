"""`dspark bench-policies`: its pure parts, repeats pooled into one row and the goals as ratios of the same run."""

from __future__ import annotations

import pytest

from dspark.bench.policies import format_table, goals, pooled


def _row(policy, c, tokens, wall, tau=1.0):
    return {
        "policy": policy,
        "concurrency": c,
        "requests": 4,
        "tokens": tokens,
        "wall_s": wall,
        "throughput_tps": tokens / wall,
        "per_user_tps": tokens / wall / c,
        "tau": tau,
        "budget_per_round": 0.0,
        "verify_ms": 50.0,
    }


def test_repeats_pool_tokens_over_wall_time_and_keep_their_spread():
    row = pooled([_row("dspark", 2, 100, 10.0, tau=1.5), _row("dspark", 2, 100, 5.0, tau=2.5)])
    assert row["repeats"] == 2 and row["requests"] == 8 and row["tokens"] == 200 and row["wall_s"] == 15.0
    assert row["throughput_tps"] == pytest.approx(200 / 15)  # not the mean of 10 and 20 tok/s
    assert row["throughput_range"] == [10.0, 20.0]
    assert row["tau"] == pytest.approx(2.0) and row["per_user_tps"] == pytest.approx(7.5)
    one = pooled([_row("fixed", 1, 30, 3.0)])
    assert one["repeats"] == 1 and one["throughput_range"] == [10.0, 10.0] and one["tokens"] == 30


def test_goals_compare_dspark_with_plain_decoding_and_the_best_static_policy_per_level():
    rows = [
        _row("autoregressive", 1, 100, 10.0),
        _row("fixed", 1, 120, 10.0),
        _row("dspark", 1, 110, 10.0),
        _row("autoregressive", 8, 100, 10.0),
        _row("dspark", 8, 99, 10.0),
    ]
    g = goals(rows)
    assert g["c1_per_user_dspark_vs_autoregressive"] == pytest.approx(1.1)
    assert g["throughput_dspark_vs_autoregressive"] == {1: pytest.approx(1.1), 8: pytest.approx(0.99)}
    assert g["throughput_dspark_vs_best_baseline"] == {1: pytest.approx(110 / 120), 8: pytest.approx(0.99)}
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:2] == ["policy", "conc"] and lines[3].split()[:2] == ["dspark", "1"]
