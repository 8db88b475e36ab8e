"""The DSpark drafter as a proposer: per request it keeps the drafter's context keys/values, grown from the
target features that arrive with each DraftRequest, and drafts all requests of a round in one batched pass.
"""

from __future__ import annotations

import time

import torch

from dspark.core.planner import DraftCost
from dspark.core.proposer import DraftRequest, DraftTimes, Proposal, synced_clock
from dspark.core.sampling import DRAFT_STREAM, RandomStreams
from dspark.drafter.model import ContextKV, DSparkDrafter


class DSparkProposer:
    def __init__(self, drafter: DSparkDrafter, max_support: int | None = None):
        """max_support: sample each draft token from at most that many candidates (a top-k cap over the request's
        own top-k/top-p), so its distribution is sparse and cheap to send to a remote verifier; None = no cap."""
        self.drafter = drafter.eval()
        self.max_support = max_support
        self.draft_cost: DraftCost | None = None  # t_draft(R, K), when profiled (drafter/cost_profile.py)
        self.device = next(drafter.parameters()).device
        self.times = DraftTimes()  # where drafting's time went, summed over calls
        self._ctx: dict[str, ContextKV] = {}  # context K/V of every token before the request's anchor
        self._rng = RandomStreams(DRAFT_STREAM, self.device)  # draft tokens from position p on: keyed by p

    @property
    def gamma(self) -> int:
        return self.drafter.config.gamma

    def release(self, request_id: str) -> None:
        self._ctx.pop(request_id, None)
        self._rng.release(request_id)

    def rollback(self, request_id: str, length: int) -> None:
        """Keep the context of the first `length` tokens only (a caller retrying a round it already sent)."""
        ctx = self._ctx.get(request_id)
        if ctx is not None and ctx.length > length:
            self._ctx[request_id] = ctx.crop(length)

    @torch.no_grad()
    def _absorb(self, requests: list[DraftRequest]) -> None:
        """Every request's new target features into its context K/V, encoded in one pass: the requests' tokens side
        by side, each at its own absolute position (a token's entry depends on that token alone)."""
        fresh, starts = [], []
        for r in requests:  # checked first: a refused round changes nothing
            old = self._ctx.get(r.request_id)
            start = 0 if old is None else old.length
            n = 0 if r.features is None else len(r.features)
            if (n or r.num_draft) and start + n != len(r.token_ids) - 1:
                raise ValueError(
                    f"request {r.request_id!r}: drafter context has {start + n} tokens but {len(r.token_ids) - 1} "
                    "precede the anchor; the target's features must cover every committed token"
                )
            if n:
                fresh.append(r)
                starts.append(start)
        for r in requests:
            if r.request_id not in self._rng:
                self._rng.open(r.request_id, r.params.seed)
        if not fresh:
            return
        lengths = [len(r.features) for r in fresh]
        features = torch.cat([r.features for r in fresh]).to(self.device)[None]  # (1, N, F)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)]).to(self.device)[None]
        new = self.drafter.encode_context(features, positions=positions).split(lengths)
        for r, part in zip(fresh, new):
            old = self._ctx.get(r.request_id)
            self._ctx[r.request_id] = part if old is None else old.cat_tokens(part)

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        t = time.perf_counter()
        self._absorb(requests)
        V = self.drafter.config.vocab_size
        active = [r for r in requests if r.num_draft > 0]
        out = {r.request_id: Proposal.empty(V, self.device) for r in requests if r.num_draft == 0}
        if active:
            k_max = max(r.num_draft for r in active)
            if k_max > self.gamma:
                raise ValueError(f"num_draft {k_max} exceeds the drafter's block size gamma={self.gamma}")
            ctx, lens = ContextKV.batch([self._ctx[r.request_id] for r in active])
            self.times.context_s += synced_clock(self.device) - t
            draft = self.drafter.propose(
                ctx,
                lens,
                [r.token_ids[-1] for r in active],
                params=[r.params for r in active],
                generator=[self._rng.at(r.request_id, len(r.token_ids)) for r in active],
                num_draft=k_max,
                max_support=self.max_support,
                times=self.times,
            )
            # a row drafted past its own k only consumed randomness: its first k tokens and q are exact
            for i, r in enumerate(active):
                k = r.num_draft
                out[r.request_id] = Proposal(draft.tokens[i, :k], draft.probs[i, :k], draft.confidence[i, :k])
        else:
            self.times.context_s += synced_clock(self.device) - t
        self.times.calls += 1
        return [out[r.request_id] for r in requests]
