"""Per-replica scheduling: with a verifier made of replicas, each replica's share of a round is priced with that
replica's own SPS table and its own load (the requests pinned to it), and dspark-async keeps its capacity history per
replica. A fake two-replica verifier and a fake proposer with known confidences make the budgets exact to check."""

from __future__ import annotations

import torch

from dspark.core.decoding import Decoder
from dspark.core.proposer import DraftRequest, Proposal
from dspark.core.sampling import SamplingParams
from dspark.core.scheduler import SpsTable, batch_capacity, schedule
from dspark.core.verifier import Prefilled, PrefillItem, Verified, VerifyItem

V, K, CONF = 16, 4, 0.9
FLAT = SpsTable((1, 1024), (100.0, 100.0))  # a cheap replica: a bigger batch costs nothing
LINEAR = SpsTable(
    tuple(range(1, 257)), tuple(100.0 / b for b in range(1, 257))
)  # an expensive one: cost grows with every query token
KNEE = SpsTable(tuple(range(1, 257)), tuple(100.0 * min(1.0, 8 / b) for b in range(1, 257)))  # free up to B=8
PARAMS = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)


class FakeProposer:
    """k drafts per request, every one with confidence CONF."""

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        return [
            Proposal(
                torch.zeros(r.num_draft, dtype=torch.long),
                torch.full((r.num_draft, V), 1 / V),
                torch.full((r.num_draft,), CONF),
            )
            for r in requests
        ]

    def release(self, request_id: str) -> None:
        pass


class TwoReplicas:
    """Requests pinned to replica "a" or "b" by `assign`; verify rejects every draft and records the budgets."""

    vocab_size, max_context, device = V, 10_000, torch.device("cpu")

    def __init__(self, tables: dict[str, SpsTable | None], assign):
        self.tables, self.assign = tables, assign
        self.sps = next(iter(tables.values()))  # what the pool reports: one table
        self.pins: dict[str, str] = {}
        self.rounds: list[dict[str, int]] = []  # per round: request id -> draft tokens sent to verification

    free_slots = 64

    def replica_of(self, request_id: str) -> str:
        return self.pins[request_id]

    def sps_of(self, replica: str) -> SpsTable | None:
        return self.tables[replica]

    def prefill(self, items: list[PrefillItem]) -> list[Prefilled]:
        for it in items:
            self.pins[it.request_id] = self.assign(it.request_id)
        return [Prefilled(2, None) for _ in items]

    def verify(self, items: list[VerifyItem]) -> list[Verified]:
        self.rounds.append({it.request_id: len(it.draft_tokens) for it in items})
        return [Verified(0, [3], False, None) for _ in items]

    def release(self, request_id: str) -> None:
        self.pins.pop(request_id, None)


def run(verifier, n: int, policy: str = "dspark", rounds: int = 1) -> dict[str, int]:
    dec = Decoder(verifier, FakeProposer(), num_draft=K, policy=policy)
    for i in range(n):
        dec.add_request([5, 6, 7], PARAMS, request_id=f"r{i}")
    for _ in range(rounds):
        dec.step()
    return verifier.rounds[-1]


def by_replica(verifier, budgets: dict[str, int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for rid, n in budgets.items():
        out.setdefault(verifier.pins[rid], []).append(n)
    return out


def test_each_replica_is_priced_with_its_own_table():
    v = TwoReplicas({"a": LINEAR, "b": FLAT}, assign=lambda rid: "a" if int(rid[1:]) % 2 == 0 else "b")
    got = by_replica(v, run(v, 6))
    assert got["b"] == [K] * 3  # the cheap replica verifies whole blocks
    assert got["a"] == [0] * 3  # the expensive one prunes everything: a token costs more than it is expected to give
    # one table for the whole round (the old behaviour) would have priced "b" like "a"
    assert schedule("dspark", [[CONF] * K] * 6, LINEAR) == [0] * 6


def test_each_replica_is_priced_with_its_own_load():
    v = TwoReplicas({"a": KNEE, "b": KNEE}, assign=lambda rid: "a" if rid == "r0" else "b")
    got = by_replica(v, run(v, 7))
    conf = [CONF] * K
    assert got["a"] == schedule("dspark", [conf], KNEE) == [K]  # alone on its replica: B=5, free
    assert got["b"] == schedule("dspark", [conf] * 6, KNEE)  # six requests share the other one's knee
    assert sum(got["b"]) < 6 * K
    assert schedule("dspark", [conf] * 7, KNEE) != [K] + got["b"]  # the whole round as one load would differ


def test_a_replica_without_a_table_falls_back_to_the_verifier_table():
    v = TwoReplicas({"a": FLAT, "b": None}, assign=lambda rid: "b")
    assert run(v, 3) == {f"r{i}": K for i in range(3)}  # priced with FLAT, the verifier's `sps`


def test_dspark_async_capacity_history_is_kept_per_replica():
    v = TwoReplicas({"a": LINEAR, "b": KNEE}, assign=lambda rid: "a" if rid in ("r0", "r1") else "b")
    dec = Decoder(v, FakeProposer(), num_draft=K, policy="dspark-async")
    for i in range(6):
        dec.add_request([5, 6, 7], PARAMS, request_id=f"r{i}")
    dec.step()
    dec.step()
    assert all(n == 0 for r in v.rounds for n in r.values())  # no capacity two rounds back yet: anchors only
    dec.step()  # the capacities from round 1, each replica's own
    got = by_replica(v, v.rounds[-1])
    conf = [CONF] * K
    for replica, table, n in (("a", LINEAR, 2), ("b", KNEE, 4)):
        cap = batch_capacity([conf] * n, table)
        assert got[replica] == schedule("dspark-async", [conf] * n, table, capacity=cap)
    assert sum(got["a"]) == 0 and sum(got["b"]) > 0
    assert set(dec._capacities) == {"a", "b"}
