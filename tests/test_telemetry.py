"""Tracing and metrics across router -> draft -> verifier: spans joined through gRPC metadata, Prometheus counters
scraped over HTTP."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_router import Letters, _free_port
from test_services import PROMPTS, Background, make_draft_core, make_verifier_core

from dspark import metrics
from dspark.router import Router, RouterConfig
from dspark.sampling import SamplingParams
from dspark.serve import start_draft, start_verifier

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spans():
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture(scope="module")
def target_model():
    from test_decoding_stats import _tiny_llama

    return _tiny_llama(seed=0, hidden=32, layers=2, heads=4, kv_heads=2)


def test_one_trace_spans_router_draft_and_verifier_and_metrics_are_scraped(spans, target_model):
    bg = Background()
    v = bg.run(start_verifier(make_verifier_core(target_model)))
    d = bg.run(start_draft(make_draft_core(target_model)))
    router = Router(RouterConfig(verifier=f"127.0.0.1:{v.port}", draft=f"127.0.0.1:{d.port}"), tokenizer=Letters())
    port = _free_port()
    metrics.start_exporter(port)
    try:
        spans.clear()
        sp = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)]
        (out,) = asyncio.run(router.generate(PROMPTS[0], sp))
        assert out.finish_reason == "length"
        got = spans.get_finished_spans()
        (gen,) = [s for s in got if s.name == "dspark.generate"]
        rounds = [s for s in got if s.name == "dspark.round"]
        assert rounds and all(gen.context.span_id in [lk.context.span_id for lk in r.links] for r in rounds)
        r0 = rounds[0]
        assert r0.attributes["dspark.policy"] == "dspark" and r0.attributes["dspark.batch_size"] == 1
        assert {"dspark.budget", "dspark.accepted", "dspark.drafted"} <= set(r0.attributes)
        by_round = {r.context.span_id: r for r in rounds}
        for name in ("dspark.draft", "dspark.verify"):
            children = [s for s in got if s.name == name]
            assert children, name
            for s in children:  # server spans in the services, children of a router round
                assert s.kind == trace.SpanKind.SERVER and s.parent.span_id in by_round
                assert s.context.trace_id == by_round[s.parent.span_id].context.trace_id
                assert s.attributes["dspark.service"] in ("draft", "verifier")

        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for needle in (
            "dspark_rounds_total",
            "dspark_accepted_tokens_total",
            "dspark_budget_tokens_total",
            'dspark_round_seconds_count{phase="verify"}',
            'dspark_rpc_seconds_count{method="verify",service="verifier"}',
            'dspark_rpc_seconds_count{method="draft",service="draft"}',
            'dspark_sessions{service="verifier"}',
            "dspark_verifier_kv_capacity_tokens 384.0",
            "dspark_request_tau_count",
        ):
            assert needle in text, needle
        rounds_total = [ln for ln in text.splitlines() if ln.startswith("dspark_rounds_total ")]
        assert float(rounds_total[0].split()[1]) >= len(rounds)
    finally:
        router.close()
        bg.run(v.stop(0))
        bg.run(d.stop(0))
        bg.close()
