"""Builds a ready Decoder from an EngineConfig: the target engine, its tokenizer and a proposer."""

from __future__ import annotations

from dataclasses import replace

from dspark.config import EngineConfig
from dspark.decoding import Decoder
from dspark.draft_model import DraftModelProposer
from dspark.engine import TargetEngine
from dspark.prompt import eos_token_ids


def build_proposer(config: EngineConfig, target: TargetEngine, draft_model: str) -> DraftModelProposer:
    """An independent draft LM proposer; "self" (or the target's name) drafts with the target's own weights."""
    draft_config = replace(config, model=draft_model, feature_layers=())
    if draft_model in ("self", config.model):
        return DraftModelProposer(TargetEngine(draft_config, model=target.model, tokenizer=target.tokenizer))
    draft = TargetEngine(draft_config)
    if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise ValueError(f"draft model {draft_model!r} does not share the target's tokenizer")
    return DraftModelProposer(draft, vocab_size=target.vocab_size)


def build_decoder(config: EngineConfig, draft_model: str | None = None, num_draft: int = 4) -> Decoder:
    """Plain decoding when draft_model is None, else speculative decoding with that draft LM."""
    target = TargetEngine(config)
    proposer = None if draft_model is None else build_proposer(config, target, draft_model)
    return Decoder(target, proposer, num_draft, eos_token_ids(target.model, target.tokenizer))
