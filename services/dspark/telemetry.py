"""OpenTelemetry tracing for the services: a span per request and per round in the router, a server span per Draft,
Prefill and Verify call, joined by W3C trace context in gRPC metadata.

A round serves many requests at once, so a round is not a child of one request: each round span links to the spans of
the requests it carried, and the draft/verify server spans are children of the round span.

Configured by the standard OTEL_* environment variables (OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_TRACES_EXPORTER, OTEL_TRACES_SAMPLER, ...). With none set, the opentelemetry API's default no-op tracer is used:
spans are not recorded and nothing is injected into metadata, so tracing off costs a few attribute look-ups a round.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

log = logging.getLogger("dspark.telemetry")

ROUTER, DRAFT, VERIFIER = "dspark-router", "dspark-draft", "dspark-verifier"


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
