"""The public gRPC API (dspark.v1.GenerationService) over a Router: message conversion and status codes. The same
functions serve Ray Serve's gRPC ingress (router_app.py) and a plain grpc.aio server (`dspark serve router --no-ray`,
tests)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator

import grpc

from dspark.core.engine import CapacityError
from dspark.router.loop import Delta, Router
from dspark.serving import metrics
from dspark.v1 import generation_pb2 as gpb
from dspark.v1 import generation_pb2_grpc


class ApiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def __reduce__(self):  # picklable: Ray Serve sends a stream's error from the replica to its proxy
        return ApiError, (self.code, self.message)


def status_of(e: BaseException) -> ApiError:
    """The API error a failed request ends with; those from the decode loop are counted in dspark_request_errors_total
    (an ApiError passes through uncounted: it was raised for the caller before the loop saw the request)."""
    if isinstance(e, ApiError):
        return e
    err = _status_of(e)
    metrics.REQUEST_ERRORS.labels(code=err.code.name).inc()
    return err


def _status_of(e: BaseException) -> ApiError:
    if isinstance(e, CapacityError):
        return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    if isinstance(e, ValueError):
        return ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, TimeoutError):
        return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the generation finished")
    if isinstance(e, ConnectionError):
        return ApiError(grpc.StatusCode.UNAVAILABLE, f"{e}; retry later")
    return ApiError(grpc.StatusCode.INTERNAL, f"internal error: {e}")


def check_token(api_key: str | None, metadata) -> None:
    """Bearer token from the `authorization` metadata/header, compared in constant time."""
    if not api_key:
        return
    got = dict(metadata or ()).get("authorization", "")
    if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
        raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization: Bearer ...)")


def _inputs(router: Router, r: gpb.GenerateRequest):
    messages = [{"role": m.role, "content": m.content} for m in r.messages]
    ids = router.encode(r.prompt, messages, list(r.prompt_token_ids))
    params = router.sampling_params(
        r.n if r.HasField("n") else 1,
        r.max_tokens if r.HasField("max_tokens") else None,
        r.temperature if r.HasField("temperature") else None,
        r.top_p if r.HasField("top_p") else None,
        r.top_k if r.HasField("top_k") else None,
        r.seed if r.HasField("seed") else None,
        r.ignore_eos,
    )
    return ids, params, list(r.stop), r.policy or None


def stats_msg(d: Delta) -> gpb.SpeculativeStats:
    s = d.completion.stats
    return gpb.SpeculativeStats(
        tau=round(s.tau, 4),
        rounds=s.rounds,
        drafted=s.drafted,
        budget=s.scheduled,
        accepted=s.accepted,
        accepted_per_position=s.accepted_per_position,
    )


async def generate(router: Router, r: gpb.GenerateRequest, timeout_s: float | None = None) -> gpb.GenerateResponse:
    try:
        ids, params, stop, policy = _inputs(router, r)
        async with asyncio.timeout(timeout_s):
            out = await router.generate(ids, params, stop, policy)
    except Exception as e:  # noqa: BLE001
        raise status_of(e) from e
    return gpb.GenerateResponse(
        request_id=r.request_id,
        choices=[
            gpb.Choice(
                index=d.index,
                text=d.text,
                token_ids=d.token_ids,
                finish_reason=d.finish_reason,
                stats=stats_msg(d),
            )
            for d in out
        ],
        usage=gpb.Usage(prompt_tokens=len(ids), completion_tokens=sum(len(d.token_ids) for d in out)),
    )


async def generate_stream(
    router: Router, r: gpb.GenerateRequest, timeout_s: float | None = None
) -> AsyncIterator[gpb.GenerateStreamResponse]:
    try:
        ids, params, stop, policy = _inputs(router, r)
        async with asyncio.timeout(timeout_s):
            async for d in router.stream(ids, params, stop, policy):
                m = gpb.GenerateStreamResponse(
                    request_id=r.request_id, index=d.index, text=d.text, token_ids=d.token_ids
                )
                if d.finish_reason:
                    m.finish_reason = d.finish_reason
                    m.stats.CopyFrom(stats_msg(d))
                    m.usage.CopyFrom(gpb.Usage(prompt_tokens=len(ids), completion_tokens=len(d.completion.token_ids)))
                yield m
    except Exception as e:  # noqa: BLE001
        raise status_of(e) from e


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """For a plain grpc.aio server."""

    def __init__(self, router: Router):
        self.router = router

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        try:
            check_token(self.router.config.api_key, context.invocation_metadata())
            return await generate(self.router, request, context.time_remaining())
        except ApiError as e:
            await context.abort(e.code, e.message)

    async def GenerateStream(self, request, context: grpc.aio.ServicerContext):
        try:
            check_token(self.router.config.api_key, context.invocation_metadata())
            async for m in generate_stream(self.router, request, context.time_remaining()):
                yield m
        except ApiError as e:
            await context.abort(e.code, e.message)


SERVICE_NAME = gpb.DESCRIPTOR.services_by_name["GenerationService"].full_name


async def start(router: Router, config=None):
    """The public API of `router` on a plain grpc.aio server (health, reflection, limits): a grpc_server.Service."""
    from dspark.serving import grpc_server

    return await grpc_server.start(
        config or grpc_server.ServerConfig(),
        [(generation_pb2_grpc.add_GenerationServiceServicer_to_server, GenerationServicer(router))],
        [SERVICE_NAME],
    )
