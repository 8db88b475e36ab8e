"""Fast tests of the DSpark drafter and its losses on tiny random targets (no real model)."""

from __future__ import annotations

import pytest
import torch

from dspark.core.config import EngineConfig
from dspark.core.engine import TargetEngine
from dspark.core.sampling import SamplingParams, logits_to_probs
from dspark.drafter.checkpoint import load_trained_drafter, save_trained_drafter, target_fingerprint
from dspark.drafter.loss import LossWeights, acceptance_rate, drafter_loss, position_weights, total_variation
from dspark.drafter.model import (
    ContextKV,
    DrafterConfig,
    DSparkDrafter,
    block_labels,
    expected_calibration_error,
    fit_joint_temperatures,
    fit_sts_temperatures,
    gather_blocks,
    prefix_ece,
    sample_anchors,
)

from conftest import tiny_model

V = 32


def make(arch="llama", head="markov", gamma=4, seed=0, **kw):
    model = tiny_model(arch, vocab=V)
    torch.manual_seed(seed)
    d = DSparkDrafter.from_target_model(model, gamma=gamma, sequential_head=head, markov_rank=8, **kw)
    if d.seq is not None:  # W2 starts at zero (B = 0); give the sequential head something to do
        torch.nn.init.normal_(d.seq.W2.weight, std=0.5)
    torch.nn.init.normal_(d.confidence.weight, std=0.5)
    return model, d.eval()


def batch(d, B=2, L=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, d.config.feature_size, generator=g), torch.randint(0, V, (B, L), generator=g)


# -- config and shapes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_from_target_and_shapes(arch):
    model, d = make(arch)
    c, t = d.config, model.config
    assert (c.hidden_size, c.vocab_size, c.num_target_layers) == (32, V, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 2, 16 if arch == "gemma3" else 8)
    assert c.rope_theta == (1e6 if arch == "gemma3" else 1e4) and c.rms_norm_eps == t.rms_norm_eps
    assert c.feature_size == len(c.feature_layers) * 32 and c.gamma == 4 and c.markov_rank == 8
    feats, ids = batch(d)
    out = d(feats, ids, torch.tensor([[3, 6, 0], [1, 7, 8]]))
    assert out.logits.shape == (2, 3, 4, V) and out.logits.dtype == torch.float32
    assert out.conf_logits.shape == (2, 3, 4) and out.hidden.shape == (2, 3, 4, 32)
    draft = d.propose(feats, [5, 9], ids[:, 5], SamplingParams(temperature=0.7), torch.Generator().manual_seed(0))
    assert draft.tokens.shape == (2, 4) and draft.probs.shape == (2, 4, V) and draft.confidence.shape == (2, 4)
    assert torch.allclose(draft.probs.sum(-1), torch.ones(2, 4))
    assert ((draft.confidence > 0) & (draft.confidence < 1)).all()
    p = draft.proposal(1)
    assert p.token_ids.shape == (4,) and p.probs.shape == (4, V)
    assert d.propose(feats, [5, 9], ids[:, 5], num_draft=0).tokens.shape == (2, 0)


def test_config_defaults_and_validation():
    from transformers import LlamaConfig

    big = LlamaConfig(hidden_size=64, num_hidden_layers=30, num_attention_heads=4, vocab_size=100)
    c = DrafterConfig.from_target(big)
    assert c.feature_layers == (2, 15, 28) and c.gamma == 7 and c.markov_rank == 256
    assert c.sequential_head == "markov" and c.head_dim == 16 and c.num_kv_heads == 4
    assert DrafterConfig.from_target(big, feature_layers=[3, 4], n_layer=5).feature_layers == (3, 4)
    with pytest.raises(ValueError):
        DrafterConfig.from_target(big, sequential_head="lstm")
    with pytest.raises(ValueError):
        DrafterConfig.from_target(big, feature_layers=(31,))


# -- shared, frozen embedding and LM head -------------------------------------------------------------------------


def test_shared_modules_frozen_and_not_saved(tmp_path):
    model, d = make()
    shared = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    ptrs = {p.data_ptr() for p in shared}
    assert not any(p.data_ptr() in ptrs for p in d.parameters())
    assert all(not p.requires_grad for p in shared)
    sd = d.drafter_state_dict()
    assert not any("embed" in k and "mask" not in k or "lm_head" in k for k in sd)
    assert not any(v.data_ptr() in ptrs for v in sd.values())
    assert sum(v.numel() for v in sd.values()) == sum(p.numel() for p in d.parameters()) + d.config.gamma

    feats, ids = batch(d)
    anchors = torch.tensor([[2, 5], [3, 4]])
    out = d.train()(feats, ids, anchors)
    labels, valid = block_labels(ids, anchors, 4)
    drafter_loss(out.logits, torch.randn_like(out.logits), labels, out.conf_logits, valid).loss.backward()
    assert all(p.grad is None for p in shared)
    assert d.fc.weight.grad is not None and d.layers[0].attn.q_proj.weight.grad is not None

    d.eval().conf_temperature.fill_(2.0)
    save_trained_drafter(d, tmp_path, "tiny", target_fingerprint(model))
    d2 = load_trained_drafter(tmp_path, model)
    assert d2.config == d.config and torch.equal(d2.conf_temperature, d.conf_temperature)
    torch.testing.assert_close(d2(feats, ids, anchors).logits, d(feats, ids, anchors).logits, rtol=0, atol=0)

    # shipped drafters store bfloat16 weights (half the size); the temperatures stay float32, loading gives float32
    from safetensors.torch import load_file

    save_trained_drafter(d, tmp_path / "bf16", "tiny", target_fingerprint(model), dtype="bfloat16")
    stored = load_file(str(tmp_path / "bf16" / "drafter.safetensors"))
    assert stored["fc.weight"].dtype == torch.bfloat16 and stored["conf_temperature"].dtype == torch.float32
    d3 = load_trained_drafter(tmp_path / "bf16", model)
    assert d3.fc.weight.dtype == torch.float32 and torch.equal(d3.fc.weight, d.fc.weight.to(torch.bfloat16).float())


def test_mask_token_id_uses_the_frozen_target_embedding():
    _, d = make(mask_token_id=5)
    assert d.mask_embed is None and "mask_embed" not in d.drafter_state_dict()
    x = d._block_inputs(torch.tensor([7]))  # (1, gamma, C)
    emb = d.embed_tokens.weight
    assert torch.equal(x[0, 0], emb[7]) and torch.equal(x[0, 1], emb[5]) and torch.equal(x[0, 3], emb[5])


# -- attention layout ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_block_sees_only_the_context_before_its_anchor(arch):
    _, d = make(arch)
    feats, ids = batch(d, B=1)
    anchors = torch.tensor([[3, 6]])
    base = d(feats, ids, anchors).logits
    later = feats.clone()
    later[:, 3:] += 5.0  # features of the anchor token and after: unseen by block 0, partly seen by block 1
    out = d(later, ids, anchors).logits
    torch.testing.assert_close(out[:, 0], base[:, 0])
    assert not torch.allclose(out[:, 1], base[:, 1])
    earlier = feats.clone()
    earlier[:, 2] += 5.0  # the last context token of block 0
    assert not torch.allclose(d(earlier, ids, anchors).logits[:, 0], base[:, 0])


def test_blocks_do_not_see_each_other():
    _, d = make()
    feats, ids = batch(d, B=1)
    both = d(feats, ids, torch.tensor([[3, 6]])).logits
    torch.testing.assert_close(both[:, 0], d(feats, ids, torch.tensor([[3]])).logits[:, 0])
    torch.testing.assert_close(both[:, 1], d(feats, ids, torch.tensor([[6]])).logits[:, 0])


# -- sequential head ----------------------------------------------------------------------------------------------


def test_markov_head_adds_a_bias_that_depends_only_on_the_previous_token():
    _, mk = make(head="markov")
    _, none = make(head="none")
    backbone = {k: v for k, v in mk.drafter_state_dict().items() if not k.startswith(("seq.", "confidence."))}
    none.load_drafter_state_dict(backbone, strict=False)
    feats, ids = batch(mk, B=1, L=16)
    ids[0, 4:8] = torch.tensor([9, 9, 3, 9])  # block at anchor 4: previous tokens 9, 9, 3, 9
    anchors = torch.tensor([[4]])
    diff = mk(feats, ids, anchors).logits - none(feats, ids, anchors).logits  # (1, 1, gamma, V)
    expected = mk.seq.W2(mk.seq.W1(torch.tensor([9, 9, 3, 9])))  # B(x_{k-1}, ·), eq. 5
    torch.testing.assert_close(diff[0, 0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diff[0, 0, 0], diff[0, 0, 1])


@pytest.mark.parametrize("head", ["none", "markov", "rnn"])
def test_changing_a_block_token_only_changes_later_positions(head):
    _, d = make(head=head)
    feats, ids = batch(d, B=1, L=16)
    anchors = torch.tensor([[4]])
    base = d(feats, ids, anchors)
    ids2 = ids.clone()
    ids2[0, 6] = (ids[0, 6] + 1) % V  # x_2 of the block: the previous token of position 3
    out = d(feats, ids2, anchors)
    torch.testing.assert_close(out.logits[0, 0, :2], base.logits[0, 0, :2])
    torch.testing.assert_close(out.conf_logits[0, 0, :2], base.conf_logits[0, 0, :2])
    changed = not torch.allclose(out.logits[0, 0, 2], base.logits[0, 0, 2])
    assert changed == (head != "none")
    if head == "none":
        torch.testing.assert_close(out.logits, base.logits)  # a pure parallel block only sees the anchor
    if head == "rnn":
        assert not torch.allclose(out.logits[0, 0, 3], base.logits[0, 0, 3])  # the state carries it on


# -- proposing: q is exactly what the tokens were sampled from ----------------------------------------------------


def teacher_forced(d, feats, ids, t, tokens):
    """The training forward on the drafted tokens: the logits each draft position was sampled from."""
    seq = torch.cat([ids[:, : t + 1], tokens], dim=1)  # context tokens, anchor, drafts
    f = torch.cat([feats[:, :t], torch.zeros(feats.shape[0], seq.shape[1] - t, feats.shape[2])], dim=1)
    return d(f, seq, torch.full((feats.shape[0], 1), t)).logits[:, 0]  # (B, gamma, V)


@pytest.mark.parametrize("head", ["markov", "rnn", "none"])
def test_greedy_q_is_one_hot_argmax_of_the_final_logits(head):
    _, d = make(head=head)
    feats, ids = batch(d, B=1, L=12)
    t = 7
    draft = d.propose(feats[:, :t], [t], ids[:, t], SamplingParams(temperature=0.0))
    logits = teacher_forced(d, feats, ids, t, draft.tokens)
    assert torch.equal(draft.tokens, logits.argmax(-1))
    assert torch.equal(draft.probs, torch.nn.functional.one_hot(logits.argmax(-1), V).float())


@pytest.mark.parametrize("head", ["markov", "rnn"])
def test_sampled_q_matches_the_processed_final_logits(head):
    _, d = make(head=head)
    feats, ids = batch(d, B=1, L=12)
    t = 6
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9)
    draft = d.propose(feats, [t], ids[:, t], params, torch.Generator().manual_seed(3))  # padded context, len t
    logits = teacher_forced(d, feats, ids, t, draft.tokens)
    torch.testing.assert_close(draft.probs, logits_to_probs(logits, params), atol=1e-5, rtol=1e-4)
    assert (draft.probs.gather(-1, draft.tokens[..., None]) > 0).all()


def test_per_row_params_and_generators_are_reproducible():
    _, d = make()
    feats, ids = batch(d, B=2)
    rows = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]

    def run():
        gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
        return d.propose(feats, [6, 8], ids[:, 5], rows, gens)

    a, b = run(), run()
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)
    assert ((a.probs[0] == 0) | (a.probs[0] == 1)).all()  # the greedy row is one-hot
    single = d.propose(feats[1:, :8], [8], ids[1:, 5], rows[1], torch.Generator().manual_seed(2))
    assert torch.equal(single.tokens[0], a.tokens[1])


def test_context_kv_is_incremental_and_batchable():
    _, d = make()
    feats, ids = batch(d, B=1, L=10)
    whole = d.encode_context(feats)
    parts = d.encode_context(feats[:, :4]).cat_tokens(d.encode_context(feats[:, 4:], start=4))
    for a, b in zip(whole.k + whole.v, parts.k + parts.v):
        torch.testing.assert_close(a, b)
    assert whole.crop(6).length == 6
    ctx, lens = ContextKV.batch([whole.crop(6), whole])
    assert lens.tolist() == [6, 10] and ctx.length == 10
    greedy = SamplingParams(temperature=0.0)
    both = d.propose(ctx, lens, torch.tensor([3, 4]), greedy)
    one = d.propose(whole.crop(6), [6], [3], greedy)
    assert torch.equal(both.tokens[0], one.tokens[0])
    torch.testing.assert_close(both.confidence[0], one.confidence[0])


def test_engine_features_feed_the_drafter():
    model, d = make()
    engine = TargetEngine(EngineConfig(feature_layers=d.config.feature_layers, max_context=64), model=model)
    engine.add("r")
    prompt = [0, 5, 7, 9, 11, 2]
    out = engine.prefill("r", prompt)
    anchor = int(out.logits[-1].argmax())
    assert out.features.shape == (len(prompt), d.config.feature_size)
    draft = d.propose(out.features[None], [len(prompt)], [anchor], SamplingParams(temperature=0.0), num_draft=3)
    assert draft.tokens.shape == (1, 3)


# -- training helpers ---------------------------------------------------------------------------------------------


def test_anchor_sampling_and_labels():
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0], [0] * 9 + [1]])
    anchors, keep = sample_anchors(loss_mask, 3, torch.Generator().manual_seed(0))
    assert anchors.shape == keep.shape == (2, 3)
    assert keep[0].all() and not keep[1].any() and (anchors[1] == 0).all()
    a = anchors[0].tolist()
    assert a == sorted(a) and len(set(a)) == 3 and all(3 <= t <= 6 for t in a)
    ids = torch.arange(10)[None].expand(2, -1)
    labels, valid = block_labels(ids, torch.tensor([[5], [8]]), 4, loss_mask)
    assert labels[0, 0].tolist() == [6, 7, 8, 9] and valid[0, 0].tolist() == [True, True, False, False]
    assert labels[1, 0].tolist() == [9, 9, 9, 9] and valid[1, 0].tolist() == [True, False, False, False]
    x = torch.arange(20.0).view(1, 10, 2)
    assert gather_blocks(x, torch.tensor([[1]]), 2).tolist() == [[[[2.0, 3.0], [4.0, 5.0]]]]


# -- losses -------------------------------------------------------------------------------------------------------


def test_tv_and_acceptance_targets():
    logits = torch.randn(3, 4, V)
    p = logits.softmax(-1)
    assert torch.allclose(total_variation(p, p), torch.zeros(3, 4))
    assert torch.allclose(acceptance_rate(logits, logits), torch.ones(3, 4))
    c = acceptance_rate(torch.randn(3, 4, V) * 5, torch.randn(3, 4, V) * 5)
    assert ((c >= 0) & (c <= 1)).all()
    disjoint = torch.full((2, V), -1e4)
    disjoint[0, 0] = disjoint[1, 1] = 0.0
    assert acceptance_rate(disjoint[:1], disjoint[1:]).item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(position_weights(7), torch.exp(-torch.arange(7.0) / 7))


def test_loss_components_and_masking():
    g = torch.Generator().manual_seed(0)
    draft, target = torch.randn(2, 3, 4, V, generator=g), torch.randn(2, 3, 4, V, generator=g)
    labels, conf = torch.randint(0, V, (2, 3, 4), generator=g), torch.randn(2, 3, 4, generator=g)
    same = drafter_loss(target, target, labels, conf)
    assert same.tv.item() == pytest.approx(0.0, abs=1e-6) and torch.allclose(same.accept, torch.ones(4))
    assert same.tau.item() == pytest.approx(5.0)
    out = drafter_loss(draft, target, labels, conf)
    assert out.loss.item() == pytest.approx(0.1 * out.ce.item() + 0.9 * out.tv.item() + out.conf.item(), rel=1e-6)
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    valid[..., 2:] = False
    masked = drafter_loss(draft, target, labels, conf, valid)
    draft2 = draft.clone()
    draft2[..., 2:, :] = torch.randn(2, 3, 2, V)
    assert drafter_loss(draft2, target, labels, conf, valid).loss.item() == pytest.approx(masked.loss.item())


def test_loss_decreases_when_fitting_a_fixed_target():
    _, d = make(head="markov")
    d.train()
    feats, ids = batch(d, B=2, L=14, seed=4)
    anchors = torch.tensor([[2, 5, 9], [1, 4, 8]])
    g = torch.Generator().manual_seed(5)
    target = torch.randn(2, 3, 4, V, generator=g) * 3  # a fixed, fairly peaked target distribution per position
    labels = target.argmax(-1)
    opt = torch.optim.AdamW(d.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        out = d(feats, ids, anchors)
        loss = drafter_loss(out.logits, target, labels, out.conf_logits)
        opt.zero_grad()
        loss.loss.backward()
        opt.step()
        losses.append((loss.loss.item(), loss.tv.item(), loss.conf.item(), loss.tau.item()))
    (loss0, tv0, conf0, tau0), (loss1, tv1, conf1, tau1) = losses[0], losses[-1]
    assert loss1 < 0.75 * loss0 and tv1 < 0.8 * tv0 and conf1 < conf0 and tau1 > tau0


# -- confidence calibration (STS) ---------------------------------------------------------------------------------


def test_sts_fixes_an_overconfident_head():
    g = torch.Generator().manual_seed(0)
    n = 4000
    logits = torch.full((n, 2), 3.0)  # claims 95% per step
    step_ok = torch.rand(n, 2, generator=g) < 0.7  # actually 70%
    accepted = step_ok.int().cumprod(-1).sum(-1)
    temps = fit_sts_temperatures(logits, accepted)
    assert temps.shape == (2,) and (temps > 1).all()
    calibrated = torch.sigmoid(logits[:, 0] / temps[0])
    label = (accepted >= 1).float()
    raw = torch.sigmoid(logits[:, 0])
    assert expected_calibration_error(calibrated, label) < expected_calibration_error(raw, label)
    assert calibrated.mean().item() == pytest.approx(0.7, abs=0.05)


def test_joint_fit_calibrates_every_prefix():
    # position 1 overconfident, position 2 underconfident: the prefix products at both positions are off
    g = torch.Generator().manual_seed(1)
    n = 4000
    logits = torch.stack([torch.full((n,), 3.0), torch.randn(n, generator=g) * 0.5 - 0.5], dim=1)
    step_ok = torch.rand(n, 2, generator=g) < torch.tensor([0.7, 0.8])
    accepted = step_ok.int().cumprod(-1).sum(-1)
    raw = prefix_ece(logits, accepted, torch.ones(2))
    joint = fit_joint_temperatures(logits, accepted)
    sts = fit_sts_temperatures(logits, accepted)
    assert joint.shape == (2,) and joint[0] > 1
    assert prefix_ece(logits, accepted, joint) < 0.5 * raw
    # coordinate descent on the summed objective is never worse than the greedy left-to-right fit by much
    assert prefix_ece(logits, accepted, joint) <= prefix_ece(logits, accepted, sts) + 0.01


def test_position_decay_and_forward_kl_warmup_terms():
    """LossWeights.decay sets w_k = exp(-(k-1)/decay) (DeepSpec's 4 against the paper's gamma); the forward-KL term is
    0 where the drafter matches the target, positive elsewhere, and enters the loss only with its weight."""
    torch.testing.assert_close(position_weights(7, decay=4.0), torch.exp(-torch.arange(7.0) / 4))
    g = torch.Generator().manual_seed(1)
    draft, target = torch.randn(2, 3, 4, V, generator=g), torch.randn(2, 3, 4, V, generator=g)
    labels, conf = torch.randint(0, V, (2, 3, 4), generator=g), torch.randn(2, 3, 4, generator=g)
    tv_only = drafter_loss(draft, target, labels, conf, weights=LossWeights())
    kl_only = drafter_loss(draft, target, labels, conf, weights=LossWeights(tv=0.0, kl=0.9))
    same = drafter_loss(target, target, labels, conf, weights=LossWeights(tv=0.0, kl=0.9))
    kl = (kl_only.loss - 0.1 * kl_only.ce - kl_only.conf) / 0.9
    assert kl.item() > 0.05
    assert (same.loss - 0.1 * same.ce - same.conf).item() == pytest.approx(0.0, abs=1e-5)
    assert tv_only.loss.item() == pytest.approx(0.1 * tv_only.ce.item() + 0.9 * tv_only.tv.item() + tv_only.conf.item())
    flat = drafter_loss(draft, target, labels, conf, weights=LossWeights(decay=1e6))  # ~equal weights
    l1 = (draft.softmax(-1) - target.softmax(-1)).abs().sum(-1)
    assert flat.tv.item() == pytest.approx(l1.mean().item(), rel=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_warm_start_copies_the_targets_last_layers(arch):
    """init_layers_from: draft layer j holds the target's layer L - n_layer + j (projections, pre-norms), the final
    norm the target's; Gemma's (1 + w) norms arrive as scales."""
    model = tiny_model(arch, vocab=V, layers=3)
    d = DSparkDrafter.from_target_model(model, n_layer=2, gamma=4, markov_rank=8)
    d.init_layers_from(model)
    src = model.model.layers
    for j, layer in enumerate(d.layers):
        t = src[1 + j]
        assert torch.equal(layer.attn.q_proj.weight, t.self_attn.q_proj.weight)
        assert torch.equal(layer.attn.o_proj.weight, t.self_attn.o_proj.weight)
        assert torch.equal(layer.mlp.down.weight, t.mlp.down_proj.weight)
        shift = 1.0 if arch == "gemma3" else 0.0
        torch.testing.assert_close(layer.ln_1.weight, t.input_layernorm.weight + shift)
    torch.testing.assert_close(d.norm.weight, model.model.norm.weight + (1.0 if arch == "gemma3" else 0.0))
    feats, ids = batch(d, B=1, L=10, seed=2)
    assert torch.isfinite(d(feats, ids, torch.tensor([[2, 5]])).logits).all()
