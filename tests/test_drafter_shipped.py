"""The drafter shipped for the default target: it loads, it is small, and DSpark generation with it is exact under
every verification policy; `dspark generate --local --json` keeps its contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dspark.core.config import EngineConfig
from dspark.core.decoding import Decoder
from dspark.core.engine import TargetEngine
from dspark.core.sampling import SamplingParams
from dspark.core.scheduler import POLICIES, SpsTable
from dspark.drafter.checkpoint import METADATA, WEIGHTS, default_drafter_path, load_trained_drafter
from dspark.drafter.eval_sets import EVAL_SETS, first_turns
from dspark.drafter.proposer import DSparkProposer
from dspark.models.prompt import encode_prompt, eos_token_ids
from dspark.models.registry import DEFAULT_MODEL

from conftest import transformers_greedy

pytestmark = pytest.mark.slow

MAX_NEW = 32
KNEE = SpsTable(tuple(range(1, 257)), tuple(25.0 * min(1.0, 16 / b) for b in range(1, 257)))


@pytest.fixture(scope="module")
def shipped():
    return default_drafter_path(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def drafter(real_model, shipped):
    model, tok = real_model
    return load_trained_drafter(shipped, model, tok)


def test_shipped_files_are_small_and_documented(shipped):
    from safetensors.torch import load_file

    size = (shipped / WEIGHTS).stat().st_size
    assert size < 60 * 2**20, f"{size / 2**20:.1f} MiB"
    state = load_file(str(shipped / WEIGHTS))
    assert not any("embed_tokens" in k or "lm_head" in k for k in state)  # shared with the target, never stored
    meta = json.loads((shipped / METADATA).read_text())
    assert meta["target"]["model"] == DEFAULT_MODEL and meta["calibration"]["method"] in ("none", "sts", "joint")
    card = (shipped / "README.md").read_text()
    for needed in ("tau", "ECE", "AUC", "ablation", "wall"):
        assert needed.lower() in card.lower(), needed


def test_greedy_is_exact_under_every_policy(real_model, reference_model, drafter):
    """One batch mixing every policy (per-request overrides), two prompts each: every output is transformers' own
    greedy, and every drafting policy gets tokens accepted."""
    model, tok = real_model
    texts = [t for name in EVAL_SETS for t in first_turns(name, limit=2)]  # 10 prompts
    prompts = [encode_prompt(tok, t)[-400:] for t in texts]
    policies = [POLICIES[i % len(POLICIES)] for i in range(len(prompts))]
    hf = transformers_greedy(reference_model[0], prompts, MAX_NEW)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    cfg = EngineConfig(max_requests=len(prompts), max_context=1024, feature_layers=tuple(drafter.config.feature_layers))
    engine = TargetEngine(cfg, model=model, tokenizer=tok)
    dec = Decoder(engine, DSparkProposer(drafter), drafter.config.gamma, eos_token_ids(model, tok), sps=KNEE)
    out = dec.generate(prompts, sp, policy=policies)
    for policy, c, want in zip(policies, out, hf):
        assert c.token_ids == want, policy
    for policy in set(POLICIES) - {"autoregressive"}:
        assert sum(c.stats.accepted for p, c in zip(policies, out) if p == policy) > 0, policy


def test_generate_cli_json_contract(tmp_path, capsys):
    from dspark.cli import main

    base = ["generate", "--local", "--json", "--max-tokens", "16", "--sps-profile", str(tmp_path / "sps.json")]
    assert main([*base, "--temperature", "0", "What is 12 times 7?"]) == 0
    dspark = json.loads(capsys.readouterr().out)
    assert {"text", "token_ids", "finish_reason", "stats"} <= dspark.keys()
    assert {"tau", "rounds", "budget", "accepted_per_position", "drafted"} <= dspark["stats"].keys()
    assert dspark["stats"]["tau"] >= 1.0 and len(dspark["token_ids"]) <= 16
    assert Path(tmp_path / "sps.json").is_file()  # no profile matched: a quick one was measured and saved
    assert main([*base, "--temperature", "0", "--policy", "autoregressive", "What is 12 times 7?"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["token_ids"] == dspark["token_ids"] and plain["stats"]["budget"] == 0
    args = [*base, "--policy", "dspark-async", "--temperature", "0.8", "--seed", "3", "--n", "2", "Tell me a story."]
    assert main(args) == 0
    many = json.loads(capsys.readouterr().out)
    assert len(many["choices"]) == 2 and all("stats" in c for c in many["choices"])
