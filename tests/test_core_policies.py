"""Every verification policy in the decode loop stays lossless (tiny models, DSpark drafter with confidences)."""

from __future__ import annotations

import pytest
import torch
from test_core_decoding_stats import (
    V,
    _tiny_llama,
    assert_samples_follow_the_target,
)

from dspark.core.config import EngineConfig
from dspark.core.decoding import Decoder
from dspark.core.engine import TargetEngine
from dspark.core.sampling import SamplingParams
from dspark.core.scheduler import SpsTable
from dspark.drafter.model import DSparkDrafter
from dspark.drafter.proposer import DSparkProposer

LAYERS = (0, 1, 2)
KNEE = SpsTable(tuple(range(1, 257)), tuple(100.0 * min(1.0, 24 / b) for b in range(1, 257)))  # free to B=24


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target_model():
    return _tiny_llama(seed=0, hidden=32, layers=2, heads=4, kv_heads=2)


def decoder(model, policy, max_requests=16, threshold=0.5):
    engine = TargetEngine(EngineConfig(max_requests=max_requests, max_context=24, feature_layers=LAYERS), model=model)
    torch.manual_seed(1)
    drafter = DSparkDrafter.from_target_model(model, feature_layers=LAYERS, n_layer=1, gamma=4, markov_rank=8)
    drafter.conf_temperature.fill_(0.3)  # spread the untrained confidences so budgets vary
    return Decoder(engine, DSparkProposer(drafter), num_draft=4, policy=policy, sps=KNEE, threshold=threshold)


@pytest.mark.parametrize("policy", ["dspark", "dspark-async", "threshold", "fixed", "autoregressive"])
def test_greedy_is_exact_under_every_policy(target_model, policy):
    prompts = [[3, 4, 5], [6], [7, 1, 2, 3], [4, 4]]
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    plain = Decoder(TargetEngine(EngineConfig(max_requests=4, max_context=24), model=target_model)).generate(
        prompts, sp
    )
    out = decoder(target_model, policy, max_requests=4).generate(prompts, sp)
    assert [c.token_ids for c in out] == [c.token_ids for c in plain]
    scheduled = sum(c.stats.scheduled for c in out)
    assert (scheduled == 0) == (policy == "autoregressive")


@pytest.mark.parametrize("policy", ["dspark", "dspark-async"])
def test_dspark_policy_prunes_under_load_and_keeps_the_target_distribution(target_model, policy):
    dec = decoder(target_model, policy)
    done = assert_samples_follow_the_target(target_model, dec, 3000)
    drafted = sum(c.stats.drafted for c in done)
    scheduled = sum(c.stats.scheduled for c in done)
    assert 0 < scheduled < drafted  # the scheduler verified some prefixes, not whole blocks
    assert V == target_model.config.vocab_size


def test_policy_is_overridable_per_request(target_model):
    prompts = [[3, 4, 5], [6], [7, 1, 2, 3], [4, 4]]
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    plain = Decoder(TargetEngine(EngineConfig(max_requests=4, max_context=24), model=target_model)).generate(
        prompts, sp
    )
    dec = decoder(target_model, "dspark", max_requests=4)
    ids = [dec.add_request(p, sp, policy=pol) for p, pol in zip(prompts, ["autoregressive", "fixed", None, "fixed"])]
    done = {}
    while dec.has_work:
        done.update((c.request_id, c) for c in dec.step())
    out = [done[i] for i in ids]
    assert [c.token_ids for c in out] == [c.token_ids for c in plain]
    assert out[0].stats.drafted == 0 and out[0].stats.scheduled == 0
    assert out[1].stats.scheduled == out[1].stats.drafted > 0  # fixed: every draft verified
    with pytest.raises(ValueError, match="unknown policy"):
        dec.add_request([1], sp, policy="eager")
    plain_dec = Decoder(TargetEngine(EngineConfig(max_requests=1, max_context=24), model=target_model))
    with pytest.raises(ValueError, match="SPS"):
        plain_dec.add_request([1], sp, policy="dspark-async")


def test_policy_needs_confidences_and_a_table(target_model):
    engine = TargetEngine(EngineConfig(max_requests=2, max_context=24), model=target_model)
    with pytest.raises(ValueError, match="SPS"):
        Decoder(engine, None, policy="dspark")
    with pytest.raises(ValueError, match="unknown policy"):
        Decoder(engine, None, policy="eager")
