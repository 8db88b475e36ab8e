"""Several verifier or draft replicas behind one decode loop, each request pinned to one of each.

VerifierPool: a new request goes to the verifier replica with the most free sessions and stays there; a round calls
every replica that holds running requests, in parallel (one batched call each). A replica that stays unreachable past
its RemoteVerifier's recover_s is dropped, and its requests are prefilled again on the others from the router's
history (their output stays exact). ProposerPool: requests are spread over draft replicas the same way; while a
replica is down its requests move to another one, which reopens their sessions (the features recomputed by the
verifier, RemoteProposer's features_of).

The decode loop prices each replica's share of a round with that replica's own SPS table (`replica_of`, `sps_of`):
the load a replica sees is the requests pinned to it, and replicas on different hardware have different tables.

Replicas come and go while the loop runs (discovery.py follows a Kubernetes Service): `add` takes a replica that became
ready (new requests go to it first, it has the most free sessions), `remove` one that left: its sessions are moved
like a lost replica's (verifier: prefilled again elsewhere from history; draft: reopened on another replica), so no
request fails. The last replica of a pool stays until another one joins. Both run on the decode loop's thread.
"""

from __future__ import annotations

import contextvars
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from dspark.core.engine import CapacityError
from dspark.core.proposer import DraftRequest, Proposal
from dspark.core.scheduler import SpsTable
from dspark.core.verifier import Prefilled, PrefillItem, Verified, VerifyItem
from dspark.router.remote import RemoteProposer, RemoteVerifier
from dspark.serving import metrics

log = logging.getLogger("dspark.router.pool")


def _submit(threads: ThreadPoolExecutor, fn, arg) -> Future:
    """fn(arg) on a pool thread, in a copy of this thread's context (the round's trace context goes along)."""
    return threads.submit(contextvars.copy_context().run, fn, arg)


_MAX_THREADS = 64  # calls in flight per round: one per replica (threads are started as needed)


class VerifierPool:
    def __init__(self, replicas: list[RemoteVerifier]):
        if not replicas:
            raise ValueError("a verifier pool needs at least one replica")
        first = replicas[0]
        for r in replicas[1:]:
            self._check_same(r, first)
        self.replicas = list(replicas)
        self.model, self.vocab_size, self.max_context = first.model, first.vocab_size, first.max_context
        self.eos_token_ids, self.feature_layers, self.device = first.eos_token_ids, first.feature_layers, first.device
        # the table of a replica that has none of its own (and what says the pool can run dspark at all)
        self.sps = next((r.sps for r in replicas if r.sps is not None), None)
        self._pin: dict[str, RemoteVerifier] = {}
        self._threads = ThreadPoolExecutor(max_workers=_MAX_THREADS, thread_name_prefix="dspark-verify")
        self.failovers = 0  # sessions moved off a lost or leaving replica
        self._restored_gone = 0  # what replicas no longer in the pool had restored (keeps `restored` from falling)
        # replicas that left while they were the last one, or while the others had no room for their sessions: they
        # take no new requests, and go when another one joins or the room is there (tried every round)
        self._leaving: set[str] = set()
        metrics.REPLICAS.labels(tier="verifier").set(len(self.replicas))

    @staticmethod
    def _check_same(r: RemoteVerifier, first: RemoteVerifier) -> None:
        same = (r.vocab_size, r.max_context, r.feature_layers) == (
            first.vocab_size,
            first.max_context,
            first.feature_layers,
        )
        if not same:
            raise ValueError(f"verifier {r.address} does not serve the same model setup as {first.address}")

    @property
    def ragged(self) -> bool:
        """Whether every replica's verify step computes real tokens only (else rounds are priced as padded)."""
        return all(r.ragged for r in self.replicas)

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    def sessions(self) -> dict[str, int]:
        """Sessions this router holds per replica: the load the scheduler prices each replica with."""
        return {r.address: len(r._history) for r in self.replicas}

    def add(self, replica: RemoteVerifier) -> bool:
        """A replica that became ready joins (False: already here, or a different model setup, and it is closed)."""
        if replica.address in self.addresses:
            replica.close()
            return False
        try:
            self._check_same(replica, self.replicas[0])
        except ValueError:
            log.exception("not adding verifier %s", replica.address)
            replica.close()
            return False
        self.replicas.append(replica)
        if self.sps is None:
            self.sps = replica.sps
        log.info("verifier %s joined the pool (%d replicas)", replica.address, len(self.replicas))
        metrics.REPLICAS.labels(tier="verifier").set(len(self.replicas))
        for address in list(self._leaving):
            self._leaving.discard(address)
            self.remove(address)
        return True

    def remove(self, address: str) -> bool:
        """A replica that left (its pod is terminating or gone): its sessions are prefilled again on the others from
        the router's history, then it is released and closed. The last replica stays until another one joins."""
        r = next((x for x in self.replicas if x.address == address), None)
        if r is None:
            return False
        if len(self.replicas) == 1:
            log.warning("verifier %s left but it is the last replica; keeping it until another one joins", address)
            self._leaving.add(address)
            return False
        moved = [rid for rid, x in self._pin.items() if x is r]
        room = sum(x.free_slots for x in self.replicas if x is not r and x.address not in self._leaving)
        if room < len(moved):  # it keeps decoding them (it drains for a while) and takes no new ones; tried each round
            if address not in self._leaving:
                log.warning("verifier %s left; %d session(s) wait for room on the others", address, len(moved) - room)
            self._leaving.add(address)
            return False
        self._leaving.discard(address)
        self.replicas.remove(r)
        self._restored_gone += r.restored
        self._rehome(r, moved)
        r.release_sessions(moved)  # the leaving pod is draining: free its sessions now (the TTL would, later)
        r.close()
        metrics.REPLICAS.labels(tier="verifier").set(len(self.replicas))
        metrics.forget_replica("verifier", address)
        log.info("verifier %s left the pool; %d session(s) moved", address, len(moved))
        return True

    @property
    def max_sessions(self) -> int:
        return sum(r.max_sessions for r in self.replicas)

    @property
    def free_slots(self) -> int:
        """Sessions new requests can still get (not on a replica that is leaving)."""
        return sum(r.free_slots for r in self._open())

    def _open(self) -> list[RemoteVerifier]:
        """The replicas that take new requests: all but those leaving (all of them, if every one is leaving)."""
        return [r for r in self.replicas if r.address not in self._leaving] or self.replicas

    def replica_of(self, request_id: str) -> str:
        """The address of the replica a running request is pinned to."""
        return self._pin[request_id].address

    def sps_of(self, replica: str) -> SpsTable | None:
        return next((r.sps for r in self.replicas if r.address == replica), None)

    @property
    def restored(self) -> int:
        """Sessions rebuilt from the router's history, ever: on a restarted replica, or moved off one that was lost
        or left (each counted once, by the replica that prefilled it; never falls when a replica goes)."""
        return sum(r.restored for r in self.replicas) + self._restored_gone

    def _groups(self, items, key=lambda it: it.request_id) -> dict[RemoteVerifier, list[int]]:
        groups: dict[RemoteVerifier, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(self._pin[key(it)], []).append(i)
        return groups

    def _fan_out(self, method: str, items: list, groups) -> tuple[list, list[RemoteVerifier]]:
        """Call each replica with its items in parallel; (results in item order, replicas that failed)."""
        futures = {r: _submit(self._threads, getattr(r, method), [items[i] for i in idx]) for r, idx in groups.items()}
        out, lost = [None] * len(items), []
        for r, f in futures.items():
            try:
                for i, res in zip(groups[r], f.result()):
                    out[i] = res
            except ConnectionError:
                lost.append(r)
        return out, lost

    def prefill(self, items: list[PrefillItem]) -> list[Prefilled]:
        open_ = self._open()
        free = {r: r.free_slots for r in open_}
        for it in items:
            best = max(open_, key=lambda r: free[r])
            if free[best] <= 0:
                raise CapacityError(f"all {len(self.replicas)} verifier replicas are full")
            free[best] -= 1
            self._pin[it.request_id] = best
        for r in open_:
            n = sum(1 for it in items if self._pin[it.request_id] is r and not it.restore)
            if n:
                metrics.REPLICA_REQUESTS.labels(tier="verifier", replica=r.address).inc(n)
        out, lost = self._fan_out("prefill", items, self._groups(items))
        if lost:  # the whole admission is retried next round, on the replicas left
            for r in lost:
                self._drop(r)
            for it in items:
                r = self._pin.pop(it.request_id)
                if r not in lost:
                    r.release(it.request_id)
            raise CapacityError("a verifier replica was lost while admitting requests; retrying on the others")
        return out

    def verify(self, items: list[VerifyItem]) -> list[Verified]:
        if self._leaving and len(self.replicas) > 1:  # replicas that left while the others had no room for theirs
            for address in list(self._leaving):
                self.remove(address)
        out, lost = self._fan_out("verify", items, self._groups(items))
        if not lost:
            return out
        for r in lost:
            moved = [i for i, it in enumerate(items) if self._pin[it.request_id] is r]
            self._move(r, [items[i].request_id for i in moved])
        retry = [i for i, o in enumerate(out) if o is None]
        again = self.verify([items[i] for i in retry])
        for i, o in zip(retry, again):
            out[i] = o
        return out

    def _drop(self, r: RemoteVerifier) -> None:
        if r in self.replicas and len(self.replicas) > 1:
            log.warning("verifier %s lost; dropping it from the pool", r.address)
            self.replicas.remove(r)
            self._restored_gone += r.restored
        elif r in self.replicas:
            raise ConnectionError(f"the last verifier replica {r.address} is unreachable")

    def _move(self, lost: RemoteVerifier, request_ids: list[str]) -> None:
        """Prefill the lost replica's sessions again on the others, from the history the router holds."""
        self._drop(lost)
        self._rehome(lost, request_ids)

    def _rehome(self, lost: RemoteVerifier, request_ids: list[str]) -> None:
        for rid in request_ids:
            history, params = lost._history.pop(rid), lost._params.pop(rid)
            target = max(self.replicas, key=lambda r: r.free_slots)
            target.adopt(rid, history, params)
            self._pin[rid] = target
            self.failovers += 1

    def refeature(self, items: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """RemoteVerifier.refeature on the replica each session is pinned to."""
        groups = self._groups(items, key=lambda it: it[0])
        out, lost = self._fan_out("refeature", items, groups)
        if lost:
            raise ConnectionError(f"verifier replica(s) {', '.join(r.address for r in lost)} lost while refeaturing")
        return out

    def release(self, request_id: str) -> None:
        r = self._pin.pop(request_id, None)
        if r is not None:
            r.release(request_id)

    def close(self) -> None:
        self._threads.shutdown(wait=False)
        for r in self.replicas:
            r.close()


class ProposerPool:
    def __init__(self, replicas: list[RemoteProposer]):
        if not replicas:
            raise ValueError("a draft pool needs at least one replica")
        self.replicas = list(replicas)
        self.vocab_size = replicas[0].vocab_size
        self._pin: dict[str, RemoteProposer] = {}
        self._load = {r: 0 for r in replicas}
        self._threads = ThreadPoolExecutor(max_workers=_MAX_THREADS, thread_name_prefix="dspark-draft")
        self._leaving: set[str] = set()
        self.moved = 0  # sessions moved off a leaving replica
        metrics.REPLICAS.labels(tier="draft").set(len(self.replicas))

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    def sessions(self) -> dict[str, int]:
        return {r.address: self._load[r] for r in self.replicas}

    def add(self, replica: RemoteProposer) -> bool:
        """A draft replica that became ready (its Info already fetched: gamma, cost table) joins; new and moved
        sessions go to the least loaded replica, so it takes them first."""
        if replica.address in self.addresses:
            replica.close()
            return False
        self.replicas.append(replica)
        self._load[replica] = 0
        log.info("draft service %s joined the pool (%d replicas)", replica.address, len(self.replicas))
        metrics.REPLICAS.labels(tier="draft").set(len(self.replicas))
        for address in list(self._leaving):
            self._leaving.discard(address)
            self.remove(address)
        return True

    def remove(self, address: str) -> bool:
        """A draft replica that left: its sessions are reopened on the others at their next draft (the features
        recomputed by the verifier); the last replica stays until another one joins."""
        p = next((x for x in self.replicas if x.address == address), None)
        if p is None:
            return False
        if len(self.replicas) == 1:
            log.warning("draft service %s left but it is the last replica; keeping it until another joins", address)
            self._leaving.add(address)
            return False
        self.replicas.remove(p)
        moved = [rid for rid, x in self._pin.items() if x is p]
        for rid in moved:
            del self._pin[rid]
            p.release(rid)
        self._load.pop(p, None)
        self.moved += len(moved)
        p.close()
        metrics.REPLICAS.labels(tier="draft").set(len(self.replicas))
        metrics.forget_replica("draft", address)
        log.info("draft service %s left the pool; %d session(s) move", address, len(moved))
        return True

    @property
    def failures(self) -> int:
        return sum(r.failures for r in self.replicas)

    @property
    def gamma(self) -> int | None:
        return max((r.gamma or 0 for r in self.replicas), default=0) or None

    def info(self, timeout_s: float = 5.0):
        infos = [r.info(timeout_s) for r in self.replicas]
        return next((i for i in infos if i is not None), None)

    @property
    def draft_cost(self):
        """The dearest replica's table: a round's drafts run on the replicas in parallel, the slowest one sets it."""
        tables = [r.draft_cost for r in self.replicas if r.draft_cost is not None]
        return max(tables, key=lambda t: t(1, t.gamma), default=None)

    def _up(self, r: RemoteProposer) -> bool:
        return time.monotonic() >= r._down_until

    def _pin_for(self, rid: str) -> RemoteProposer:
        cur = self._pin.get(rid)
        if cur is not None and self._up(cur):
            return cur
        live = [r for r in self.replicas if self._up(r) and r.address not in self._leaving] or self.replicas
        best = min(live, key=lambda r: self._load[r])
        if cur is not None and best is not cur:  # move: the new replica reopens it (features from the verifier)
            cur._sent.pop(rid, None)
            self._load[cur] -= 1
        if best is not cur:
            self._pin[rid] = best
            self._load[best] += 1
            if cur is None:
                metrics.REPLICA_REQUESTS.labels(tier="draft", replica=best.address).inc()
        return best

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        groups: dict[RemoteProposer, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._pin_for(r.request_id), []).append(i)
        futures = {p: _submit(self._threads, p.propose, [requests[i] for i in idx]) for p, idx in groups.items()}
        out: list[Proposal | None] = [None] * len(requests)
        for p, f in futures.items():
            for i, prop in zip(groups[p], f.result()):
                out[i] = prop
        return out

    def release(self, request_id: str) -> None:
        p = self._pin.pop(request_id, None)
        if p is not None:
            self._load[p] -= 1
            p.release(request_id)

    def close(self) -> None:
        self._threads.shutdown(wait=False)
        for r in self.replicas:
            r.close()
