"""One streaming request, timed: a gRPC GenerateStream call or an OpenAI SSE chat completion becomes a Sample (TTFT,
each inter-token gap, end-to-end time, tokens out, the choice's speculative statistics, or the error it ended with).
No Locust here: the users in locustfile.py fire its events, the chaos probes and the tests call these directly."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Sample:
    api: str  # "grpc" or "http"
    policy: str  # the request's verification policy ("" = the router's)
    step: str = ""  # the load step it started in
    started: float = 0.0  # wall clock (time.time()) when it was sent
    ok: bool = False
    error: str = ""  # gRPC status name or "HTTP <code>", then the message
    ttft_s: float | None = None  # first token
    gaps_s: list[float] = field(default_factory=list)  # between messages that carried tokens (a round may carry many)
    e2e_s: float = 0.0
    tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # gRPC only (the HTTP API streams text)
    tau: float | None = None
    budget: int | None = None
    accepted: int | None = None
    rounds: int | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        if self.ttft_s is None or self.tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)

    def record(self) -> dict:
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        return d


def grpc_request(prompt: str, max_tokens: int, temperature: float, policy: str, seed: int | None = None, **kw):
    from dspark.v1 import generation_pb2 as gpb

    extra = {} if seed is None else {"seed": seed}
    return gpb.GenerateRequest(
        messages=[gpb.ChatMessage(role="user", content=prompt)],
        max_tokens=max_tokens,
        temperature=temperature,
        policy=policy,
        **extra,
        **kw,
    )


def grpc_stream(stub, request, timeout_s: float, metadata=(), keep_ids: bool = False, sample: Sample | None = None):
    """Run one GenerateStream call to its end; the Sample says how it went (never raises for a gRPC error)."""
    import grpc

    s = sample or Sample("grpc", request.policy)
    s.started = time.time()
    t0 = last = time.perf_counter()
    try:
        for m in stub.GenerateStream(request, timeout=timeout_s, metadata=metadata):
            now = time.perf_counter()
            if m.token_ids:
                if s.ttft_s is None:
                    s.ttft_s = now - t0
                else:
                    s.gaps_s.append(now - last)
                last = now
                s.tokens += len(m.token_ids)
                if keep_ids:
                    s.token_ids += list(m.token_ids)
            if m.finish_reason:
                s.tau, s.budget = m.stats.tau, m.stats.budget
                s.accepted, s.rounds = m.stats.accepted, m.stats.rounds
        s.ok = True
    except grpc.RpcError as e:
        s.error = f"{e.code().name}: {e.details()}"
    s.e2e_s = time.perf_counter() - t0
    return s


def chat_body(prompt: str, max_tokens: int, temperature: float, policy: str, seed: int | None = None) -> dict:
    body = {
        "model": "dspark",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if policy:
        body["policy"] = policy
    if seed is not None:
        body["seed"] = seed
    return body


def _sse_events(response):
    """The `data:` payloads of a text/event-stream, each as soon as its line is complete."""
    buf = b""
    for chunk in response.iter_content(chunk_size=None):  # whatever arrived (never waits to fill a block)
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.startswith(b"data: "):
                yield line[6:].decode()


def http_stream(session, url: str, body: dict, timeout_s: float, headers=None, sample: Sample | None = None):
    """POST one streaming chat completion and read its SSE events to [DONE]; the Sample says how it went."""
    import requests

    s = sample or Sample("http", body.get("policy", ""))
    s.started = time.time()
    t0 = last = time.perf_counter()
    try:
        with session.post(url, json=body, stream=True, timeout=timeout_s, headers=headers) as r:
            if r.status_code != 200:
                try:
                    message = r.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = r.text[:200]
                s.error = f"HTTP {r.status_code}: {message}"
            else:
                for data in _sse_events(r):
                    if data == "[DONE]":
                        s.ok = not s.error
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        s.error = f"{chunk['error'].get('code', 'ERROR')}: {chunk['error'].get('message', '')}"
                        continue
                    if chunk.get("usage"):
                        s.tokens = chunk["usage"]["completion_tokens"]
                    for c in chunk.get("choices", []):
                        now = time.perf_counter()
                        if (c.get("delta") or {}).get("content"):
                            if s.ttft_s is None:
                                s.ttft_s = now - t0
                            else:
                                s.gaps_s.append(now - last)
                            last = now
                        if c.get("dspark"):
                            st = c["dspark"]
                            s.tau, s.budget, s.accepted, s.rounds = (
                                st["tau"],
                                st["budget"],
                                st["accepted"],
                                st["rounds"],
                            )
                if not s.ok and not s.error:
                    s.error = "HTTP 200: the stream ended without [DONE]"
    except requests.RequestException as e:
        s.error = f"{type(e).__name__}: {e}"
    s.e2e_s = time.perf_counter() - t0
    return s
