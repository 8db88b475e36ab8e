"""The verifier service: the target engine behind gRPC. `VerifierCore` is the plain, testable part (sessions, checks,
expiry over a LocalVerifier); `VerifierServicer` only converts messages. One Prefill or Verify call carries a whole
round for many sessions.

A Verify request names the position of its anchor (tokens already committed). A retried call whose first attempt did
commit (its response was lost) is rolled back to that position first, so retries are safe; a session that is behind
the caller's position, or unknown, is reported missing (NOT_FOUND, ids in trailing metadata) and the caller restores
it from its own token history.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from dspark.core.engine import CapacityError, ContextLengthError, TargetEngine
from dspark.core.scheduler import SpsTable
from dspark.core.verifier import LocalVerifier, Prefilled, PrefillItem, Verified, VerifyItem
from dspark.serving import metrics, wire
from dspark.serving.grpc_server import CoreServicer, MissingSessionsError
from dspark.v1 import verifier_pb2 as vpb
from dspark.v1 import verifier_pb2_grpc

log = logging.getLogger("dspark.core.verifier")


@dataclass(frozen=True)
class PositionedVerifyItem:
    item: VerifyItem
    position: int  # the caller's count of committed tokens before the anchor


class VerifierCore:
    def __init__(
        self,
        engine: TargetEngine,
        sps: SpsTable | None = None,
        eos_token_ids: tuple[int, ...] = (),
        ttl_s: float = 600.0,
        feature_dtype: str | None = None,
        clock=time.monotonic,
    ):
        self.engine = engine
        self.local = LocalVerifier(engine, sps)
        self.eos_token_ids = eos_token_ids
        self.ttl_s, self.clock = ttl_s, clock
        self.feature_dtype = feature_dtype  # None: send features in the dtype the target computes them in
        self._last_used: dict[str, float] = {}

    @property
    def sessions(self) -> int:
        return len(self._last_used)

    def _check_tokens(self, sid: str, ids) -> None:
        V = self.engine.vocab_size
        if any(not 0 <= t < V for t in ids):
            raise ValueError(f"session {sid!r}: token ids outside the vocabulary 0..{V - 1}")

    def prefill(self, items: list[PrefillItem]) -> list[Prefilled]:
        ids = [it.request_id for it in items]
        if len(set(ids)) != len(ids) or not all(ids):
            raise ValueError("session ids must be non-empty and distinct within one call")
        for it in items:
            if not it.token_ids:
                raise ValueError(f"session {it.request_id!r}: the prompt is empty")
            if len(it.token_ids) >= self.engine.config.max_context:
                raise ContextLengthError(
                    f"session {it.request_id!r}: {len(it.token_ids)} prompt tokens, but this verifier holds "
                    f"at most {self.engine.config.max_context} tokens per session (prompt + output)"
                )
            self._check_tokens(it.request_id, it.token_ids)
        for sid in ids:  # re-opening a session (a retried Prefill, a restore) replaces it
            self.release([sid])
        if len(items) > self.engine.free_slots:
            raise CapacityError(
                f"{len(items)} new sessions but {self.engine.free_slots} of {self.engine.config.max_requests} "
                "slots free; retry when running sessions finish, or add verifier replicas"
            )
        out = self.local.prefill(items)
        now = self.clock()
        for sid in ids:
            self._last_used[sid] = now
        return out

    def verify(self, items: list[PositionedVerifyItem]) -> list[Verified]:
        missing = [p.item.request_id for p in items if p.item.request_id not in self._last_used]
        behind = [
            p.item.request_id
            for p in items
            if p.item.request_id in self._last_used and self.engine.length(p.item.request_id) < p.position
        ]
        if missing or behind:
            raise MissingSessionsError(missing + behind, "verifier")
        V = self.engine.vocab_size
        for p in items:
            it, sid = p.item, p.item.request_id
            k = len(it.draft_tokens)
            if it.draft_probs.shape != (k, V):
                raise ValueError(f"session {sid!r}: {k} draft tokens need {k} draft distributions over {V} tokens")
            self._check_tokens(sid, [it.anchor, *it.draft_tokens.tolist()])
            if k and not bool(
                (it.draft_probs[torch.arange(k, device=it.draft_probs.device), it.draft_tokens] > 0).all()
            ):
                raise ValueError(f"session {sid!r}: a draft token has probability 0 under its own draft distribution")
            if p.position + 1 + k > self.engine.config.max_context:
                raise ContextLengthError(
                    f"session {sid!r}: position {p.position} + anchor + {k} drafts passes max_context "
                    f"{self.engine.config.max_context}"
                )
            if self.engine.length(sid) > p.position:  # a retry of a call that did commit: roll it back
                self.engine.truncate(sid, p.position)
        out = self.local.verify([p.item for p in items])
        now = self.clock()
        for p in items:
            self._last_used[p.item.request_id] = now
        return out

    def release(self, session_ids: list[str]) -> int:
        n = 0
        for sid in session_ids:
            if self._last_used.pop(sid, None) is not None:
                n += 1
            self.local.release(sid)
        return n

    def release_msg(self, m: vpb.ReleaseInput) -> int:
        return self.release(list(m.session_ids))

    def observe(self) -> None:
        """Export the session and KV cache gauges."""
        metrics.SESSIONS.labels("verifier").set(self.sessions)
        metrics.MAX_SESSIONS.labels("verifier").set(self.engine.config.max_requests)
        metrics.KV_TOKENS.set(sum(self.engine.length(s) for s in self._last_used))
        metrics.KV_CAPACITY.set(self.engine.config.max_requests * self.engine.config.max_context)

    def expire(self) -> int:
        """Release sessions unused for ttl_s (their router finished without releasing, or died)."""
        cutoff = self.clock() - self.ttl_s
        old = [sid for sid, t in self._last_used.items() if t < cutoff]
        if old:
            log.info("expiring %d idle sessions", len(old))
        return self.release(old)

    def info(self) -> vpb.VerifierInfo:
        sps = self.local.sps
        return vpb.VerifierInfo(
            model=str(self.engine.config.model),
            vocab_size=self.engine.vocab_size,
            max_context=self.engine.config.max_context,
            max_sessions=self.engine.config.max_requests,
            active_sessions=self.sessions,
            feature_layers=list(self.engine.config.feature_layers),
            sps=wire.sps_to_proto(sps) if sps else None,
            eos_token_ids=list(self.eos_token_ids),
            ragged=self.engine.ragged,
        )

    # -- messages <-> core ------------------------------------------------------------------------------------

    def prefill_msg(self, m: vpb.PrefillInput) -> vpb.PrefillOutput:
        items = [
            PrefillItem(r.session_id, list(r.token_ids), wire.params_from_proto(r.params), restore=r.restore)
            for r in m.requests
        ]
        out = self.prefill(items)
        return vpb.PrefillOutput(
            results=[
                vpb.Prefilled(
                    token_id=-1 if p.token is None else p.token,
                    features=None if p.features is None else wire.tensor_to_proto(p.features, self.feature_dtype),
                )
                for p in out
            ]
        )

    def verify_msg(self, m: vpb.VerifyInput) -> vpb.VerifyOutput:
        V, dev = self.engine.vocab_size, self.engine.device
        items = [
            PositionedVerifyItem(
                VerifyItem(
                    r.session_id,
                    r.anchor,
                    torch.tensor(list(r.draft_token_ids), dtype=torch.long, device=dev),
                    wire.dense_from_sparse(r.draft_probs, V, dev),
                ),
                r.position,
            )
            for r in m.requests
        ]
        out = self.verify(items)
        return vpb.VerifyOutput(
            results=[
                vpb.Verified(
                    accepted=v.accepted,
                    token_ids=v.tokens,
                    bonus=v.bonus,
                    features=None if v.features is None else wire.tensor_to_proto(v.features, self.feature_dtype),
                )
                for v in out
            ]
        )


class VerifierServicer(CoreServicer, verifier_pb2_grpc.VerifierServiceServicer):
    """Prefill and Verify; Release and Info are CoreServicer's."""

    service = "verifier"
    core: VerifierCore

    async def Prefill(self, request: vpb.PrefillInput, context) -> vpb.PrefillOutput:
        return await self.run(context, self.core.prefill_msg, request, "prefill")

    async def Verify(self, request: vpb.VerifyInput, context) -> vpb.VerifyOutput:
        return await self.run(context, self.core.verify_msg, request, "verify")


SERVICE_NAME = vpb.DESCRIPTOR.services_by_name["VerifierService"].full_name
