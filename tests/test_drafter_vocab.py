"""The reduced draft vocabulary (drafter/vocab.py): which tokens it keeps, drafts that stay on it, the same drafter
otherwise, a saved drafter that keeps it, and verification that stays exact (greedy and sampled)."""

from __future__ import annotations

import collections
import gzip
import json

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
from dspark.drafter.checkpoint import load_trained_drafter, save_trained_drafter, target_fingerprint
from dspark.drafter.model import DSparkDrafter
from dspark.drafter.proposer import DSparkProposer
from dspark.drafter.vocab import frequent_tokens, token_counts, with_draft_vocab

LAYERS = (0, 1, 2)
KEEP = [0, 2, 3, 5, 6]  # the draft vocabulary of the tests (V = 8)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_frequent_tokens_keep_the_end_of_sequence(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for resp in ([5, 5, 5, 7, 7, 1], [7, 3, 5], [3]):
            f.write(json.dumps({"prompt_ids": [1], "response_ids": resp}) + "\n")
    counts = token_counts([path])
    assert counts == collections.Counter({5: 4, 7: 3, 3: 2, 1: 1})
    assert frequent_tokens(counts, 2) == [5, 7]
    assert frequent_tokens(counts, 2, always=[9]) == [5, 9]  # EOS kept even though never seen
    assert frequent_tokens(counts, 3, always=[3]) == [3, 5, 7]
    assert frequent_tokens(counts, 6, vocab_size=8) == [0, 1, 2, 3, 5, 7]  # unseen ids fill up in id order
    assert frequent_tokens(counts, 20, vocab_size=8) == list(range(8))
    with pytest.raises(ValueError, match="cannot hold"):
        frequent_tokens(counts, 1, always=[8, 9])


@pytest.fixture(scope="module")
def target_model():
    return _tiny_llama(seed=0, hidden=32, layers=2, heads=4, kv_heads=2)


def drafter(model) -> DSparkDrafter:
    torch.manual_seed(1)
    d = DSparkDrafter.from_target_model(model, feature_layers=LAYERS, n_layer=1, gamma=4, markov_rank=8)
    torch.nn.init.normal_(d.seq.W2.weight, std=0.5)
    d.conf_temperature.fill_(0.3)
    return d.eval()


def draft(d, features, params, seed=0):
    g = torch.Generator().manual_seed(seed)
    return d.propose(features, [features.shape[1]] * features.shape[0], [3] * features.shape[0], params, g)


def test_drafts_stay_on_the_draft_vocabulary(target_model):
    d = drafter(target_model)
    small = with_draft_vocab(d, KEEP)
    assert small.config.draft_vocab_size == len(KEEP) and small.draft_vocab.tolist() == KEEP
    feats = torch.randn(3, 5, d.config.feature_size)
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)):
        out = draft(small, feats, params)
        assert set(out.tokens.flatten().tolist()) <= set(KEEP)
        off = torch.ones(V, dtype=torch.bool)
        off[KEEP] = False
        assert out.probs[..., off].abs().max() == 0  # q is 0 off the list
        torch.testing.assert_close(out.probs.sum(-1), torch.ones(3, 4))
    full = with_draft_vocab(d, range(V))  # the whole vocabulary: exactly the drafter it came from
    assert full.config.draft_vocab_size == 0
    a, b = draft(d, feats, SamplingParams(temperature=1.0)), draft(full, feats, SamplingParams(temperature=1.0))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)


def block_hidden(d, feats):
    """h (B, gamma, C) of the block after each row's context, as propose computes it."""
    B, L = feats.shape[:2]
    G = d.config.gamma
    pos = L + torch.arange(G).expand(B, G)
    mask = torch.ones(B, G, L + G, dtype=torch.bool)
    return d.backbone(d.encode_context(feats), d._block_inputs(torch.tensor([3] * B)), pos, mask)


def test_greedy_draft_is_the_argmax_over_the_draft_vocabulary(target_model):
    d = drafter(target_model)
    feats = torch.randn(2, 5, d.config.feature_size)
    out = draft(with_draft_vocab(d, KEEP), feats, SamplingParams(temperature=0.0))
    h = block_hidden(d, feats)[:, 0]  # (B, C): the first position
    logits, _ = d._sequential_step(d._logits(h), h, torch.tensor([3, 3]), None)  # (B, V): U_1 + B(anchor, .)
    assert torch.equal(out.tokens[:, 0], torch.tensor(KEEP)[logits[:, KEEP].argmax(-1)])


def test_a_saved_drafter_keeps_its_draft_vocabulary(target_model, tmp_path):
    small = with_draft_vocab(drafter(target_model), KEEP)
    save_trained_drafter(small, tmp_path, "tiny", target_fingerprint(target_model), dtype="bfloat16")
    back = load_trained_drafter(tmp_path, target_model)
    assert back.config.draft_vocab_size == len(KEEP) and back.draft_vocab.tolist() == KEEP
    column = back.draft_column()  # the training labels' lookup: each kept token's column, -1 elsewhere
    assert [column[t].item() for t in KEEP] == list(range(len(KEEP)))
    assert int((column >= 0).sum()) == len(KEEP) and back.draft_column() is column  # built once
    other = sorted(KEEP[1:] + [min(set(range(back.config.vocab_size)) - set(KEEP))])  # one token swapped
    back.set_draft_vocab(other)  # a new vocabulary: a new lookup
    assert [back.draft_column()[t].item() for t in other] == list(range(len(KEEP)))


def test_training_logits_are_the_draft_vocabulary_columns(rnn_or_markov, target_model):
    """Teacher-forced training logits over the draft vocabulary are exactly the full logits' KEEP columns, for both
    sequential heads, and their gradient reaches W2 only in KEEP's rows."""
    torch.manual_seed(1)
    d = DSparkDrafter.from_target_model(
        target_model, feature_layers=LAYERS, n_layer=1, gamma=4, markov_rank=8, sequential_head=rnn_or_markov
    )
    small = with_draft_vocab(d, KEEP).train()
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 12, d.config.feature_size, generator=g)
    ids = torch.randint(0, V, (2, 12), generator=g)
    anchors = torch.tensor([[1, 6], [3, 7]])
    full, sub = d(feats, ids, anchors), small(feats, ids, anchors)
    assert sub.logits.shape == (2, 2, 4, len(KEEP))
    torch.testing.assert_close(sub.logits, full.logits[..., KEEP])
    torch.testing.assert_close(sub.conf_logits, full.conf_logits)
    sub.logits.logsumexp(-1).sum().backward()
    grad = small.seq.W2.weight.grad
    off = [t for t in range(V) if t not in KEEP]
    assert grad[KEEP].abs().sum() > 0 and grad[off].abs().sum() == 0


@pytest.fixture(params=["markov", "rnn"])
def rnn_or_markov(request):
    return request.param


def test_the_draft_vocabulary_loss_is_the_full_loss_of_a_drafter_that_drafts_only_it():
    """drafter_loss over KEEP's columns, with the target normalised over all V (target_lse), equals the full-vocabulary
    loss of the same draft distribution put to zero off KEEP: the target's mass off KEEP counts in ||p_d - p_t||_1 and
    c*, a label off KEEP has no cross-entropy term."""
    from dspark.drafter.loss import drafter_loss

    g = torch.Generator().manual_seed(4)
    draft_sub = torch.randn(3, 4, len(KEEP), generator=g)
    target = torch.randn(3, 4, V, generator=g) * 2
    labels = torch.randint(0, V, (3, 4), generator=g)
    conf = torch.randn(3, 4, generator=g)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[2, 2:] = False
    column = torch.full((V,), -1)
    column[KEEP] = torch.arange(len(KEEP))
    draft_full = torch.full((3, 4, V), -torch.inf)
    draft_full[..., KEEP] = draft_sub
    sub = drafter_loss(draft_sub, target[..., KEEP], column[labels], conf, valid, target_lse=target.logsumexp(-1))
    in_keep = column[labels] >= 0
    full = drafter_loss(draft_full, target, labels.where(in_keep, KEEP[0]), conf, valid)
    torch.testing.assert_close(sub.tv, full.tv)
    torch.testing.assert_close(sub.conf, full.conf)
    torch.testing.assert_close(sub.accept, full.accept)
    torch.testing.assert_close(sub.tau, full.tau)
    # cross-entropy: only labels on KEEP count (a label off it is never drafted), with the same denominator
    w = torch.exp(-torch.arange(4) / 4.0) * valid
    nll = -draft_sub.log_softmax(-1).gather(-1, column[labels].clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(sub.ce, (w * nll * in_keep).sum() / w.sum())
    assert (~in_keep & valid).any()  # the case is exercised


def decoder(model, d, policy="fixed", max_requests=16):
    engine = TargetEngine(EngineConfig(max_requests=max_requests, max_context=24, feature_layers=LAYERS), model=model)
    return Decoder(engine, DSparkProposer(d), num_draft=4, policy=policy)


def test_verification_stays_exact_with_a_draft_vocabulary(target_model):
    small = with_draft_vocab(drafter(target_model), KEEP)
    prompts = [[3, 4, 5], [6], [7, 1, 2, 3], [4, 4]]
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    plain = Decoder(TargetEngine(EngineConfig(max_requests=4, max_context=24), model=target_model)).generate(
        prompts, sp
    )
    out = decoder(target_model, small, max_requests=4).generate(prompts, sp)
    assert [c.token_ids for c in out] == [c.token_ids for c in plain]
    assert sum(c.stats.accepted for c in out) > 0


def test_sampled_output_keeps_the_target_distribution_with_a_draft_vocabulary(target_model):
    dec = decoder(target_model, with_draft_vocab(drafter(target_model), KEEP))
    done = assert_samples_follow_the_target(target_model, dec, 3000)
    assert sum(c.stats.accepted for c in done) > 0
    outputs = [tuple(c.token_ids) for c in done]
    # tokens off the draft vocabulary still come out: the target's recovered/bonus tokens cover the whole vocabulary
    assert {t for o in outputs for t in o} - set(KEEP)
