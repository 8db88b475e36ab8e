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
from test_router_apis import Letters
from test_verifier_draft_services import PROMPTS, make_draft_core, make_verifier_core

from dspark.core.sampling import SamplingParams
from dspark.router.loop import Router, RouterConfig
from dspark.serving import metrics, telemetry
from dspark.stack.port import free_port
from dspark.stack.serve import start_draft, start_verifier

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spans():
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.enable_request_spans()  # what telemetry.setup() turns on in a service process
    yield exporter
    telemetry.enable_request_spans(False)


@pytest.fixture(scope="module")
def target_model():
    from test_core_decoding_stats import _tiny_llama

    return _tiny_llama(seed=0, hidden=32, layers=2, heads=4, kv_heads=2)


def test_one_trace_spans_router_draft_and_verifier_and_metrics_are_scraped(spans, target_model, bg):
    v = bg.run(start_verifier(make_verifier_core(target_model)))
    d = bg.run(start_draft(make_draft_core(target_model)))
    router = Router(RouterConfig(verifier=f"127.0.0.1:{v.port}", draft=f"127.0.0.1:{d.port}"), tokenizer=Letters())
    port = free_port()
    metrics.start_exporter(port)
    try:
        spans.clear()
        sp = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)]
        (out,) = asyncio.run(router.generate(PROMPTS[0], sp))
        assert out.finish_reason == "length"
        got = spans.get_finished_spans()
        (gen,) = [s for s in got if s.name == "dspark.generate"]
        trace_id = gen.context.trace_id
        # the request's own trace: generate -> a round span per round -> the services' spans of this request
        mine = [s for s in got if s.context.trace_id == trace_id]
        rounds = [s for s in mine if s.name == "dspark.round"]
        assert rounds and all(r.parent.span_id == gen.context.span_id for r in rounds)
        assert [r.attributes["dspark.round"] for r in rounds] == list(range(1, len(rounds) + 1))
        r0 = rounds[0]
        assert r0.attributes["dspark.policy"] == "dspark" and r0.attributes["dspark.batch_size"] == 1
        assert {"dspark.budget", "dspark.accepted", "dspark.drafted"} <= set(r0.attributes)
        accepted = sum(r.attributes["dspark.accepted"] for r in rounds)
        assert len(rounds) + accepted == 8 - 1  # the first token comes from the prefill
        by_round = {r.context.span_id: r for r in rounds}
        for name, service in (("dspark.prefill", "verifier"), ("dspark.draft", "draft"), ("dspark.verify", "verifier")):
            children = [s for s in mine if s.name == name]
            assert children, name
            for s in children:  # the services' share of a batched call, in the request's trace
                assert s.kind == trace.SpanKind.SERVER and s.parent.span_id in by_round
                assert s.attributes["dspark.service"] == service and s.attributes["dspark.session_id"]
                (link,) = s.links  # to the server span of the whole batched call
                assert link.context.trace_id != trace_id
        assert {s.parent.span_id for s in mine if s.name == "dspark.verify"} == set(by_round)

        # the batch's view: a trace per round, linked to the requests it carried, the calls' server spans below it
        batches = [s for s in got if s.name == "dspark.batch"]
        assert len(batches) == len(rounds)
        assert all(gen.context.span_id in [lk.context.span_id for lk in b.links] for b in batches)
        by_batch = {b.context.span_id: b for b in batches}
        served = [s for s in got if s.name == "dspark.verify" and s.context.trace_id != trace_id]
        assert len(served) == len(batches) and all(s.parent.span_id in by_batch for s in served)
        assert all(r.links[0].context.span_id in by_batch for r in rounds)

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
