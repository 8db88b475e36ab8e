"""Sparse draft distributions: a drafter with max_support samples from at most that many tokens, the wire carries
exactly that distribution, and decoding with it keeps the target's distribution."""

from __future__ import annotations

import pytest
import torch
from test_core_decoding_stats import (
    _tiny_llama,
    assert_samples_follow_the_target,
)

from dspark.core.config import EngineConfig
from dspark.core.decoding import Decoder
from dspark.core.engine import TargetEngine
from dspark.core.proposer import truncated
from dspark.core.sampling import SamplingParams
from dspark.drafter.model import DSparkDrafter
from dspark.drafter.proposer import DSparkProposer
from dspark.serving import wire

LAYERS = (0, 1, 2)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target_model():
    return _tiny_llama(seed=0, hidden=32, layers=2, heads=4, kv_heads=2)


def _drafter(model):
    torch.manual_seed(1)
    return DSparkDrafter.from_target_model(model, feature_layers=LAYERS, n_layer=1, gamma=3, markov_rank=8)


def test_truncation_caps_top_k_and_leaves_greedy_alone():
    assert truncated(SamplingParams(temperature=1.0), 64).top_k == 64
    assert truncated(SamplingParams(temperature=1.0, top_k=5), 64).top_k == 5
    assert truncated(SamplingParams(temperature=1.0, top_k=100), 64).top_k == 64
    assert truncated(SamplingParams(temperature=0.0), 64).top_k == 0
    assert truncated(SamplingParams(temperature=1.0), None).top_k == 0


def test_sparse_round_trip_is_exact(target_model):
    drafter = _drafter(target_model)
    feats = torch.randn(1, 5, drafter.config.hidden_size * len(LAYERS))  # (B, L, F)
    draft = drafter.propose(feats, [5], [3], params=SamplingParams(temperature=1.0), max_support=3)
    q = draft.probs[0]  # (k, V)
    assert ((q > 0).sum(-1) <= 3).all()
    rows = wire.sparse_from_dense(q)
    assert all(len(r.token_ids) <= 3 for r in rows)
    assert torch.equal(wire.dense_from_sparse(rows, q.shape[-1]), q)
    for i, t in enumerate(draft.tokens[0].tolist()):
        assert q[i, t] > 0  # every draft token was sampled from inside its support


def test_feature_tensors_round_trip():
    t = torch.randn(4, 6)
    assert torch.equal(wire.tensor_from_proto(wire.tensor_to_proto(t)), t)
    half = wire.tensor_from_proto(wire.tensor_to_proto(t, "bfloat16"))
    assert torch.allclose(half, t, rtol=1e-2, atol=1e-2)
    assert wire.tensor_from_proto(wire.tensor_to_proto(t, "float16")).shape == (4, 6)


def test_sparse_drafts_keep_the_target_distribution(target_model):
    """max_support=2 on a vocabulary of 8: drafts come from a very different q, output must not change."""
    n, max_tokens, prompt = 3000, 4, [3, 4, 5]
    engine = TargetEngine(EngineConfig(max_requests=16, max_context=24, feature_layers=LAYERS), model=target_model)
    dec = Decoder(engine, DSparkProposer(_drafter(target_model), max_support=2), num_draft=3)
    done = assert_samples_follow_the_target(target_model, dec, n, prompt, max_tokens)
    assert sum(c.stats.accepted for c in done) > 0


def test_sparse_rows_slice_like_the_dense_tensor():
    q = torch.zeros(3, 8)
    q[0, 1], q[1, 2], q[1, 5], q[2, 7] = 1.0, 0.25, 0.75, 1.0
    rows = wire.SparseRows(wire.sparse_from_dense(q), 8)
    assert rows.shape == (3, 8) and len(rows[:2]) == 2
    assert torch.equal(rows[:2].dense(), q[:2]) and torch.equal(rows[:0].dense(), q[:0])
    assert wire.sparse_from_dense(rows) is rows.rows  # forwarded untouched
