"""DSpark training losses (paper §3.3, eqs. 8-12) as pure functions on tensors: cross-entropy to the ground truth,
distribution matching to the target, and a confidence loss against the analytic acceptance rate, all weighted by
block position.

Shapes: (..., gamma, N) logits (N: the whole vocabulary V, or a draft vocabulary) and (..., gamma) labels, where ...
is any batch of blocks, e.g. (B, A) from DSparkDrafter.forward. Reduction: each term is sum_k w_k * l_k summed over
blocks, divided by sum_k w_k over the valid positions. For full blocks that is eqs. 9-11 (a sum over k per block)
averaged over blocks and divided by the constant sum_k w_k; partially valid blocks (sequence end, prompt) are handled
without changing the scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.1  # alpha_ce (eq. 12)
    tv: float = 0.9  # alpha_tv
    conf: float = 1.0  # alpha_conf
    kl: float = 0.0  # forward KL(p_t || p_d) on the drafter's columns (a warm-up before TV; not in eq. 12)
    decay: float | None = None  # position weights exp(-(k-1)/decay); None: gamma (the paper), DeepSpec's code uses 4


@dataclass
class DrafterLosses:
    loss: torch.Tensor  # () eq. 12: alpha_ce*ce + alpha_tv*tv + alpha_conf*conf, the one to backprop
    ce: torch.Tensor  # () eq. 9
    tv: torch.Tensor  # () eq. 10: weighted ||p_d - p_t||_1 (= 2 x total variation, as the paper writes it)
    conf: torch.Tensor  # () eq. 11
    accept: torch.Tensor  # (gamma,) detached: mean c*_k per position, the per-step acceptance rate
    tau: torch.Tensor  # () detached: expected tokens per round, 1 + sum_k prod_{i<=k} c*_i, mean over blocks


def position_weights(gamma: int, device=None, decay: float | None = None) -> torch.Tensor:
    """w_k = exp(-(k-1)/decay) for k = 1..gamma, decay = gamma by default (§3.3, after DFlash): earlier positions weigh
    more, as every later token only counts if all before it are accepted."""
    return torch.exp(-torch.arange(gamma, device=device, dtype=torch.float32) / (decay or gamma))


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(..., V) distributions -> (...) total variation distance 1/2 ||p - q||_1, in [0, 1]."""
    return 0.5 * (p - q).abs().sum(-1)


def acceptance_rate(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) c* = 1 - TV(p_d, p_t) (eq. 8): the chance rejection sampling accepts a draft token
    drawn from p_d when the target's distribution is p_t (Leviathan et al. 2023)."""
    p_d = draft_logits.float().softmax(-1)
    p_t = target_logits.float().softmax(-1)
    return (1.0 - total_variation(p_d, p_t)).clamp(0.0, 1.0)


def drafter_loss(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.Tensor,
    conf_logits: torch.Tensor,
    valid: torch.Tensor | None = None,
    weights: LossWeights | None = None,
    target_lse: torch.Tensor | None = None,
) -> DrafterLosses:
    """draft_logits (..., gamma, N): the draft distribution's logits (base + sequential bias, eq. 4) over N tokens, the
    whole vocabulary or the draft vocabulary; target_logits (..., gamma, N): the target's next-token logits on the
    same tokens (temperature 1); target_lse (..., gamma): the logsumexp of the target's logits over its whole
    vocabulary when the N columns are only the draft vocabulary (SpecForge's normalisation; None: they are the whole
    vocabulary), so p_t keeps its true mass and the mass off the draft vocabulary, which the drafter can never
    propose, counts in full in ||p_d - p_t||_1 and so in c*; labels (..., gamma): the ground truth x*_k as a column
    index, negative where it is off the draft vocabulary (no cross-entropy term there); conf_logits (..., gamma): the
    confidence head before its sigmoid; valid (..., gamma) bool: which positions count (default all)."""
    weights = weights or LossWeights()
    gamma = draft_logits.shape[-2]
    valid = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid.bool()
    w = position_weights(gamma, draft_logits.device, weights.decay) * valid  # (..., gamma)
    denom = w.sum().clamp(min=1e-6)

    logp_d = draft_logits.float().log_softmax(-1)  # (..., gamma, N)
    p_d = logp_d.exp()
    t = target_logits.float().detach()
    if target_lse is None:
        p_t, off = t.softmax(-1), 0.0
    else:
        p_t = (t - target_lse.float().detach()[..., None]).exp()  # (..., gamma, N) sums to the mass on the N tokens
        off = (1.0 - p_t.sum(-1)).clamp(min=0.0)  # (..., gamma) the target's mass off them
    nll = -logp_d.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels >= 0)  # (..., gamma)
    l1 = (p_d - p_t).abs().sum(-1) + off  # (..., gamma)  ||p_d - p_t||_1 over the whole vocabulary
    c_star = (1.0 - 0.5 * l1).clamp(0.0, 1.0).detach()  # eq. 8, a soft label: no gradient through it
    bce = F.binary_cross_entropy_with_logits(conf_logits.float(), c_star, reduction="none")  # (..., gamma)
    # forward KL on the N columns: sum p_t (log p_t - log p_d); the target's mass off them is a constant the drafter
    # cannot move (and infinite in a true KL), so it is left out
    kl = (p_t * (p_t.clamp(min=1e-12).log() - logp_d)).sum(-1) if weights.kl else torch.zeros_like(l1)

    ce = (w * nll).sum() / denom  # eq. 9
    tv = (w * l1).sum() / denom  # eq. 10
    conf = (w * bce).sum() / denom  # eq. 11
    kl = (w * kl).sum() / denom
    with torch.no_grad():
        vf = valid.float().reshape(-1, gamma)
        cs = c_star.reshape(-1, gamma) * vf
        accept = cs.sum(0) / vf.sum(0).clamp(min=1)
        blocks = vf[:, 0] > 0
        tau = (1.0 + cs.cumprod(-1).sum(-1))[blocks].mean() if blocks.any() else cs.new_zeros(())
    loss = weights.ce * ce + weights.tv * tv + weights.conf * conf + weights.kl * kl
    return DrafterLosses(loss, ce, tv, conf, accept, tau)
