"""Builds a ready Decoder from an EngineConfig: the target engine, its tokenizer, a proposer and, for the
confidence-scheduled policies, the engine's SPS cost table."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dspark.core.config import EngineConfig
from dspark.core.decoding import Decoder
from dspark.core.draft_lm import DraftModelProposer
from dspark.core.engine import TargetEngine
from dspark.core.scheduler import POLICIES
from dspark.drafter.checkpoint import default_drafter_path, load_target_with_drafter
from dspark.models.prompt import eos_token_ids


def build_proposer(config: EngineConfig, target: TargetEngine, draft_model: str) -> DraftModelProposer:
    """An independent draft LM proposer; "self" (or the target's name) drafts with the target's own weights."""
    draft_config = replace(config, model=draft_model, feature_layers=())
    if draft_model in ("self", config.model):
        return DraftModelProposer(TargetEngine(draft_config, model=target.model, tokenizer=target.tokenizer))
    draft = TargetEngine(draft_config)
    if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise ValueError(f"draft model {draft_model!r} does not share the target's tokenizer")
    return DraftModelProposer(draft, vocab_size=target.vocab_size)


def build_decoder(
    config: EngineConfig, draft_model: str | None = None, num_draft: int = 4, policy: str = "fixed"
) -> Decoder:
    """Plain decoding when draft_model is None, else speculative decoding with that draft LM (no confidences:
    fixed-length verification, or autoregressive)."""
    target = TargetEngine(config)
    proposer = None if draft_model is None else build_proposer(config, target, draft_model)
    return Decoder(target, proposer, num_draft, eos_token_ids(target.model, target.tokenizer), policy=policy)


def build_dspark_decoder(
    config: EngineConfig,
    drafter: str | Path | None = None,
    policy: str = "dspark",
    sps_profile_path: str | Path | None = None,
    threshold: float = 0.5,
    gamma: int | None = None,
    log=print,
    draft_cost: bool = True,
    draft_cost_path: str | Path | None = None,
) -> Decoder:
    """DSpark: the target engine with a trained DSpark drafter (default: the one shipped for config.model), its
    feature layers switched on, the engine's SPS table and the drafter's cost table t_draft(R, K) (each loaded, or
    quickly profiled when none matches). draft_cost=False prices rounds with the verifier alone (the paper's
    Theta) and drafts every request in full."""
    from dspark.core import sps_profile
    from dspark.drafter import cost_profile
    from dspark.drafter.proposer import DSparkProposer

    if policy not in POLICIES:  # before loading anything
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    drafter_path = Path(drafter) if drafter else default_drafter_path(config.model)
    engine, d = load_target_with_drafter(config, drafter_path)
    sps = sps_profile.load_or_profile(engine, sps_profile_path, log=log)
    k = d.config.gamma if gamma is None else gamma
    if not 1 <= k <= d.config.gamma:
        raise ValueError(f"gamma must be in 1..{d.config.gamma} (the drafter's block size)")
    eos = eos_token_ids(engine.model, engine.tokenizer)
    d.use_linear_kernel(config.linear_kernel)
    proposer = DSparkProposer(d)
    if draft_cost:
        proposer.draft_cost = cost_profile.load_or_profile(
            proposer, drafter_path.name, config.max_requests, draft_cost_path, log=log
        )
    return Decoder(engine, proposer, k, eos, policy=policy, sps=sps, threshold=threshold)
