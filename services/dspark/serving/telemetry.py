"""OpenTelemetry tracing for the services: one trace per request, spanning router -> draft service -> verifier.

A round serves many requests in one Draft and one Verify call, so each round is seen twice:
- the request's view, in the request's trace: dspark.generate -> dspark.round (one per round the request took part
  in: its policy, budget, accepted, the batch size) -> dspark.draft / dspark.prefill / dspark.verify, the services'
  spans of that request's share of the batched call. The round's trace context travels per request inside the
  batched message (`trace_context` of DraftRequest, PrefillRequest, VerifyRequest), made only for traced requests.
- the batch's view, a trace of its own: dspark.batch (the router's round, linked to the requests it carried) ->
  the services' server span of the whole call, joined by W3C trace context in the gRPC metadata. Each request-level
  span links to its batch-level one.

Configured by the standard OTEL_* environment variables (OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_TRACES_EXPORTER, OTEL_TRACES_SAMPLER, ...). With none set, the opentelemetry API's default no-op tracer is used:
spans are not recorded and nothing is injected into messages or metadata, so tracing off costs a few attribute
look-ups a round.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind

log = logging.getLogger("dspark.serving.telemetry")

ROUTER, DRAFT, VERIFIER = "dspark-router", "dspark-draft", "dspark-verifier"
ENABLED = False  # setup() installed a tracer provider in this process (services record per-request spans only then)


def setup(service_name: str) -> bool:
    """Install an SDK tracer provider exporting over OTLP when the environment asks for traces; True if it did."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "otlp" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "")
    if exporter in ("", "none"):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    global ENABLED
    ENABLED = True
    log.info("tracing on (%s exporter) as %s", exporter, service_name)
    return True


def tracer() -> trace.Tracer:
    return trace.get_tracer("dspark")


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata (empty when no span is recording)."""
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(carrier)
    return tuple(carrier.items())


def incoming_context(metadata) -> otel_context.Context | None:
    """The caller's trace context from gRPC invocation metadata, or None."""
    carrier = {k: v for k, v in (metadata or ()) if k in ("traceparent", "tracestate", "baggage")}
    return propagate.extract(carrier) if carrier else None


def enable_request_spans(on: bool = True) -> None:
    """Record per-request spans in this process without setup() (a tracer provider installed by other means)."""
    global ENABLED
    ENABLED = on


class RoundSpans:
    """The request-level spans of one router round: a dspark.round span, child of the request's dspark.generate span
    and linked to the batch span, made for a traced request when an outgoing call first asks for its context."""

    def __init__(self, parents: Mapping[str, trace.Span], batch: trace.Span):
        self.parents = parents
        ctx = batch.get_span_context()
        self.links = [Link(ctx)] if ctx.is_valid else []
        self.start_ns = time.time_ns()
        self.spans: dict[str, trace.Span] = {}
        self._carriers: dict[str, dict[str, str]] = {}  # per span: its context, injected once

    def carrier(self, request_id: str) -> dict[str, str]:
        carrier = self._carriers.get(request_id)
        if carrier is None:
            parent = self.parents.get(request_id)
            if parent is None or not parent.is_recording():
                return {}
            span = tracer().start_span(
                "dspark.round",
                context=trace.set_span_in_context(parent),
                start_time=self.start_ns,
                links=self.links,
            )
            self.spans[request_id] = span
            carrier = self._carriers[request_id] = {}
            propagate.inject(carrier, context=trace.set_span_in_context(span))
        return carrier

    def end(self, attributes_of: Callable[[str], dict]) -> None:
        for request_id, span in self.spans.items():
            span.set_attributes(attributes_of(request_id))
            span.end()


_round: contextvars.ContextVar[RoundSpans | None] = contextvars.ContextVar("dspark_round_spans", default=None)


@contextlib.contextmanager
def round_spans(parents: Mapping[str, trace.Span], batch: trace.Span) -> Iterator[RoundSpans]:
    """While the router runs a round: outgoing calls put each traced request's context into its message."""
    spans = RoundSpans(parents, batch)
    token = _round.set(spans)
    try:
        yield spans
    finally:
        _round.reset(token)


def request_context(request_id: str) -> dict[str, str]:
    """The trace context to send with one request of a batched call ({} when the request is not traced)."""
    spans = _round.get()
    return spans.carrier(request_id) if spans is not None else {}


def record_request_spans(name: str, service: str, requests, start_ns: int, end_ns: int, batch: trace.Span) -> None:
    """In a service, after a batched call: one span per traced request in the call, in that request's trace, covering
    the call's time and linked to the call's server span."""
    if not ENABLED:
        return
    ctx = batch.get_span_context()
    links = [Link(ctx)] if ctx.is_valid else []
    attrs = {"dspark.service": service, "dspark.batch_size": len(requests)}
    for r in requests:
        if not r.trace_context:
            continue
        span = tracer().start_span(
            name,
            context=propagate.extract(dict(r.trace_context)),
            kind=SpanKind.SERVER,
            start_time=start_ns,
            links=links,
            attributes={**attrs, "dspark.session_id": r.session_id},
        )
        span.end(end_time=end_ns)
