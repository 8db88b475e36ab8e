"""An independent draft language model as proposer (classic speculative decoding, Leviathan et al. 2023).

The draft LM keeps its own KV rows per request and re-syncs from the history it is given each round:
it rolls back to the longest common prefix with what it cached, feeds the rest, then drafts k tokens
one step at a time, batched across requests.
"""

from __future__ import annotations

import torch

from dspark.core.engine import QueryBlock, TargetEngine
from dspark.core.proposer import DraftRequest, Proposal
from dspark.core.sampling import DRAFT_STREAM, RandomStreams, draw, logits_to_probs


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class DraftModelProposer:
    def __init__(self, engine: TargetEngine, vocab_size: int | None = None):
        self.engine = engine  # a model runner for the draft LM (same class as the target's)
        self.vocab_size = vocab_size or engine.vocab_size  # the target's vocabulary, drafts padded to it
        self._cached: dict[str, list[int]] = {}  # tokens whose KV the draft LM holds, per request
        self._rng = RandomStreams(DRAFT_STREAM, self.engine.device)

    def release(self, request_id: str) -> None:
        self.engine.release(request_id)
        self._cached.pop(request_id, None)
        self._rng.release(request_id)

    def _sync(self, r: DraftRequest) -> list[int]:
        """Roll the draft cache back to what still matches the history; return the tokens to feed."""
        if r.request_id not in self._cached:
            self.engine.add(r.request_id)
            self._cached[r.request_id] = []
            self._rng.open(r.request_id, r.params.seed)
        keep = min(common_prefix(self._cached[r.request_id], r.token_ids), len(r.token_ids) - 1)
        self.engine.truncate(r.request_id, keep)
        self._cached[r.request_id] = r.token_ids[:keep]
        return r.token_ids[keep:]

    def _feed(self, blocks: list[QueryBlock]) -> list[torch.Tensor]:
        """Forward and commit blocks; the next-token logits after each block, (V,) each."""
        outs = []
        # prompts can be long: feed big catch-ups one request at a time, small ones batched
        big = [b for b in blocks if len(b.token_ids) > 64]
        small = [b for b in blocks if len(b.token_ids) <= 64]
        by_id = {}
        for b in big:
            by_id[b.request_id] = self.engine.prefill(b.request_id, b.token_ids).logits[-1]
            self._cached[b.request_id] += b.token_ids
        if small:
            for b, o in zip(small, self.engine.forward(small, logits="last")):
                self.engine.commit(b.request_id, len(b.token_ids))
                self._cached[b.request_id] += b.token_ids
                by_id[b.request_id] = o.logits[-1]
        for b in blocks:
            outs.append(by_id[b.request_id])
        return outs

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        active = [r for r in requests if r.num_draft > 0]
        tokens = {r.request_id: [] for r in active}
        probs = {r.request_id: [] for r in active}
        blocks = [QueryBlock(r.request_id, self._sync(r)) for r in active]
        rng = {r.request_id: self._rng.at(r.request_id, len(r.token_ids)) for r in active}
        step = 0
        while active:
            logits = self._feed(blocks)
            for r, lg in zip(active, logits):
                q = logits_to_probs(lg[: self.vocab_size], r.params)  # (V_draft,)
                if q.shape[-1] < self.vocab_size:
                    q = torch.nn.functional.pad(q, (0, self.vocab_size - q.shape[-1]))
                tokens[r.request_id].append(draw(q, r.params, rng[r.request_id]))
                probs[r.request_id].append(q)
            step += 1
            active = [r for r in active if r.num_draft > step]
            blocks = [QueryBlock(r.request_id, [int(tokens[r.request_id][-1])]) for r in active]
        out = []
        for r in requests:
            if r.num_draft == 0 or not tokens.get(r.request_id):
                out.append(Proposal.empty(self.vocab_size, self.engine.device))
            else:
                out.append(Proposal(torch.stack(tokens[r.request_id]), torch.stack(probs[r.request_id])))
        return out
