"""Lossless verification of a draft block by rejection sampling (Leviathan et al. 2023, Chen et al. 2023).

Vocabulary: the target checks k draft tokens; the first `accepted` survive; at the first rejection a
*recovered* token is sampled from the residual norm(max(0, p - q)); if all k survive, a *bonus* token is
sampled from the target's distribution after the last draft. Either way a round emits accepted + 1 tokens,
distributed exactly as the target alone would produce them. Verification knows nothing about the drafter:
it sees only the draft tokens and the distribution they were sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.core.sampling import sample


@dataclass(frozen=True)
class VerifyResult:
    accepted: int  # draft tokens that survived, 0..k
    tokens: list[int]  # the accepted drafts followed by the recovered or bonus token
    bonus: bool  # True when all k drafts survived and the last token is a bonus token


def verify(
    draft_tokens: torch.Tensor,  # (k,) int64
    draft_probs: torch.Tensor,  # (k, V) distribution each draft token was sampled from
    target_probs: torch.Tensor,  # (k+1, V) target distribution at each block position
    generator: torch.Generator | None = None,
    greedy: bool = False,  # one-hot target: the recovered/bonus token is its argmax, no draw needed
) -> VerifyResult:
    pick = (lambda d: d.argmax(-1)) if greedy else (lambda d: sample(d, generator))
    k = draft_tokens.shape[0]
    if k:
        idx = torch.arange(k, device=draft_tokens.device)
        p = target_probs[idx, draft_tokens]  # (k,) target prob of each draft token
        q = draft_probs[idx, draft_tokens]  # (k,) draft prob of each draft token
        u = torch.rand(k, generator=generator, device=target_probs.device)
        # accept x_i with probability min(1, p/q): u*q < p, written without a division
        rejected = (u * q >= p).nonzero()
        accepted = int(rejected[0]) if rejected.numel() else k
    else:
        accepted = 0
    if accepted < k:
        residual = (target_probs[accepted] - draft_probs[accepted]).clamp_min(0)
        # p == q leaves no residual mass, but then rejection had probability 0; fall back to p
        dist = residual if residual.sum() > 0 else target_probs[accepted]
        last = pick(dist / dist.sum())
    else:
        last = pick(target_probs[k])
    tokens = draft_tokens[:accepted].tolist() + [int(last)]
    return VerifyResult(accepted=accepted, tokens=tokens, bonus=accepted == k)
