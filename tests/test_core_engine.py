"""TargetEngine: ragged batched forward against the model's own full forward, KV rollback, capacity."""

from __future__ import annotations

import pytest
import torch

from dspark.core.config import EngineConfig
from dspark.core.engine import CapacityError, ContextLengthError, QueryBlock, TargetEngine, UnknownRequestError

from conftest import tiny_model


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # (T, V)


def make(arch="llama", **kw) -> tuple[TargetEngine, torch.nn.Module]:
    model = tiny_model(arch)
    cfg = EngineConfig(max_requests=kw.pop("max_requests", 4), max_context=kw.pop("max_context", 64), **kw)
    return TargetEngine(cfg, model=model), model


def test_the_slot_cache_goes_in_under_the_name_the_decoder_takes():
    """transformers renamed the decoder's cache argument (past_key_values, then cache); the engine passes its slot
    cache under whichever name this version's decoder has, never into **kwargs where it would be ignored."""
    import inspect

    engine, _ = make("llama")
    assert engine._cache_arg in inspect.signature(engine.decoder.forward).parameters


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_ragged_batch_matches_full_forward(arch):
    engine, model = make(arch)
    seqs = {"a": [3, 4, 5, 6, 7, 8, 9, 10, 11], "b": [12, 13, 14], "c": [2, 5, 7, 11, 13, 17, 19]}
    cuts = {"a": 5, "b": 2, "c": 3}  # prefill this much, then one ragged round with the rest
    for rid, ids in seqs.items():
        engine.add(rid)
        engine.prefill(rid, ids[: cuts[rid]])
    outs = engine.forward([QueryBlock(rid, ids[cuts[rid] :]) for rid, ids in seqs.items()])
    for (rid, ids), out in zip(seqs.items(), outs):
        want = full_logits(model, ids)[cuts[rid] :]
        assert out.logits.shape == want.shape
        torch.testing.assert_close(out.logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_a_padded_forward_multiplies_only_its_real_tokens(arch):
    """Rows of 4, 1 and 2 query tokens pad to 3 x 4 = 12 positions; the MLPs and attention projections get the 7 real
    ones (core/ragged_rows.py), and every logit and feature is what the padded computation gives."""
    engine, model = make(arch, feature_layers=(1, 2))
    assert engine.ragged
    seen = []
    layer = engine.decoder.layers[0]
    for m in (layer.mlp, layer.self_attn.q_proj, layer.self_attn.o_proj):
        m.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape[:-1])))
    blocks = [QueryBlock("a", [3, 4, 5, 6]), QueryBlock("b", [7]), QueryBlock("c", [8, 9])]
    for b in blocks:
        engine.add(b.request_id)
        engine.prefill(b.request_id, [2, 11, 12])
    seen.clear()
    ragged = engine.forward(blocks)
    assert seen == [(1, 7)] * 3
    engine.ragged = False  # the same forward, padded all through
    seen.clear()
    padded = engine.forward(blocks)
    assert seen == [(3, 4)] * 3
    for r, p, b in zip(ragged, padded, blocks):
        assert r.logits.shape == (len(b.token_ids), model.config.vocab_size)
        torch.testing.assert_close(r.logits, p.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r.features, p.features, atol=1e-5, rtol=1e-5)


def test_gemma3_sliding_window_beyond_window():
    engine, model = make("gemma3")
    ids = list(range(2, 20))  # longer than the window of 4
    engine.add("r")
    engine.prefill("r", ids[:10])
    (out,) = engine.forward([QueryBlock("r", ids[10:])])
    torch.testing.assert_close(out.logits, full_logits(model, ids)[10:], atol=1e-4, rtol=1e-4)


def test_rollback_discards_uncommitted_tokens():
    engine, model = make()
    engine.add("r")
    engine.prefill("r", [3, 4, 5])
    engine.forward([QueryBlock("r", [6, 7, 8, 9])])  # a draft block
    engine.commit("r", 2)  # keep 6, 7; 8, 9 are rolled back
    assert engine.length("r") == 5
    (out,) = engine.forward([QueryBlock("r", [20, 21])])  # continue with different tokens
    torch.testing.assert_close(out.logits, full_logits(model, [3, 4, 5, 6, 7, 20, 21])[5:], atol=1e-4, rtol=1e-4)
    engine.truncate("r", 3)
    (out,) = engine.forward([QueryBlock("r", [10])])
    torch.testing.assert_close(out.logits, full_logits(model, [3, 4, 5, 10])[3:], atol=1e-4, rtol=1e-4)


def test_logits_last_and_features():
    engine, model = make(feature_layers=(0, 1, 2))
    engine.add("r")
    (out,) = engine.forward([QueryBlock("r", [3, 4, 5])], logits="last")
    assert out.logits.shape == (1, model.config.vocab_size)
    torch.testing.assert_close(out.logits[0], full_logits(model, [3, 4, 5])[-1], atol=1e-4, rtol=1e-4)
    assert out.features.shape == (3, 3 * model.config.hidden_size)
    with torch.no_grad():
        hs = model(torch.tensor([[3, 4, 5]]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.features, torch.cat([hs[0][0], hs[1][0], hs[2][0]], -1), atol=1e-4, rtol=1e-4)


def test_batch_independence():
    engine, _ = make()
    engine.add("alone")
    engine.prefill("alone", [3, 4, 5, 6])
    (alone,) = engine.forward([QueryBlock("alone", [7, 8])])
    engine.release("alone")
    for rid, ids in [("x", [9] * 11), ("alone", [3, 4, 5, 6]), ("y", [2, 3])]:
        engine.add(rid)
        engine.prefill(rid, ids)
    outs = engine.forward([QueryBlock("x", [1, 2, 3, 4, 5]), QueryBlock("alone", [7, 8]), QueryBlock("y", [4])])
    torch.testing.assert_close(outs[1].logits, alone.logits, atol=1e-5, rtol=1e-5)


def test_capacity_error_leaves_running_requests_alone():
    engine, model = make(max_requests=2)
    engine.add("a")
    engine.prefill("a", [3, 4])
    engine.add("b")
    with pytest.raises(CapacityError, match="slots are busy"):
        engine.add("c")
    (out,) = engine.forward([QueryBlock("a", [5])])
    torch.testing.assert_close(out.logits, full_logits(model, [3, 4, 5])[2:], atol=1e-4, rtol=1e-4)
    engine.release("b")  # finishing or cancelling frees the slot
    engine.add("c")
    assert engine.free_slots == 0


def test_release_frees_and_unknown_ids_are_errors():
    engine, _ = make(max_requests=1)
    engine.add("a")
    engine.release("a")
    engine.release("a")  # idempotent
    assert engine.active == 0 and engine.free_slots == 1
    with pytest.raises(UnknownRequestError):
        engine.forward([QueryBlock("a", [1])])
    with pytest.raises(ValueError, match="already"):
        engine.add("b")
        engine.add("b")


def test_context_length_error_is_per_request_and_harmless():
    engine, model = make(max_context=8)
    engine.add("a")
    engine.prefill("a", [3, 4, 5, 6, 7])
    with pytest.raises(ContextLengthError, match="max_context=8"):
        engine.forward([QueryBlock("a", [1, 2, 3, 4])])
    assert engine.length("a") == 5
    (out,) = engine.forward([QueryBlock("a", [8, 9, 10])])  # exactly fills the context
    torch.testing.assert_close(out.logits, full_logits(model, [3, 4, 5, 6, 7, 8, 9, 10])[5:], atol=1e-4, rtol=1e-4)


def test_bfloat16_runs_close_to_fp32():
    model = tiny_model()
    engine = TargetEngine(
        EngineConfig(max_requests=1, max_context=16, dtype="bfloat16"), model=model.to(torch.bfloat16)
    )
    engine.add("r")
    (out,) = engine.forward([QueryBlock("r", [3, 4, 5])])
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


def test_config_validation():
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int8")
    with pytest.raises(ValueError, match="feature layer"):
        TargetEngine(EngineConfig(feature_layers=(99,)), model=tiny_model())
