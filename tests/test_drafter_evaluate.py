"""`dspark eval` on a tiny random llama target with a tiny untrained DSpark drafter (no real model)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dspark.core.config import EngineConfig
from dspark.core.engine import TargetEngine
from dspark.core.sampling import SamplingParams
from dspark.drafter.checkpoint import (
    default_drafter_path,
    load_trained_drafter,
    save_trained_drafter,
    target_fingerprint,
)
from dspark.drafter.evaluate import (
    THRESHOLDS,
    Round,
    evaluate_prompts,
    format_table,
    roc_auc,
    threshold_sweep,
    write_outputs,
)
from dspark.drafter.model import DSparkDrafter

from conftest import tiny_model

V = 32
LAYERS = (0, 1, 2)
GAMMA = 4
KEYS = {"tau", "rounds", "requests", "acceptance_by_position", "ece_before", "ece_after", "auc_before", "auc_after"}


@pytest.fixture(scope="module")
def target(one_thread):
    return tiny_model("llama", vocab=V)


@pytest.fixture(scope="module")
def drafter(target, tmp_path_factory):
    """An untrained drafter, saved and loaded back as `dspark train` output; a random confidence head and
    non-trivial STS temperatures so that before/after calibration differ."""
    torch.manual_seed(1)
    d = DSparkDrafter.from_target_model(target, feature_layers=LAYERS, n_layer=1, gamma=GAMMA, markov_rank=8)
    torch.nn.init.normal_(d.confidence.weight, std=1.0)
    d.conf_temperature.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]))
    out = tmp_path_factory.mktemp("drafter")
    save_trained_drafter(d, out, "tiny-llama", target_fingerprint(target))
    return load_trained_drafter(out, target)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """A tiny synthetic dataset, written as JSONL of pre-tokenized prompts and read back."""
    path = tmp_path_factory.mktemp("data") / "synthetic.jsonl"
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for _ in range(4):
            ids = torch.randint(2, V, (int(torch.randint(3, 9, (), generator=g)),), generator=g).tolist()
            f.write(json.dumps({"prompt_ids": ids}) + "\n")
    return [json.loads(line)["prompt_ids"] for line in path.read_text().splitlines()]


def engine(target, max_requests=2):
    return TargetEngine(EngineConfig(max_requests=max_requests, max_context=96, feature_layers=LAYERS), model=target)


@pytest.fixture(scope="module")
def result(target, drafter, prompts):
    sp = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    return evaluate_prompts(engine(target), drafter, prompts, sp, gamma=GAMMA, seed=0)


def test_metrics_contract(result):
    assert KEYS | {"threshold_sweep"} <= result.keys()
    assert result["requests"] == 4 and result["rounds"] > 0
    assert 1.0 <= result["tau"] <= GAMMA + 1
    for key in KEYS - {"tau", "rounds", "requests"}:
        assert len(result[key]) == GAMMA, key
    assert all(x is None or 0.0 <= x <= 1.0 for x in result["acceptance_by_position"])
    assert result["acceptance_by_position"][0] is not None  # every drafted round reaches position 1
    for key in ("auc_before", "auc_after", "ece_before", "ece_after"):
        assert all(x is None or 0.0 <= x <= 1.0 for x in result[key]), key
    json.dumps(result)  # JSON-serialisable


def test_tau_matches_the_recorded_rounds(result):
    # every request drafts gamma tokens a round until max_tokens leaves less room: tau from the accepted drafts
    assert result["tau"] == pytest.approx(1.0 + result["mean_accepted"])
    reached = result["reached_by_position"]
    assert reached[0] == result["drafted_rounds"] and all(a >= b for a, b in zip(reached, reached[1:]))


def test_threshold_sweep_is_monotone(result):
    sweep = result["threshold_sweep"]
    assert [r["threshold"] for r in sweep] == list(THRESHOLDS)
    verified = [r["verified"] for r in sweep]
    assert all(a >= b for a, b in zip(verified, verified[1:]))
    assert all(
        0 <= r["accepted"] <= r["verified"] <= GAMMA and (r["wasted"] is None or 0 <= r["wasted"] <= 1) for r in sweep
    )


def test_greedy_decoding_and_batching_do_not_change_the_numbers(target, drafter, prompts):
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    one = evaluate_prompts(engine(target, max_requests=1), drafter, prompts, sp, gamma=3)
    many = evaluate_prompts(engine(target, max_requests=4), drafter, prompts, sp, gamma=3)
    assert one["tau"] == many["tau"] and one["acceptance_by_position"] == many["acceptance_by_position"]
    assert len(one["acceptance_by_position"]) == 3


def test_recorded_confidences_match_the_proposals(target, drafter, prompts):
    """The spy on the confidence head reproduces the proposals' calibrated confidences, and the accepted counts
    derived from the histories add up to the decoder's own stats."""
    from dspark.core.decoding import Decoder
    from dspark.drafter.evaluate import RecordingProposer
    from dspark.drafter.proposer import DSparkProposer

    proposer = RecordingProposer(DSparkProposer(drafter))
    dec = Decoder(engine(target), proposer, num_draft=GAMMA)
    sp = SamplingParams(temperature=1.0, max_tokens=17, seed=5, ignore_eos=True)
    completions = dec.generate(prompts, sp)
    temps = drafter.conf_temperature.cpu()
    assert proposer.records and all(c.stats.drafted > 0 for c in completions)
    for recs in proposer.records.values():
        for rec in recs:
            k = len(rec.raw)
            logit = rec.raw.log() - (-rec.raw).log1p()
            torch.testing.assert_close(torch.sigmoid(logit / temps[:k]), rec.confidence)
    for c in completions:
        rounds = proposer.rounds(c)
        assert sum(r.accepted for r in rounds) == c.stats.accepted
        assert sum(r.drafted for r in rounds) == c.stats.drafted
    assert proposer.records == {}


def test_gamma_beyond_the_block_size_is_refused(target, drafter, prompts):
    with pytest.raises(ValueError, match="block size"):
        evaluate_prompts(engine(target), drafter, prompts, SamplingParams(), gamma=GAMMA + 1)


def test_outputs_and_table(result, tmp_path):
    full = {"drafter": "x", "gamma": GAMMA, "temperature": 1.0, "datasets": {"synthetic": result}}
    write_outputs(full, tmp_path)
    assert json.loads((tmp_path / "eval.json").read_text())["datasets"]["synthetic"]["tau"] == result["tau"]
    pytest.importorskip("matplotlib")
    for name in ("acceptance.png", "threshold_sweep.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    table = format_table(full)
    assert "synthetic" in table and "AUC" in table


def test_missing_shipped_drafter_names_dspark_train():
    with pytest.raises(FileNotFoundError, match="dspark train"):
        default_drafter_path("no-such-model")


def test_cli_reports_missing_drafter(capsys):
    from dspark.cli import main

    assert main(["eval", "--model", "no-such-model", "--datasets", "gsm8k"]) == 2
    assert "dspark train" in capsys.readouterr().err


# -- AUC and the sweep on hand-computed cases ---------------------------------------------------------------------


def test_auc_hand_computed():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # pairs (pos, neg): (0.8 vs 0.1, 0.9) -> 1, 0 ; (0.4 vs 0.1, 0.9) -> 1, 0  => 2/4
    assert roc_auc([0.1, 0.4, 0.8, 0.9], [0, 1, 1, 0]) == 0.5
    # 3 positives, 2 negatives: pos 0.35 beats neg 0.1 only; 0.8 beats both; 0.4 beats both => (1+2+2)/6
    assert math.isclose(roc_auc([0.1, 0.35, 0.4, 0.8, 0.5], [0, 1, 1, 1, 0]), 4 / 6)
    # ties count half: all equal -> 0.5; one tie between a positive and a negative
    assert roc_auc([0.5, 0.5, 0.5], [1, 0, 1]) == 0.5
    assert roc_auc([0.3, 0.5, 0.5], [0, 1, 0]) == 0.75
    assert roc_auc([0.3, 0.6], [1, 1]) is None and roc_auc([], []) is None


def test_auc_matches_pairwise_count():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    y = torch.rand(60, generator=g) < 0.4
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean()
    assert math.isclose(roc_auc(s, y), float(pairwise), rel_tol=1e-12)


def test_threshold_sweep_hand_computed():
    rounds = [
        Round(accepted=2, raw=torch.zeros(3), calibrated=torch.tensor([0.9, 0.5, 0.5])),  # cum 0.9, 0.45, 0.225
        Round(accepted=0, raw=torch.zeros(3), calibrated=torch.tensor([0.3, 0.9, 0.9])),  # cum 0.3, 0.27, 0.243
    ]
    by_t = {r["threshold"]: r for r in threshold_sweep(rounds, thresholds=(0.05, 0.25, 0.4, 0.95))}
    assert by_t[0.05] == {"threshold": 0.05, "verified": 3.0, "accepted": 1.0, "wasted": 4 / 6}
    assert by_t[0.25] == {"threshold": 0.25, "verified": 2.0, "accepted": 1.0, "wasted": 0.5}
    assert by_t[0.4] == {"threshold": 0.4, "verified": 1.0, "accepted": 1.0, "wasted": 0.0}
    assert by_t[0.95] == {"threshold": 0.95, "verified": 0.0, "accepted": 0.0, "wasted": None}
