"""The per-pod signals the autoscalers read (serving/metrics.py): a service's queue depth (calls waiting for its model,
dspark_rpc_waiting), its session capacity (dspark_max_sessions), and the tokens verified rounds emit
(dspark_emitted_tokens_total, the numerator of tokens per second with tau)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from dspark.serving import grpc_server, metrics
from dspark.serving.metrics import RoundStats


class Context:
    """The part of a grpc.aio ServicerContext the serve loop's call uses."""

    def __init__(self, remaining: float):
        self.remaining = remaining
        self.aborted = None

    def time_remaining(self):
        return self.remaining

    async def abort(self, code, details):
        self.aborted = code
        raise RuntimeError(details)


def waiting(service: str) -> float:
    return metrics.RPC_WAITING.labels(service)._value.get()


def test_calls_queued_for_the_model_are_the_services_queue_depth():
    async def scenario():
        lock = asyncio.Lock()
        await lock.acquire()  # a call is running on the model
        before = waiting("verifier")
        calls = [
            asyncio.create_task(grpc_server._call_locked(Context(5.0), lock, lambda x: x, i, service="verifier"))
            for i in range(3)
        ]
        await asyncio.sleep(0.05)
        queued = waiting("verifier") - before
        lock.release()
        results = await asyncio.gather(*calls)
        return queued, waiting("verifier") - before, results

    queued, after, results = asyncio.run(scenario())
    assert queued == 3 and after == 0 and sorted(results) == [0, 1, 2]


def test_a_call_whose_deadline_passes_in_the_queue_leaves_it():
    async def scenario():
        lock = asyncio.Lock()
        await lock.acquire()
        before = waiting("draft")
        ctx = Context(0.05)
        with pytest.raises(RuntimeError, match="deadline passed while queued"):
            await grpc_server._call_locked(ctx, lock, lambda x: x, 1, service="draft")
        return ctx.aborted, waiting("draft") - before

    code, left = asyncio.run(scenario())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and left == 0


def test_emitted_tokens_count_the_accepted_drafts_and_one_token_per_verified_request():
    before = metrics.EMITTED_TOKENS._value.get()
    metrics.record_round(RoundStats(batch=3, drafted=12, budget=9, accepted=5, accepted_per_position=[3, 2]), 0.1)
    assert metrics.EMITTED_TOKENS._value.get() - before == 3 + 5  # tau of the round: 8 / 3


def test_the_verifier_exports_how_many_sessions_it_holds_at_most():
    from test_core_decoding_stats import _tiny_llama
    from test_verifier_draft_services import make_verifier_core

    core = make_verifier_core(_tiny_llama(seed=0, hidden=32, layers=2, heads=4, kv_heads=2), max_requests=5)
    core.observe()
    assert metrics.MAX_SESSIONS.labels("verifier")._value.get() == 5
    assert metrics.SESSIONS.labels("verifier")._value.get() == 0


def test_a_replica_that_leaves_takes_its_series_along():
    metrics.REPLICA_REQUESTS.labels(tier="draft", replica="10.0.0.9:50062").inc(4)
    metrics.record_replica_sessions("draft", {"10.0.0.9:50062": 2})
    metrics.forget_replica("draft", "10.0.0.9:50062")
    samples = {s.labels.get("replica") for fam in metrics.REPLICA_REQUESTS.collect() for s in fam.samples}
    samples |= {s.labels.get("replica") for fam in metrics.REPLICA_SESSIONS.collect() for s in fam.samples}
    assert "10.0.0.9:50062" not in samples
    metrics.forget_replica("draft", "10.0.0.9:50062")  # twice: nothing to remove, no error
