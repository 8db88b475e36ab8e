"""What a verifier is: it holds the target's state for each request, prefills prompts and verifies a round of draft
blocks for many requests at once. The decode loop talks to the target only through this interface, so the target
can sit in this process (`LocalVerifier`) or behind a gRPC service (`dspark.verifier_client.RemoteVerifier`).

A verifier owns each request's random numbers (stream 0 of its seed, keyed by position: sampling.RandomStreams): the
first token and every accept/reject draw come from them, so a seeded request reproduces wherever its verifier runs,
also when its session is restored on another one.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

import torch

from dspark.core.engine import CapacityError, QueryBlock, TargetEngine
from dspark.core.sampling import RandomStreams, SamplingParams, draw, logits_to_probs
from dspark.core.scheduler import SpsTable
from dspark.core.verification import verify


@dataclass(frozen=True)
class PrefillItem:
    request_id: str
    token_ids: list[int]  # the prompt; with restore, every token before the anchor
    params: SamplingParams
    restore: bool = False  # rebuild a lost session from history: commit token_ids, sample nothing


@dataclass(frozen=True)
class Prefilled:
    token: int | None  # the first generated token (None when restoring)
    features: torch.Tensor | None  # (n, F) target features of the prefilled tokens, or None


@dataclass(frozen=True)
class VerifyItem:
    request_id: str
    anchor: int  # the last emitted token, not yet in the target's cache
    draft_tokens: torch.Tensor  # (k,) int64: the scheduled prefix of the proposal
    draft_probs: torch.Tensor  # (k, V) float32: the distribution each draft token was sampled from (or wire.SparseRows)


@dataclass(frozen=True)
class Verified:
    accepted: int  # draft tokens accepted, 0..k
    tokens: list[int]  # the accepted drafts, then the recovered or bonus token
    bonus: bool
    features: torch.Tensor | None  # (1 + accepted, F) features of the committed tokens: anchor + accepted drafts


class Verifier(Protocol):
    vocab_size: int
    max_context: int
    device: torch.device
    sps: SpsTable | None  # the target's profiled cost table, if it has one
    ragged: bool  # a verify step costs its real tokens (True) or rows x the longest block (False: padded)

    @property
    def free_slots(self) -> int: ...

    def prefill(self, items: list[PrefillItem]) -> list[Prefilled]: ...

    def verify(self, items: list[VerifyItem]) -> list[Verified]: ...

    def release(self, request_id: str) -> None: ...


class ReplicatedVerifier(Verifier, Protocol):
    """A verifier made of several replicas (`dspark.router.pool.VerifierPool`), each request pinned to one of them.
    The decode loop prices each replica's share of a round with that replica's own SPS table (replicas on different
    hardware have different tables); a verifier without these methods is one replica priced with its `sps`."""

    def replica_of(self, request_id: str) -> Hashable:
        """The replica a running request is pinned to (any hashable key but None)."""
        ...

    def sps_of(self, replica: Hashable) -> SpsTable | None:
        """That replica's SPS table (None: it has none; the decode loop then uses `sps`)."""
        ...


class LocalVerifier:
    """The target engine in this process."""

    def __init__(self, engine: TargetEngine, sps: SpsTable | None = None):
        self.engine = engine
        self.vocab_size = engine.vocab_size
        self.max_context = engine.config.max_context
        self.device = engine.device
        self.sps = sps
        self.ragged = engine.ragged
        self._params: dict[str, SamplingParams] = {}
        self._rng = RandomStreams(stream=0, device=self.device)

    @property
    def free_slots(self) -> int:
        return self.engine.free_slots

    @property
    def active(self) -> int:
        return self.engine.active

    def prefill(self, items: list[PrefillItem]) -> list[Prefilled]:
        if len(items) > self.engine.free_slots:
            raise CapacityError(
                f"{len(items)} sessions asked for, {self.engine.free_slots} of {self.engine.config.max_requests} free"
            )
        out = []
        for it in items:
            self.engine.add(it.request_id)
            try:
                o = self.engine.prefill(it.request_id, it.token_ids)
            except Exception:
                self.engine.release(it.request_id)
                raise
            self._params[it.request_id] = it.params
            self._rng.open(it.request_id, it.params.seed)
            if it.restore:
                token = None
            else:
                rng = self._rng.at(it.request_id, len(it.token_ids))
                token = int(draw(logits_to_probs(o.logits[-1], it.params), it.params, rng))
            out.append(Prefilled(token, o.features))
        return out

    def verify(self, items: list[VerifyItem]) -> list[Verified]:
        # the anchor sits at position `length`: this round draws the tokens from length + 1 on
        firsts = [self.engine.length(it.request_id) + 1 for it in items]
        outs = self.engine.forward([QueryBlock(it.request_id, [it.anchor] + it.draft_tokens.tolist()) for it in items])
        results = []
        for it, o, first in zip(items, outs, firsts):
            params = self._params[it.request_id]
            target_probs = logits_to_probs(o.logits, params)  # (k+1, V)
            q = (
                it.draft_probs.dense(self.device) if hasattr(it.draft_probs, "dense") else it.draft_probs
            )  # wire.SparseRows
            v = verify(it.draft_tokens, q, target_probs, self._rng.at(it.request_id, first), greedy=params.greedy)
            self.engine.commit(it.request_id, 1 + v.accepted)  # anchor + accepted drafts
            feats = None if o.features is None else o.features[: 1 + v.accepted]
            results.append(Verified(v.accepted, v.tokens, v.bonus, feats))
        return results

    def refeature(self, items: list[tuple[str, list[int]]]) -> list[torch.Tensor | None]:
        """(request, every token before its anchor) -> the target features of those tokens, by prefilling the
        request's cache again from them (random numbers are keyed by position: nothing else changes). A remote
        drafter that lost its sessions reopens them from these (RemoteProposer's features_of)."""
        out = []
        for rid, tokens in items:
            self.engine.release(rid)
            self.engine.add(rid)
            out.append(self.engine.prefill(rid, tokens).features)
        return out

    def release(self, request_id: str) -> None:
        self.engine.release(request_id)
        self._params.pop(request_id, None)
        self._rng.release(request_id)
