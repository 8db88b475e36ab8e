"""The router: the decode loop of a distributed deployment, fed by asyncio front ends (gRPC, HTTP).

One thread runs the same Decoder as `dspark generate --local`, with a RemoteProposer (draft service) and a
RemoteVerifier (verifier service): every round is one Draft call and one Verify call for all running requests. The
router holds each request's token history (inside the Decoder and RemoteVerifier), which is what lost draft or verifier
state is rebuilt from. Front ends submit requests and read per-choice deltas from an asyncio queue; text, stop strings
and n > 1 are handled here, on the router's side of the tokenizer.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from opentelemetry.trace import Link

from dspark.core.decoding import Completion, Decoder
from dspark.core.engine import CapacityError
from dspark.core.sampling import SamplingParams
from dspark.router.discovery import DISCOVERY_WAIT_S, EndpointsWatch, is_discovered, service_ref
from dspark.serving import metrics, telemetry
from dspark.serving.metrics import InstrumentedProposer, InstrumentedVerifier, RoundStats

log = logging.getLogger("dspark.router.loop")


@dataclass(frozen=True)
class RouterConfig:
    # verifier service host:port (comma-separated: replicas; k8s://[namespace/]service[:port]: the Service's endpoints)
    verifier: str = "127.0.0.1:50061"
    draft: str | None = "127.0.0.1:50062"  # draft service, the same forms; None = plain decoding
    model: str | None = None  # tokenizer (registry name or folder); None = the verifier's model
    policy: str = "dspark"  # verification policy; requests may override it
    num_draft: int | None = None  # draft tokens per round; None = the drafter's block size gamma
    threshold: float = 0.5  # survival threshold of the threshold policy
    max_tokens: int = 4096  # largest max_tokens a request may ask for
    max_queue: int = 1024  # requests waiting for a verifier slot before new ones get RESOURCE_EXHAUSTED
    api_key: str | None = None  # bearer token the public API requires; None = open
    verifier_recover_s: float = 60.0  # how long a round waits for a lost verifier before failing its requests
    draft_retry_s: float = 1.0  # plain decoding this long after the draft service fails, then try it again
    max_request_bytes: int = 1 << 20  # HTTP bodies larger than this are refused (413) before they are parsed


@dataclass
class Delta:
    index: int  # the choice
    token_ids: list[int]  # new tokens
    text: str = ""  # new text
    finish_reason: str | None = None
    completion: Completion | None = None  # set with finish_reason


@dataclass
class _Choice:
    index: int
    request_id: str
    ids: list[int] = field(default_factory=list)
    text: str = ""  # text sent so far
    stopped: bool = False  # a stop string was reached
    done: bool = False


class Router:
    def __init__(self, config: RouterConfig, tokenizer=None, decoder: Decoder | None = None):
        self.config = config
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._watches: list = []  # discovery.EndpointsWatch of each tier found through Kubernetes
        if decoder is None:
            decoder = self._build_decoder(config)
        decoder.verifier = InstrumentedVerifier(decoder.verifier)
        if decoder.proposer is not None:
            decoder.proposer = InstrumentedProposer(decoder.proposer)
        self.decoder = decoder
        self._restored = getattr(decoder.verifier.inner, "restored", 0)  # what RESTORED counted so far
        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer(config)
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._sent: dict[str, int] = {}
        self._spans: dict[str, object] = {}  # request id -> its dspark.generate span (the parent of its round spans)
        self._pending = 0  # submitted, not finished (changed by both threads, under _lock)
        self._streams = 0  # calls of stream() not yet returned: what a shutdown waits for (event loop only)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="dspark-decode-loop", daemon=True)
        self._thread.start()

    def _build_decoder(self, config: RouterConfig) -> Decoder:
        """Comma-separated addresses make a pool of replicas (requests pinned to one of each); a `k8s://` address
        (discovery.py) makes a pool that follows the Service's ready endpoints."""
        from dspark.router.pool import ProposerPool, VerifierPool
        from dspark.router.remote import RemoteProposer, RemoteVerifier

        recover = min(config.verifier_recover_s, 5.0)  # with replicas, fail over quickly: the others take the sessions
        if is_discovered(config.verifier):
            verifier = VerifierPool(
                self._follow("verifier", config.verifier, lambda a: RemoteVerifier(a, recover_s=recover))
            )
        else:
            addresses = [x.strip() for x in config.verifier.split(",") if x.strip()]
            if len(addresses) == 1:
                verifier = RemoteVerifier(addresses[0], recover_s=config.verifier_recover_s)
            else:
                verifier = VerifierPool([RemoteVerifier(a, recover_s=recover) for a in addresses])
        proposer, k = None, 0

        def remote_proposer(address: str) -> RemoteProposer:
            return RemoteProposer(
                address, verifier.vocab_size, retry_after_s=config.draft_retry_s, features_of=verifier.refeature
            )

        if is_discovered(config.draft):

            def joined(address: str) -> RemoteProposer:
                p = remote_proposer(address)
                p.info(timeout_s=30.0)  # gamma and its cost table, before it takes sessions
                return p

            proposer = ProposerPool(self._follow("draft", config.draft, joined))
        else:
            drafts = [x.strip() for x in (config.draft or "").split(",") if x.strip()]
            if drafts:
                remote = [remote_proposer(a) for a in drafts]
                proposer = remote[0] if len(remote) == 1 else ProposerPool(remote)
        if proposer is not None:
            info = proposer.info(timeout_s=30.0)
            if info is None and config.num_draft is None:
                raise ConnectionError(f"draft service {config.draft} is unreachable and --num-draft is not set")
            k = config.num_draft or info.gamma
        policy = config.policy if proposer is not None else "autoregressive"
        return Decoder(verifier, proposer, k, verifier.eos_token_ids, policy=policy, threshold=config.threshold)

    def _follow(self, tier: str, address: str, connect) -> list:
        """Start watching a tier's Service; the replicas ready now (waited for, up to DISCOVERY_WAIT_S). Later joins
        are connected on the watch thread (Info: the SPS table, the draft cost) and handed to the decode loop with
        the leaves, which applies them between rounds (VerifierPool/ProposerPool add and remove)."""
        lock = threading.Lock()
        applied: set[str] = set()  # the addresses the pool has (or is being given)
        started = threading.Event()

        def on_change(_change) -> None:
            with lock:
                if not started.is_set():
                    return
                now = watch.membership.addresses
                joined, left = sorted(now - applied), sorted(applied - now)
                replicas = []
                for a in joined:
                    try:
                        replicas.append(connect(a))
                        applied.add(a)
                    except Exception:  # noqa: BLE001 - not answering yet: taken at the tier's next change
                        log.exception("%s replica %s is ready but could not be connected", tier, a)
                applied.difference_update(left)
            if replicas or left:
                self._inbox.put(("replicas", tier, replicas, left))
                self._wake.set()

        watch = EndpointsWatch(service_ref(address), on_change)
        self._watches.append(watch.start())
        watch.wait_ready(DISCOVERY_WAIT_S)
        with lock:  # changes from here on wait, then come out as the difference to what the pool starts with
            first = sorted(watch.membership.addresses)
            replicas = [connect(a) for a in first]
            applied.update(first)
            started.set()
        log.info("%s replicas behind %s: %s", tier, watch.ref, first)
        return replicas

    def _apply_replicas(self, tier: str, joined: list, left: list[str]) -> None:
        part = self.decoder.verifier if tier == "verifier" else self.decoder.proposer
        pool = getattr(part, "inner", part)
        for r in joined:
            try:
                pool.add(r)
            except Exception:  # noqa: BLE001 - a replica that cannot join must not stop the decode loop
                log.exception("%s replica %s could not join", tier, r.address)
        for address in left:
            try:
                pool.remove(address)
            except Exception:  # noqa: BLE001 - its requests fail over when it is found unreachable instead
                log.exception("%s replica %s could not leave cleanly", tier, address)

    def _load_tokenizer(self, config: RouterConfig):
        from dspark.models.model_store import load_tokenizer

        return load_tokenizer(config.model or self.decoder.verifier.model)

    # -- front-end side (asyncio) -------------------------------------------------------------------------------

    def encode(self, prompt: str = "", messages: list[dict] | None = None, token_ids: list[int] | None = None):
        from dspark.models.prompt import encode_prompt

        given = [bool(prompt), bool(messages), bool(token_ids)]
        if sum(given) != 1:
            raise ValueError("send exactly one of prompt, messages or prompt_token_ids")
        if token_ids:
            return list(token_ids)
        if self.tokenizer is None:
            raise ValueError("this router has no tokenizer: send prompt_token_ids")
        chars = len(prompt) + sum(len(m.get("content") or "") for m in messages or ())
        limit = self._max_prompt_chars
        if limit is not None and chars > limit:  # surely too long: refused without tokenizing it
            from dspark.core.engine import ContextLengthError

            raise ContextLengthError(
                f"the prompt has {chars} characters, more than this deployment's max_context of "
                f"{self.decoder.verifier.max_context} tokens can hold (prompt + output): shorten the prompt"
            )
        return encode_prompt(self.tokenizer, prompt or messages)

    @functools.cached_property
    def _max_prompt_chars(self) -> int | None:
        """The most characters a prompt under max_context tokens can have: no token stands for more characters than
        its vocabulary entry has (byte-level BPE: one character a byte), so a longer text has too many tokens and is
        refused before tokenizing it (a 10 MB prompt would take seconds). None: the tokenizer has no vocabulary."""
        vocab = getattr(self.tokenizer, "get_vocab", None)
        if vocab is None:
            return None
        longest = max((len(t) for t in vocab()), default=0)
        return longest * self.decoder.verifier.max_context if longest else None

    def sampling_params(self, n: int, max_tokens: int | None, temperature, top_p, top_k, seed, ignore_eos=False):
        if not 1 <= n <= 16:
            raise ValueError(f"n must be in 1..16, got {n}")
        max_tokens = min(128, self.config.max_tokens) if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.config.max_tokens:
            raise ValueError(f"max_tokens must be in 1..{self.config.max_tokens}, got {max_tokens}")
        return [
            SamplingParams(
                temperature=0.0 if temperature is None else float(temperature),
                top_p=1.0 if top_p is None else float(top_p),
                top_k=0 if top_k is None else int(top_k),
                max_tokens=max_tokens,
                seed=None if seed is None else seed + i,
                ignore_eos=ignore_eos,
            )
            for i in range(n)
        ]

    async def stream(
        self, prompt_ids: list[int], params: list[SamplingParams], stop: list[str] = (), policy: str | None = None
    ) -> AsyncIterator[Delta]:
        """Deltas of every choice as rounds are verified; each choice ends with a Delta carrying finish_reason.
        Raises ValueError/ContextLengthError (bad request), CapacityError (queue full), ConnectionError (the
        verifier is lost). Leaving the iteration early aborts the unfinished choices."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        v = self.decoder.verifier
        if len(prompt_ids) >= v.max_context:
            from dspark.core.engine import ContextLengthError

            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens; this deployment's max_context is {v.max_context} "
                "(prompt + output): shorten the prompt"
            )
        if policy:
            self.decoder._check_policy(policy)
        with self._lock:
            if self._pending + len(params) > self.config.max_queue:
                raise CapacityError(f"{self._pending} requests in flight (max {self.config.max_queue}); retry later")
            self._pending += len(params)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        attrs = {
            "dspark.n": len(params),
            "dspark.prompt_tokens": len(prompt_ids),
            "dspark.max_tokens": params[0].max_tokens,
            "dspark.temperature": params[0].temperature,
            "dspark.policy": policy or "",
        }
        span = telemetry.tracer().start_span("dspark.generate", attributes=attrs)
        choices = []
        for i, sp in enumerate(params):
            rid = f"r{next(self._ids)}-{i}"
            choices.append(_Choice(i, rid))
            self._sinks[rid] = (loop, q)
            self._spans[rid] = span
            self._inbox.put(("add", rid, prompt_ids, sp, policy))
        self._wake.set()
        by_id = {c.request_id: c for c in choices}
        self._streams += 1
        try:
            while not all(c.done for c in choices):
                rid, item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                c = by_id[rid]
                tokens, completion = item
                if c.stopped:  # past a stop string: only the completion (its stats) matters now
                    tokens = []
                c.ids += tokens
                text, hit = self._text_delta(c, stop, final=completion is not None)
                if hit and not c.stopped:  # a stop string: the text ends before it, the request ends here
                    c.stopped = True
                    self._inbox.put(("abort", rid))
                    self._wake.set()
                delta = Delta(c.index, tokens, text)
                if completion is not None:
                    c.done = True
                    delta.finish_reason = "stop" if c.stopped else completion.finish_reason
                    delta.completion = completion
                if delta.token_ids or delta.text or delta.finish_reason:
                    yield delta
        finally:
            self._streams -= 1
            for c in choices:
                self._spans.pop(c.request_id, None)
                if not c.done:
                    self._inbox.put(("abort", c.request_id))
            self._wake.set()
            span.end()

    @property
    def in_flight(self) -> int:
        """Requests of the public APIs this router is still answering (a shutdown drains them first)."""
        return self._streams

    def _text_delta(self, c: _Choice, stop, final: bool) -> tuple[str, bool]:
        """(new text since the last delta, whether a stop string was reached). Text is held back while it may be an
        unfinished character or the start of a stop string, and cut before the first stop string."""
        if self.tokenizer is None or c.stopped:
            return "", False
        text = self.tokenizer.decode(c.ids, skip_special_tokens=True)
        for s in stop:
            at = text.find(s, max(0, len(c.text) - len(s))) if s else -1
            if at >= 0:
                out = text[len(c.text) : at] if at >= len(c.text) else ""
                c.text += out
                return out, True
        if not final:
            hold = max([len(s) - 1 for s in stop if s] + [0])
            if text.endswith("\ufffd"):
                hold = max(hold, 1)
            text = text[: len(text) - hold] if hold else text
        out = text[len(c.text) :] if text.startswith(c.text) else ""
        c.text += out
        return out, False

    async def generate(self, prompt_ids, params, stop=(), policy=None) -> list[Delta]:
        """Run to completion: one Delta per choice with all its text and token ids."""
        done: dict[int, Delta] = {i: Delta(i, []) for i in range(len(params))}
        async for d in self.stream(prompt_ids, params, stop, policy):
            acc = done[d.index]
            acc.text += d.text
            acc.token_ids += d.token_ids
            if d.finish_reason:
                acc.finish_reason, acc.completion = d.finish_reason, d.completion
        return [done[i] for i in range(len(params))]

    # -- the decode loop (its own thread) -----------------------------------------------------------------------

    def _post(self, rid: str, item) -> None:
        sink = self._sinks.get(rid)
        if sink is not None:
            loop, q = sink
            loop.call_soon_threadsafe(q.put_nowait, (rid, item))

    def _finish(self, rid: str, item) -> None:
        self._post(rid, item)
        if self._sinks.pop(rid, None) is not None:
            with self._lock:
                self._pending -= 1
        self._sent.pop(rid, None)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, rid, prompt_ids, sp, policy = msg
                try:
                    self.decoder.add_request(prompt_ids, sp, request_id=rid, policy=policy)
                    self._sent[rid] = 0
                except Exception as e:  # noqa: BLE001 - goes back to the caller
                    self._finish(rid, e)
            elif msg[0] == "abort":
                c = self.decoder.abort(msg[1])
                if c is not None:
                    self._finish(msg[1], ([], c))
            elif msg[0] == "replicas":
                self._apply_replicas(*msg[1:])
                self._record_restored()

    def _loop(self) -> None:
        while not self._stop:
            self._drain_inbox()
            if not self.decoder.has_work:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                finished = self._round()
            except Exception as e:  # noqa: BLE001 - a lost verifier: fail what is running, keep serving
                log.exception("decode round failed")
                err = e if isinstance(e, ConnectionError) else ConnectionError(f"decode round failed: {e}")
                for rid in list(self._sinks):
                    self.decoder.abort(rid)
                    self._finish(rid, err)
                continue
            for rid, out in self.decoder.outputs().items():
                n = self._sent.get(rid, 0)
                if len(out) > n:
                    self._sent[rid] = len(out)
                    self._post(rid, (out[n:], None))
            for c in finished:
                n = self._sent.get(c.request_id, 0)
                metrics.record_finished(c)
                self._finish(c.request_id, (c.token_ids[n:], c))
            metrics.QUEUE_DEPTH.set(self.decoder.waiting)
            metrics.RUNNING.set(self.decoder.running)
            for tier, part in (("verifier", self.decoder.verifier), ("draft", self.decoder.proposer)):
                if hasattr(getattr(part, "inner", None), "sessions"):
                    metrics.record_replica_sessions(tier, part.inner.sessions())

    def _round(self) -> list[Completion]:
        """One decoder step, traced twice: a dspark.batch span linked to the requests it carries, and a dspark.round
        span in each traced request's own trace (telemetry.py); its stats go to Prometheus."""
        v, p = self.decoder.verifier, self.decoder.proposer
        v.round = stats = RoundStats()
        if p is not None:
            p.round = stats
        failures = getattr(p, "failures", 0)
        traced = {rid: s for rid, s in self._spans.copy().items() if s.is_recording()}
        links = [Link(s.get_span_context()) for s in list(traced.values())[:64]]
        with telemetry.tracer().start_as_current_span("dspark.batch", links=links) as span:
            before = {}
            if traced:  # the request-level view: each traced request's statistics before the round
                live = self.decoder.live_stats()
                before = {
                    rid: (pol, st, st.scheduled, st.accepted, st.drafted)
                    for rid, (pol, st) in live.items()
                    if rid in traced
                }
            with telemetry.round_spans(traced, span) as request_spans:
                t = time.perf_counter()
                finished = self.decoder.step()
                total = time.perf_counter() - t

            def attributes(rid: str) -> dict:
                attrs = {"dspark.batch_size": stats.batch}
                if rid in before:
                    pol, st, scheduled, accepted, drafted = before[rid]
                    attrs.update(
                        {
                            "dspark.policy": pol,
                            "dspark.round": st.rounds,
                            "dspark.drafted": st.drafted - drafted,
                            "dspark.budget": st.scheduled - scheduled,
                            "dspark.accepted": st.accepted - accepted,
                        }
                    )
                return attrs

            request_spans.end(attributes)
            if span.is_recording():
                span.set_attributes(
                    {
                        "dspark.policy": self.decoder.policy,
                        "dspark.batch_size": stats.batch,
                        "dspark.drafted": stats.drafted,
                        "dspark.budget": stats.budget,
                        "dspark.accepted": stats.accepted,
                    }
                )
        metrics.record_round(stats, total)
        metrics.DRAFT_FALLBACK.inc(getattr(p, "failures", 0) - failures)
        self._record_restored()
        return finished

    def _record_restored(self) -> None:
        """dspark_verifier_restored_sessions_total follows the pool's count, whether the sessions were rebuilt in a
        round (a restarted replica) or between rounds (moved off a replica that left the tier)."""
        now = getattr(self.decoder.verifier.inner, "restored", 0)
        metrics.RESTORED.inc(max(0, now - self._restored))
        self._restored = max(now, self._restored)

    def close(self) -> None:
        for w in self._watches:
            w.stop()
        self._stop = True
        self._wake.set()
        self._thread.join(10)
        for part in (self.decoder.verifier, self.decoder.proposer):
            if hasattr(part, "close"):
                part.close()
