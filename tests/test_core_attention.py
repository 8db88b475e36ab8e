"""The engine's attention (core/attention.py): grouped key/value heads go to torch's SDPA as they are, and it computes
what transformers' "sdpa" attention computes."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dspark.core.attention import NAME, grouped_sdpa_attention, use_grouped_sdpa
from dspark.core.config import EngineConfig
from dspark.core.engine import QueryBlock, TargetEngine

from conftest import tiny_model


class Groups(torch.nn.Module):
    num_key_value_groups = 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 8])
def test_grouped_attention_equals_transformers_sdpa(dtype, T):
    torch.manual_seed(0)
    B, L = 4, 40
    q = torch.randn(B, 9, T, 64, dtype=dtype)  # 9 query heads over 3 key/value heads
    cache = torch.randn(B, 3, L + 10, 64, dtype=dtype)
    k, v = cache[:, :, :L], cache.flip(0)[:, :, :L]  # strided views, as the slot cache hands them out
    pos = torch.arange(L - T, L)[None, :] - torch.arange(B)[:, None] * 3  # (B, T): rows of different lengths
    mask = (torch.arange(L)[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, T, L)
    got, _ = grouped_sdpa_attention(Groups(), q, k, v, mask, scaling=0.125)
    want, _ = sdpa_attention_forward(Groups(), q, k, v, mask, scaling=0.125)
    assert got.shape == (B, T, 9, 64)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)


def test_engine_runs_grouped_attention_and_scores_what_the_model_scores():
    model = tiny_model("llama")  # 4 query heads over 2 key/value heads
    engine = TargetEngine(EngineConfig(max_requests=2, max_context=32), model=model)
    assert engine.model.config._attn_implementation == NAME
    assert not use_grouped_sdpa(engine.model)  # already switched
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    for i, p in enumerate(prompts):
        engine.add(f"r{i}")
        engine.prefill(f"r{i}", p[:-1])
    outs = engine.forward([QueryBlock("r0", [7, 10, 11]), QueryBlock("r1", [9, 12])])  # ragged: padded and masked
    reference = tiny_model("llama")  # transformers' own "sdpa", no cache tricks
    for out, full in zip(outs, [[3, 4, 5, 6, 7, 10, 11], [8, 9, 12]]):
        with torch.no_grad():
            want = reference(torch.tensor([full])).logits[0, -out.logits.shape[0] :]
        torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-4)
