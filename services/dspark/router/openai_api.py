"""The OpenAI-compatible HTTP API over a Router: /v1/completions, /v1/chat/completions (SSE streaming with
"stream": true), /v1/models, /healthz. Each choice also carries the speculative statistics under "dspark"."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dspark.router.grpc_api import ApiError, check_token, status_of
from dspark.router.loop import Delta, Router

_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
}


def _error(e: BaseException) -> JSONResponse:
    a = status_of(e)
    body = {"error": {"message": a.message, "type": a.code.name.lower(), "code": a.code.name}}
    return JSONResponse(body, status_code=_HTTP.get(a.code, 500))


def _stats(d: Delta) -> dict:
    s = d.completion.stats
    return {
        "tau": round(s.tau, 4),
        "rounds": s.rounds,
        "drafted": s.drafted,
        "budget": s.scheduled,
        "accepted": s.accepted,
        "accepted_per_position": s.accepted_per_position,
    }


def build_app(get_router: Callable[[], Router]) -> FastAPI:
    app = FastAPI(title="dspark", description="DSpark speculative decoding, OpenAI-compatible")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        router = get_router()
        try:
            check_token(router.config.api_key, request.headers.items())
        except ApiError as e:
            return _error(e)
        name = router.config.model or router.decoder.verifier.model
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "dspark"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(get_router(), request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _handle(get_router(), request, chat=True)

    return app


class TooLarge(ValueError):
    """A request body over RouterConfig.max_request_bytes (HTTP 413)."""


# what each endpoint reads; anything else in a body is refused with a 400 naming it, rather than silently ignored
_COMMON = {"model", "n", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options"}
_COMMON |= {"policy", "ignore_eos", "user"}  # dspark's own: policy, ignore_eos; user: an opaque client tag
_FIELDS = {True: _COMMON | {"messages", "max_completion_tokens"}, False: _COMMON | {"prompt"}}
# OpenAI parameters this server does not implement: accepted only at their no-op value, else refused by name
_NOOP = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


def _is_noop(value, noops) -> bool:
    # by type too: 0 == False in Python, and `logprobs: 0` asks for log probabilities in the completions API
    return any(value is None if d is None else (type(value) is type(d) and value == d) for d in noops)


async def _body(request: Request, limit: int) -> dict:
    """The JSON object of the request body, refused (TooLarge) past `limit` bytes before anything is parsed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request body has {declared} bytes; this server takes at most {limit}")
    raw = bytearray()
    async for chunk in request.stream():  # a chunked body has no content-length: count as it arrives
        raw += chunk
        if len(raw) > limit:
            raise TooLarge(f"the request body is over {limit} bytes, the most this server takes")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"the body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise ValueError(f"the body must be a JSON object, got a JSON {type(body).__name__}")
    return body


def _field(body: dict, name: str, kinds: tuple[type, ...], what: str):
    """body[name] (None when absent or null) if it is one of `kinds` (a bool is not a number here), else ValueError."""
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        raise ValueError(f"'{name}' must be {what}, got {json.dumps(v)[:40]}")
    return v


def _messages(body: dict) -> list[dict]:
    """Chat messages as {role, content: str}; content may also be a list of {"type": "text", "text": ...} parts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role' and a string 'content'")
        out.append({"role": m["role"], "content": content})
    return out


def _request(router: Router, body: dict, chat: bool):
    """(prompt ids, sampling params, stop strings, policy, stream, include_usage) of a body, or ValueError."""
    unknown = sorted(set(body) - _FIELDS[chat] - set(_NOOP))
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(unknown)}")
    unsupported = sorted(k for k, noops in _NOOP.items() if k in body and not _is_noop(body[k], noops))
    if unsupported:
        raise ValueError(f"not implemented by this server: {', '.join(unsupported)}; leave them out")
    if chat:
        ids = router.encode(messages=_messages(body))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            ids = router.encode(token_ids=prompt)
        elif isinstance(prompt, str) and prompt:
            ids = router.encode(prompt=prompt)
        else:
            raise ValueError("'prompt' must be a non-empty string or a list of token ids")
    integer, number = (int,), (int, float)
    max_tokens = _field(body, "max_completion_tokens", integer, "an integer")
    max_tokens = _field(body, "max_tokens", integer, "an integer") if max_tokens is None else max_tokens
    n = _field(body, "n", integer, "an integer")
    params = router.sampling_params(
        1 if n is None else n,
        max_tokens,
        _field(body, "temperature", number, "a number"),
        _field(body, "top_p", number, "a number"),
        _field(body, "top_k", integer, "an integer"),
        _field(body, "seed", integer, "an integer"),
        bool(_field(body, "ignore_eos", (bool,), "true or false")),
    )
    stop = _field(body, "stop", (str, list), "a string or a list of strings") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(x, str) for x in stop):
        raise ValueError("'stop' must be a string or a list of strings")
    policy = _field(body, "policy", (str,), "a policy name")
    stream = bool(_field(body, "stream", (bool,), "true or false"))
    options = _field(body, "stream_options", (dict,), "an object") or {}
    return ids, params, stop, policy, stream, bool(options.get("include_usage"))


async def _handle(router: Router, request: Request, chat: bool):
    try:
        check_token(router.config.api_key, request.headers.items())
        body = await _body(request, router.config.max_request_bytes)
        ids, params, stop, policy, stream, include_usage = _request(router, body, chat)
    except TooLarge as e:
        body = {"error": {"message": str(e), "type": "request_too_large", "code": "REQUEST_TOO_LARGE"}}
        return JSONResponse(body, status_code=413)
    except Exception as e:  # noqa: BLE001
        return _error(e)

    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    model = router.config.model or router.decoder.verifier.model
    obj = "chat.completion" if chat else "text_completion"

    if stream:
        deltas = router.stream(ids, params, stop, policy)
        try:  # the request's own errors (policy, context, a full queue) are HTTP statuses: wait for the first delta
            first = await anext(deltas)
        except Exception as e:  # noqa: BLE001
            await deltas.aclose()
            return _error(e)

        async def chained():
            yield first
            async for d in deltas:
                yield d

        async def events():
            completion_tokens = 0
            try:
                async for d in chained():
                    completion_tokens += len(d.token_ids)
                    if chat:
                        choice = {"index": d.index, "delta": {"content": d.text}, "finish_reason": d.finish_reason}
                    else:
                        choice = {"index": d.index, "text": d.text, "finish_reason": d.finish_reason}
                    if d.finish_reason:
                        choice["dspark"] = _stats(d)
                    chunk = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created}
                    chunk |= {"model": model, "choices": [choice]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                if include_usage:  # stream_options.include_usage: one last chunk, no choices, the usage
                    usage = {"prompt_tokens": len(ids), "completion_tokens": completion_tokens}
                    usage["total_tokens"] = len(ids) + completion_tokens
                    chunk = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created}
                    yield f"data: {json.dumps(chunk | {'model': model, 'choices': [], 'usage': usage})}\n\n"
            except Exception as e:  # noqa: BLE001 - after the headers: report in-band
                a = status_of(e)
                yield f"data: {json.dumps({'error': {'message': a.message, 'code': a.code.name}})}\n\n"
            finally:  # a client gone mid-stream: its choices are aborted
                await deltas.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    try:
        out = await router.generate(ids, params, stop, policy)
    except Exception as e:  # noqa: BLE001
        return _error(e)
    choices = []
    for d in out:
        c = {"index": d.index, "finish_reason": d.finish_reason, "dspark": _stats(d)}
        if chat:
            c["message"] = {"role": "assistant", "content": d.text}
        else:
            c |= {"text": d.text, "logprobs": None}
        choices.append(c)
    completion_tokens = sum(len(d.completion.token_ids) for d in out)
    usage = {"prompt_tokens": len(ids), "completion_tokens": completion_tokens}
    usage["total_tokens"] = len(ids) + completion_tokens
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage}
