"""What every dspark gRPC service shares: a grpc.aio server with message size limits, health checking, server
reflection, errors mapped to status codes, session expiry and a graceful drain on SIGTERM.

Servicers stay thin (`CoreServicer`): each RPC calls a plain core object through `call`, which maps the core's
exceptions to status codes with the core's message (written for the person who sent the request).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import SpanKind

from dspark.core.engine import CapacityError, ContextLengthError, UnknownRequestError
from dspark.serving import metrics, telemetry
from dspark.v1 import verifier_pb2

log = logging.getLogger("dspark.grpc")

MISSING_SESSIONS = "dspark-missing-sessions"  # trailing metadata: comma-separated session ids the service lacks

# Every model computation of a service process runs on this one thread, loading and profiling included. torch's
# OpenMP kernels give each thread that runs them its own thread team, and once two teams share the cores, small
# kernels get up to 3x slower (measured here: an (8, 576) x (576, 576) matmul takes 0.06 ms on the first thread that
# used OpenMP and 0.17 ms on any other; a verify round of 8 tokens 57 ms vs 86 ms).
MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dspark-model")


def on_model_thread(fn: Callable[..., Any], *args) -> Any:
    """fn(*args) on the model thread, waited for (start-up: load the model where it will run)."""
    return MODEL_THREAD.submit(fn, *args).result()


class MissingSessionsError(KeyError):
    """Some sessions of a batched call are unknown (expired, released, or the service restarted)."""

    def __init__(self, session_ids: list[str], what: str):
        self.session_ids = session_ids
        super().__init__(
            f"unknown {what} session(s) {', '.join(session_ids[:5])}{' ...' if len(session_ids) > 5 else ''}: "
            "they expired, were released, or the service restarted; open them again from the start"
        )

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class ServerConfig:
    address: str = "127.0.0.1:0"  # host:port to bind; internal services expect a private network
    max_message_mb: int = 64  # both directions; a round's prefill features can be large
    session_ttl_s: float = 600.0  # sessions unused this long are released
    drain_s: float = 10.0  # on SIGTERM: stop accepting, let running calls finish for this long


def status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, MissingSessionsError | UnknownRequestError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, ContextLengthError | ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


async def call(
    context: grpc.aio.ServicerContext, lock: asyncio.Lock, fn: Callable[..., Any], msg, service: str, method: str
) -> Any:
    """fn(msg) in a worker thread, one call at a time (one model per process), honouring the caller's deadline while
    waiting for the model; exceptions become status codes. Each call is a server span (child of the caller's batch
    span when the metadata carries one), plus a span per traced request in the requests' own traces (telemetry.py),
    and is timed in dspark_rpc_seconds."""
    requests = getattr(msg, "requests", ())
    batch = len(requests) or len(getattr(msg, "session_ids", ()))
    parent = telemetry.incoming_context(context.invocation_metadata())
    attrs = {"dspark.service": service, "dspark.batch_size": batch}
    t, start_ns = time.perf_counter(), time.time_ns()
    with telemetry.tracer().start_as_current_span(
        f"dspark.{method}", context=parent, kind=SpanKind.SERVER, attributes=attrs
    ) as span:
        try:
            return await _call_locked(context, lock, fn, msg, service=service)
        finally:
            metrics.RPC_SECONDS.labels(service, method).observe(time.perf_counter() - t)
            metrics.RPC_BATCH.labels(service, method).observe(batch)
            telemetry.record_request_spans(f"dspark.{method}", service, requests, start_ns, time.time_ns(), span)


class CoreServicer:
    """The shared part of a service's servicer: the core it adapts, the lock that lets one call at a time at the
    model, `run` (`call`, then the core's gauges: core.observe()) and the RPCs every service has, Release (the same
    ReleaseInput and ReleaseOutput everywhere) and Info. Subclasses set `service`, and each of their RPCs is one
    `run` of a core method."""

    service = ""  # the service label of spans and metrics

    def __init__(self, core):
        self.core = core
        self.lock = asyncio.Lock()

    async def run(self, context: grpc.aio.ServicerContext, fn: Callable[..., Any], msg, method: str) -> Any:
        out = await call(context, self.lock, fn, msg, self.service, method)
        self.core.observe()
        return out

    async def Release(self, request: verifier_pb2.ReleaseInput, context) -> verifier_pb2.ReleaseOutput:
        return verifier_pb2.ReleaseOutput(released=await self.run(context, self.core.release_msg, request, "release"))

    async def Info(self, request, context):
        return self.core.info()


async def _call_locked(context, lock: asyncio.Lock, fn, *args, service: str = "") -> Any:
    remaining = context.time_remaining()
    waiting = metrics.RPC_WAITING.labels(service)
    waiting.inc()  # the service's queue depth: calls waiting for the model
    try:
        async with asyncio.timeout(remaining):
            await lock.acquire()
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while queued for the model")
    finally:
        waiting.dec()
    work = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(MODEL_THREAD, fn, *args))
    try:
        result = await asyncio.shield(work)
    except asyncio.CancelledError:  # the caller went away: the model stays locked until the thread is done
        work.add_done_callback(lambda _: lock.release())
        raise
    except Exception as e:  # noqa: BLE001 - every error goes back as a status
        lock.release()
        code = status_of(e)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error")
        if isinstance(e, MissingSessionsError):
            context.set_trailing_metadata(((MISSING_SESSIONS, ",".join(e.session_ids)),))
        await context.abort(code, str(e))
    lock.release()
    return result


class Service:
    """A running grpc.aio server; `port` is the bound one (useful with port 0)."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer, names: list[str]):
        self.server, self.port, self.health, self.names = server, port, health_servicer, names
        self._tasks: list[asyncio.Task] = []

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.names]:
            await self.health.set(name, status)

    def every(self, period_s: float, fn: Callable[[], Any]) -> None:
        """Run fn every period_s seconds while the server runs (session expiry)."""

        async def loop():
            while True:
                await asyncio.sleep(period_s)
                try:
                    fn()
                except Exception:  # noqa: BLE001
                    log.exception("periodic task failed")

        self._tasks.append(asyncio.get_running_loop().create_task(loop()))

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful drain: health says NOT_SERVING, new calls are refused, running ones get grace_s to finish."""
        await self.health.enter_graceful_shutdown()
        for t in self._tasks:
            t.cancel()
        await self.server.stop(grace_s)

    async def wait(self, drain_s: float) -> None:
        """Serve until SIGTERM/SIGINT, then drain."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("draining for up to %.0f s", drain_s)
        await self.stop(drain_s)


async def start(
    config: ServerConfig, add: list[tuple[Callable, Any]], service_names: list[str], interceptors=()
) -> Service:
    """Bind, register servicers (add_XServicer_to_server, servicer) with health and reflection, start."""
    limit = config.max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    for add_fn, servicer in add:
        add_fn(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(config.address)
    if port == 0:
        raise OSError(f"could not bind {config.address}")
    await server.start()
    svc = Service(server, port, health_servicer, service_names)
    await svc.set_serving(True)
    return svc


def channel_options(max_message_mb: int = 64) -> list[tuple[str, Any]]:
    limit = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
