"""End to end: speculative decoding through the whole Decoder (target engine + draft LM + verification +
continuous batching) produces exactly the target model's distribution, and greedy decoding is unchanged.

Tiny random-weight Llama models (vocabulary 8), built in memory: no weights are downloaded. The exact
target distribution comes from the target model's own full forward passes over every possible prefix.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

from dspark.core.config import EngineConfig
from dspark.core.decoding import Decoder
from dspark.core.draft_lm import DraftModelProposer
from dspark.core.engine import QueryBlock, TargetEngine
from dspark.core.sampling import SamplingParams, logits_to_probs

from conftest import transformers_greedy

V = 8
PROMPT = [3, 5, 1]
MAX_TOKENS = 5  # the first round drafts min(3, MAX_TOKENS - 2) = 3 tokens, so every draft position is used
N_REQUESTS = 6000
P_MIN = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_llama(seed: int, hidden: int, layers: int, heads: int, kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        initializer_range=0.2,  # peaked, clearly different target and draft distributions (0.02 is ~uniform)
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def target_model():
    return _tiny_llama(0, hidden=32, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def draft_model():
    return _tiny_llama(1, hidden=16, layers=1, heads=2, kv_heads=1)


def _cfg(max_requests: int, max_context: int = 16) -> EngineConfig:
    return EngineConfig(max_requests=max_requests, max_context=max_context, threads=1)


def _speculative(target_model, draft_model, max_requests: int, max_context: int = 16, num_draft: int = 3):
    engine = TargetEngine(_cfg(max_requests, max_context), model=target_model)
    proposer = DraftModelProposer(TargetEngine(_cfg(max_requests, max_context), model=draft_model))
    return Decoder(engine, proposer, num_draft=num_draft)


@torch.inference_mode()
def _exact_joint(model, prompt: list[int], n: int, params: SamplingParams) -> torch.Tensor:
    """(V,)*n float64: the target's exact probability of each n-token continuation of `prompt`."""
    rest = torch.tensor(list(itertools.product(range(V), repeat=n - 1)), dtype=torch.long).reshape(-1, n - 1)
    ids = torch.cat([torch.tensor(prompt).expand(len(rest), -1), rest], 1)
    logits = model(ids).logits[:, len(prompt) - 1 :]  # (V^(n-1), n, V): next-token logits after each prefix
    probs = logits_to_probs(logits, params).double().reshape((V,) * (n - 1) + (n, V))
    joint = probs[(0,) * (n - 1) + (0,)]  # (V,)
    for j in range(1, n):
        # next-token distribution after t1..tj: any row that starts with t1..tj, e.g. the one padded with 0s
        cond = probs[(slice(None),) * j + (0,) * (n - 1 - j) + (j,)]  # (V,)*j + (V,)
        joint = joint[..., None] * cond
    return joint


def _chi2_pvalue(samples: list[tuple[int, ...]], exact: torch.Tensor) -> float:
    """Goodness of fit of samples (index tuples into `exact`); cells expected < 5 times are pooled."""
    n = len(samples)
    counts = torch.zeros(exact.numel(), dtype=torch.float64)
    flat = torch.tensor([sum(t * V**i for i, t in enumerate(reversed(s))) for s in samples])
    counts.index_add_(0, flat, torch.ones(n, dtype=torch.float64))
    expected = exact.flatten() * n
    if bool((counts[expected == 0] > 0).any()):
        return 0.0  # an outcome the target cannot produce
    big = expected >= 5
    obs = counts[big].tolist() + [float(counts[~big].sum())]
    exp = expected[big].tolist() + [float(expected[~big].sum())]
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


def _marginal(joint: torch.Tensor, keep: tuple[int, ...]) -> torch.Tensor:
    drop = [d for d in range(joint.dim()) if d not in keep]
    return joint.sum(drop) if drop else joint


def assert_samples_follow_the_target(
    model, dec, n: int, prompt=(3, 4, 5), max_tokens: int = 4, keeps=((0, 1), (1, 2), (2, 3))
) -> list:
    """n seeded T=1 requests of `prompt` through decoder `dec`; asserts that the joint of each tuple of output
    positions in `keeps` is the target's exact one (chi-square); returns the completions."""
    params = [SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=i) for i in range(n)]
    done = dec.generate([list(prompt)] * n, params)
    joint = _exact_joint(model, list(prompt), max_tokens, SamplingParams(temperature=1.0))
    outputs = [tuple(c.token_ids) for c in done]
    for keep in keeps:
        pv = _chi2_pvalue([tuple(o[i] for i in keep) for o in outputs], _marginal(joint, keep))
        assert pv > P_MIN, f"tokens {keep}: p-value {pv:.2e}"
    return done


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_speculative_decoding_matches_target_distribution(target_model, draft_model, temperature, top_p):
    decoder = _speculative(target_model, draft_model, max_requests=16)  # 16 slots << N: continuous batching
    # consecutive seeds: make_generator hashes them, so the requests' streams are unrelated
    params = [
        SamplingParams(temperature=temperature, top_p=top_p, max_tokens=MAX_TOKENS, ignore_eos=True, seed=i)
        for i in range(N_REQUESTS)
    ]
    done = decoder.generate([PROMPT] * N_REQUESTS, params)
    assert all(c.finish_reason == "length" and len(c.token_ids) == MAX_TOKENS for c in done)
    assert not decoder.has_work and decoder.engine.active == 0 and decoder.proposer.engine.active == 0

    # the run really exercised acceptances at every draft position, rejections and bonus tokens
    rounds = sum(c.stats.rounds for c in done)
    accepted = sum(c.stats.accepted for c in done)
    per_pos = [
        sum(c.stats.accepted_per_position[i] for c in done if len(c.stats.accepted_per_position) > i) for i in range(3)
    ]
    assert 0 < accepted < sum(c.stats.scheduled for c in done)
    assert all(n > 50 for n in per_pos), per_pos  # [2] > 0: all 3 drafts survived, a bonus token followed
    assert rounds < N_REQUESTS * (MAX_TOKENS - 1)  # fewer rounds than plain decoding would need

    sp = SamplingParams(temperature=temperature, top_p=top_p)
    joint = _exact_joint(target_model, PROMPT, MAX_TOKENS, sp)
    torch.testing.assert_close(joint.sum(), torch.tensor(1.0, dtype=torch.float64))
    if top_p < 1.0:
        assert float((joint == 0).double().mean()) > 0.1  # top-p really cut tokens
    outputs = [tuple(c.token_ids) for c in done]
    # every adjacent pair (first two tokens: position 0 of a draft block; later pairs: deeper positions,
    # bonus tokens and rounds after a rollback), and the first three tokens jointly
    for keep in [(0, 1), (1, 2), (2, 3), (3, 4), (0, 1, 2)]:
        pv = _chi2_pvalue([tuple(o[i] for i in keep) for o in outputs], _marginal(joint, keep))
        assert pv > P_MIN, f"tokens {keep}: p-value {pv:.2e}"


def test_exact_joint_matches_incremental_engine(target_model):
    """The reference itself: the engine's slot-cache logits equal the model's full forward passes."""
    engine = TargetEngine(_cfg(2), model=target_model)
    engine.add("r")
    engine.prefill("r", PROMPT)
    sp = SamplingParams(temperature=0.7)
    joint = _exact_joint(target_model, PROMPT, 3, sp)
    (out,) = engine.forward([QueryBlock("r", [6, 2])])
    # p(t2 = . | t1 = 6) and p(t3 = . | 6, 2) from the cache, against the joint's conditionals
    cond2 = joint[6].sum(-1) / joint[6].sum()
    cond3 = joint[6, 2] / joint[6, 2].sum()
    torch.testing.assert_close(logits_to_probs(out.logits[0], sp).double(), cond2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits_to_probs(out.logits[1], sp).double(), cond3, atol=1e-5, rtol=1e-4)


PROMPTS = [[1], [3, 5, 1], [7, 0, 2, 2, 6], [4, 4], [0, 6, 6, 1, 3, 2, 5]]


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    (out,) = transformers_greedy(model, [prompt], n, min_new_tokens=n, pad_token_id=0)
    return out


@pytest.mark.parametrize("num_draft", [1, 3, 5])
def test_greedy_speculative_equals_plain_decoding_equals_generate(target_model, draft_model, num_draft):
    n = 12
    greedy = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    plain = Decoder(TargetEngine(_cfg(2, 24), model=target_model)).generate(PROMPTS, greedy)
    spec_decoder = _speculative(target_model, draft_model, max_requests=2, max_context=24, num_draft=num_draft)
    spec = spec_decoder.generate(PROMPTS, greedy)
    for prompt, a, b in zip(PROMPTS, plain, spec):
        want = _hf_greedy(target_model, prompt, n)
        assert a.token_ids == want, prompt
        assert b.token_ids == want, prompt
        assert a.finish_reason == b.finish_reason == "length"
        assert a.stats.rounds == n - 1  # plain: one round per token after the first
        assert b.stats.rounds <= a.stats.rounds
    assert sum(c.stats.accepted for c in spec) > 0  # the draft LM got some tokens through


def test_greedy_speculative_with_the_target_as_its_own_draft_accepts_everything(target_model):
    n = 10
    greedy = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    decoder = _speculative(target_model, target_model, max_requests=3, max_context=24, num_draft=3)
    done = decoder.generate(PROMPTS, greedy)
    for prompt, c in zip(PROMPTS, done):
        assert c.token_ids == _hf_greedy(target_model, prompt, n)
        assert c.stats.accepted == c.stats.scheduled  # identical draft: every draft survives
        # 1 + 4 + 4 + 1 tokens: prefill, two fully accepted rounds (k=3, bonus), a last round with k=0
        assert c.stats.rounds == 3 and c.stats.scheduled == 6
