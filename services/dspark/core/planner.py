"""How much to draft before drafting: the drafter's cost table and the per-request draft caps of a round.

The paper prices a round with the verifier alone (its drafter is tiny next to a 4B target on a GPU). Here a round
costs t(B, R, K) = 1 / SPS(B) + t_draft(R, K): B query tokens verified, R rows drafted, K positions drafted (the
backbone runs once for the R rows, the LM head, sequential head and sampling once per position). Drafting is paid
before verification, so how much to draft is decided first, from what earlier rounds said (the dspark-async
argument): `ConfidenceForecast` predicts each request's confidences from its own last draft (corrected by how often
such confidences were accepted), and `plan_drafts` searches every prefix of the survival-sorted predicted candidates
for the best expected throughput E[tokens] / t(B, R, K). A request capped at 0 is not drafted at all; a round where
every cap is 0 makes no draft call and costs what plain decoding costs.

The caps depend only on earlier rounds, never on this round's draft tokens, and Algorithm 1 then runs with its early
stop on what was drafted, so verification stays lossless (Appendix A): a cap only shortens the candidate list.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

from dspark.core.scheduler import SpsTable, survival, throughput


@dataclass(frozen=True)
class DraftCost:
    """Seconds of one draft call for R rows and K drafted positions, as profiled: seconds[i][k - 1] is R = rows[i]
    and K = k (k = 1..gamma). R between measured points takes the next measured point's time (pessimistic), R past
    the last one scales linearly. overhead_s: what a call costs besides the drafter's compute (the RPC round trip,
    added by a remote caller). No rows or no positions: no call, 0 s."""

    rows: tuple[int, ...]  # ascending R
    seconds: tuple[tuple[float, ...], ...]  # (len(rows), gamma)
    overhead_s: float = 0.0

    def __post_init__(self):
        if not self.rows or len(self.rows) != len(self.seconds):
            raise ValueError("a draft cost table needs one row of times per row count")
        if list(self.rows) != sorted(set(self.rows)) or self.rows[0] < 1:
            raise ValueError("row counts must be ascending, distinct and >= 1")
        if len({len(s) for s in self.seconds}) != 1 or not self.seconds[0]:
            raise ValueError("every row count needs a time for each of the same K = 1..gamma")

    @property
    def gamma(self) -> int:
        return len(self.seconds[0])

    def __call__(self, rows: int, positions: int) -> float:
        if rows <= 0 or positions <= 0:
            return 0.0
        k = min(positions, self.gamma) - 1
        i = bisect_left(self.rows, rows)
        if i < len(self.rows):
            return self.overhead_s + self.seconds[i][k]
        return self.overhead_s + self.seconds[-1][k] * rows / self.rows[-1]

    def with_overhead(self, overhead_s: float) -> DraftCost:
        return DraftCost(self.rows, self.seconds, overhead_s)

    def to_dict(self) -> dict:
        return {"rows": list(self.rows), "seconds": [list(s) for s in self.seconds], "overhead_s": self.overhead_s}

    @classmethod
    def from_dict(cls, d: dict) -> DraftCost:
        return cls(tuple(d["rows"]), tuple(tuple(s) for s in d["seconds"]), d.get("overhead_s", 0.0))


def round_seconds(sps: SpsTable, tokens: int, draft_cost: DraftCost | None, rows: int, positions: int) -> float:
    """t(B, R, K): one verify step over B query tokens plus the draft call that proposed R rows x K positions."""
    return 1.0 / sps(tokens) + _draft_seconds(draft_cost, rows, positions)


def plan_drafts(
    forecasts: Sequence[Sequence[float]],
    sps: SpsTable,
    draft_cost: DraftCost | None,
    base_tokens: int = 0,
    base_tau: float = 0.0,
    base_rows: int = 0,
    base_positions: int = 0,
    margin: float = 1.0,
    early_stop: bool = False,
    padded_rows: int = 0,
    verify_row_s: float = 0.0,
    verify_base_s: float = 0.0,
) -> list[int]:
    """Draft caps for one verifier's requests: forecasts[r] = predicted confidences c_{r,1..k_r} (k_r: the most
    request r may draft). Drafting the first n candidates sorted by predicted survival costs t(B, R, K); each n is
    priced with the expected throughput E[tokens] / t(B, R, K) of what will then be verified, and the best n is kept.

    What will be verified: with early_stop (the `dspark` policy), what Algorithm 1 admits from those n drafts with
    their drafting time sunk: it stops at the first candidate that does not improve Theta, so a draft past a bump of
    the SPS curve would be paid for and never verified; the plan counts only the admitted prefix m(n) <= n.
    Without it (`dspark-async`, whose capacity comes from the same unconstrained search) all n are.
    base_*: what other requests of the round already add (query tokens, expected tokens, rows and positions drafted
    for them). margin: how much better than drafting none of these requests a plan must be expected to do to be
    taken (forecasts and cost tables err; 1.05 asks for 5%).

    padded_rows: the rows the verify step batches (every request of the replica, drafting or not), for a verifier
    whose engine pads (`ragged` False; the engine here computes real tokens only, core/ragged_rows.py, and the
    decode loop passes 0 for it). When given, a plan's verify step is priced as a padding engine runs it: every row
    padded to the longest block, padded_rows x (1 + the most drafts verified in one row) query tokens, not their
    sum. On a 2-core Xeon (bf16, 200 cached tokens) 4 rows of 3 tokens took 51 ms against 41 ms for 4 rows of 1,
    while the table said 12 tokens cost about what 7 do; caps of [2, 1, 0, 0] verify 7 tokens but cost 12.
    Algorithm 1 still prices what was drafted by the sum (its early stop is emulated as it runs); only the decision
    to draft sees the padding.

    verify_row_s: seconds a verify step costs beyond its SPS price for each row that verifies drafts (learned as
    rounds run, `VerifyRowCost`); base_rows count too."""
    R = len(forecasts)
    if R == 0:
        return []
    cands = sorted(
        ((a, r, j) for r, c in enumerate(forecasts) for j, a in enumerate(survival(c), 1) if a > 0),
        key=lambda x: -x[0],
    )
    # after the first n candidates: query tokens B[n], expected tokens tau[n], and the draft call's seconds
    B, tau, draft_s = [base_tokens + R], [base_tau + R], [_draft_seconds(draft_cost, base_rows, base_positions)]
    rows, positions = set(), base_positions
    longest = [base_positions]  # the most drafts in one row after the first n candidates
    row_s = [verify_row_s * base_rows]  # the verify step's per-row extra when the first n candidates are verified
    for a, r, j in cands:
        rows.add(r)
        positions = max(positions, j)
        longest.append(positions)
        row_s.append(verify_row_s * (base_rows + len(rows)))
        B.append(B[-1] + 1)
        tau.append(tau[-1] + a)
        draft_s.append(_draft_seconds(draft_cost, base_rows + len(rows), positions))
    stops: dict[float, int] = {}  # Algorithm 1's stopping point over all candidates, per sunk drafting time

    def verified(n: int) -> int:
        if not early_stop:
            return n
        d = draft_s[n] + verify_base_s
        if d not in stops:
            m = 0
            while m < len(cands) and throughput(tau[m + 1], sps, B[m + 1], d) > throughput(tau[m], sps, B[m], d):
                m += 1
            stops[d] = m
        return min(n, stops[d])

    def verify_tokens(m: int) -> int:  # what the verify step computes when the first m candidates are verified
        return verify_step_tokens(B[m], padded_rows, longest[m], ragged=not padded_rows)

    best, best_n = margin * throughput(tau[0], sps, verify_tokens(0), draft_s[0] + row_s[0] + verify_base_s), 0
    for n in range(1, len(cands) + 1):
        m = verified(n)
        theta = throughput(tau[m], sps, verify_tokens(m), draft_s[n] + row_s[m] + verify_base_s)
        if theta > best:
            best, best_n = theta, n
    caps = [0] * R
    for _, r, j in cands[:best_n]:
        caps[r] = max(caps[r], j)
    return caps


def verify_step_tokens(total: int, rows: int, longest: int, ragged: bool) -> int:
    """Query tokens a verify step computes: `total` (every row's anchor and drafts) for an engine that computes real
    tokens only (`ragged`), else every one of `rows` rows padded to the longest block, rows x (1 + longest)."""
    return total if ragged else rows * (1 + longest)


def _draft_seconds(draft_cost: DraftCost | None, rows: int, positions: int) -> float:
    return 0.0 if draft_cost is None else draft_cost(rows, positions)


@dataclass
class VerifyRowCost:
    """What a verify step costs beyond its SPS price for each row that verifies drafts, learned from the rounds as
    they run. The SPS profile times query tokens in few long rows; a round that adds a draft or two to some of many
    rows pays more than the table says for them (rejection sampling and the LM head per drafted row, attention
    rows padded to the longest block, a remote verifier's larger messages). On a 2-core EPYC at 4 requests, rounds
    verifying ~2 drafts took 3-4 ms more than plain rounds, where the table priced the 2 tokens at 0.5 ms.

    base_s: the running mean of actual - predicted over rounds that verify no draft (what every round pays beyond
    the table); row_s: the running mean, over rounds that verify drafts, of what they pay beyond base_s per drafting
    row (never below 0). Until drafting has been seen row_s is 0, so the planner drafts and learns."""

    alpha: float = 0.1  # weight of the newest round
    base_s: float | None = None
    row_s: float = 0.0

    @property
    def round_s(self) -> float:
        """What every verify step costs beyond its SPS price (base_s, never below 0: a table that overprices is
        left as it is): the machine's drift since profiling, and rows past the largest row table measured."""
        return max(0.0, self.base_s or 0.0)

    def observe(self, actual_s: float, predicted_s: float, draft_rows: int) -> None:
        extra = actual_s - predicted_s
        if draft_rows == 0:
            self.base_s = extra if self.base_s is None else (1 - self.alpha) * self.base_s + self.alpha * extra
        elif self.base_s is not None:
            per_row = max(0.0, (extra - self.base_s) / draft_rows)
            self.row_s = (1 - self.alpha) * self.row_s + self.alpha * per_row


@dataclass
class ConfidenceForecast:
    """Predicted confidences of a request's next draft, from earlier rounds only.

    A request's forecast is the confidences of its own last draft (each position's, the last one repeated beyond
    what was drafted), times that position's calibration ratio: accepted / predicted over every verified draft
    token that could have been accepted (its predecessors were). A request that never drafted gets the running
    mean of all drafts' confidences. With nothing observed yet there is no forecast (None): the caller drafts in
    full, which is how the first observations arrive.

    A request that stops drafting sees no new confidences of its own, so its last draft would decide every later
    round: one poor block and it never drafts again, although acceptance changes along a response. Each round
    it sits out (`idle`) moves its forecast towards the running mean, halfway every `half_life` rounds, until
    drafting pays again and a fresh draft replaces the old one."""

    gamma: int
    prior: float = 2.0  # pseudo-counts pulling the calibration ratio towards 1 while few tokens were verified
    half_life: float = 4.0  # rounds without a draft that halve the weight of a request's last draft
    _last: dict[str, list[float]] = field(default_factory=dict)
    _idle: dict[str, int] = field(default_factory=dict)  # rounds since the request's last draft
    _predicted: list[float] = field(init=False)
    _accepted: list[float] = field(init=False)
    _conf_sum: list[float] = field(init=False)
    _conf_n: list[int] = field(init=False)

    def __post_init__(self):
        self._predicted = [0.0] * self.gamma
        self._accepted = [0.0] * self.gamma
        self._conf_sum = [0.0] * self.gamma
        self._conf_n = [0] * self.gamma

    def ratio(self, j: int) -> float:
        """Calibration ratio at position j (0-based): accepted / predicted, shrunk towards 1 (1 where nothing was
        reached yet)."""
        if self._predicted[j] + self.prior <= 0:
            return 1.0
        return (self._accepted[j] + self.prior) / (self._predicted[j] + self.prior)

    def _mean(self) -> list[float]:
        conf: list[float] = []
        for s, n in zip(self._conf_sum, self._conf_n):
            conf.append(s / n if n else conf[-1])  # a position never drafted: its predecessor's mean
        return conf

    def forecast(self, request_id: str, k: int) -> list[float] | None:
        last = self._last.get(request_id)
        if last is None and not self._conf_n[0]:
            return None
        mean = self._mean()
        if last is None:
            conf = mean
        else:
            last = last + [last[-1]] * self.gamma
            w = 0.5 ** (self._idle.get(request_id, 0) / self.half_life)
            conf = [w * a + (1.0 - w) * b for a, b in zip(last, mean)]
        conf = (conf + [conf[-1]] * self.gamma)[: min(k, self.gamma)]
        return [min(0.99, max(0.0, c * self.ratio(j))) for j, c in enumerate(conf)]

    def idle(self, request_id: str) -> None:
        """A round in which the request drafted nothing."""
        if request_id in self._last:
            self._idle[request_id] = self._idle.get(request_id, 0) + 1

    def observe(self, request_id: str, confidence: Sequence[float], verified: int, accepted: int) -> None:
        """A drafted block's confidences, how many of its tokens were verified and how many were accepted."""
        confidence = [float(c) for c in confidence]
        if not confidence:
            return
        self._last[request_id] = confidence
        self._idle[request_id] = 0
        for j, c in enumerate(confidence[: self.gamma]):
            self._conf_sum[j] += c
            self._conf_n[j] += 1
        for j in range(min(verified, accepted + 1, self.gamma)):  # reached: every predecessor was accepted
            self._predicted[j] += confidence[j]
            self._accepted[j] += 1.0 if j < accepted else 0.0

    def release(self, request_id: str) -> None:
        self._last.pop(request_id, None)
        self._idle.pop(request_id, None)
