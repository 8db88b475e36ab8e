"""Decoder: the propose -> verify -> commit loop, its finish reasons, errors and stats (tiny models)."""

from __future__ import annotations

import pytest

from dspark.core.config import EngineConfig
from dspark.core.decoding import Decoder
from dspark.core.draft_lm import DraftModelProposer
from dspark.core.engine import ContextLengthError, TargetEngine
from dspark.core.sampling import SamplingParams

from conftest import tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def engines(max_requests=4, max_context=64):
    cfg = EngineConfig(max_requests=max_requests, max_context=max_context)
    target = TargetEngine(cfg, model=tiny_model(seed=0))
    draft = TargetEngine(cfg, model=tiny_model(seed=1))
    return target, draft


def test_speculative_greedy_equals_plain_with_more_requests_than_slots():
    target, draft = engines(max_requests=2)
    prompts = [[3, 4, 5], [6], [7, 8, 9, 10, 11], [12, 13]]
    plain = Decoder(target).generate(prompts, GREEDY)
    spec = Decoder(target, DraftModelProposer(draft), num_draft=3).generate(prompts, GREEDY)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in spec)
    assert target.active == 0 and draft.active == 0  # every slot released


def test_self_draft_accepts_everything_and_stats_add_up():
    target, _ = engines()
    selfdraft = TargetEngine(target.config, model=target.model)
    (c,) = Decoder(target, DraftModelProposer(selfdraft), num_draft=4).generate([[3, 4]], GREEDY)
    s = c.stats
    # first token comes from prefill; 11 more in rounds of 5 (4 accepted + bonus), the last one capped
    assert s.rounds == 3 and s.accepted == s.scheduled and s.tau == pytest.approx(11 / 3)
    assert s.accepted_per_position == [2, 2, 2, 2]  # the third round had no room left to draft
    assert s.drafted >= s.scheduled


def test_stop_token_and_eos_finish_with_stop():
    target, _ = engines()
    free = Decoder(target).generate([[3, 4]], GREEDY)[0].token_ids
    stop_at = free[4]
    c = Decoder(target).generate([[3, 4]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(stop_at,)))[0]
    assert c.finish_reason == "stop" and c.token_ids == free[: free.index(stop_at) + 1]
    c = Decoder(target, eos_token_ids=(stop_at,)).generate([[3, 4]], SamplingParams(temperature=0, max_tokens=12))[0]
    assert c.finish_reason == "stop" and c.token_ids[-1] == stop_at


def test_context_end_finishes_with_length():
    target, draft = engines(max_context=10)
    c = Decoder(target, DraftModelProposer(draft), num_draft=4).generate(
        [[3, 4, 5]], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    )[0]
    assert c.finish_reason == "length" and len(c.prompt_ids) + len(c.token_ids) == 11  # last token needs no cache slot
    assert target.active == 0


def test_bad_requests_are_rejected_and_others_keep_running():
    target, _ = engines(max_context=16)
    dec = Decoder(target)
    ok = dec.add_request([3, 4], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        dec.add_request([], GREEDY)
    with pytest.raises(ContextLengthError, match="max_context"):
        dec.add_request(list(range(2, 18)), GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        dec.add_request([3, 10_000], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    done = []
    while dec.has_work:
        done += dec.step()
    assert [c.request_id for c in done] == [ok] and len(done[0].token_ids) == 12


def test_abort_frees_slots_mid_generation():
    target, draft = engines(max_requests=2)
    dec = Decoder(target, DraftModelProposer(draft), num_draft=2)
    a = dec.add_request([3, 4], GREEDY)
    b = dec.add_request([5, 6], GREEDY)
    c = dec.add_request([7, 8], GREEDY)  # waits for a slot
    dec.step()
    aborted = dec.abort(a)
    assert aborted.finish_reason == "abort" and target.active == 1 and draft.active <= 1
    assert dec.abort("nope") is None
    done = []
    while dec.has_work:
        done += dec.step()
    assert sorted(x.request_id for x in done) == sorted([b, c])
    assert target.active == 0 and draft.active == 0


def test_seeded_sampling_is_reproducible():
    target, draft = engines()
    sp = SamplingParams(temperature=1.0, max_tokens=10, seed=7, ignore_eos=True)
    one = Decoder(target, DraftModelProposer(draft), num_draft=3).generate([[3, 4]], sp)[0].token_ids
    two = Decoder(target, DraftModelProposer(draft), num_draft=3).generate([[3, 4]], sp)[0].token_ids
    assert one == two


def test_ignore_eos_still_honours_explicit_stop_tokens():
    target, _ = engines()
    free = Decoder(target).generate([[3, 4]], GREEDY)[0].token_ids
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=(free[3],))
    c = Decoder(target, eos_token_ids=(free[1],)).generate([[3, 4]], sp)[0]
    assert c.finish_reason == "stop" and c.token_ids == free[: free.index(free[3]) + 1]
