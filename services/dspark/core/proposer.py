"""What a proposer is: given each request's token history, propose k draft tokens and the distribution
each was sampled from. Proposers never learn how their tokens are accepted; they only see the next
history, which tells them how much of their proposal survived.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch

from dspark.core.sampling import SamplingParams


@dataclass(frozen=True)
class DraftRequest:
    request_id: str
    token_ids: list[int]  # the whole history: prompt + output, ending with the anchor token
    num_draft: int  # k, tokens to propose
    params: SamplingParams
    # (n, F) target features of the tokens committed since this request's previous DraftRequest (the whole prompt
    # the first time); None when the target returns no features. Together they cover every token before the anchor.
    features: torch.Tensor | None = None


@dataclass(frozen=True)
class Proposal:
    token_ids: torch.Tensor  # (k,) int64
    probs: torch.Tensor  # (k, V) float32, the distribution each draft token was sampled from
    confidence: torch.Tensor | None = None  # (k,) P(draft i survives | drafts < i survived), if the proposer knows

    def prefix(self, n: int) -> Proposal:
        """The first n draft tokens: verifying a prefix of a proposal is still lossless."""
        conf = None if self.confidence is None else self.confidence[:n]
        return Proposal(self.token_ids[:n], self.probs[:n], conf)

    @classmethod
    def empty(cls, vocab_size: int, device="cpu") -> Proposal:
        return cls(torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, vocab_size, device=device))


@dataclass
class DraftTimes:
    """Where a proposer's time went, summed over its calls (seconds). In process the wire is 0; a remote proposer
    takes the three compute phases from the draft service's answer and counts the rest of the call as wire: the
    RPC, (de)serialising features and draft distributions, the service's queue."""

    calls: int = 0
    context_s: float = 0.0  # new target features into each request's draft context, contexts batched for the pass
    backbone_s: float = 0.0  # the parallel backbone over every row's block
    head_s: float = 0.0  # per drafted position: LM head, sequential head, confidence, sampling
    wire_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.context_s + self.backbone_s + self.head_s + self.wire_s

    def copy(self) -> DraftTimes:
        return replace(self)

    def plus(self, other: DraftTimes) -> DraftTimes:
        return DraftTimes(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def minus(self, earlier: DraftTimes) -> DraftTimes:
        """What was added since `earlier` (a copy taken then)."""
        return DraftTimes(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})


def synced_clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished what was queued (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def truncated(params: SamplingParams, max_support: int | None) -> SamplingParams:
    """The draft side's sampling parameters when draft distributions must stay small (on the wire): a top-k cap of
    max_support on top of the request's own top-k/top-p. Any draft distribution keeps rejection sampling lossless as
    long as the verifier sees exactly the one each token was sampled from; a sparse one is simply cheap to send."""
    if max_support is None or params.greedy or 0 < params.top_k <= max_support:
        return params
    return replace(params, top_k=max_support)


class Proposer(Protocol):
    def propose(self, requests: list[DraftRequest]) -> list[Proposal]: ...

    def release(self, request_id: str) -> None: ...
