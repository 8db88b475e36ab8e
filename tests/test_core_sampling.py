"""Sampling parameters and the pure logits -> probabilities -> token helpers.

Fast and offline: small hand-built logits, fixed seeds, no model.
"""

from __future__ import annotations

import pytest
import torch

from dspark.core.sampling import SamplingParams, logits_to_probs, make_generator, sample

# distinct logits so every ranking (and so every top-k / top-p cut) is unambiguous
LOGITS = torch.tensor([1.0, 3.0, -0.5, 2.0, 0.0, 2.5])


def _probs(logits=LOGITS, **kw):
    return logits_to_probs(logits, SamplingParams(**kw))


def _top_p_reference(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest prefix of the descending-sorted distribution whose mass is >= p; renormalise."""
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += float(probs[i])
        if mass >= p:
            break
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


# SamplingParams ------------------------------------------------------------------------------------


def test_defaults_are_valid_and_not_greedy():
    p = SamplingParams()
    assert p.temperature == 1.0 and p.top_k == 0 and p.top_p == 1.0
    assert not p.greedy
    assert SamplingParams(temperature=0.0).greedy


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": -0.1},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"temperature": 101.0},
        {"top_p": 0.0},
        {"top_p": -0.5},
        {"top_p": 1.01},
        {"top_p": float("nan")},
        {"top_k": -1},
        {"max_tokens": 0},
        {"max_tokens": -3},
    ],
)
def test_sampling_params_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0.0},
        {"temperature": 100.0},
        {"top_p": 1.0},
        {"top_p": 1e-6},
        {"top_k": 0},
        {"top_k": 1},
        {"max_tokens": 1},
    ],
)
def test_sampling_params_accepts_edge_values(kw):
    SamplingParams(**kw)


# logits_to_probs: greedy and temperature -----------------------------------------------------------


def test_greedy_is_one_hot_argmax():
    probs = _probs(temperature=0.0)
    want = torch.zeros(6)
    want[1] = 1.0
    assert torch.equal(probs, want)
    assert probs.dtype == torch.float32


def test_greedy_ignores_top_k_and_top_p():
    probs = _probs(temperature=0.0, top_k=3, top_p=0.5)
    assert int(probs.argmax()) == 1 and float(probs.sum()) == 1.0 and int((probs > 0).sum()) == 1


@pytest.mark.parametrize("t", [0.3, 0.7, 1.0, 2.0, 10.0])
def test_temperature_matches_softmax_of_scaled_logits(t):
    torch.testing.assert_close(_probs(temperature=t), torch.softmax(LOGITS / t, -1))


def test_low_temperature_approaches_greedy_and_high_approaches_uniform():
    assert float(_probs(temperature=0.01)[1]) > 0.999
    torch.testing.assert_close(_probs(temperature=100.0), torch.full((6,), 1 / 6), atol=0.01, rtol=0)


def test_output_is_float32_for_low_precision_logits():
    probs = logits_to_probs(LOGITS.to(torch.bfloat16), SamplingParams(temperature=0.8, top_k=4))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


# logits_to_probs: top-k ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_keeps_exactly_the_k_largest_renormalised(k):
    probs = _probs(top_k=k)
    keep = torch.topk(LOGITS, k).indices
    assert set(torch.nonzero(probs).flatten().tolist()) == set(keep.tolist())
    want = torch.zeros(6)
    want[keep] = torch.softmax(LOGITS[keep], -1)
    torch.testing.assert_close(probs, want)


@pytest.mark.parametrize("k", [0, 6, 50])
def test_top_k_off_or_at_least_vocab_is_plain_softmax(k):
    torch.testing.assert_close(_probs(top_k=k), torch.softmax(LOGITS, -1))


def test_top_k_applies_after_temperature():
    probs = _probs(temperature=0.5, top_k=2)
    want = torch.zeros(6)
    want[[1, 5]] = torch.softmax(LOGITS[[1, 5]] / 0.5, -1)
    torch.testing.assert_close(probs, want)


# logits_to_probs: top-p ----------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.3, 0.5, 0.62, 0.8, 0.9, 0.95, 0.999])
def test_top_p_keeps_smallest_prefix_with_mass_at_least_p(p):
    probs = _probs(top_p=p)
    full = torch.softmax(LOGITS, -1)
    torch.testing.assert_close(probs, _top_p_reference(full, p))
    kept = probs > 0
    assert int(kept.sum()) >= 1
    assert float(full[kept].sum()) >= p - 1e-6  # enough mass ...
    if int(kept.sum()) > 1:  # ... and minimal: dropping the smallest kept token falls below p
        assert float(full[kept].sum() - full[kept].min()) < p


def test_top_p_at_exact_prefix_mass_stops_there():
    # sorted probabilities 0.5, 0.25, 0.125, 0.125: p = 0.75 is reached exactly by two tokens
    logits = torch.log(torch.tensor([0.125, 0.5, 0.125, 0.25]))
    probs = logits_to_probs(logits, SamplingParams(top_p=0.75))
    torch.testing.assert_close(probs, torch.tensor([0.0, 2 / 3, 0.0, 1 / 3]))


def test_top_p_always_keeps_the_most_likely_token():
    probs = _probs(top_p=1e-6)
    want = torch.zeros(6)
    want[1] = 1.0
    torch.testing.assert_close(probs, want)


def test_top_p_on_a_peaked_distribution_keeps_one_token():
    logits = torch.tensor([0.0, 10.0, 0.0, 0.0])
    probs = logits_to_probs(logits, SamplingParams(top_p=0.9))
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("t", [0.5, 2.0])
def test_top_p_applies_after_temperature(t):
    probs = _probs(temperature=t, top_p=0.7)
    torch.testing.assert_close(probs, _top_p_reference(torch.softmax(LOGITS / t, -1), 0.7))


@pytest.mark.parametrize(("k", "p"), [(4, 0.5), (4, 0.9), (3, 0.99), (2, 0.3), (5, 0.75)])
def test_top_k_then_top_p(k, p):
    probs = _probs(top_k=k, top_p=p)
    keep = torch.topk(LOGITS, k).indices
    after_k = torch.zeros(6)
    after_k[keep] = torch.softmax(LOGITS[keep], -1)
    torch.testing.assert_close(probs, _top_p_reference(after_k, p))
    assert int((probs > 0).sum()) <= k


def test_top_k_plus_top_p_concrete_values():
    # top-2 of LOGITS: tokens 1 (3.0) and 5 (2.5) with mass 0.622 / 0.378 among themselves
    probs = _probs(top_k=3, top_p=0.6)
    # top-3 is {1, 5, 3}; renormalised masses 0.506, 0.307, 0.186: token 1 alone (0.506) < 0.6, so {1, 5}
    want = torch.zeros(6)
    want[[1, 5]] = torch.softmax(LOGITS[[1, 5]], -1)
    torch.testing.assert_close(probs, want)


# logits_to_probs: shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw", [{"temperature": 0.0}, {"temperature": 0.7}, {"top_k": 3}, {"top_p": 0.8}, {"top_k": 4, "top_p": 0.7}]
)
def test_batched_rows_match_single_rows(kw):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 11, generator=g) * 2
    params = SamplingParams(**kw)
    batched = logits_to_probs(rows, params)
    assert batched.shape == (5, 11)
    for i in range(5):
        torch.testing.assert_close(batched[i], logits_to_probs(rows[i], params))
    torch.testing.assert_close(batched.sum(-1), torch.ones(5))
    assert bool((batched >= 0).all())


def test_single_row_shape_is_kept():
    assert _probs(top_p=0.8).shape == (6,)


# sample and make_generator -------------------------------------------------------------------------


def test_sample_shapes_and_support():
    g = make_generator(0)
    probs = _probs(top_k=2)
    tokens = sample(probs.expand(1000, 6), g)
    assert tokens.shape == (1000,) and tokens.dtype == torch.long
    assert set(tokens.tolist()) <= {1, 5}
    assert sample(probs, g).shape == ()
    assert sample(probs.expand(2, 3, 6), g).shape == (2, 3)


def test_sample_one_hot_is_deterministic():
    probs = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert sample(probs, make_generator(5)).tolist() == [2, 0]


def test_sample_frequencies_follow_probs():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    tokens = sample(probs.expand(40000, 4), make_generator(1))
    freq = torch.bincount(tokens, minlength=4).float() / 40000
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)


def test_make_generator_with_seed_is_reproducible():
    probs = torch.softmax(LOGITS, -1).expand(64, 6)
    a = sample(probs, make_generator(1234))
    b = sample(probs, make_generator(1234))
    c = sample(probs, make_generator(1235))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.rand(8, generator=make_generator(7)), torch.rand(8, generator=make_generator(7)))


def test_make_generator_without_seed_draws_from_the_global_rng():
    torch.manual_seed(0)
    a = torch.rand(8, generator=make_generator(None))
    torch.manual_seed(0)
    b = torch.rand(8, generator=make_generator(None))
    c = torch.rand(8, generator=make_generator(None))
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_consecutive_seeds_and_streams_give_unrelated_generators():
    from dspark.core.sampling import DRAFT_STREAM

    firsts = [float(torch.rand(1, generator=make_generator(s))) for s in range(2000)]
    drafts = [float(torch.rand(1, generator=make_generator(s, stream=DRAFT_STREAM))) for s in range(2000)]
    x, y = torch.tensor(firsts), torch.tensor(drafts)
    assert abs(float(torch.corrcoef(torch.stack([x[1:], x[:-1]]))[0, 1])) < 0.1  # neighbouring seeds
    assert abs(float(torch.corrcoef(torch.stack([x[1:], y[:-1]]))[0, 1])) < 0.1  # draft s vs verifier s+1
    assert firsts != drafts
