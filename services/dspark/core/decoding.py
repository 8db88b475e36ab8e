"""The decode loop: propose -> verify -> commit, over many requests with continuous batching.

Each round every running request sends its anchor token (the last token it emitted, not yet in the
target's cache) followed by its draft block through one batched target forward; rejection sampling
keeps a prefix of the block and emits one recovered or bonus token, which becomes the next anchor.
With no proposer (or k = 0) the same loop is plain autoregressive decoding: the baseline. When the drafter's cost
is known (a DraftCost table), the confidence-scheduled policies first decide how much each request drafts, from
earlier rounds and the load (planner.py); a request capped at 0 is not sent to the proposer, and a round with
nothing to draft makes no proposer call, so it costs what plain decoding costs.
Requests join and leave between rounds. The loop sees the drafter only as a Proposer and the target only as a
Verifier, in this process or behind gRPC; it holds every request's token history, the state both can be rebuilt from.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Hashable
from dataclasses import dataclass, field, fields

import torch

from dspark.core.engine import CapacityError, ContextLengthError, TargetEngine
from dspark.core.planner import ConfidenceForecast, DraftCost, VerifyRowCost, plan_drafts, verify_step_tokens
from dspark.core.proposer import DraftRequest, Proposal, Proposer
from dspark.core.sampling import SamplingParams
from dspark.core.scheduler import NEEDS_SPS, POLICIES, SpsTable, batch_capacity, expected_tokens, schedule
from dspark.core.verifier import LocalVerifier, PrefillItem, Verifier, VerifyItem


@dataclass
class RequestStats:
    rounds: int = 0  # verification rounds
    drafted: int = 0  # draft tokens proposed
    scheduled: int = 0  # draft tokens sent to verification (the verification budget)
    accepted: int = 0  # draft tokens that survived
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: rounds whose draft i survived

    @property
    def tau(self) -> float:
        """Mean tokens emitted per round, the recovered/bonus token included (as the paper counts it)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def record(self, scheduled: int, accepted: int) -> None:
        self.rounds += 1
        self.scheduled += scheduled
        self.accepted += accepted
        if len(self.accepted_per_position) < scheduled:
            self.accepted_per_position += [0] * (scheduled - len(self.accepted_per_position))
        for i in range(accepted):
            self.accepted_per_position[i] += 1


@dataclass
class LoopTimes:
    """Where the decode loop's time went (wall seconds, summed over rounds): benchmarks read and reset it."""

    rounds: int = 0
    draft_calls: int = 0  # rounds that called the proposer
    draft_s: float = 0.0  # in the proposer (in process: the drafter; remote: the RPC and the service)
    verify_s: float = 0.0  # in the verifier's batched verify
    prefill_s: float = 0.0

    def plus(self, other: LoopTimes) -> LoopTimes:
        return LoopTimes(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def per_round_ms(self) -> dict[str, float]:
        n = max(1, self.rounds)
        return {
            "draft_ms": 1000 * self.draft_s / n,
            "verify_ms": 1000 * self.verify_s / n,
            "draft_calls_per_round": self.draft_calls / n,
        }


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence or stop token), "length" (max_tokens / context), "abort"
    stats: RequestStats


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    policy: str
    output: list[int] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    new_features: list[torch.Tensor] = field(default_factory=list)  # committed, not yet sent to the proposer

    def take_features(self) -> torch.Tensor | None:
        if not self.new_features:
            return None
        out, self.new_features = torch.cat(self.new_features), []
        return out

    @property
    def anchor(self) -> int:
        return self.output[-1]

    @property
    def committed(self) -> int:
        """Tokens in the target's cache: every token but the anchor."""
        return len(self.prompt_ids) + len(self.output) - 1


class Decoder:
    def __init__(
        self,
        target: TargetEngine | Verifier,
        proposer: Proposer | None = None,
        num_draft: int = 0,
        eos_token_ids: tuple[int, ...] = (),
        policy: str = "fixed",
        sps: SpsTable | None = None,
        threshold: float = 0.5,
        draft_cost: DraftCost | None = None,
        plan_margin: float = 1.05,
    ):
        """draft_cost: the proposer's cost table (default: the proposer's own `draft_cost`, if it has one); None
        prices rounds with the verifier alone, as the paper does, and drafts every request in full. plan_margin:
        how much faster than not drafting a round must be expected to be before it drafts (see plan_drafts)."""
        if isinstance(target, TargetEngine):
            self.engine: TargetEngine | None = target
            self.verifier: Verifier = LocalVerifier(target, sps)
        else:
            self.engine, self.verifier = None, target
        self.proposer = proposer
        self.num_draft = num_draft if proposer is not None else 0
        self.sps, self.threshold = (sps if sps is not None else self.verifier.sps), threshold
        self.policy = self._check_policy(policy)
        self._draft_cost, self.plan_margin = draft_cost, plan_margin
        self._forecast = ConfidenceForecast(max(1, self.num_draft))
        self._verify_cost = VerifyRowCost()  # what drafted rows cost the verify step beyond the SPS table
        self.times = LoopTimes()
        # dspark-async, per verifier replica (None: a verifier without replicas): the batch capacities computed from
        # the last two rounds' confidences (oldest first)
        self._capacities: dict[Hashable, collections.deque[int | None]] = {}
        self.eos_token_ids = frozenset(eos_token_ids)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._ids = itertools.count()
        self._ids_in_use: set[str] = set()

    @property
    def draft_cost(self) -> DraftCost | None:
        if self._draft_cost is not None:
            return self._draft_cost
        return getattr(self.proposer, "draft_cost", None)

    # -- requests ---------------------------------------------------------------------------------------

    def _check_policy(self, policy: str) -> str:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if policy in NEEDS_SPS and self.sps is None:
            raise ValueError(f"the {policy} policy needs the verifier's SPS table")
        return policy

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, policy: str | None = None
    ) -> str:
        """Queue a request; `policy` overrides the decoder's verification policy for this request only."""
        policy = self.policy if policy is None else self._check_policy(policy)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.verifier.max_context:
            raise ContextLengthError(f"prompt has {len(prompt_ids)} tokens; max_context is {self.verifier.max_context}")
        bad = [t for t in prompt_ids if not 0 <= t < self.verifier.vocab_size]
        if bad:
            raise ValueError(f"token ids out of the vocabulary (0..{self.verifier.vocab_size - 1}): {bad[:5]}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._ids_in_use:
            raise ValueError(f"request id {rid!r} is already in use")
        self._ids_in_use.add(rid)
        self._waiting.append(_Request(rid, list(prompt_ids), params, policy))
        return rid

    def abort(self, request_id: str) -> Completion | None:
        for queue in (self._waiting, self._running):
            for r in queue:
                if r.request_id == request_id:
                    queue.remove(r)
                    self._free(r)
                    return self._completion(r, "abort")
        return None

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def outputs(self) -> dict[str, list[int]]:
        """Tokens emitted so far by each running request (for streaming; the lists are live, do not modify)."""
        return {r.request_id: r.output for r in self._running}

    def live_stats(self) -> dict[str, tuple[str, RequestStats]]:
        """(policy, live statistics) of every queued or running request; the stats objects update as rounds run."""
        return {r.request_id: (r.policy, r.stats) for q in (self._waiting, self._running) for r in q}

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # -- one round --------------------------------------------------------------------------------------

    def step(self) -> list[Completion]:
        """Admit waiting requests, run one propose -> verify -> commit round; return what finished."""
        finished = self._admit()
        batch = self._running
        if not batch:
            return finished
        groups = self._groups(batch)
        base_s = self._verify_base_s(groups)
        ks = self._plan(batch, groups, [self._budget(r) for r in batch], base_s)
        drafted = self._propose(batch, ks)
        cost = self.draft_cost
        draft_s = 0.0 if cost is None else cost(sum(k > 0 for k in ks), max(ks))
        sunk_s = draft_s + base_s  # seconds of this round no prefix length changes
        proposals = [p.prefix(n) for p, n in zip(drafted, self._schedule(batch, groups, drafted, sunk_s))]
        t = time.perf_counter()
        outs = self.verifier.verify(
            [VerifyItem(r.request_id, r.anchor, p.token_ids, p.probs) for r, p in zip(batch, proposals)]
        )
        verify_s = time.perf_counter() - t
        self.times.verify_s += verify_s
        self.times.rounds += 1
        self._learn_verify_cost(groups, proposals, verify_s)
        still = []
        for r, d, p, v in zip(batch, drafted, proposals, outs):
            if v.features is not None:
                r.new_features.append(v.features)
            r.stats.drafted += len(d.token_ids)
            r.stats.record(len(p.token_ids), v.accepted)
            if d.confidence is not None and len(d.token_ids):
                self._forecast.observe(r.request_id, d.confidence.tolist(), len(p.token_ids), v.accepted)
            elif len(d.token_ids) == 0:
                self._forecast.idle(r.request_id)
            reason = self._emit(r, v.tokens)
            if reason:
                self._free(r)
                finished.append(self._completion(r, reason))
            else:
                still.append(r)
        self._running = still
        return finished

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        policy: str | list[str] | None = None,
    ) -> list[Completion]:
        """Run prompts to completion (continuous batching when there are more than engine slots); `policy`: one
        override for every prompt or one per prompt."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        policies = policy if isinstance(policy, list) else [policy] * len(prompts)
        if len(plist) != len(prompts) or len(policies) != len(prompts):
            raise ValueError("one sampling params and one policy per prompt")
        ids = [self.add_request(p, sp, policy=pol) for p, sp, pol in zip(prompts, plist, policies)]
        done: dict[str, Completion] = {}
        while self.has_work:
            for c in self.step():
                done[c.request_id] = c
        return [done[i] for i in ids]

    # -- pieces -----------------------------------------------------------------------------------------

    def _admit(self) -> list[Completion]:
        """Prefill as many waiting requests as the verifier has room for, in one call."""
        n = min(len(self._waiting), self.verifier.free_slots)
        admitted = [self._waiting.popleft() for _ in range(n)]
        if not admitted:
            return []
        t = time.perf_counter()
        try:
            outs = self.verifier.prefill([PrefillItem(r.request_id, r.prompt_ids, r.params) for r in admitted])
        except CapacityError:  # a shared verifier filled up meanwhile: they wait for the next round
            self._waiting.extendleft(reversed(admitted))
            if not self._running:
                time.sleep(0.01)  # nothing else to do until a session is released somewhere
            return []
        self.times.prefill_s += time.perf_counter() - t
        finished = []
        for r, out in zip(admitted, outs):
            if out.features is not None:
                r.new_features.append(out.features)
            reason = self._emit(r, [out.token])
            if reason:
                self._free(r)
                finished.append(self._completion(r, reason))
            else:
                self._running.append(r)
        return finished

    def _budget(self, r: _Request) -> int:
        """Draft tokens worth verifying: never past max_tokens or the context."""
        room_tokens = r.params.max_tokens - len(r.output) - 1
        room_context = self.verifier.max_context - r.committed - 1
        k = 0 if r.policy == "autoregressive" else self.num_draft
        return max(0, min(k, room_tokens, room_context))

    def _propose(self, batch: list[_Request], ks: list[int]) -> list[Proposal]:
        """Drafts for the requests with k > 0 only; the others keep their new target features until they draft
        again (one batched catch-up then), and a round with nothing to draft makes no proposer call."""
        empty = Proposal.empty(self.verifier.vocab_size, self.verifier.device)
        out = [empty] * len(batch)
        active = [i for i, k in enumerate(ks) if k > 0]
        if self.proposer is None or not active:
            return out
        t = time.perf_counter()
        reqs = [
            DraftRequest(r.request_id, r.prompt_ids + r.output, ks[i], r.params, r.take_features())
            for i, r in ((i, batch[i]) for i in active)
        ]
        for i, p in zip(active, self.proposer.propose(reqs)):
            out[i] = p
        self.times.draft_s += time.perf_counter() - t
        self.times.draft_calls += 1
        return out

    def _groups(self, batch: list[_Request]) -> dict[Hashable, list[int]]:
        """The round's requests (indices) grouped by the verifier replica they are pinned to (None: no replicas)."""
        replica_of = getattr(self.verifier, "replica_of", None)
        groups: dict[Hashable, list[int]] = {}
        for i, r in enumerate(batch):
            groups.setdefault(None if replica_of is None else replica_of(r.request_id), []).append(i)
        return groups

    def _plan(
        self, batch: list[_Request], groups: dict[Hashable, list[int]], ks: list[int], base_s: float
    ) -> list[int]:
        """How many tokens each request drafts this round, decided before drafting: the confidence-scheduled
        policies draft what the forecast of their confidences and the drafter's cost say is worth verifying (at most
        their budget k); the others draft k. Without a draft cost table (or a forecast yet) everyone drafts k. base_s:
        what every verify step of the round costs beyond its table (`_verify_base_s`)."""
        cost = self.draft_cost
        if cost is None or self.proposer is None:
            return ks
        caps = list(ks)
        ragged = getattr(self.verifier, "ragged", False)
        for replica, idx in groups.items():
            sps = self._sps_of(replica, len(idx))
            if sps is None:
                continue
            for policy in NEEDS_SPS:  # dspark first: Algorithm 1 admits its requests before dspark-async's
                planned = [i for i in idx if batch[i].policy == policy and ks[i] > 0]
                forecasts = [self._forecast.forecast(batch[i].request_id, ks[i]) for i in planned]
                if not planned or any(f is None for f in forecasts):
                    continue
                others = [i for i in idx if i not in planned]
                base_tau = 0.0
                for i in others:  # the others' drafts, expected from their own forecast (or all survive)
                    f = self._forecast.forecast(batch[i].request_id, caps[i]) or [1.0] * caps[i]
                    base_tau += expected_tokens(f, caps[i])
                drafting = [i for i in others if caps[i] > 0]
                group_caps = plan_drafts(
                    forecasts,
                    sps,
                    cost,
                    base_tokens=sum(1 + caps[i] for i in others),
                    base_tau=base_tau,
                    base_rows=len(drafting),
                    base_positions=max((caps[i] for i in drafting), default=0),
                    margin=self.plan_margin,
                    early_stop=policy == "dspark",
                    padded_rows=0 if ragged else len(idx),  # a padded verify step costs rows x the longest block
                    verify_row_s=self._verify_cost.row_s,
                    verify_base_s=base_s,
                )
                for i, c in zip(planned, group_caps):
                    caps[i] = c
        return caps

    def _schedule(
        self, batch: list[_Request], groups: dict[Hashable, list[int]], proposals: list[Proposal], sunk_s: float
    ) -> list[int]:
        """Verification budget per request: how much of each proposal the target checks this round. The load is what
        each verifier replica batches: each replica's group is priced with that replica's own SPS table (a verifier
        without replicas: one group, its table), and with the round's sunk seconds: its drafting, and what every
        verify step costs beyond the table."""
        lengths = [0] * len(batch)
        for replica, idx in groups.items():
            history = self._capacities.setdefault(replica, collections.deque([None, None], maxlen=2))
            group = self._schedule_group(
                [batch[i] for i in idx], [proposals[i] for i in idx], self._sps_of(replica, len(idx)), history, sunk_s
            )
            for i, n in zip(idx, group):
                lengths[i] = n
        return lengths

    def _learn_verify_cost(self, groups: dict[Hashable, list[int]], proposals: list[Proposal], seconds: float) -> None:
        """The round's verify time against its SPS price, for the planner (only for one replica: replicas verify in
        parallel, so one round's time is not one table's step)."""
        if len(groups) != 1 or self.draft_cost is None:
            return
        sps = self._sps_of(next(iter(groups)), len(proposals))
        if sps is None:
            return
        lengths = [len(p.token_ids) for p in proposals]
        ragged = getattr(self.verifier, "ragged", False)
        tokens = verify_step_tokens(sum(lengths) + len(lengths), len(lengths), max(lengths), ragged)
        self._verify_cost.observe(seconds, 1.0 / sps(tokens), sum(n > 0 for n in lengths))

    def _verify_base_s(self, groups: dict[Hashable, list[int]]) -> float:
        """What the learned verify cost adds to every step of this round (learned for one replica only)."""
        return self._verify_cost.round_s if len(groups) == 1 else 0.0

    def _sps_of(self, replica: Hashable, rows: int) -> SpsTable | None:
        """The table a verify step of `rows` rows on a replica is priced with: the replica's own (the decoder's `sps`,
        else the verifier's, without replicas or when it has none), for that row count."""
        table = None if replica is None else self.verifier.sps_of(replica)
        table = self.sps if table is None else table
        return None if table is None else table.for_rows(rows)

    def _schedule_group(
        self,
        batch: list[_Request],
        proposals: list[Proposal],
        sps: SpsTable | None,
        capacities: collections.deque,
        sunk_s: float = 0.0,
    ) -> list[int]:
        """The budgets of the requests one verifier batches, priced with its table; `capacities`: its dspark-async
        capacities from the last two rounds it scheduled dspark-async requests in (oldest first)."""
        policies = [r.policy for r in batch]
        if all(p == "fixed" for p in policies) or not any(len(p.token_ids) for p in proposals):
            return [len(p.token_ids) for p in proposals]
        conf = []
        for r, p in zip(batch, proposals):
            if p.confidence is not None:
                conf.append(p.confidence.tolist())
            elif r.policy == "fixed" or not len(p.token_ids):
                conf.append([1.0] * len(p.token_ids))  # no estimate: counted as surviving in the others' Theta
            else:
                raise ValueError(f"the {r.policy} policy needs a proposer that reports confidences")
        capacity = capacities[0]
        if "dspark-async" in policies:  # two rounds on, this round's confidences size that round's batch
            capacities.append(batch_capacity(conf, sps, sunk_s))
        return schedule(policies, conf, sps, self.threshold, capacity, sunk_s)

    def _emit(self, r: _Request, tokens: list[int]) -> str | None:
        """Append tokens, cutting at a stop token or max_tokens; return a finish reason or None."""
        stops = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else self.eos_token_ids)
        for t in tokens:
            r.output.append(t)
            if t in stops:
                return "stop"
            if len(r.output) >= r.params.max_tokens:
                return "length"
        if r.committed + 1 > self.verifier.max_context:  # no room for the anchor
            return "length"
        return None

    def _free(self, r: _Request) -> None:
        self._ids_in_use.discard(r.request_id)
        self.verifier.release(r.request_id)
        self._forecast.release(r.request_id)
        if self.proposer is not None:
            self.proposer.release(r.request_id)

    @staticmethod
    def _completion(r: _Request, reason: str) -> Completion:
        return Completion(r.request_id, r.prompt_ids, list(r.output), reason, r.stats)
