"""Prometheus metrics of the router and the two services, one vocabulary with the protos and spans.

Per round the router records what the Verifier saw: how many requests (batch), draft tokens proposed, the budget
(draft tokens scheduled for verification) and tokens accepted, with accepted counts per draft position; per finished
request, its tau and its total budget; per phase, round latency. `RoundStats` is the plain record (also read by the
round span); the exporters are the prometheus_client objects below.

Derived rates (PromQL):
    acceptance rate      rate(dspark_accepted_tokens_total[1m]) / rate(dspark_budget_tokens_total[1m])
    tokens per round     1 + rate(dspark_accepted_tokens_total[1m]) / rate(dspark_verified_requests_total[1m])
    budget pruned        1 - rate(dspark_budget_tokens_total[1m]) / rate(dspark_draft_tokens_total[1m])
    emitted tokens/s     rate(dspark_emitted_tokens_total[1m])  (= tau x verified request-rounds per second)
    session usage        dspark_sessions / dspark_max_sessions  (per verifier or draft pod)
    KV usage             dspark_verifier_kv_tokens / dspark_verifier_kv_capacity_tokens

What the autoscalers read (helm/dspark: HPA, KEDA, prometheus-adapter rules), per pod: the verifier's calls waiting
for its model (dspark_rpc_waiting{service="verifier"}), its sessions and KV usage; the draft service's sessions and
Draft call latency (dspark_rpc_seconds{service="draft"}); the router's queue (dspark_queue_depth) and requests
decoding (dspark_running_requests), and per replica of each tier what it was given (dspark_replica_requests_total).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# -- router -----------------------------------------------------------------------------------------------------
ROUNDS = Counter("dspark_rounds_total", "decode rounds run by the router")
VERIFIED_REQUESTS = Counter("dspark_verified_requests_total", "request-rounds verified (one per request per round)")
DRAFT_TOKENS = Counter("dspark_draft_tokens_total", "draft tokens proposed")
BUDGET_TOKENS = Counter("dspark_budget_tokens_total", "draft tokens scheduled for verification (the budget)")
ACCEPTED_TOKENS = Counter("dspark_accepted_tokens_total", "draft tokens accepted")
ACCEPTED_AT = Counter(
    "dspark_accepted_position_total", "rounds whose draft at this position was accepted", ["position"]
)
ROUND_SECONDS = Histogram("dspark_round_seconds", "router round latency by phase", ["phase"], buckets=LATENCY)
BATCH_REQUESTS = Histogram("dspark_batch_requests", "requests per round", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
REQUEST_TAU = Histogram("dspark_request_tau", "tokens per round of finished requests", buckets=(1, 1.5, 2, 3, 4, 6, 8))
REQUEST_BUDGET = Histogram(
    "dspark_request_budget_tokens", "verification budget of finished requests", buckets=(0, 8, 32, 128, 512, 2048)
)
EMITTED_TOKENS = Counter(
    "dspark_emitted_tokens_total", "tokens verified rounds emitted (accepted + the bonus or corrected token)"
)
REPLICAS = Gauge("dspark_replicas", "verifier or draft replicas in the router's pool", ["tier"])
REPLICA_REQUESTS = Counter(
    "dspark_replica_requests_total", "requests pinned to each verifier or draft replica", ["tier", "replica"]
)
REPLICA_SESSIONS = Gauge("dspark_replica_sessions", "this router's sessions on each replica", ["tier", "replica"])
QUEUE_DEPTH = Gauge("dspark_queue_depth", "requests waiting for a verifier session")
RUNNING = Gauge("dspark_running_requests", "requests decoding")
DRAFT_FALLBACK = Counter("dspark_draft_fallback_rounds_total", "rounds decoded without drafts (draft service down)")
RESTORED = Counter("dspark_verifier_restored_sessions_total", "verifier sessions rebuilt from the router's history")
REQUEST_ERRORS = Counter(
    "dspark_request_errors_total",
    "requests failed by the decode loop (capacity, input, deadline, lost verifier)",
    ["code"],
)

# -- services ---------------------------------------------------------------------------------------------------
RPC_SECONDS = Histogram("dspark_rpc_seconds", "service call latency", ["service", "method"], buckets=LATENCY)
RPC_BATCH = Histogram(
    "dspark_rpc_batch_requests", "requests per service call", ["service", "method"], buckets=(1, 2, 4, 8, 16, 32, 64)
)
RPC_WAITING = Gauge("dspark_rpc_waiting", "calls queued for the service's model (one runs at a time)", ["service"])
SESSIONS = Gauge("dspark_sessions", "open sessions", ["service"])
MAX_SESSIONS = Gauge("dspark_max_sessions", "sessions the service holds at most", ["service"])
KV_TOKENS = Gauge("dspark_verifier_kv_tokens", "tokens held in the verifier's KV cache")
KV_CAPACITY = Gauge("dspark_verifier_kv_capacity_tokens", "tokens the verifier's KV cache can hold")
DRAFT_PHASE_SECONDS = Histogram(
    "dspark_draft_phase_seconds", "draft service compute per Draft call by phase", ["phase"], buckets=LATENCY
)


def observe_draft_times(t) -> None:
    """One Draft call's DraftTimes (core/proposer.py) into the phase histogram."""
    for phase in ("context", "backbone", "head"):
        DRAFT_PHASE_SECONDS.labels(phase=phase).observe(getattr(t, f"{phase}_s"))


@dataclass
class RoundStats:
    batch: int = 0
    drafted: int = 0
    budget: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0


class _Instrumented:
    """Wraps a Proposer or a Verifier: its calls add to `round` (a RoundStats); everything else passes through."""

    def __init__(self, inner):
        self.inner = inner
        self.round = RoundStats()

    def __getattr__(self, name):
        return getattr(self.inner, name)


class InstrumentedProposer(_Instrumented):
    """Times a Proposer and counts what it drafted."""

    def propose(self, requests):
        t = time.perf_counter()
        out = self.inner.propose(requests)
        self.round.draft_s += time.perf_counter() - t
        self.round.drafted += sum(len(p.token_ids) for p in out)
        return out


class InstrumentedVerifier(_Instrumented):
    """Times a Verifier and counts budget and accepted tokens per round."""

    def verify(self, items):
        t = time.perf_counter()
        out = self.inner.verify(items)
        r = self.round
        r.verify_s += time.perf_counter() - t
        r.batch += len(items)
        r.budget += sum(len(it.draft_tokens) for it in items)
        r.accepted += sum(v.accepted for v in out)
        for v in out:
            if len(r.accepted_per_position) < v.accepted:
                r.accepted_per_position += [0] * (v.accepted - len(r.accepted_per_position))
            for i in range(v.accepted):
                r.accepted_per_position[i] += 1
        return out


def record_round(r: RoundStats, total_s: float) -> None:
    ROUNDS.inc()
    VERIFIED_REQUESTS.inc(r.batch)
    DRAFT_TOKENS.inc(r.drafted)
    BUDGET_TOKENS.inc(r.budget)
    ACCEPTED_TOKENS.inc(r.accepted)
    EMITTED_TOKENS.inc(r.batch + r.accepted)
    for i, n in enumerate(r.accepted_per_position):
        ACCEPTED_AT.labels(position=str(i + 1)).inc(n)
    BATCH_REQUESTS.observe(r.batch)
    ROUND_SECONDS.labels(phase="draft").observe(r.draft_s)
    ROUND_SECONDS.labels(phase="verify").observe(r.verify_s)
    ROUND_SECONDS.labels(phase="other").observe(max(0.0, total_s - r.draft_s - r.verify_s))
    ROUND_SECONDS.labels(phase="total").observe(total_s)


def record_replica_sessions(tier: str, sessions: dict[str, int]) -> None:
    for replica, n in sessions.items():
        REPLICA_SESSIONS.labels(tier=tier, replica=replica).set(n)


def forget_replica(tier: str, replica: str) -> None:
    """A replica left the pool: its per-replica series go (its counter's total stays in Prometheus' history)."""
    for m in (REPLICA_SESSIONS, REPLICA_REQUESTS):
        try:
            m.remove(tier, replica)
        except KeyError:
            pass


def record_finished(completion) -> None:
    s = completion.stats
    if s is not None and s.rounds:
        REQUEST_TAU.observe(s.tau)
        REQUEST_BUDGET.observe(s.scheduled)


def start_exporter(port: int) -> None:
    """Serve /metrics on this port (0 = no exporter)."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port)
