"""The draft service: a DSpark drafter (with its own copy of the target's embedding and LM head) behind gRPC.
`DraftCore` holds one session per request: the token history and the drafter's context cache, grown from the target
features the router forwards from the verifier. `DraftServicer` only converts messages. One Draft call drafts a whole
round for many sessions, and sends each draft distribution sparse (the drafter samples from at most max_support
tokens).

A Draft request says where its new tokens start. A session that is shorter than that (unknown, expired, or the
service restarted) is reported missing (NOT_FOUND, ids in trailing metadata) and the caller reopens it from the
start; a longer one (a retried call) is rolled back first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from dspark.core.proposer import DraftRequest, Proposal
from dspark.core.sampling import SamplingParams
from dspark.drafter.proposer import DSparkProposer
from dspark.serving import metrics, wire
from dspark.serving.grpc_server import CoreServicer, MissingSessionsError
from dspark.v1 import draft_pb2 as dpb
from dspark.v1 import draft_pb2_grpc

log = logging.getLogger("dspark.draft")


@dataclass(frozen=True)
class DraftItem:
    session_id: str
    start: int  # tokens the caller believes this session holds; 0 opens it
    new_token_ids: list[int]  # appended at start; the last one is the anchor
    features: torch.Tensor | None  # (n, F) target features of the tokens committed since the previous call
    num_draft: int
    params: SamplingParams


@dataclass
class _Session:
    params: SamplingParams
    history: list[int] = field(default_factory=list)
    last_used: float = 0.0


class DraftCore:
    def __init__(self, proposer: DSparkProposer, ttl_s: float = 600.0, clock=time.monotonic):
        self.proposer = proposer
        self.vocab_size = proposer.drafter.config.vocab_size
        self.ttl_s, self.clock = ttl_s, clock
        self._sessions: dict[str, _Session] = {}

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def draft(self, items: list[DraftItem]) -> list[Proposal]:
        ids = [it.session_id for it in items]
        if len(set(ids)) != len(ids) or not all(ids):
            raise ValueError("session ids must be non-empty and distinct within one call")
        missing = [
            it.session_id
            for it in items
            if it.start > 0
            and (it.session_id not in self._sessions or len(self._sessions[it.session_id].history) < it.start)
        ]
        if missing:
            raise MissingSessionsError(missing, "draft")
        for it in items:
            if not it.new_token_ids:
                raise ValueError(f"session {it.session_id!r}: no new tokens (the anchor must be sent)")
            if any(not 0 <= t < self.vocab_size for t in it.new_token_ids):
                raise ValueError(
                    f"session {it.session_id!r}: token ids outside the vocabulary 0..{self.vocab_size - 1}"
                )
            if not 0 <= it.num_draft <= self.proposer.gamma:
                raise ValueError(
                    f"session {it.session_id!r}: num_draft {it.num_draft} outside 0..{self.proposer.gamma} "
                    "(the drafter's block size)"
                )
            if it.start == 0 and it.num_draft > 0 and it.features is None:
                raise ValueError(
                    f"session {it.session_id!r}: opening a session to draft needs the target features of its history"
                )
        now = self.clock()
        requests = []
        for it in items:
            if it.start == 0:
                self.release([it.session_id])
                self._sessions[it.session_id] = _Session(it.params)
            s = self._sessions[it.session_id]
            if len(s.history) > it.start:  # a retried round: forget what the first attempt appended
                del s.history[it.start :]
                self.proposer.rollback(it.session_id, max(0, it.start - 1))
            s.history += it.new_token_ids
            s.last_used = now
            requests.append(DraftRequest(it.session_id, s.history, it.num_draft, s.params, it.features))
        try:
            return self.proposer.propose(requests)
        except ValueError:  # inconsistent features: the session cannot be trusted any more
            self.release(ids)
            raise

    def release(self, session_ids: list[str]) -> int:
        n = 0
        for sid in session_ids:
            if self._sessions.pop(sid, None) is not None:
                n += 1
            self.proposer.release(sid)
        return n

    def release_msg(self, m) -> int:
        return self.release(list(m.session_ids))

    def observe(self) -> None:
        metrics.SESSIONS.labels("draft").set(self.sessions)

    def expire(self) -> int:
        cutoff = self.clock() - self.ttl_s
        old = [sid for sid, s in self._sessions.items() if s.last_used < cutoff]
        if old:
            log.info("expiring %d idle sessions", len(old))
        return self.release(old)

    def info(self) -> dpb.DraftInfo:
        c = self.proposer.drafter.config
        cost = self.proposer.draft_cost
        return dpb.DraftInfo(
            vocab_size=c.vocab_size,
            gamma=c.gamma,
            max_support=self.proposer.max_support or 0,
            feature_layers=list(c.feature_layers),
            active_sessions=self.sessions,
            cost=None if cost is None else wire.draft_cost_to_proto(cost),
        )

    # -- messages <-> core ------------------------------------------------------------------------------------

    def draft_msg(self, m: dpb.DraftInput) -> dpb.DraftOutput:
        items = [
            DraftItem(
                r.session_id,
                r.start,
                list(r.new_token_ids),
                wire.tensor_from_proto(r.features, self.proposer.device),
                r.num_draft,
                wire.params_from_proto(r.params),
            )
            for r in m.requests
        ]
        before = self.proposer.times.copy()
        out = self.draft(items)
        spent = self.proposer.times.minus(before)
        metrics.observe_draft_times(spent)
        return dpb.DraftOutput(
            times=dpb.DraftTimes(
                context_seconds=spent.context_s, backbone_seconds=spent.backbone_s, head_seconds=spent.head_s
            ),
            drafts=[
                dpb.Draft(
                    token_ids=p.token_ids.tolist(),
                    probs=wire.sparse_from_dense(p.probs),
                    confidence=[] if p.confidence is None else p.confidence.tolist(),
                )
                for p in out
            ],
        )


class DraftServicer(CoreServicer, draft_pb2_grpc.DraftServiceServicer):
    """Draft; Release and Info are CoreServicer's."""

    service = "draft"
    core: DraftCore

    async def Draft(self, request: dpb.DraftInput, context) -> dpb.DraftOutput:
        return await self.run(context, self.core.draft_msg, request, "draft")


SERVICE_NAME = dpb.DESCRIPTOR.services_by_name["DraftService"].full_name
