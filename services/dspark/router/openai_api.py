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


async def _handle(router: Router, request: Request, chat: bool):
    try:
        check_token(router.config.api_key, request.headers.items())
        try:
            body = await request.json()
        except json.JSONDecodeError as e:
            raise ValueError(f"the body is not JSON: {e}") from e
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ValueError("'messages' must be a non-empty list of {role, content}")
            ids = router.encode(messages=messages)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                ids = router.encode(token_ids=prompt)
            elif isinstance(prompt, str) and prompt:
                ids = router.encode(prompt=prompt)
            else:
                raise ValueError("'prompt' must be a non-empty string or a list of token ids")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        params = router.sampling_params(
            int(body.get("n") or 1),
            None if max_tokens is None else int(max_tokens),
            body.get("temperature"),
            body.get("top_p"),
            body.get("top_k"),
            body.get("seed"),
            bool(body.get("ignore_eos", False)),
        )
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        policy = body.get("policy")
    except Exception as e:  # noqa: BLE001
        return _error(e)

    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    model = router.config.model or router.decoder.verifier.model
    obj = "chat.completion" if chat else "text_completion"

    if body.get("stream"):

        async def events():
            try:
                async for d in router.stream(ids, params, stop, policy):
                    if chat:
                        choice = {"index": d.index, "delta": {"content": d.text}, "finish_reason": d.finish_reason}
                    else:
                        choice = {"index": d.index, "text": d.text, "finish_reason": d.finish_reason}
                    if d.finish_reason:
                        choice["dspark"] = _stats(d)
                    chunk = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created}
                    chunk |= {"model": model, "choices": [choice]}
                    yield f"data: {json.dumps(chunk)}\n\n"
            except Exception as e:  # noqa: BLE001 - after the headers: report in-band
                a = status_of(e)
                yield f"data: {json.dumps({'error': {'message': a.message, 'code': a.code.name}})}\n\n"
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
