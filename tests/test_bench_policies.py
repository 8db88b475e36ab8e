"""`dspark bench-policies`: its pure parts, repeats pooled into one row and the goals as ratios of the same run."""

from __future__ import annotations

import pytest

from dspark.bench.policies import format_table, goals, pooled, round_breakdown
from dspark.core.decoding import LoopTimes
from dspark.core.proposer import DraftTimes


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


def test_a_round_is_broken_down_into_draft_phases_verify_and_the_rest():
    loop = LoopTimes(rounds=10, draft_calls=5, draft_s=0.2, verify_s=0.5, prefill_s=0.1)
    draft = DraftTimes(calls=5, context_s=0.03, backbone_s=0.08, head_s=0.06, wire_s=0.02)
    b = round_breakdown(loop, draft, wall_s=1.0)
    assert b["draft_ms"] == pytest.approx(20) and b["verify_ms"] == pytest.approx(50)
    assert b["prefill_ms"] == pytest.approx(10) and b["other_ms"] == pytest.approx(20)
    assert [b[f"draft_{p}_ms"] for p in ("context", "backbone", "head", "wire")] == pytest.approx([3, 8, 6, 2])
    assert b["draft_calls_per_round"] == 0.5
    assert "draft_head_ms" not in round_breakdown(loop, None, wall_s=1.0)  # a proposer that reports no phases
