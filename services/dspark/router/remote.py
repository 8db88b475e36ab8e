"""The draft and verifier services seen from the decode loop: a Proposer and a Verifier over long-lived gRPC
channels, one batched call per round.

Both keep what is needed to rebuild their service's state, so a lost service costs time, never output:
- RemoteProposer: nothing but how far each draft session is. Draft service unreachable -> empty proposals (the
  round verifies anchors only, plain decoding) and a retry after `retry_after_s`; a session the service no longer
  has (restart, expiry, another replica) is reopened from the start with the whole history and the target features
  of all of it, recomputed by the verifier (`features_of`, e.g. RemoteVerifier.refeature) instead of kept here:
  features are far larger than tokens (3 layers x hidden size floats per token).
- RemoteVerifier: every request's token history. A session the verifier no longer has is restored by prefilling that
  history again (on a restarted replica; random numbers are keyed by position, so it draws what it would have), and
  an unreachable verifier is retried until `recover_s` has passed.
"""

from __future__ import annotations

import logging
import time

import grpc
import torch

from dspark.core.engine import CapacityError, ContextLengthError
from dspark.core.planner import DraftCost
from dspark.core.proposer import DraftRequest, DraftTimes, Proposal
from dspark.core.verifier import Prefilled, PrefillItem, Verified, VerifyItem
from dspark.serving import telemetry, wire
from dspark.serving.grpc_server import MISSING_SESSIONS, channel_options
from dspark.v1 import draft_pb2 as dpb
from dspark.v1 import draft_pb2_grpc, verifier_pb2_grpc
from dspark.v1 import verifier_pb2 as vpb

log = logging.getLogger("dspark.router.remote")

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _missing(e: grpc.RpcError) -> list[str]:
    for key, value in e.trailing_metadata() or ():
        if key == MISSING_SESSIONS:
            return [s for s in value.split(",") if s]
    return []


def _release(stub, session_id: str, timeout_s: float, pending: list) -> None:
    """Fire and forget: the decode loop never waits for a release; a lost one is expired by the service's TTL.
    The futures are kept until done (a dropped gRPC future cancels its call)."""
    pending[:] = [f for f in pending if not f.done()]
    pending.append(stub.Release.future(vpb.ReleaseInput(session_ids=[session_id]), timeout=timeout_s))


def _raise_for(e: grpc.RpcError, service: str):
    code, details = e.code(), e.details()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        raise CapacityError(f"{service}: {details}") from e
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        cls = ContextLengthError if "max_context" in (details or "") else ValueError
        raise cls(f"{service}: {details}") from e
    raise ConnectionError(f"{service} failed ({code.name}): {details}") from e


class RemoteVerifier:
    def __init__(
        self,
        address: str,
        timeout_s: float = 60.0,
        recover_s: float = 60.0,
        connect_s: float = 30.0,
        max_message_mb: int = 64,
    ):
        self.address = address
        self.timeout_s, self.recover_s = timeout_s, recover_s
        self.channel = grpc.insecure_channel(address, options=channel_options(max_message_mb))
        self.stub = verifier_pb2_grpc.VerifierServiceStub(self.channel)
        info = self.stub.Info(vpb.InfoInput(), timeout=connect_s, wait_for_ready=True)
        self.model = info.model
        self.vocab_size = info.vocab_size
        self.max_context = info.max_context
        self.max_sessions = info.max_sessions
        self.feature_layers = tuple(info.feature_layers)
        self.eos_token_ids = tuple(info.eos_token_ids)
        self.ragged = info.ragged
        self.sps = wire.sps_from_proto(info.sps)
        self.device = torch.device("cpu")
        self._history: dict[str, list[int]] = {}  # per session: every token so far, the anchor last
        self._params: dict[str, vpb.SamplingParams] = {}
        self._releasing: list[grpc.Future] = []
        self.restored = 0  # sessions rebuilt from history (a verifier restart or expiry)

    @property
    def free_slots(self) -> int:
        return max(0, self.max_sessions - len(self._history))

    def _call(self, method, msg, what: str):
        """method(msg), retried while the verifier is unreachable (up to recover_s); missing sessions restored."""
        give_up = time.monotonic() + self.recover_s
        delay = 0.1
        while True:
            try:
                # fail fast while the verifier is down: this loop does the waiting, bounded by recover_s
                return method(msg, timeout=self.timeout_s, metadata=telemetry.outgoing_metadata())
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND and _missing(e) and what == "Verify":
                    self._restore(_missing(e))
                    continue
                if e.code() not in _RETRYABLE or time.monotonic() > give_up:
                    _raise_for(e, f"verifier {self.address} {what}")
                log.warning("verifier %s %s: %s; retrying", self.address, what, e.code().name)
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    def _restore(self, session_ids: list[str]) -> None:
        log.warning(
            "verifier %s lost %d session(s); prefilling them again from history", self.address, len(session_ids)
        )
        reqs = [
            vpb.PrefillRequest(
                session_id=s,
                token_ids=self._history[s][:-1],
                params=self._params[s],
                restore=True,
                trace_context=telemetry.request_context(s),
            )
            for s in session_ids
            if s in self._history
        ]
        self._call(self.stub.Prefill, vpb.PrefillInput(requests=reqs), "Prefill")
        self.restored += len(reqs)

    def prefill(self, items: list[PrefillItem]) -> list[Prefilled]:
        reqs = [
            vpb.PrefillRequest(
                session_id=it.request_id,
                token_ids=it.token_ids,
                params=wire.params_to_proto(it.params),
                restore=it.restore,
                trace_context=telemetry.request_context(it.request_id),
            )
            for it in items
        ]
        out = self._call(self.stub.Prefill, vpb.PrefillInput(requests=reqs), "Prefill")
        results = []
        for it, req, r in zip(items, reqs, out.results):
            token = None if it.restore else r.token_id
            self._history[it.request_id] = list(it.token_ids) + ([] if token is None else [token])
            self._params[it.request_id] = req.params
            results.append(Prefilled(token, wire.tensor_from_proto(r.features)))
        return results

    def verify(self, items: list[VerifyItem]) -> list[Verified]:
        reqs = []
        for it in items:
            hist = self._history[it.request_id]
            if hist[-1] != it.anchor:
                raise ValueError(f"request {it.request_id!r}: anchor {it.anchor} is not the last token {hist[-1]}")
            reqs.append(
                vpb.VerifyRequest(
                    session_id=it.request_id,
                    anchor=it.anchor,
                    draft_token_ids=it.draft_tokens.tolist(),
                    draft_probs=wire.sparse_from_dense(it.draft_probs),
                    position=len(hist) - 1,
                    trace_context=telemetry.request_context(it.request_id),
                )
            )
        out = self._call(self.stub.Verify, vpb.VerifyInput(requests=reqs), "Verify")
        results = []
        for it, r in zip(items, out.results):
            tokens = list(r.token_ids)
            self._history[it.request_id] += tokens
            results.append(Verified(r.accepted, tokens, r.bonus, wire.tensor_from_proto(r.features)))
        return results

    def adopt(self, request_id: str, history: list[int], params: vpb.SamplingParams) -> None:
        """Take over a session another replica lost: prefill its history (every token before the anchor) here."""
        self._history[request_id], self._params[request_id] = list(history), params
        self._restore([request_id])

    def refeature(self, items: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """(session, every token before its anchor) -> the target features of those tokens, recomputed by prefilling
        the sessions again (the KV cache is rebuilt from the same tokens, and random numbers are keyed by position,
        so decoding goes on unchanged): what a lost draft session is reopened from."""
        reqs = [
            vpb.PrefillRequest(
                session_id=rid,
                token_ids=tokens,
                params=self._params[rid],
                restore=True,
                trace_context=telemetry.request_context(rid),
            )
            for rid, tokens in items
        ]
        out = self._call(self.stub.Prefill, vpb.PrefillInput(requests=reqs), "Prefill")
        return [wire.tensor_from_proto(r.features) for r in out.results]

    def release(self, request_id: str) -> None:
        if self._history.pop(request_id, None) is not None:
            self._params.pop(request_id, None)
            _release(self.stub, request_id, self.timeout_s, self._releasing)

    def release_sessions(self, session_ids: list[str]) -> None:
        """Free sessions another replica took over (their history already moved), in one call that is waited for
        briefly: the channel is closed next."""
        if session_ids:
            try:
                self.stub.Release(vpb.ReleaseInput(session_ids=session_ids), timeout=min(2.0, self.timeout_s))
            except grpc.RpcError as e:  # gone already: its sessions went with it
                log.info("verifier %s: releasing moved sessions failed (%s)", self.address, e.code().name)

    def close(self) -> None:
        self.channel.close()


class RemoteProposer:
    def __init__(
        self,
        address: str,
        vocab_size: int,
        timeout_s: float = 10.0,
        retry_after_s: float = 1.0,
        feature_dtype: str | None = None,
        max_message_mb: int = 64,
        features_of=None,
    ):
        """features_of([(request id, every token before its anchor)]) -> their target features: how a lost session
        is reopened (None: a lost session cannot be reopened and its request is decoded without drafts)."""
        self.address = address
        self.vocab_size = vocab_size
        self.features_of = features_of
        self.timeout_s, self.retry_after_s = timeout_s, retry_after_s
        self.feature_dtype = feature_dtype
        self.channel = grpc.insecure_channel(address, options=channel_options(max_message_mb))
        self.stub = draft_pb2_grpc.DraftServiceStub(self.channel)
        self.gamma: int | None = None
        self.draft_cost: DraftCost | None = None  # the service's t_draft(R, K) plus this caller's round trip
        self._sent: dict[str, int] = {}  # tokens the draft service holds per session; absent = (re)open it
        self._releasing: list[grpc.Future] = []
        self._down_until = 0.0
        self.failures = 0  # rounds that fell back to plain decoding
        self.reopened = 0  # sessions the service had lost, reopened from the start
        self.times = DraftTimes()  # successful Draft calls: the service's compute phases (its answers) and the rest

    def info(self, timeout_s: float = 5.0) -> dpb.DraftInfo | None:
        try:
            info = self.stub.Info(vpb.InfoInput(), timeout=timeout_s, wait_for_ready=True)
        except grpc.RpcError:
            return None
        self.gamma = info.gamma
        if info.vocab_size != self.vocab_size:
            raise ValueError(f"the drafter's vocabulary ({info.vocab_size}) is not the target's ({self.vocab_size})")
        cost = wire.draft_cost_from_proto(info.cost)
        self.draft_cost = None if cost is None else cost.with_overhead(self._round_trip_s(timeout_s))
        return info

    def _round_trip_s(self, timeout_s: float, calls: int = 5) -> float:
        """What a call costs besides the service's compute: the median of a few Info round trips."""
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            try:
                self.stub.Info(vpb.InfoInput(), timeout=timeout_s)
            except grpc.RpcError:
                break
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2] if times else 0.0

    def release(self, request_id: str) -> None:
        if self._sent.pop(request_id, None) is not None:
            _release(self.stub, request_id, self.timeout_s, self._releasing)

    def _empty(self, requests: list[DraftRequest]) -> list[Proposal]:
        return [Proposal.empty(self.vocab_size)] * len(requests)

    def _features(self, requests: list[DraftRequest]) -> dict[str, torch.Tensor | None]:
        """The features each request sends: those committed since its last call, or, for a session to (re)open
        whose request brought fewer than its whole history's (a reopen), all of them, recomputed by the verifier."""
        out, reopen = {}, []
        for r in requests:
            covers_all = r.features is not None and r.features.shape[0] == len(r.token_ids) - 1
            if self._sent.get(r.request_id, 0) == 0 and not covers_all and len(r.token_ids) > 1:
                reopen.append(r)
            else:
                out[r.request_id] = r.features
        if reopen:
            if self.features_of is None:
                raise ConnectionError(f"draft service {self.address} lost sessions and this router cannot reopen them")
            feats = self.features_of([(r.request_id, r.token_ids[:-1]) for r in reopen])
            self.reopened += len(reopen)
            out.update((r.request_id, f) for r, f in zip(reopen, feats))
        return out

    def _message(self, requests: list[DraftRequest]) -> dpb.DraftInput:
        features = self._features(requests)
        reqs = []
        for r in requests:
            start = self._sent.get(r.request_id, 0)
            f = features[r.request_id]
            k = r.num_draft if self.gamma is None else min(r.num_draft, self.gamma)
            reqs.append(
                dpb.DraftRequest(
                    session_id=r.request_id,
                    start=start,
                    new_token_ids=r.token_ids[start:],
                    features=None if f is None else wire.tensor_to_proto(f, self.feature_dtype),
                    num_draft=k,
                    params=wire.params_to_proto(r.params),
                    trace_context=telemetry.request_context(r.request_id),
                )
            )
        return dpb.DraftInput(requests=reqs)

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        if time.monotonic() < self._down_until:
            self.failures += 1
            return self._empty(requests)
        if self.gamma is None and self.info(timeout_s=min(1.0, self.timeout_s)) is None:
            return self._down(requests, "unreachable")
        t = time.perf_counter()
        for attempt in range(2):
            try:
                metadata = telemetry.outgoing_metadata()
                out = self.stub.Draft(self._message(requests), timeout=self.timeout_s, metadata=metadata)
                break
            except grpc.RpcError as e:
                missing = _missing(e) if e.code() == grpc.StatusCode.NOT_FOUND else []
                if missing and attempt == 0:  # the service restarted or expired them: reopen from the start
                    for s in missing:
                        self._sent.pop(s, None)
                    continue
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    _raise_for(e, f"draft service {self.address}")
                return self._down(requests, e.code().name)
        proposals = []
        spent = out.times
        self.times.calls += 1
        self.times.context_s += spent.context_seconds
        self.times.backbone_s += spent.backbone_seconds
        self.times.head_s += spent.head_seconds
        for r, d in zip(requests, out.drafts):
            self._sent[r.request_id] = len(r.token_ids)
            k = len(d.token_ids)
            proposals.append(
                Proposal(
                    torch.tensor(list(d.token_ids), dtype=torch.long),
                    wire.SparseRows(d.probs, self.vocab_size),  # forwarded to the verifier as they are
                    torch.tensor(list(d.confidence), dtype=torch.float32) if len(d.confidence) == k else None,
                )
            )
        compute = spent.context_seconds + spent.backbone_seconds + spent.head_seconds
        self.times.wire_s += max(0.0, time.perf_counter() - t - compute)
        return proposals

    def _down(self, requests: list[DraftRequest], why: str) -> list[Proposal]:
        """No drafts this round (plain decoding); every session is reopened when the service answers again."""
        log.warning("draft service %s: %s; plain decoding for %.1f s", self.address, why, self.retry_after_s)
        self.failures += 1
        self._down_until = time.monotonic() + self.retry_after_s
        self._sent.clear()
        self.gamma = None
        return self._empty(requests)

    def close(self) -> None:
        self.channel.close()
