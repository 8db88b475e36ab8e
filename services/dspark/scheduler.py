"""Verification budgets: how many of each request's draft tokens the target verifies this round.

Pure functions, no I/O. The `dspark` policy is the paper's Algorithm 1 (hardware-aware prefix scheduler): with
prefix survival a_{r,j} = prod_{i<=j} c_{r,i}, admit draft tokens in descending a_{r,j} while the expected
throughput Theta = tau * SPS(B) improves, and stop at the first candidate that does not improve it. The early stop
is what keeps verification lossless (Appendix A): whether token k is verified depends only on candidates ranked
above it, never on tokens sampled after it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

POLICIES = ("dspark", "fixed", "threshold", "autoregressive")


@dataclass(frozen=True)
class SpsTable:
    """Profiled verifier steps per second SPS(B) for B query tokens in one forward; B between measured points
    takes the next measured point's speed (pessimistic), B past the last one extrapolates as 1/B."""

    batch_tokens: tuple[int, ...]  # ascending B
    steps_per_s: tuple[float, ...]

    def __post_init__(self):
        if not self.batch_tokens or len(self.batch_tokens) != len(self.steps_per_s):
            raise ValueError("an SPS table needs one steps/s value per batch size")
        if list(self.batch_tokens) != sorted(set(self.batch_tokens)) or self.batch_tokens[0] < 1:
            raise ValueError("batch sizes must be ascending, distinct and >= 1")

    def __call__(self, b: int) -> float:
        i = bisect_left(self.batch_tokens, b)
        if i < len(self.batch_tokens):
            return self.steps_per_s[i]
        last_b, last_sps = self.batch_tokens[-1], self.steps_per_s[-1]
        return last_sps * last_b / b


def survival(confidences: Sequence[float]) -> list[float]:
    """a_j = prod_{i<=j} c_i: the chance draft j is accepted, given the confidences c_i = P(i ok | < i ok)."""
    out, a = [], 1.0
    for c in confidences:
        a *= c
        out.append(a)
    return out


def prefix_schedule(confidences: Sequence[Sequence[float]], sps: SpsTable) -> list[int]:
    """Algorithm 1. confidences[r] = c_{r,1..k_r} for request r; returns the prefix length l_r to verify."""
    R = len(confidences)
    if R == 0:
        return []
    surv = [survival(c) for c in confidences]
    # stable sort: equal survival keeps (r, j) order, so a request's prefix is always admitted in order
    cand = sorted(((a, r, j) for r, s in enumerate(surv) for j, a in enumerate(s, 1) if a > 0), key=lambda x: -x[0])
    lengths = [0] * R
    B, tau = R, float(R)  # every request verifies its anchor and gets one token (recovered or bonus) for sure
    best = tau * sps(B)
    for a, r, j in cand:
        B, tau = B + 1, tau + a
        theta = tau * sps(B)
        if theta <= best:
            break  # early stop: admission never looks past the first non-improvement (Appendix A)
        best, lengths[r] = theta, j
    return lengths


def threshold_schedule(confidences: Sequence[Sequence[float]], threshold: float) -> list[int]:
    """Static threshold on prefix survival (DeepSpec's evaluator): verify while a_{r,j} >= threshold."""
    out = []
    for c in confidences:
        n = 0
        for a in survival(c):
            if a < threshold:
                break
            n += 1
        out.append(n)
    return out


def schedule(
    policy: str,
    confidences: Sequence[Sequence[float]],
    sps: SpsTable | None = None,
    threshold: float = 0.5,
) -> list[int]:
    """Prefix lengths for one round under `policy`; each is between 0 and len(confidences[r])."""
    if policy == "dspark":
        if sps is None:
            raise ValueError("the dspark policy needs the verifier's SPS table")
        return prefix_schedule(confidences, sps)
    if policy == "fixed":
        return [len(c) for c in confidences]
    if policy == "autoregressive":
        return [0] * len(confidences)
    if policy == "threshold":
        return threshold_schedule(confidences, threshold)
    raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
