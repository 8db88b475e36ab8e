"""Verification budgets: how many of each request's draft tokens the target verifies this round.

Pure functions, no I/O. The `dspark` policy is the paper's Algorithm 1 (hardware-aware prefix scheduler): with
prefix survival a_{r,j} = prod_{i<=j} c_{r,i}, admit draft tokens in descending a_{r,j} while the expected
throughput Theta = tau * SPS(B) improves, and stop at the first candidate that does not improve it. The early stop
is what keeps verification lossless (Appendix A): whether token k is verified depends only on candidates ranked
above it, never on tokens sampled after it.

The `dspark-async` policy is the paper's §5.2 variant: the batch capacity (total query tokens) comes from an
unconstrained search, without the early stop, over the confidences of a round two rounds old, and the current round
admits the top-K fresh survival probabilities. The capacity cannot depend on the current round's tokens, and a
token's rank among the fresh candidates depends only on its own prefix and on other requests, so admission stays
non-anticipating (the same reason Algorithm 1's early stop gives).

With a drafter whose cost is not negligible (ours on a CPU, a user's big one), Theta counts the round's drafting
time too: Theta = tau / (1 / SPS(B) + draft_s), draft_s being what the round's draft call cost (see planner.py,
which decides before drafting how much to draft). draft_s = 0 is the paper's Theta = tau * SPS(B).

A round may mix policies (per-request overrides): requests on the static policies are fixed first, Algorithm 1 then
runs over the `dspark` requests with those tokens already in the batch, and `dspark-async` requests share what is
left of the capacity.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

POLICIES = ("dspark", "dspark-async", "fixed", "threshold", "autoregressive")
NEEDS_SPS = ("dspark", "dspark-async")


@dataclass(frozen=True)
class SpsTable:
    """Profiled verifier steps per second SPS(B) for B query tokens in one forward; B between measured points
    takes the next measured point's speed (pessimistic), B past the last one extrapolates as 1/B.

    The main table packs B tokens into as few rows as blocks allow (ceil(B / 8)); a round of R requests verifies its B
    tokens in R rows, and on a CPU a step of R rows of 1 token is dearer than one row of R tokens (per-row attention
    and rejection sampling, kernels chosen by shape). `by_rows` holds tables measured in that shape, B tokens spread
    over R rows, for some R; `for_rows(R)` is the table a round of R rows is priced with."""

    batch_tokens: tuple[int, ...]  # ascending B
    steps_per_s: tuple[float, ...]
    by_rows: tuple[tuple[int, SpsTable], ...] = ()  # (R, SPS over B tokens in R rows), ascending R >= 2

    def __post_init__(self):
        if not self.batch_tokens or len(self.batch_tokens) != len(self.steps_per_s):
            raise ValueError("an SPS table needs one steps/s value per batch size")
        if list(self.batch_tokens) != sorted(set(self.batch_tokens)) or self.batch_tokens[0] < 1:
            raise ValueError("batch sizes must be ascending, distinct and >= 1")
        rows = [r for r, _ in self.by_rows]
        if rows != sorted(set(rows)) or (rows and rows[0] < 2):
            raise ValueError("row tables need ascending, distinct row counts >= 2")

    def __call__(self, b: int) -> float:
        i = bisect_left(self.batch_tokens, b)
        if i < len(self.batch_tokens):
            return self.steps_per_s[i]
        last_b, last_sps = self.batch_tokens[-1], self.steps_per_s[-1]
        return last_sps * last_b / b

    def for_rows(self, rows: int) -> SpsTable:
        """The table for steps of `rows` rows: the one measured for the next row count up (pessimistic), the
        largest one past the last, this table for one row or when none was measured."""
        if rows <= 1 or not self.by_rows:
            return self
        i = bisect_left([r for r, _ in self.by_rows], rows)
        return self.by_rows[min(i, len(self.by_rows) - 1)][1]


def survival(confidences: Sequence[float]) -> list[float]:
    """a_j = prod_{i<=j} c_i: the chance draft j is accepted, given the confidences c_i = P(i ok | < i ok)."""
    out, a = [], 1.0
    for c in confidences:
        a *= c
        out.append(a)
    return out


def throughput(tau: float, sps: SpsTable, tokens: int, draft_s: float = 0.0) -> float:
    """Theta: expected tokens emitted per second by a round of `tokens` query tokens whose drafts cost draft_s."""
    return tau / (1.0 / sps(tokens) + draft_s)


def prefix_schedule(
    confidences: Sequence[Sequence[float]],
    sps: SpsTable,
    base_tokens: int = 0,
    base_tau: float = 0.0,
    draft_s: float = 0.0,
) -> list[int]:
    """Algorithm 1. confidences[r] = c_{r,1..k_r} for request r; returns the prefix length l_r to verify.
    base_tokens / base_tau: query tokens and expected emitted tokens of other requests already in the batch;
    draft_s: seconds the round's drafting cost (already paid, part of the round's time)."""
    R = len(confidences)
    if R == 0:
        return []
    surv = [survival(c) for c in confidences]
    lengths = [0] * R
    # every request verifies its anchor and gets one token (recovered or bonus) for sure
    B, tau = base_tokens + R, base_tau + R
    best = throughput(tau, sps, B, draft_s)
    for a, r, j in _candidates(surv):
        B, tau = B + 1, tau + a
        theta = throughput(tau, sps, B, draft_s)
        if theta <= best:
            break  # early stop: admission never looks past the first non-improvement (Appendix A)
        best, lengths[r] = theta, j
    return lengths


def _candidates(surv: list[list[float]]) -> list[tuple[float, int, int]]:
    # stable sort: equal survival keeps (r, j) order, so a request's prefix is always admitted in order
    return sorted(((a, r, j) for r, s in enumerate(surv) for j, a in enumerate(s, 1) if a > 0), key=lambda x: -x[0])


def batch_capacity(confidences: Sequence[Sequence[float]], sps: SpsTable, draft_s: float = 0.0) -> int:
    """dspark-async's capacity: the total query tokens B maximising Theta over every prefix of the survival-sorted
    candidates, with no early stop (an unconstrained search; safe only on confidences from an earlier round)."""
    R = len(confidences)
    B, tau = R, float(R)
    best, best_b = throughput(tau, sps, B, draft_s), B
    for a, _, _ in _candidates([survival(c) for c in confidences]):
        B, tau = B + 1, tau + a
        theta = throughput(tau, sps, B, draft_s)
        if theta > best:
            best, best_b = theta, B
    return best_b


def top_k_schedule(confidences: Sequence[Sequence[float]], k: int) -> list[int]:
    """Admit the k candidates with the highest fresh survival a_{r,j}; the result is a prefix per request."""
    lengths = [0] * len(confidences)
    for _, r, j in _candidates([survival(c) for c in confidences])[: max(0, k)]:
        lengths[r] = j
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


def expected_tokens(confidences: Sequence[float], length: int) -> float:
    """Expected tokens a request emits when `length` drafts are verified: 1 + sum of their survival."""
    return 1.0 + sum(survival(confidences)[:length])


def schedule(
    policy: str | Sequence[str],
    confidences: Sequence[Sequence[float]],
    sps: SpsTable | None = None,
    threshold: float = 0.5,
    capacity: int | None = None,
    draft_s: float = 0.0,
) -> list[int]:
    """Prefix lengths for one round; each is between 0 and len(confidences[r]). `policy` is one name for the whole
    round or one per request. `capacity`: dspark-async's total query tokens for this round (from batch_capacity on
    confidences two rounds old; None: no history yet, verify anchors only). draft_s: what the round's drafting
    cost, in seconds."""
    R = len(confidences)
    policies = [policy] * R if isinstance(policy, str) else list(policy)
    if len(policies) != R:
        raise ValueError("one policy per request")
    for p in set(policies):
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r}; choose one of {', '.join(POLICIES)}")
        if p in NEEDS_SPS and sps is None:
            raise ValueError(f"the {p} policy needs the verifier's SPS table")
    lengths = [0] * R
    for r, (p, c) in enumerate(zip(policies, confidences)):
        if p == "fixed":
            lengths[r] = len(c)
        elif p == "threshold":
            lengths[r] = threshold_schedule([c], threshold)[0]
    static = [r for r, p in enumerate(policies) if p not in NEEDS_SPS]
    base_tokens = sum(1 + lengths[r] for r in static)
    base_tau = sum(expected_tokens(confidences[r], lengths[r]) for r in static)
    dsp = [r for r, p in enumerate(policies) if p == "dspark"]
    for r, n in zip(dsp, prefix_schedule([confidences[r] for r in dsp], sps, base_tokens, base_tau, draft_s)):
        lengths[r] = n
    asy = [r for r, p in enumerate(policies) if p == "dspark-async"]
    if asy:
        used = base_tokens + sum(1 + lengths[r] for r in dsp) + len(asy)
        k = 0 if capacity is None else capacity - used
        for r, n in zip(asy, top_k_schedule([confidences[r] for r in asy], k)):
            lengths[r] = n
    return lengths
