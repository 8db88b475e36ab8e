"""Deciding how much to draft before drafting (core/planner.py) and the decode loop that uses it: the drafter's cost
table, the caps, the confidence forecast, the round that makes no draft call, and exactness with planning on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core_decoding_stats import (
    _tiny_llama,
    assert_samples_follow_the_target,
)

from dspark.core.config import EngineConfig
from dspark.core.decoding import Decoder
from dspark.core.engine import TargetEngine
from dspark.core.planner import ConfidenceForecast, DraftCost, VerifyRowCost, plan_drafts, round_seconds
from dspark.core.proposer import Proposal
from dspark.core.sampling import SamplingParams
from dspark.core.scheduler import SpsTable, expected_tokens, prefix_schedule, schedule, throughput
from dspark.drafter.model import DSparkDrafter
from dspark.drafter.proposer import DSparkProposer

LAYERS = (0, 1, 2)
FLAT = SpsTable((1, 256), (100.0, 100.0))  # a GPU-like verifier: B query tokens cost what one costs
KNEE = SpsTable(tuple(range(1, 257)), tuple(100.0 * min(1.0, 24 / b) for b in range(1, 257)))


def cost(backbone_s: float, per_position_s: float, gamma: int = 4, rows=(1, 2, 4, 8, 16)) -> DraftCost:
    """A table that grows with rows: each row adds 10% of the one-row time."""
    return DraftCost(
        rows,
        tuple(
            tuple((backbone_s + k * per_position_s) * (1 + 0.1 * (r - 1)) for k in range(1, gamma + 1)) for r in rows
        ),
    )


# -- the cost table -----------------------------------------------------------------------------------------------


def test_draft_cost_lookup():
    c = DraftCost((1, 4), ((0.010, 0.012), (0.020, 0.030)), overhead_s=0.001)
    assert c(0, 2) == 0 and c(3, 0) == 0  # no rows or no positions: no call at all
    assert c(1, 1) == pytest.approx(0.011)
    assert c(2, 2) == pytest.approx(0.031)  # between measured R: the next measured point (pessimistic)
    assert c(8, 1) == pytest.approx(0.001 + 0.040)  # past the last R: linear
    assert c(1, 9) == pytest.approx(0.013)  # past gamma: the deepest measured K
    assert DraftCost.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="ascending"):
        DraftCost((4, 1), ((1.0,), (1.0,)))
    with pytest.raises(ValueError, match="same K"):
        DraftCost((1, 2), ((1.0,), (1.0, 2.0)))


# -- the caps -------------------------------------------------------------------------------------------------------


def test_no_drafting_where_it_cannot_pay():
    # a drafter as slow as the verifier and confidences of 0.3: an autoregressive round is faster
    caps = plan_drafts([[0.3] * 4] * 3, FLAT, cost(0.010, 0.002))
    assert caps == [0, 0, 0]


def test_cheap_drafting_of_good_tokens_drafts_everything():
    caps = plan_drafts([[0.9] * 4] * 3, FLAT, cost(1e-5, 1e-6))
    assert caps == [4, 4, 4]


def test_load_prunes_the_caps():
    light = plan_drafts([[0.8, 0.6, 0.5, 0.4]], KNEE, cost(0.0005, 0.0002))
    heavy = plan_drafts([[0.8, 0.6, 0.5, 0.4]] * 16, KNEE, cost(0.0005, 0.0002))
    assert light == [4]
    assert max(heavy) < 4 and sum(heavy) < 16 * 4


def test_caps_never_exceed_the_forecast():
    f = [[0.9, 0.9], [0.9], []]
    caps = plan_drafts(f, FLAT, cost(1e-5, 1e-6))
    assert all(c <= len(x) for c, x in zip(caps, f))
    assert caps[2] == 0


def test_round_seconds_adds_the_draft_call():
    c = cost(0.010, 0.002)
    assert round_seconds(FLAT, 5, c, 0, 0) == pytest.approx(0.01)
    assert round_seconds(FLAT, 5, c, 1, 2) == pytest.approx(0.01 + 0.014)


confidences = st.lists(st.lists(st.floats(0.01, 0.99), min_size=0, max_size=6), min_size=1, max_size=8)

# a CPU-like verifier with a bump: steps of 2-3 query tokens are slow, steps of 4-8 faster than them
BUMPY = SpsTable((1, 2, 3, 4, 8, 16), (100.0, 40.0, 40.0, 60.0, 60.0, 40.0))


def test_dspark_plans_only_what_algorithm_1_will_verify():
    """Past a bump of the SPS curve: drafting 7 good tokens would pay if all were verified (B = 8 is faster than B = 2)
    so the unconstrained search drafts them, but Algorithm 1 stops at the first one (B = 2 is slower than
    B = 1 for 0.9 more tokens) and verifies none; the dspark plan sees that and drafts nothing."""
    f, c = [[0.9] * 7], cost(0.001, 0.0002, gamma=7)
    assert plan_drafts(f, BUMPY, c) == [7]
    assert prefix_schedule(f, BUMPY, draft_s=c(1, 7)) == [0]
    assert plan_drafts(f, BUMPY, c, early_stop=True) == [0]


@settings(max_examples=300, deadline=None)
@given(conf=confidences, draft_ms=st.floats(0.0, 20.0), margin=st.floats(1.0, 1.2))
def test_a_dspark_plan_pays_as_algorithm_1_verifies_it(conf, draft_ms, margin):
    """Forecasts that come true: what Algorithm 1 then verifies of the planned drafts, with their drafting time sunk,
    beats not drafting by the margin whenever the plan drafts anything."""
    c = cost(draft_ms / 1000, draft_ms / 5000, gamma=6)
    caps = plan_drafts(conf, BUMPY, c, margin=margin, early_stop=True)
    assert all(0 <= k <= len(x) for k, x in zip(caps, conf))
    if not any(caps):
        return
    drafted = [x[:k] for x, k in zip(conf, caps)]
    d = c(sum(1 for k in caps if k), max(caps))
    lengths = prefix_schedule(drafted, BUMPY, draft_s=d)
    tau = sum(expected_tokens(x, n) for x, n in zip(conf, lengths))
    assert throughput(tau, BUMPY, len(conf) + sum(lengths), d) > margin * throughput(len(conf), BUMPY, len(conf)) * (
        1 - 1e-9
    )


# -- Algorithm 1 with the drafting time, and the cap that is not binding ----------------------------------------------


@settings(max_examples=300, deadline=None)
@given(conf=confidences, draft_ms=st.floats(0.0, 30.0), knee=st.integers(1, 40), slack=st.integers(0, 3))
def test_a_cap_that_is_not_binding_changes_nothing(conf, draft_ms, knee, slack):
    """Algorithm 1 over blocks drafted only up to caps gives the same prefix lengths as over the full blocks
    whenever each cap reaches one past the full run's length (the candidate that stopped it is still there)."""
    sps = SpsTable(tuple(range(1, 129)), tuple(50.0 * min(1.0, knee / b) for b in range(1, 129)))
    full = prefix_schedule(conf, sps, draft_s=draft_ms / 1000)
    caps = [min(len(c), n + 1 + slack) for c, n in zip(conf, full)]
    capped = prefix_schedule([c[:k] for c, k in zip(conf, caps)], sps, draft_s=draft_ms / 1000)
    assert capped == full


@settings(max_examples=200, deadline=None)
@given(conf=confidences, draft_ms=st.floats(0.0, 30.0))
def test_a_sunk_drafting_cost_only_lengthens_the_verified_prefix(conf, draft_ms):
    """A sunk drafting cost only lengthens what Algorithm 1 verifies (each token's share of the round's fixed
    cost shrinks); with draft_s = 0 it is the paper's Theta = tau * SPS(B)."""
    with_cost = prefix_schedule(conf, KNEE, draft_s=draft_ms / 1000)
    without = prefix_schedule(conf, KNEE)
    assert sum(with_cost) >= sum(without)
    assert schedule("dspark", conf, KNEE) == without


# -- the forecast -----------------------------------------------------------------------------------------------------


def test_forecast_from_earlier_rounds():
    f = ConfidenceForecast(gamma=4, prior=0.0)
    assert f.forecast("a", 4) is None  # nothing observed: draft in full
    f.observe("a", [0.8, 0.5], verified=2, accepted=1)  # position 1 accepted, position 2 rejected
    assert f.ratio(0) == pytest.approx(1 / 0.8) and f.ratio(1) == 0.0
    # clipped at 0.99; past what was drafted the last confidence repeats, uncorrected where nothing was reached
    assert f.forecast("a", 4) == pytest.approx([0.99, 0.0, 0.5, 0.5])
    assert f.forecast("b", 2) == pytest.approx([0.99, 0.0])  # a new request: the mean of all drafts
    f.release("a")
    assert f.forecast("a", 1) == pytest.approx([0.99])


def test_a_request_that_sits_out_drifts_back_to_the_mean():
    """A request whose last draft was poor is not stuck with it: every round it drafts nothing moves its forecast
    halfway to the mean of all drafts per half_life rounds; a fresh draft restarts from its own confidences."""
    f = ConfidenceForecast(gamma=2, prior=1e9, half_life=2.0)  # prior: calibration ratios stay 1
    f.observe("good", [0.9, 0.9], verified=2, accepted=2)
    f.observe("poor", [0.1, 0.1], verified=2, accepted=0)
    assert f.forecast("poor", 2) == pytest.approx([0.1, 0.1])
    f.idle("poor")
    f.idle("poor")  # one half-life: halfway from 0.1 to the mean 0.5
    assert f.forecast("poor", 2) == pytest.approx([0.3, 0.3])
    for _ in range(40):
        f.idle("poor")
    assert f.forecast("poor", 1) == pytest.approx([0.5], abs=1e-4)
    assert f.forecast("good", 2) == pytest.approx([0.9, 0.9])  # the others are untouched
    f.observe("poor", [0.2, 0.2], verified=1, accepted=0)
    assert f.forecast("poor", 2) == pytest.approx([0.2, 0.2])
    f.idle("new")  # a request that never drafted has nothing to drift from
    assert f.forecast("new", 2) == pytest.approx(f._mean())


def test_forecast_counts_only_reached_positions():
    f = ConfidenceForecast(gamma=4, prior=0.0)
    f.observe("a", [0.5, 0.5, 0.5], verified=3, accepted=0)  # position 1 rejected: 2 and 3 were never reached
    assert f._predicted == [0.5, 0.0, 0.0, 0.0]
    f.observe("a", [0.5, 0.5, 0.5], verified=0, accepted=0)  # drafted, nothing verified: confidences only
    assert f._predicted == [0.5, 0.0, 0.0, 0.0] and f._conf_n == [2, 2, 2, 0]


# -- the decode loop with planning on -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target_model():
    return _tiny_llama(seed=0, hidden=32, layers=2, heads=4, kv_heads=2)


class CountingProposer(DSparkProposer):
    def __init__(self, drafter):
        super().__init__(drafter)
        self.calls, self.rows = 0, 0

    def propose(self, requests):
        self.calls += 1
        self.rows += len(requests)
        assert all(r.num_draft > 0 for r in requests), "a request capped at 0 is never sent"
        return super().propose(requests)


def decoder(model, policy, draft_cost, max_requests=16, sps=KNEE):
    engine = TargetEngine(EngineConfig(max_requests=max_requests, max_context=24, feature_layers=LAYERS), model=model)
    torch.manual_seed(1)
    drafter = DSparkDrafter.from_target_model(model, feature_layers=LAYERS, n_layer=1, gamma=4, markov_rank=8)
    drafter.conf_temperature.fill_(0.3)  # spread the untrained confidences so budgets vary
    proposer = CountingProposer(drafter)
    proposer.draft_cost = draft_cost
    return Decoder(engine, proposer, num_draft=4, policy=policy, sps=sps)


PROMPTS = [[3, 4, 5], [6], [7, 1, 2, 3], [4, 4]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def plain(model, prompts, sp):
    return Decoder(TargetEngine(EngineConfig(max_requests=4, max_context=24), model=model)).generate(prompts, sp)


def test_a_round_with_nothing_worth_drafting_makes_no_draft_call(target_model):
    dec = decoder(target_model, "dspark", cost(10.0, 1.0), max_requests=4, sps=FLAT)  # drafting takes seconds
    out = dec.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in out] == [c.token_ids for c in plain(target_model, PROMPTS, GREEDY)]
    # the first round drafts (nothing observed yet); afterwards every round is an autoregressive one
    assert dec.proposer.calls == 1
    assert sum(c.stats.rounds for c in out) > 4 * 5


@pytest.mark.parametrize("policy", ["dspark", "dspark-async"])
def test_planned_drafting_is_greedy_exact_and_catches_up_the_context(target_model, policy):
    """Cheap drafting: requests draft some rounds and skip others; a request that skipped rounds sends all the
    target features it missed in one batch (the proposer checks they cover its whole history)."""
    dec = decoder(target_model, policy, cost(0.002, 0.0005), max_requests=4)
    out = dec.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in out] == [c.token_ids for c in plain(target_model, PROMPTS, GREEDY)]
    drafted = sum(c.stats.drafted for c in out)
    rounds = sum(c.stats.rounds for c in out)
    assert 0 < drafted < 4 * rounds  # planning drafted less than whole blocks every round
    assert dec.proposer.rows < rounds  # some request-rounds were not sent to the proposer at all


@pytest.mark.parametrize("policy", ["dspark", "dspark-async"])
def test_planned_drafting_keeps_the_target_distribution(target_model, policy):
    dec = decoder(target_model, policy, cost(0.002, 0.0005))
    done = assert_samples_follow_the_target(target_model, dec, 3000)
    drafted = sum(c.stats.drafted for c in done)
    scheduled = sum(c.stats.scheduled for c in done)
    rounds = sum(c.stats.rounds for c in done)
    assert 0 < scheduled <= drafted < 4 * rounds


def test_a_plan_must_beat_not_drafting_by_the_margin():
    f, c = [[0.5, 0.3]], cost(0.0015, 0.0002)
    assert plan_drafts(f, FLAT, c) != [0]  # a little faster than not drafting ...
    assert plan_drafts(f, FLAT, c, margin=1.5) == [0]  # ... but not 50% faster


def test_a_plan_is_priced_as_the_engine_pads_its_rows():
    """The verify step pads every row to the longest block: caps [3, 0, 0, 0] verify 7 tokens but compute 16."""
    steps = [1.0 if b <= 7 else 1.5 if b <= 12 else 2.0 for b in range(1, 33)]  # seconds per step
    sps = SpsTable(tuple(range(1, 33)), tuple(1 / t for t in steps))
    ragged = [[0.9, 0.9, 0.9], [0.1], [0.1], [0.1]]
    assert plan_drafts(ragged, sps, None) == [3, 0, 0, 0]  # priced by the sum: 7 tokens, as cheap as 4
    assert plan_drafts(ragged, sps, None, padded_rows=4) == [0, 0, 0, 0]  # 4 x 4 tokens: 2 s for 6.4 tokens
    even = [[0.9, 0.9, 0.9]] * 4
    assert plan_drafts(even, sps, None, padded_rows=4) == [2, 2, 2, 2]  # 4 x 3 tokens: 1.5 s for 10.8 tokens
    assert plan_drafts(ragged, sps, None, padded_rows=4, early_stop=True) == [0, 0, 0, 0]


def test_what_drafting_rows_cost_the_verify_step_beyond_the_table_prunes_the_plan():
    """FLAT prices 4 rows of 3 tokens as 4 rows of 1 (10 ms); rows that verify drafts costing 6 ms more each make
    drafting 0.5-confidence tokens a loss."""
    f = [[0.5, 0.5]] * 4
    assert plan_drafts(f, FLAT, cost(0.0005, 0.0002)) == [2, 2, 2, 2]
    assert plan_drafts(f, FLAT, cost(0.0005, 0.0002), verify_row_s=0.006) == [0, 0, 0, 0]
    # rows others already draft pay it whether or not these draft: it does not stop the plan
    assert plan_drafts([[0.9, 0.9]], FLAT, None, base_rows=3, base_tokens=9, base_tau=6, verify_row_s=0.006) == [2]


def test_what_every_verify_step_costs_beyond_the_table_makes_drafting_relatively_cheaper():
    """The table prices a plain step at 10 ms and drafting at 12 ms: not worth it. If every step really takes 60 ms
    (rows the profile never had), the same draft call adds a fifth, for 65% more tokens."""
    f, c = [[0.5, 0.3]], cost(0.01, 0.001)
    assert plan_drafts(f, FLAT, c) == [0]
    assert plan_drafts(f, FLAT, c, verify_base_s=0.05) == [2]
    assert plan_drafts(f, FLAT, c, verify_base_s=0.05, early_stop=True) == [2]


def test_verify_row_cost_prices_every_step_with_what_plain_rounds_paid_beyond_the_table():
    learn = VerifyRowCost(alpha=0.5)
    assert learn.round_s == 0.0  # nothing seen
    for _ in range(20):
        learn.observe(0.030, 0.020, draft_rows=0)
    assert learn.round_s == pytest.approx(0.010)
    for _ in range(40):
        learn.observe(0.015, 0.020, draft_rows=0)  # a table that overprices is left as it is
    assert learn.round_s == 0.0


def test_verify_row_cost_learns_the_extra_seconds_of_drafting_rows():
    learn = VerifyRowCost(alpha=0.2)
    learn.observe(0.030, 0.025, draft_rows=2)  # no plain round seen yet: nothing to compare with
    assert learn.row_s == 0 and learn.base_s is None
    for _ in range(60):
        learn.observe(0.027, 0.025, draft_rows=0)  # every round pays 2 ms beyond the table
        learn.observe(0.027 + 2 * 0.003, 0.0255, draft_rows=2)  # drafted rows: 3 ms each beyond that
    assert learn.base_s == pytest.approx(0.002, abs=1e-4)
    assert learn.row_s == pytest.approx(0.003 - 0.00025, abs=2e-4)
    learn.observe(0.020, 0.025, draft_rows=1)  # faster than plain: never a negative cost
    assert learn.row_s >= 0


def test_the_decode_loop_prices_rounds_with_what_drafting_rows_cost_it(target_model):
    """The loop compares each round's verify time with its SPS price; the planner gets the learned per-row cost."""
    dec = decoder(target_model, "dspark", cost(0.0005, 0.0002))
    props = [Proposal(torch.tensor([5, 6]), torch.zeros(2, 8)), Proposal.empty(8)]
    plain = [Proposal.empty(8)] * 2
    price = 1 / dec.sps(2)
    for _ in range(50):
        dec._learn_verify_cost({None: [0, 1]}, plain, price + 0.001)
        dec._learn_verify_cost({None: [0, 1]}, props, 1 / dec.sps(4) + 0.001 + 0.004)
    assert dec._verify_cost.row_s == pytest.approx(0.004, abs=3e-4)
    dec._learn_verify_cost({"a": [0], "b": [1]}, props, 1.0)  # two replicas: not one table's step, not learned
    assert dec._verify_cost.row_s == pytest.approx(0.004, abs=3e-4)


def test_the_decode_loop_gives_algorithm_1_the_learned_step_overhead_as_sunk_time(target_model, monkeypatch):
    """The overhead every verify step pays beyond the table is sunk like the draft call: Algorithm 1 gets both."""
    dec = decoder(target_model, "dspark", cost(0.0005, 0.0002))
    for _ in range(50):
        dec._learn_verify_cost({None: [0]}, [Proposal.empty(8)], 1 / dec.sps(1) + 0.02)
    seen = []
    real = dec._schedule
    monkeypatch.setattr(dec, "_schedule", lambda *a: seen.append(a[-1]) or real(*a))
    dec.generate([[3, 4, 5]], GREEDY)
    assert seen and seen[0] >= 0.02  # the first round: the draft call plus the learned 20 ms
    assert dec._verify_base_s({"a": [0], "b": [1]}) == 0.0  # two replicas: nothing learned applies


def test_a_round_of_r_requests_is_priced_with_the_table_measured_in_r_rows(target_model):
    """The packed table says extra query tokens are free; the one measured in 4 rows says every token beyond the
    anchors costs as much as a whole step. Four requests verify no draft; one request alone verifies whole blocks."""
    steep = SpsTable(tuple(range(4, 33)), tuple(100.0 if b == 4 else 10.0 for b in range(4, 33)))
    table = SpsTable(FLAT.batch_tokens, FLAT.steps_per_s, ((4, steep),))
    dec = decoder(target_model, "dspark", None, sps=table)
    four = dec.generate(PROMPTS, GREEDY)  # all four at once, none drafting: 4 rows every round
    assert [c.token_ids for c in four] == [c.token_ids for c in plain(target_model, PROMPTS, GREEDY)]
    assert sum(c.stats.scheduled for c in four) == 0
    alone = dec.generate(PROMPTS[:1], GREEDY)
    assert alone[0].stats.scheduled > 0
