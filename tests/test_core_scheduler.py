"""Verification budgets: Algorithm 1 on hand-made cases and its properties (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from dspark.core.scheduler import SpsTable, batch_capacity, prefix_schedule, schedule, survival, top_k_schedule
from dspark.core.verification import verify

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


def test_core_policies():
    conf = [[0.9, 0.4, 0.9], [0.2]]
    assert schedule("fixed", conf) == [3, 1]
    assert schedule("autoregressive", conf) == [0, 0]
    assert schedule("threshold", conf, threshold=0.35) == [2, 0]
    assert schedule("dspark", conf, FLAT) == [3, 1]
    with pytest.raises(ValueError, match="SPS"):
        schedule("dspark", conf)
    with pytest.raises(ValueError, match="unknown policy"):
        schedule("greedy", conf)
    with pytest.raises(ValueError, match="SPS"):
        schedule("dspark-async", conf, capacity=4)


def test_async_capacity_is_an_unconstrained_search_and_the_round_takes_the_top_k():
    jagged = SpsTable((1, 2, 3, 4, 5, 6), (10.0, 10.0, 1.0, 10.0, 10.0, 10.0))
    # Algorithm 1 stops at the cliff at B=3; the global search sees past it (B=5: anchor + 4 drafts)
    assert prefix_schedule([[0.9, 0.9, 0.9, 0.9]], jagged) == [1]
    assert batch_capacity([[0.9, 0.9, 0.9, 0.9]], jagged) == 5
    # top-K over fresh survival: a = [0.9, 0.45] and [0.8, 0.72, 0.36]; K = 3 takes 0.9, 0.8, 0.72
    assert top_k_schedule([[0.9, 0.5], [0.8, 0.9, 0.5]], 3) == [1, 2]
    assert top_k_schedule([[0.9, 0.5], [0.8, 0.9, 0.5]], 0) == [0, 0]
    assert top_k_schedule([[0.9, 0.5], [0.8, 0.9, 0.5]], 99) == [2, 3]
    # the capacity counts every anchor: 2 requests and capacity 5 leave 3 draft tokens; no history: anchors only
    conf = [[0.9, 0.5], [0.8, 0.9, 0.5]]
    assert schedule("dspark-async", conf, FLAT, capacity=5) == [1, 2]
    assert schedule("dspark-async", conf, FLAT, capacity=None) == [0, 0]


def test_mixed_policies_share_one_batch():
    knee = SpsTable(tuple(range(1, 65)), tuple(100.0 * min(1.0, 8 / b) for b in range(1, 65)))
    conf = [[0.9] * 7, [0.9] * 4, [0.9, 0.9]]
    # the fixed request alone fills the free part of the curve (B=8), so dspark admits less than it would alone
    alone = schedule("dspark", conf[1:], knee)
    mixed = schedule(["fixed", "dspark", "autoregressive"], conf, knee)
    assert alone == [4, 2] and mixed == [7, 2, 0]
    assert schedule(["threshold", "fixed"], [[0.9, 0.3], [0.1]], threshold=0.5) == [1, 1]
    with pytest.raises(ValueError, match="one policy per request"):
        schedule(["fixed"], conf)


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


@settings(max_examples=200, deadline=None)
@given(confs, tables, st.integers(0, 80))
def test_async_lengths_are_prefixes_within_capacity(conf, sps, capacity):
    lengths = schedule("dspark-async", conf, sps, capacity=capacity)
    assert all(0 <= n <= len(c) for n, c in zip(lengths, conf))
    assert sum(lengths) <= max(0, capacity - len(conf))
    cap = batch_capacity(conf, sps)
    assert len(conf) <= cap <= len(conf) + sum(len(c) for c in conf)
    assert theta(conf, top_k_schedule(conf, cap - len(conf)), sps) >= theta(conf, [0] * len(conf), sps)


# -- Appendix A: the early stop is what keeps the scheduler lossless ---------------------------------------------

# Two-token vocabulary {A=0, B=1}, one request, gamma 2. Target and draft distributions at the first position:
P_T = torch.tensor([0.7, 0.3])
P_D = torch.tensor([0.5, 0.5])
APPX_A = SpsTable((1, 2, 3), (1.0, 0.5, 0.45))
C1 = 0.8  # = sum min(p_t, p_d): calibrated
C2 = {0: 0.9, 1: 0.0}  # the Markov confidence of draft 2 depends on the realised draft 1


def retrospective_schedule(conf, sps):
    """Algorithm 1 without the early stop: the global argmax over every candidate prefix (biased)."""
    cand = sorted(((a, r, j) for r, c in enumerate(conf) for j, a in enumerate(survival(c), 1)), key=lambda x: -x[0])
    lengths, best_lengths = [0] * len(conf), [0] * len(conf)
    B, tau = len(conf), float(len(conf))
    best = tau * sps(B)
    for a, r, j in cand:
        B, tau, lengths[r] = B + 1, tau + a, j
        if tau * sps(B) > best:
            best, best_lengths = tau * sps(B), list(lengths)
    return best_lengths


def first_tokens(scheduler, n=20_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.multinomial(P_D.expand(2, 2), 1, generator=g).squeeze(1)  # two draft tokens
        (ell,) = scheduler([[C1, C2[int(x[0])]]])
        target = torch.stack([P_T, P_T, P_T])
        v = verify(x[:ell], P_D.expand(ell, 2), target[: ell + 1], g)
        out.append(v.tokens[0])
    return torch.bincount(torch.tensor(out), minlength=2)


def test_appendix_a_counterexample_retrospective_scheduler_is_biased():
    assert retrospective_schedule([[C1, C2[0]]], APPX_A) == [2]
    assert retrospective_schedule([[C1, C2[1]]], APPX_A) == [0]
    counts = first_tokens(lambda c: retrospective_schedule(c, APPX_A))
    assert chisquare(counts.numpy(), (P_T * counts.sum()).numpy()).pvalue < 1e-6
    assert counts[0] / counts.sum() == pytest.approx(0.85, abs=0.01)  # the paper's biased (0.85, 0.15)


def test_appendix_a_counterexample_algorithm_1_is_lossless():
    assert prefix_schedule([[C1, C2[0]]], APPX_A) == [0]  # Theta_1 < Theta_0: stop before looking at c_2
    counts = first_tokens(lambda c: prefix_schedule(c, APPX_A))
    assert chisquare(counts.numpy(), (P_T * counts.sum()).numpy()).pvalue > 1e-3


def test_appendix_a_counterexample_async_capacity_from_old_rounds_is_lossless():
    # the unconstrained search runs on confidences from two rounds back (an independent earlier draw), so the
    # capacity cannot depend on this round's draft tokens; this round takes its top-K fresh candidates
    g = torch.Generator().manual_seed(1)
    history = []

    def scheduler(conf):
        old = torch.randint(0, 2, (1,), generator=g).item()
        history.append(batch_capacity([[C1, C2[old]]], APPX_A))
        return schedule("dspark-async", conf, APPX_A, capacity=history[-1])

    counts = first_tokens(scheduler)
    assert set(history) == {1, 3}  # the capacity did vary: anchors only, or anchor + both drafts
    assert chisquare(counts.numpy(), (P_T * counts.sum()).numpy()).pvalue > 1e-3
