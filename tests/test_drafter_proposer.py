"""DSparkProposer inside the decode loop: exactness does not depend on the drafter, features reach it."""

from __future__ import annotations

import pytest
import torch

from dspark.core.config import EngineConfig
from dspark.core.decoding import Decoder
from dspark.core.engine import TargetEngine
from dspark.core.proposer import DraftRequest
from dspark.core.sampling import SamplingParams
from dspark.drafter.model import DSparkDrafter
from dspark.drafter.proposer import DSparkProposer

from conftest import tiny_model


def setup(gamma=4, max_requests=2):
    model = tiny_model(seed=0)
    layers = (0, 1, 2)
    engine = TargetEngine(EngineConfig(max_requests=max_requests, max_context=64, feature_layers=layers), model=model)
    torch.manual_seed(1)
    drafter = DSparkDrafter.from_target_model(model, feature_layers=layers, n_layer=1, gamma=gamma, markov_rank=8)
    return engine, DSparkProposer(drafter)


def test_greedy_with_dspark_drafter_equals_plain():
    engine, proposer = setup()
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
    sp = SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True)
    plain = Decoder(engine).generate(prompts, sp)
    spec = Decoder(engine, proposer, num_draft=4).generate(prompts, sp)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert all(c.stats.scheduled > 0 for c in spec)
    assert proposer._ctx == {} and engine.active == 0  # released


def test_drafting_time_is_split_by_phase():
    """DraftTimes: every call counted, its context, backbone and head phases timed, no wire in process; a round that
    only absorbs features times its context alone."""
    engine, proposer = setup()
    dec = Decoder(engine, proposer, num_draft=4, policy="fixed")
    dec.generate([[3, 4, 5], [6, 7]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    t = proposer.times
    assert t.calls == dec.times.draft_calls > 0
    assert t.context_s > 0 and t.backbone_s > 0 and t.head_s > 0 and t.wire_s == 0
    assert t.total_s <= dec.times.draft_s  # the loop's draft time includes building the requests
    before = t.copy()
    feats = torch.randn(2, proposer.drafter.config.feature_size)
    proposer.propose([DraftRequest("only-context", [3, 4, 5], 0, SamplingParams(), feats)])
    spent = proposer.times.minus(before)
    assert spent.calls == 1 and spent.context_s > 0 and spent.backbone_s == spent.head_s == 0
    proposer.release("only-context")


def test_one_round_absorbs_every_requests_features_in_one_encode():
    """The features of several requests, encoded side by side in one pass, give each request the context it gets
    alone; a request whose features do not cover its committed tokens is refused before anything is absorbed."""
    _, proposer = setup()
    d, F = proposer.drafter, proposer.drafter.config.feature_size
    torch.manual_seed(5)
    feats = {"a": torch.randn(5, F), "b": torch.randn(2, F), "c": torch.randn(3, F)}
    reqs = [DraftRequest(k, list(range(1 + len(f))), 0, SamplingParams(), f) for k, f in feats.items()]
    calls = []
    encode = d.encode_context
    d.encode_context = lambda *a, **kw: calls.append(1) or encode(*a, **kw)
    proposer.propose(reqs)
    assert len(calls) == 1
    for k, f in feats.items():
        alone = encode(f[None])
        for got, want in zip(proposer._ctx[k].k + proposer._ctx[k].v, alone.k + alone.v):
            torch.testing.assert_close(got, want)
    more = {"a": torch.randn(1, F), "b": torch.randn(2, F)}  # the next round: a grows by 1, b by 2, c sits out
    grown = [DraftRequest(k, list(range(1 + len(feats[k]) + len(f))), 1, SamplingParams(), f) for k, f in more.items()]
    proposer.propose(grown)
    for k, f in more.items():
        alone = encode(torch.cat([feats[k], f])[None])
        for got, want in zip(proposer._ctx[k].k + proposer._ctx[k].v, alone.k + alone.v):
            torch.testing.assert_close(got, want)
    bad = DraftRequest("c", list(range(7)), 1, SamplingParams(), torch.randn(1, F))  # 3 + 1 != 6 tokens
    ok = DraftRequest("d", [3, 4], 0, SamplingParams(), torch.randn(1, F))
    with pytest.raises(ValueError, match="drafter context has 4 tokens but 6"):
        proposer.propose([ok, bad])
    assert "d" not in proposer._ctx and "d" not in proposer._rng and proposer._ctx["c"].length == 3
    for k in ("a", "b", "c"):
        proposer.release(k)


def test_proposals_carry_confidences_and_exact_q():
    engine, proposer = setup()
    sp = SamplingParams(temperature=1.0, max_tokens=10, seed=3, ignore_eos=True)
    dec = Decoder(engine, proposer, num_draft=3)
    seen = []
    real_propose = proposer.propose

    def spy(reqs):
        out = real_propose(reqs)
        seen.extend(zip(reqs, out))
        return out

    proposer.propose = spy
    dec.generate([[3, 4, 5]], sp)
    assert seen
    for req, p in seen:
        assert p.token_ids.shape == (req.num_draft,) and p.confidence.shape == (req.num_draft,)
        assert ((p.confidence > 0) & (p.confidence < 1)).all()
        torch.testing.assert_close(p.probs.sum(-1), torch.ones(req.num_draft))
        assert (p.probs[torch.arange(req.num_draft), p.token_ids] > 0).all()


def test_context_must_cover_every_token_before_the_anchor():
    engine, proposer = setup()
    feats = torch.zeros(2, proposer.drafter.config.feature_size)
    with pytest.raises(ValueError, match="precede the anchor"):
        proposer.propose([DraftRequest("r", [3, 4, 5, 6], 2, SamplingParams(), feats)])


def test_num_draft_above_gamma_is_an_error():
    engine, proposer = setup(gamma=2)
    feats = torch.zeros(3, proposer.drafter.config.feature_size)
    with pytest.raises(ValueError, match="gamma"):
        proposer.propose([DraftRequest("r", [3, 4, 5, 6], 3, SamplingParams(), feats)])
