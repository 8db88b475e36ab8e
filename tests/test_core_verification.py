"""Rejection-sampling verification is lossless: what it emits is distributed exactly as the target.

Statistical tests on small hand-built distributions (vocabularies of 4-6 tokens), each a chi-square
goodness of fit against the exact target distribution with a fixed seed, so a run is deterministic.
A negative control checks that the same test does catch a subtly wrong verifier.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from dspark.core.sampling import SamplingParams, logits_to_probs, make_generator, sample
from dspark.core.verification import VerifyResult, verify

N = 20000
P_MIN = 1e-3


def chi2_pvalue(samples: list[tuple[int, ...]] | list[int], exact: dict) -> float:
    """Goodness of fit of `samples` to `exact` ({outcome: probability}); cells expected < 5 times are pooled.

    A sample outside the support of `exact` gives p-value 0.
    """
    n = len(samples)
    counts: dict = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    if any(exact.get(s, 0.0) <= 0.0 for s in counts):
        return 0.0
    obs, exp, pool_obs, pool_exp = [], [], 0, 0.0
    for outcome, prob in exact.items():
        if prob <= 0.0:
            continue
        if prob * n < 5:
            pool_obs += counts.get(outcome, 0)
            pool_exp += prob * n
        else:
            obs.append(counts.get(outcome, 0))
            exp.append(prob * n)
    if pool_exp > 0:
        obs.append(pool_obs)
        exp.append(pool_exp)
    if len(obs) < 2:
        return 1.0
    scale = sum(obs) / sum(exp)  # float rounding of the exact probabilities
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


def _dist(*xs: float) -> torch.Tensor:
    t = torch.tensor(xs, dtype=torch.float32)
    return t / t.sum()


# single position ----------------------------------------------------------------------------------

SINGLE = {
    "close": (_dist(0.4, 0.3, 0.2, 0.1), _dist(0.3, 0.3, 0.3, 0.1)),
    "reversed": (_dist(0.4, 0.3, 0.2, 0.1), _dist(0.1, 0.2, 0.3, 0.4)),
    "q_misses_what_p_likes": (_dist(0.5, 0.3, 0.1, 0.1, 0.0), _dist(0.0, 0.0, 0.2, 0.3, 0.5)),
    "q_wider_than_p": (_dist(0.6, 0.4, 0.0, 0.0, 0.0, 0.0), _dist(1, 1, 1, 1, 1, 1)),
    "disjoint_supports": (_dist(0.7, 0.3, 0.0, 0.0), _dist(0.0, 0.0, 0.5, 0.5)),
    "q_one_hot_on_p_argmax": (_dist(0.5, 0.2, 0.2, 0.1), _dist(1.0, 0.0, 0.0, 0.0)),
    "q_one_hot_elsewhere": (_dist(0.5, 0.2, 0.2, 0.1), _dist(0.0, 0.0, 0.0, 1.0)),
    "p_one_hot": (_dist(0.0, 1.0, 0.0, 0.0, 0.0), _dist(0.2, 0.2, 0.2, 0.2, 0.2)),
    "q_equals_p": (_dist(0.4, 0.3, 0.2, 0.1, 0.0), _dist(0.4, 0.3, 0.2, 0.1, 0.0)),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", list(SINGLE))
def test_first_emitted_token_is_distributed_as_target(name, k):
    p, q = SINGLE[name]
    V = p.shape[0]
    g = make_generator(list(SINGLE).index(name) * 10 + k)
    draft_probs = q.expand(k, V)
    # later positions: anything; they only matter once the first draft is accepted
    target_probs = torch.cat([p[None], _dist(*range(1, V + 1)).expand(k, V)])
    firsts, accepted = [], 0
    all_drafts = sample(q.expand(N, k, V), g)  # drafted in bulk; verification draws its own randomness
    for drafts in all_drafts:
        res = verify(drafts, draft_probs, target_probs, g)
        firsts.append(res.tokens[0])
        accepted += res.accepted > 0
    assert chi2_pvalue(firsts, {i: float(p[i]) for i in range(V)}) > P_MIN
    # the first draft survives with probability sum_x min(p(x), q(x))
    overlap = float(torch.minimum(p, q).sum())
    assert abs(accepted / N - overlap) < 0.02
    if name == "q_equals_p":
        assert accepted == N


# multi-token blocks over a Markov target and draft -------------------------------------------------


def _draft_chains(anchors: torch.Tensor, Q: torch.Tensor, k: int, g) -> torch.Tensor:
    """(n,) anchors -> (n, k) drafts, each sampled sequentially from q given the previous token."""
    out, prev = [], anchors
    for _ in range(k):
        prev = sample(Q[prev], g)
        out.append(prev)
    return torch.stack(out, -1)


def _emit_tokens(anchor: int, P, Q, k: int, need: int, g, first_drafts=None) -> tuple[list[int], list]:
    """Speculative rounds over Markov chains (row i = next-token distribution after token i) until `need`
    tokens are emitted; each round emits accepted + 1 tokens and its last token is the next anchor.
    Returns the first `need` tokens and every round's VerifyResult. `first_drafts`: the first round's
    drafts, sampled beforehand (in bulk) from q."""
    out, rounds = [], []
    while len(out) < need:
        if first_drafts is not None and not rounds:
            drafts = first_drafts
        else:
            drafts = _draft_chains(torch.tensor([anchor]), Q, k, g)[0]
        history = [anchor] + drafts.tolist()
        draft_probs = Q[history[:-1]]  # (k, V): the row each draft was sampled from
        target_probs = P[history]  # (k+1, V): target after the anchor and after each draft
        res = verify(drafts, draft_probs, target_probs, g)
        assert len(res.tokens) == res.accepted + 1
        assert res.tokens[: res.accepted] == history[1 : res.accepted + 1]
        out += res.tokens
        rounds.append(res)
        anchor = res.tokens[-1]
    return out[:need], rounds


def _chain_joint(anchor: int, P: torch.Tensor, n: int) -> dict[tuple[int, ...], float]:
    V = P.shape[0]
    joint = {}
    for seq in itertools.product(range(V), repeat=n):
        prob, prev = 1.0, anchor
        for t in seq:
            prob *= float(P[prev, t])
            prev = t
        joint[seq] = prob
    return joint


def _random_chain(V: int, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, V, generator=g) * scale  # logits


def _check_markov(P: torch.Tensor, Q: torch.Tensor, k: int, need: int, seed: int, anchor: int = 0):
    g = make_generator(seed)
    samples, total_rounds, total_accepted = [], 0, 0
    first = _draft_chains(torch.full((N,), anchor), Q, k, g)
    for i in range(N):
        toks, rounds = _emit_tokens(anchor, P, Q, k, need, g, first[i])
        samples.append(tuple(toks))
        total_rounds += len(rounds)
        total_accepted += sum(r.accepted for r in rounds)
    pv = chi2_pvalue(samples, _chain_joint(anchor, P, need))
    assert pv > P_MIN, f"p-value {pv:.2e}"
    return total_accepted / total_rounds


@pytest.mark.parametrize("k", [1, 2, 3])
def test_markov_block_matches_target_chain_bonus_included(k):
    """k drafts, first k + 1 tokens: a fully accepted round's bonus token is among those checked."""
    V = 4
    P = torch.softmax(_random_chain(V, 1, 1.5), -1)
    Q = torch.softmax(_random_chain(V, 2, 1.5), -1)
    Q[:, 1] = 0.0  # the draft never proposes token 1, the target often wants it
    Q = Q / Q.sum(-1, keepdim=True)
    mean_accepted = _check_markov(P, Q, k=k, need=k + 1, seed=10 + k)
    assert 0.1 < mean_accepted < k - 0.1  # both rejections and acceptances happened


def test_markov_block_first_two_tokens_vocab_6():
    V = 6
    P = torch.softmax(_random_chain(V, 3, 2.0), -1)
    Q = torch.softmax(_random_chain(V, 4, 2.0), -1)
    _check_markov(P, Q, k=3, need=2, seed=11, anchor=2)


def test_markov_block_draft_equal_to_target_always_accepts():
    V = 4
    P = torch.softmax(_random_chain(V, 5, 1.0), -1)
    g = make_generator(12)
    samples = []
    first = _draft_chains(torch.full((N // 2,), 1), P, 3, g)
    for i in range(N // 2):
        toks, rounds = _emit_tokens(1, P, P.clone(), 3, 3, g, first[i])
        assert len(rounds) == 1 and rounds[0].accepted == 3 and rounds[0].bonus
        samples.append(tuple(toks))
    assert chi2_pvalue(samples, _chain_joint(1, P, 3)) > P_MIN


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_markov_block_with_processed_distributions(temperature, top_p):
    V = 5
    params = SamplingParams(temperature=temperature, top_p=top_p)
    P = logits_to_probs(_random_chain(V, 6, 1.5), params)
    Q = logits_to_probs(_random_chain(V, 7, 1.5), params)
    if top_p < 1.0:  # the cut really removes tokens on both sides
        assert int((P == 0).sum()) > 0 and int((Q == 0).sum()) > 0
    _check_markov(P, Q, k=2, need=3, seed=13 + int(temperature * 10) + int(top_p * 100))


def test_chi2_detects_a_verifier_that_resamples_from_p_instead_of_the_residual():
    """Negative control: a common bug (recovered token drawn from p, not norm(max(0, p - q))) is caught."""
    p, q = SINGLE["close"]
    g = make_generator(99)
    firsts = []
    for _ in range(N):
        x = int(sample(q, g))
        u = float(torch.rand((), generator=g))
        firsts.append(x if u * q[x] < p[x] else int(sample(p, g)))
    assert chi2_pvalue(firsts, {i: float(p[i]) for i in range(4)}) < 1e-6


# greedy ---------------------------------------------------------------------------------------------


def _one_hot(tokens: list[int], V: int = 5) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), V).float()


@pytest.mark.parametrize(
    ("drafts", "target_argmax", "want_tokens", "want_accepted"),
    [
        ([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4], 3),  # all match: bonus token is the target's next argmax
        ([1, 2, 3], [1, 2, 0, 4], [1, 2, 0], 2),
        ([1, 2, 3], [1, 4, 3, 4], [1, 4], 1),  # later matches after a mismatch do not count
        ([1, 2, 3], [0, 2, 3, 4], [0], 0),
        ([4], [4, 2], [4, 2], 1),
        ([4], [3, 2], [3], 0),
    ],
)
def test_greedy_accepts_matching_prefix_then_target_argmax(drafts, target_argmax, want_tokens, want_accepted):
    for seed in range(5):  # with one-hot distributions the randomness cannot matter
        res = verify(torch.tensor(drafts), _one_hot(drafts), _one_hot(target_argmax), make_generator(seed))
        assert res.tokens == want_tokens
        assert res.accepted == want_accepted
        assert res.bonus == (want_accepted == len(drafts))


def test_greedy_through_logits_to_probs():
    greedy = SamplingParams(temperature=0.0)
    target_logits = torch.tensor([[0.1, 2.0, 0.3], [1.0, 0.0, -1.0], [0.0, 0.5, 0.2]])  # argmax 1, 0, 1
    draft_logits = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])  # argmax 1, 2
    drafts = draft_logits.argmax(-1)
    res = verify(drafts, logits_to_probs(draft_logits, greedy), logits_to_probs(target_logits, greedy))
    assert res == VerifyResult(accepted=1, tokens=[1, 0], bonus=False)


# bookkeeping ---------------------------------------------------------------------------------------


def test_no_drafts_samples_one_token_from_the_target():
    p = _dist(0.0, 0.0, 1.0, 0.0)
    res = verify(torch.zeros(0, dtype=torch.long), torch.zeros(0, 4), p[None], make_generator(0))
    assert res.accepted == 0 and res.tokens == [2]
    assert res.bonus  # vacuously: every one of the 0 drafts survived


@pytest.mark.parametrize("k", [1, 2, 4])
def test_tokens_length_is_accepted_plus_one_and_bonus_iff_all_accepted(k):
    V = 6
    g = make_generator(k)
    target_probs = torch.softmax(torch.randn(k + 1, V, generator=g), -1)
    draft_probs = torch.softmax(torch.randn(k, V, generator=g), -1)
    seen = set()
    for _ in range(3000):
        drafts = sample(draft_probs, g)
        res = verify(drafts, draft_probs, target_probs, g)
        assert 0 <= res.accepted <= k
        assert len(res.tokens) == res.accepted + 1
        assert res.tokens[: res.accepted] == drafts[: res.accepted].tolist()
        assert res.bonus == (res.accepted == k)
        assert all(isinstance(t, int) and 0 <= t < V for t in res.tokens)
        if not res.bonus:  # a recovered token is never the rejected draft when p <= q there
            x = int(drafts[res.accepted])
            if target_probs[res.accepted, x] <= draft_probs[res.accepted, x]:
                assert res.tokens[-1] != x
        seen.add(res.accepted)
    assert seen == set(range(k + 1))  # every outcome occurs


def test_recovered_token_comes_from_the_residual():
    # p - q is positive only on token 3: every rejection must recover token 3
    p, q = _dist(0.3, 0.3, 0.0, 0.4), _dist(0.3, 0.3, 0.4, 0.0)
    g = make_generator(3)
    for _ in range(500):
        drafts = sample(q[None], g)
        res = verify(drafts, q[None], torch.stack([p, p]), g)
        if res.accepted == 0:
            assert int(drafts[0]) == 2 and res.tokens == [3]
        else:
            assert int(drafts[0]) in (0, 1)


def test_verify_is_reproducible_with_a_seeded_generator():
    target_probs = torch.softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), -1)
    draft_probs = torch.softmax(torch.randn(3, 6, generator=torch.Generator().manual_seed(1)), -1)
    drafts = torch.tensor([0, 3, 5])
    a = [verify(drafts, draft_probs, target_probs, g) for g in [make_generator(8)] for _ in range(50)]
    b = [verify(drafts, draft_probs, target_probs, g) for g in [make_generator(8)] for _ in range(50)]
    assert a == b
