"""`dspark train` on a tiny random llama target, with training data the target generated itself (no real model)."""

from __future__ import annotations

import json

import pytest
import torch

from dspark.drafter.checkpoint import METADATA, WEIGHTS, TargetMismatchError, load_trained_drafter, target_fingerprint
from dspark.drafter.train import (
    CHECKPOINT,
    LOG,
    PLOT,
    CachedFeatures,
    LiveFeatures,
    Target,
    TrainConfig,
    batch_indices,
    load_examples,
    lr_at,
    make_example,
    train,
)

from conftest import tiny_model

V = 32


def small(**kw) -> TrainConfig:
    """The tiny preset, sized for the tiny target (its vocabulary is 32)."""
    return TrainConfig.preset("tiny", **{"markov_rank": 8, "gamma": 4, **kw})


@pytest.fixture(scope="module")
def target(one_thread):
    return tiny_model("llama", vocab=V)


@pytest.fixture(scope="module")
def data(target, tmp_path_factory):
    """`dspark data`-format JSONL: 10 random prompts, responses sampled from the tiny target."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    with open(path, "w") as f:
        for i in range(10):
            prompt = torch.randint(2, V, (int(torch.randint(4, 12, (), generator=g)),), generator=g).tolist()
            out = target.generate(
                torch.tensor([prompt]), max_new_tokens=48, min_new_tokens=48, do_sample=True, pad_token_id=0
            )
            resp = out[0, len(prompt) :].tolist()
            f.write(json.dumps({"id": f"t:{i}", "prompt_ids": prompt, "response_ids": resp, "finish_reason": "length"}))
            f.write("\n")
    return path


@pytest.fixture(scope="module")
def run(target, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(small(steps=40), data, out, model=target, target_name="tiny-llama", progress=False)


def test_loss_goes_down_and_outputs_written(run):
    losses = [r["loss"] for r in run.log["train"]]
    assert len(losses) == 40 and run.step == 40
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    for r in run.log["train"]:
        assert {"ce", "tv", "conf", "accept", "tau", "lr", "grad_norm"} <= r.keys() and len(r["accept"]) == 4
    assert [e["step"] for e in run.log["eval"]] == [10, 20, 30, 40]
    for name in (CHECKPOINT, LOG, PLOT, WEIGHTS, METADATA):
        assert (run.out_dir / name).is_file(), name
    log = json.loads((run.out_dir / LOG).read_text())
    cal = log["calibration"]
    assert cal["blocks"] > 0 and 1.0 <= cal["tau"] <= 5.0 and len(cal["temperatures"]) == 4
    assert (run.out_dir / PLOT).read_bytes()[:4] == b"\x89PNG"
    temps = run.drafter.conf_temperature.tolist()
    assert temps == pytest.approx(cal["temperatures"], rel=1e-3)


def test_saved_drafter_loads_back_identically(run, target):
    d0 = run.drafter.eval()
    d1 = load_trained_drafter(run.out_dir, target)
    assert d1.embed_tokens is target.get_input_embeddings() and d1.lm_head is target.get_output_embeddings()
    # the file holds the drafter's own weights only, never the shared target embedding / LM head
    from safetensors.torch import load_file

    saved = load_file(str(run.out_dir / WEIGHTS))
    assert saved.keys() == d0.drafter_state_dict().keys()
    assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in d0.parameters()) + d0.config.gamma
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 14, d0.config.feature_size, generator=g)
    ids = torch.randint(0, V, (2, 14), generator=g)
    anchors = torch.tensor([[2, 7], [5, 9]])
    with torch.no_grad():
        a, b = d0(feats, ids, anchors), d1(feats, ids, anchors)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.conf_logits, b.conf_logits)
    assert torch.equal(d1.conf_temperature, d0.conf_temperature)


def test_loading_for_another_target_is_refused(run):
    other = tiny_model("llama", vocab=V, layers=3)
    with pytest.raises(TargetMismatchError, match="tiny-llama"):
        load_trained_drafter(run.out_dir / WEIGHTS, other)

    class Tok:
        def get_vocab(self):
            return {f"t{i}": i for i in range(V)}

    with pytest.raises(TargetMismatchError):  # same architecture, but a tokenizer the drafter was not trained with
        load_trained_drafter(run.out_dir, tiny_model("llama", vocab=V), Tok())


def test_resume_continues_exactly(target, data, tmp_path):
    cfg = small(steps=16, feature_cache=False, checkpoint_every=4, eval_every=8)
    first = train(cfg, data, tmp_path / "a", model=target, stop_after=10, progress=False)
    assert first.step == 10 and not (tmp_path / "a" / WEIGHTS).exists()
    assert torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)["step"] == 10
    # an unfinished run's checkpoint loads as a drafter (for evaluating it), checked against the target like a file
    mid = load_trained_drafter(tmp_path / "a" / CHECKPOINT, target)
    sm, sf = mid.drafter_state_dict(), first.drafter.drafter_state_dict()
    assert all(torch.equal(sm[k], sf[k]) for k in sf)
    with pytest.raises(TargetMismatchError):
        load_trained_drafter(tmp_path / "a" / CHECKPOINT, tiny_model("llama", vocab=V, layers=3))
    with pytest.raises(ValueError, match="already holds"):
        train(cfg, data, tmp_path / "a", model=target, progress=False)
    with pytest.raises(ValueError, match="n_layer"):
        train(small(steps=16, n_layer=2), data, tmp_path / "a", resume=True, model=target, progress=False)
    resumed = train(cfg, data, tmp_path / "a", resume=True, model=target, progress=False)
    assert resumed.step == 16 and [r["step"] for r in resumed.log["train"]] == list(range(1, 17))
    straight = train(cfg, data, tmp_path / "b", model=target, progress=False)
    assert [r["loss"] for r in resumed.log["train"]] == [r["loss"] for r in straight.log["train"]]
    sa, sb = resumed.drafter.drafter_state_dict(), straight.drafter.drafter_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_over_a_draft_vocabulary(target, data, tmp_path):
    """draft_vocab=N trains over the N most frequent response tokens of the training split (EOS kept) and ships a
    drafter that drafts from exactly them."""
    from dspark.drafter.train import split_heldout, training_vocab

    cfg = small(steps=12, draft_vocab=12, eval_every=6)
    r = train(cfg, data, tmp_path, model=target, target_name="tiny-llama", progress=False)
    examples = load_examples(data, cfg.max_seq_len)
    train_idx, _ = split_heldout(examples, cfg.heldout_frac, cfg.seed)
    want = training_vocab([examples[i] for i in train_idx], 12, target, None)
    assert len(want) == 12 and want == sorted(want)
    back = load_trained_drafter(tmp_path, target)
    assert back.config.draft_vocab_size == 12 and back.draft_vocab.tolist() == want
    assert all(1.0 <= e["tau"] <= 5.0 for e in r.log["eval"]) and r.log["calibration"]["blocks"] > 0
    with pytest.raises(ValueError, match="draft_vocab"):
        train(small(steps=16), data, tmp_path, resume=True, model=target, progress=False)


def test_fine_tuning_starts_from_a_trained_drafter(target, data, tmp_path):
    """init_from: the run's step-0 drafter is the given one (weights and draft vocabulary), and a
    drafter of another shape is refused by name."""
    first = train(small(steps=12, draft_vocab=12), data, tmp_path / "a", model=target, progress=False)
    cfg = small(steps=1, draft_vocab=12, init_from=str(tmp_path / "a"), lr=1e-12, warmup=1)
    tuned = train(cfg, data, tmp_path / "b", model=target, progress=False)
    a, b = first.drafter.drafter_state_dict(), tuned.drafter.drafter_state_dict()
    assert torch.equal(a["draft_vocab"], b["draft_vocab"])
    moved = [k for k in a if k != "conf_temperature" and not torch.allclose(a[k].float(), b[k].float(), atol=1e-3)]
    assert moved == []  # one step at lr 1e-12: the weights are the initial drafter's (up to bf16 storage)
    assert tuned.log["config"]["init_from"] == str(tmp_path / "a")
    assert (
        tuned.log["train"][0]["loss"]
        < train(
            small(steps=1, draft_vocab=12, lr=1e-12, warmup=1), data, tmp_path / "c", model=target, progress=False
        ).log["train"][0]["loss"]
    )  # a trained start beats a random one
    with pytest.raises(ValueError, match="markov_rank"):
        train(
            small(steps=1, draft_vocab=12, markov_rank=4, init_from=str(tmp_path / "a")),
            data,
            tmp_path / "d",
            model=target,
            progress=False,
        )


def test_no_sequential_head_ablation_via_cli(target, data, tmp_path, monkeypatch):
    import dspark.drafter.train
    import dspark.models.model_store
    from dspark.cli import main

    monkeypatch.setattr(dspark.models.model_store, "load_model", lambda *a, **k: (target, None))
    monkeypatch.setitem(dspark.drafter.train.PRESETS, "tiny", small(eval_every=0, checkpoint_every=0))
    out = tmp_path / "ablation"
    args = ["train", "--data", str(data), "--config", "tiny", "--steps", "3", "--sequential-head", "none"]
    args += ["--markov-rank", "4"]
    assert main([*args, "--out", str(out)]) == 0
    meta = json.loads((out / METADATA).read_text())
    assert meta["drafter_config"]["sequential_head"] == "none" and meta["steps"] == 3
    assert meta["drafter_config"]["markov_rank"] == 4
    d = load_trained_drafter(out, target)
    assert d.seq is None and not any(k.startswith("seq.") for k in d.drafter_state_dict())
    assert d.confidence.in_features == d.config.hidden_size


def test_ablation_options_via_cli(target, data, tmp_path, monkeypatch):
    """The issue's ablations as flags: a warm start from the target's last layers, DeepSpec's position decay, a
    forward-KL warm-up and the block size; each lands in the run's config and the first step starts where it says."""
    import dspark.drafter.train
    import dspark.models.model_store
    from dspark.cli import main

    monkeypatch.setattr(dspark.models.model_store, "load_model", lambda *a, **k: (target, None))
    monkeypatch.setitem(dspark.drafter.train.PRESETS, "tiny", small(eval_every=0, checkpoint_every=0))
    out = tmp_path / "ablation"
    args = ["train", "--data", str(data), "--config", "tiny", "--steps", "4", "--init-layers", "target"]
    args += ["--position-decay", "4", "--kl-warmup", "2", "--gamma", "3", "--out", str(out)]
    assert main(args) == 0
    cfg = json.loads((out / METADATA).read_text())["train_config"]
    assert (cfg["init_layers"], cfg["position_decay"], cfg["kl_warmup"], cfg["gamma"]) == ("target", 4.0, 2, 3)
    log = json.loads((out / LOG).read_text())
    assert len(log["train"]) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log["train"])
    # inside train, the drafter it trains is warm-started before its first step, from the target's last layer (the
    # tiny target has 2 layers, the drafter 1), and only when asked
    drafter_cls = dspark.drafter.train.DSparkDrafter
    original, starts = drafter_cls.init_layers_from, []

    def spy(self, model):
        original(self, model)
        starts.append(torch.equal(self.layers[0].mlp.up.weight, model.model.layers[1].mlp.up_proj.weight))

    monkeypatch.setattr(drafter_cls, "init_layers_from", spy)
    first = train(small(steps=1, init_layers="target"), data, tmp_path / "warm", model=target, progress=False)
    assert first.step == 1 and starts == [True]
    train(small(steps=1), data, tmp_path / "cold", model=target, progress=False)
    assert starts == [True]  # random init: not called


def test_kl_warmup_schedule_and_validation():
    cfg = small(kl_warmup=3, position_decay=4.0)
    before, after = cfg.loss_weights_at(2), cfg.loss_weights_at(3)
    assert (before.tv, before.kl, before.decay) == (0.0, cfg.loss_tv, 4.0)
    assert (after.tv, after.kl) == (cfg.loss_tv, 0.0) and after == cfg.loss_weights
    with pytest.raises(ValueError, match="init_layers"):
        small(init_layers="copy")
    with pytest.raises(ValueError, match="position_decay"):
        small(position_decay=0.0)


# -- pieces ----------------------------------------------------------------------------------------------------


def test_make_example_truncation():
    ex = make_example("a", list(range(10)), list(range(100, 105)), 64)
    assert ex.ids == tuple(range(10)) + tuple(range(100, 105)) and ex.n_prompt == 10
    ex = make_example("b", list(range(50)), list(range(100, 140)), 64)  # response keeps half the window
    assert len(ex.ids) == 64 and ex.n_prompt == 32 and ex.ids[:32] == tuple(range(18, 50))
    ex = make_example("c", list(range(10)), list(range(100, 200)), 64)  # short prompt kept whole
    assert ex.n_prompt == 10 and ex.ids[10:] == tuple(range(100, 154))


def test_load_examples_skips_responseless(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [("a", [1, 2], [3, 4, 5]), ("b", [1, 2], [3]), ("c", [1], [4, 5])]
    p.write_text("".join(json.dumps({"id": i, "prompt_ids": a, "response_ids": b}) + "\n" for i, a, b in rows))
    assert [e.id for e in load_examples(p, 16)] == ["a", "c"]
    p.write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match="dspark data"):
        load_examples(p, 16)


def test_several_data_files_and_two_samples_of_a_prompt(tmp_path):
    """--data takes several files (.gz too); two samples of one prompt are held out together or trained on together."""
    import gzip

    from dspark.drafter.train import split_heldout

    recs = [{"id": f"p:{i}", "prompt_ids": [1, 2], "response_ids": [3, 4, 5 + i]} for i in range(20)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({**r, "response_ids": [6, 7, 8]}) + "\n" for r in recs)
    both = load_examples([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"], 16)
    assert len(both) == 40 and both[20].ids == (1, 2, 6, 7, 8)
    assert len(load_examples([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"], 16, limit=25)) == 25
    train_idx, held = split_heldout(both, 0.2, seed=0)
    assert len(held) == 8 and sorted(train_idx + held) == list(range(40))
    assert {both[i].id for i in held}.isdisjoint(both[i].id for i in train_idx)
    # one file of distinct prompts splits as it always did: a seeded permutation of the examples
    one = load_examples(tmp_path / "a.jsonl", 16)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()
    assert split_heldout(one, 0.2, seed=0) == (sorted(order[4:]), sorted(order[:4]))


def test_schedule_and_batch_order():
    cfg = small(lr=1.0, warmup=4, steps=20, min_lr_ratio=0.1)
    assert [lr_at(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(cfg, 19) == pytest.approx(0.1, abs=0.01) and lr_at(cfg, 12) == pytest.approx(0.55, abs=0.05)
    seen = [i for s in range(5) for i in batch_indices(10, 2, s, seed=1)]
    assert sorted(seen) == list(range(10))  # one epoch visits every example once
    assert batch_indices(10, 2, 7, seed=1) == batch_indices(10, 2, 7, seed=1) != batch_indices(10, 2, 7, seed=2)


def test_target_features_and_gathered_logits(target, data, tmp_path):
    exs = load_examples(data, 64)[:3]
    t = Target(target, (1, 2))
    live = LiveFeatures(t, exs).batch([0, 1, 2])
    cached = CachedFeatures(t, exs, tmp_path / "cache", key="k").batch([0, 1, 2])
    real = live.attention_mask.bool()  # padding: the live target's output, zeros in the cache; neither is read
    assert torch.allclose(live.features[real], cached.features[real], atol=2e-2, rtol=1e-2)
    assert torch.allclose(live.final[real], cached.final[real], atol=2e-2, rtol=1e-2)
    assert torch.equal(live.input_ids, cached.input_ids) and torch.equal(live.loss_mask, cached.loss_mask)
    for i, e in enumerate(exs):  # right padding leaves every real position as the unpadded forward computes it
        ref = target(torch.tensor([e.ids]), output_hidden_states=True)
        n = len(e.ids)
        assert torch.allclose(live.features[i, :n, 32:], ref.hidden_states[2][0], atol=1e-5)
        assert torch.allclose(t.logits(live.final[i, :n]), ref.logits[0], atol=1e-5)
        assert live.loss_mask[i].sum() == n - e.n_prompt and not live.loss_mask[i, : e.n_prompt].any()


def test_fingerprint():
    a, b = tiny_model("llama", vocab=V, seed=0), tiny_model("llama", vocab=V, seed=1)
    assert target_fingerprint(a) == target_fingerprint(b)  # same architecture and (no) tokenizer
    assert target_fingerprint(a) != target_fingerprint(tiny_model("qwen2", vocab=V))
