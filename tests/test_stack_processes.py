"""The whole distributed stack as real processes on the real default model, started once for the module by
launcher.local_stack (what `make run` / `dspark serve local` runs): the verifier, the draft service with the shipped
drafter, and the router on Ray Serve, on ports picked by the OS, behind a bearer token and a small request queue.

Everything goes through the public API (dspark.v1.GenerationService on the router's gRPC port, `dspark generate
--server`) and is checked against the target model run by transformers in this process: greedy outputs token for
token, sampled outputs by a chi-square test of their distribution; then the error statuses, a killed draft service
and a killed verifier in the middle of a generation (both restarted with the same command line), and the Prometheus
metrics of all three processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from dspark.core.config import EngineConfig
from dspark.stack.launcher import StackConfig
from dspark.stack.port import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

API_KEY = "stack-test-key"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
MAX_QUEUE = 24  # the router's in-flight limit (choices): the RESOURCE_EXHAUSTED test fills it
TIMEOUT = 180.0  # gRPC deadline of every call that is meant to finish
PROMPTS = [
    "What is speculative decoding?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    "How do I reverse a list in Python?",
]


def _descendants(pid: int) -> set[int]:
    """Every live process under pid (from /proc): the router's Ray processes are its children and grandchildren."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass
class Stack:
    """The running stack: its `dspark serve local` flags, the processes (in pieces() order) and a client."""

    a: StackConfig
    procs: list[subprocess.Popen]
    logs: Path
    env: dict[str, str]
    stub: object  # GenerationServiceStub on the router's gRPC port

    def index(self, name: str) -> int:
        from dspark.stack.launcher import pieces

        return [p.name for p in pieces(self.a)].index(name)

    def kill(self, name: str) -> None:
        p = self.procs[self.index(name)]
        p.send_signal(signal.SIGKILL)
        p.wait(30)

    def restart(self, name: str) -> None:
        """The same command line (same port, same flags), waited for until healthy; teardown stops the new one."""
        from dspark.stack.launcher import pieces, start_piece

        i = self.index(name)
        self.procs[i] = start_piece(pieces(self.a)[i], self.logs, self.a.wait, self.env, restart=True)

    def metrics(self, name: str) -> dict[tuple[str, tuple], float]:
        """The Prometheus samples of one process: {(name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        port = {
            "verifier": self.a.metrics_ports[0],
            "draft": self.a.metrics_ports[1],
            "router": self.a.http_port,
        }[name]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def active_sessions(self) -> tuple[int, int]:
        """(verifier, draft service) open sessions, from their Info calls."""
        from dspark.v1 import draft_pb2_grpc, verifier_pb2_grpc
        from dspark.v1 import verifier_pb2 as vpb

        with grpc.insecure_channel(f"127.0.0.1:{self.a.verifier_port}") as v:
            vi = verifier_pb2_grpc.VerifierServiceStub(v).Info(vpb.InfoInput(), timeout=30)
        with grpc.insecure_channel(f"127.0.0.1:{self.a.draft_port}") as d:
            di = draft_pb2_grpc.DraftServiceStub(d).Info(vpb.InfoInput(), timeout=30)
        return vi.active_sessions, di.active_sessions

    def wait_idle(self, within_s: float) -> None:
        """Every session on both services released within within_s (requests finished or aborted)."""
        give_up = time.monotonic() + within_s
        while (sessions := self.active_sessions()) != (0, 0) and time.monotonic() < give_up:
            time.sleep(0.25)
        assert sessions == (0, 0), f"open sessions (verifier, draft) after {within_s:.0f} s: {sessions}"


@pytest.fixture(scope="module")
def otlp():
    """An OTLP/gRPC collector the three processes export their spans to."""
    from otlp_sink import OtlpSink

    sink = OtlpSink()
    yield sink
    sink.close()


@pytest.fixture(scope="module")
def stack_env(otlp) -> dict[str, str]:
    """Environment the three processes get on top of this one's: tracing on through the standard OTEL_* variables,
    exported over OTLP to the module's sink, every request sampled, batches flushed every 200 ms."""
    return {
        "OMP_NUM_THREADS": "1",
        "DSPARK_API_KEY": API_KEY,
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, stack_env):
    from dspark.drafter.checkpoint import default_drafter_path
    from dspark.models.registry import DEFAULT_MODEL
    from dspark.stack.launcher import local_stack, log_tail
    from dspark.v1 import generation_pb2_grpc

    try:
        drafter = str(default_drafter_path(DEFAULT_MODEL))
    except FileNotFoundError as e:
        pytest.skip(f"no drafter: {e}")
    tmp = tmp_path_factory.mktemp("stack")
    a = StackConfig(
        EngineConfig(model=DEFAULT_MODEL, max_requests=8, max_context=2048, threads=1),
        drafter=drafter,
        sps_profile=str(tmp / "sps.json"),  # quick-profiled by the verifier's first start, loaded on its restart
        policy="dspark",
        verifier_port=free_port(),
        draft_port=free_port(),
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_ports=(free_port(), free_port()),
        max_queue=MAX_QUEUE,
        no_ray=False,
        wait=300.0,
    )
    logs = tmp / "logs"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    failed_before = request.session.testsfailed
    router_tree: set[int] = set()
    try:
        with local_stack(a, logs, log=lambda m: None, env=stack_env) as procs:
            with grpc.insecure_channel(f"127.0.0.1:{a.grpc_port}") as channel:
                yield Stack(a, procs, logs, stack_env, generation_pb2_grpc.GenerationServiceStub(channel))
            router_tree = _descendants(procs[-1].pid) | {procs[-1].pid}  # Ray's processes, before the SIGTERM
    finally:
        if request.session.testsfailed > failed_before and reporter is not None:  # the services' side of it
            for name in ("verifier", "draft", "router"):
                reporter.write_line(f"\n--- the end of {logs / name}.log:\n{log_tail(logs / f'{name}.log', 60)}")
    # the router's SIGTERM shut Ray Serve and the Ray processes it started down
    give_up = time.monotonic() + 30
    while (left := {p for p in router_tree if _alive(p)}) and time.monotonic() < give_up:
        time.sleep(0.5)
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    assert not left, f"processes of the router left running after its SIGTERM: {sorted(left)}"


# -- the reference: the target model in this process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ref(reference_model):
    return Reference(*reference_model)


class Reference:
    """Greedy continuations and next-token probabilities of the target, straight from transformers."""

    def __init__(self, model, tokenizer):
        from dspark.models.prompt import eos_token_ids

        self.model, self.tokenizer = model, tokenizer
        self.eos = set(eos_token_ids(model, tokenizer))
        self._done: dict[tuple, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        from dspark.models.prompt import encode_prompt

        return list(encode_prompt(self.tokenizer, text))

    def greedy(self, prompt: str | list[int], n: int, stop_at_eos: bool = False) -> list[int]:
        """n argmax tokens (fewer: stopped at an EOS token), incremental with the KV cache, as generate() does."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        key = (tuple(ids), n, stop_at_eos)
        if key not in self._done:
            out, cache, step = [], None, torch.tensor([ids])
            with torch.no_grad():
                while len(out) < n and not (stop_at_eos and out and out[-1] in self.eos):
                    r = self.model(step, cache=cache, use_cache=True)
                    cache = r.cache
                    out.append(int(r.logits[0, -1].argmax()))
                    step = torch.tensor([[out[-1]]])
            self._done[key] = out
        return list(self._done[key])

    def text(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def next_probs(self, prefixes: list[list[int]]) -> torch.Tensor:
        """(len(prefixes), V) float64: the next-token distribution at temperature 1 after each prefix."""
        with torch.no_grad():
            return torch.stack(
                [torch.softmax(self.model(torch.tensor([p])).logits[0, -1].double(), -1) for p in prefixes]
            )


def _request(**kw):
    from dspark.v1 import generation_pb2 as gpb

    return gpb.GenerateRequest(**kw)


def _rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


# -- 1. greedy through the public API ---------------------------------------------------------------------------------

N_GREEDY = 32
GAMMA = 7  # the shipped drafter's block size


def test_greedy_through_the_router_is_plain_greedy_under_every_policy(stack, ref):
    want = [ref.greedy(p, N_GREEDY) for p in PROMPTS]
    totals = {}
    for policy in ("", "dspark", "fixed", "autoregressive"):  # "": the router's own (dspark)

        def one(prompt, policy=policy):
            req = _request(prompt=prompt, max_tokens=N_GREEDY, ignore_eos=True, policy=policy)
            return stack.stub.Generate(req, metadata=AUTH, timeout=TIMEOUT)

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # together: one batched verification per round
            out = list(pool.map(one, PROMPTS))
        for prompt, r, expected in zip(PROMPTS, out, want):
            (c,) = r.choices
            assert list(c.token_ids) == expected, (policy, prompt)
            assert c.text == ref.text(expected) and c.finish_reason == "length"
            assert r.usage.completion_tokens == N_GREEDY and r.usage.prompt_tokens == len(ref.encode(prompt))
        stats = [r.choices[0].stats for r in out]
        totals[policy] = {k: sum(getattr(s, k) for s in stats) for k in ("drafted", "budget", "accepted", "rounds")}
    plain_rounds = len(PROMPTS) * (N_GREEDY - 1)  # the first token of each comes from its prefill
    assert totals["autoregressive"]["drafted"] == 0 and totals["autoregressive"]["rounds"] == plain_rounds
    assert totals["fixed"]["budget"] == totals["fixed"]["drafted"] > 0  # fixed: every draft verified
    assert totals["fixed"]["accepted"] > 0 and totals["fixed"]["rounds"] < plain_rounds
    for policy in ("", "dspark"):
        # the planner drafts only what the drafter's and the verifier's cost tables say pays (on this CPU often
        # nothing: plain rounds, no draft call); Algorithm 1 verifies a prefix of what was drafted
        t = totals[policy]
        assert t["accepted"] <= t["budget"] <= t["drafted"] < GAMMA * t["rounds"]
        assert t["rounds"] <= plain_rounds


def test_generate_server_cli_prints_plain_greedy(stack, ref, capsys):
    from dspark.cli import main

    server = ["generate", "--server", f"localhost:{stack.a.grpc_port}", "--api-key", API_KEY, "--json"]
    assert main([*server, "--max-tokens", "24", "--policy", "fixed", PROMPTS[0]]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = ref.greedy(PROMPTS[0], 24, stop_at_eos=True)
    assert out["token_ids"] == expected and out["text"] == ref.text(expected)
    assert out["stats"]["drafted"] == out["stats"]["budget"] > 0
    assert main([*server[:-1], "--max-tokens", "4", "--n", "2", "--json", PROMPTS[1]]) == 0
    both = json.loads(capsys.readouterr().out)["choices"]
    assert [c["token_ids"] for c in both] == [ref.greedy(PROMPTS[1], 4, stop_at_eos=True)] * 2


# -- 2. sampling keeps the target's distribution ------------------------------------------------------------------

CHI2_PROMPT = "Once upon a time"  # raw text, no chat template: ',' then a spread of words, so cells to compare
CHI2_REQUESTS, CHI2_N = 40, 8  # 320 samples of (token 1, token 2); 2 requests in flight = 16 choices <= MAX_QUEUE
P_MIN = 1e-3


def test_sampling_through_the_router_keeps_the_target_distribution(stack, ref):
    from scipy.stats import chisquare

    prompt = ref.tokenizer.encode(CHI2_PROMPT)

    def one(i):
        req = _request(
            prompt_token_ids=prompt,
            max_tokens=3,  # after the prefill's token, room for a draft (the 3rd token is the round's own)
            temperature=1.0,
            n=CHI2_N,
            seed=1000 + CHI2_N * i,  # choice j: seed + j; every choice its own stream
            ignore_eos=True,
            policy="fixed",  # every round verifies its drafts: the speculative path is what is sampled
        )
        return stack.stub.Generate(req, metadata=AUTH, timeout=TIMEOUT)

    with ThreadPoolExecutor(2) as pool:
        out = list(pool.map(one, range(CHI2_REQUESTS)))
    choices = [c for r in out for c in r.choices]
    assert all(len(c.token_ids) == 3 for c in choices)
    assert sum(c.stats.accepted for c in choices) > 0  # token 2 came from accepted drafts
    assert sum(c.stats.budget for c in choices) > sum(c.stats.accepted for c in choices)  # and from rejections
    counts = Counter(tuple(c.token_ids[:2]) for c in choices)
    n = len(choices)

    # exact target probabilities p(t1) p(t2 | t1) of every cell expected >= 5 times; the rest pooled into one cell
    (p1,) = ref.next_probs([prompt])
    firsts = [int(t) for t in torch.nonzero(p1 * n >= 5).flatten()]
    p2 = ref.next_probs([prompt + [t] for t in firsts])
    cells = {
        (t1, int(t2)): float(p1[t1] * p2[i, t2])
        for i, t1 in enumerate(firsts)
        for t2 in torch.nonzero(p1[t1] * p2[i] * n >= 5).flatten()
    }
    assert len(cells) >= 5, cells  # the prompt gives the test some power
    observed = [counts.get(cell, 0) for cell in cells] + [n - sum(counts.get(cell, 0) for cell in cells)]
    expected = [p * n for p in cells.values()] + [n * (1 - sum(cells.values()))]
    expected[-1] = n - sum(expected[:-1])  # exact totals for scipy
    pv = chisquare(observed, expected).pvalue
    assert pv > P_MIN, f"p-value {pv:.2e}: observed {observed}, expected {[round(e, 1) for e in expected]}"


# -- 3. streaming, n > 1, stop strings ----------------------------------------------------------------------------


def test_stream_n_and_stop_strings(stack, ref):
    expected = ref.greedy(PROMPTS[0], N_GREEDY)
    req = _request(prompt=PROMPTS[0], max_tokens=N_GREEDY, ignore_eos=True)
    unary = stack.stub.Generate(req, metadata=AUTH, timeout=TIMEOUT).choices[0]
    msgs = list(stack.stub.GenerateStream(req, metadata=AUTH, timeout=TIMEOUT))
    assert len(msgs) > 1 and all(m.index == 0 for m in msgs)  # deltas, not one message
    assert [m.finish_reason for m in msgs] == [""] * (len(msgs) - 1) + ["length"]
    assert [t for m in msgs for t in m.token_ids] == list(unary.token_ids) == expected
    assert "".join(m.text for m in msgs) == unary.text == ref.text(expected)
    # each answer's stats account for its own tokens (prefill's one, then one per round plus the accepted drafts);
    # the two need not match each other: the planner's forecast learns from every round it has seen
    for stats in (msgs[-1].stats, unary.stats):
        assert stats.rounds > 0 and 1 + stats.rounds + stats.accepted == N_GREEDY
    assert msgs[-1].usage.completion_tokens == N_GREEDY

    three = stack.stub.Generate(_request(prompt=PROMPTS[0], max_tokens=16, n=3), metadata=AUTH, timeout=TIMEOUT)
    assert [list(c.token_ids) for c in three.choices] == [ref.greedy(PROMPTS[0], 16, stop_at_eos=True)] * 3
    assert [c.index for c in three.choices] == [0, 1, 2] and three.usage.completion_tokens == 3 * 16

    full = ref.text(expected)
    words = full.split()
    stop = " " + words[len(words) // 2]  # a word in the middle: the text ends right before its first occurrence
    cut = full[: full.find(stop)]
    assert 0 < len(cut) < len(full)
    req = _request(prompt=PROMPTS[0], max_tokens=N_GREEDY, ignore_eos=True, stop=[stop, "\x00never"])
    (c,) = stack.stub.Generate(req, metadata=AUTH, timeout=TIMEOUT).choices
    assert c.text == cut and c.finish_reason == "stop"
    msgs = list(stack.stub.GenerateStream(req, metadata=AUTH, timeout=TIMEOUT))
    assert "".join(m.text for m in msgs) == cut and msgs[-1].finish_reason == "stop"


# -- 4. errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(prompt=""), "exactly one of prompt"),
        (dict(prompt="hi", temperature=-0.5), "temperature"),
        (dict(prompt="hi", top_p=0.0), "top_p"),
        (dict(prompt="hi", top_p=1.5), "top_p"),
        (dict(prompt="hi", max_tokens=0), "max_tokens"),
        (dict(prompt="hi", max_tokens=4097), "max_tokens must be in 1..4096"),
        (dict(prompt_token_ids=[28] * 2100), "max_context is 2048"),
        (dict(prompt="hi", policy="eager"), "unknown policy"),
    ],
    ids=["empty", "temperature", "top_p-0", "top_p-1.5", "max_tokens-0", "max_tokens-big", "context", "policy"],
)
def test_bad_requests_get_invalid_argument(stack, kw, words):
    for call in (stack.stub.Generate, lambda r, **k: list(stack.stub.GenerateStream(r, **k))):
        e = _rpc_error(lambda call=call: call(_request(**kw), metadata=AUTH, timeout=TIMEOUT))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.details(), (e.code(), e.details())


def test_token_deadline_and_full_queue_then_the_stack_still_serves(stack, ref):
    stub = stack.stub
    e = _rpc_error(lambda: stub.Generate(_request(prompt="hi"), timeout=TIMEOUT))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in e.details()
    wrong = (("authorization", "Bearer nope"),)
    e = _rpc_error(lambda: list(stub.GenerateStream(_request(prompt="hi"), metadata=wrong, timeout=TIMEOUT)))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED

    # a deadline far shorter than the generation: DEADLINE_EXCEEDED, and the router stops decoding it
    long = _request(prompt=PROMPTS[2], max_tokens=1024, ignore_eos=True)
    e = _rpc_error(lambda: stub.Generate(long, metadata=AUTH, timeout=1.5))
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stack.wait_idle(within_s=15)  # 1024 tokens would take far longer: the request was aborted

    # a full queue: 16 choices in flight, 16 more do not fit MAX_QUEUE
    hold = stub.GenerateStream(
        _request(prompt=PROMPTS[3], max_tokens=32, ignore_eos=True, n=16), metadata=AUTH, timeout=TIMEOUT
    )
    next(hold)  # its choices are decoding now
    e = _rpc_error(lambda: stub.Generate(_request(prompt="hi", n=16), metadata=AUTH, timeout=TIMEOUT))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in e.details(), e.details()
    hold.cancel()
    stack.wait_idle(within_s=30)

    # nothing lost: a normal request is served correctly
    (c,) = stub.Generate(_request(prompt=PROMPTS[1], max_tokens=16, ignore_eos=True), metadata=AUTH).choices
    assert list(c.token_ids) == ref.greedy(PROMPTS[1], 16) and c.finish_reason == "length"


# -- 5., 6. a process lost in the middle of a generation --------------------------------------------------------------

N_LONG = 96


def _stream_while(stack, prompt: str, during) -> tuple[list[int], object]:
    """A long greedy streaming request; during() runs after its first delta. (token ids, the last message)"""
    req = _request(prompt=prompt, max_tokens=N_LONG, ignore_eos=True, policy="fixed")
    call = stack.stub.GenerateStream(req, metadata=AUTH, timeout=TIMEOUT)
    first = next(call)
    during()
    msgs = [first, *call]
    assert msgs[-1].finish_reason == "length"
    return [t for m in msgs for t in m.token_ids], msgs[-1]


def _counter(stack, name: str, **labels) -> float:
    return stack.metrics("router").get((name, tuple(sorted(labels.items()))), 0.0)


def test_draft_service_killed_mid_generation_then_restarted(stack, ref):
    fallback = _counter(stack, "dspark_draft_fallback_rounds_total")
    ids, last = _stream_while(stack, PROMPTS[2], lambda: stack.kill("draft"))
    assert ids == ref.greedy(PROMPTS[2], N_LONG)  # finished by plain decoding, exactly
    assert _counter(stack, "dspark_draft_fallback_rounds_total") > fallback  # rounds did run without drafts
    assert last.stats.rounds > 0

    stack.restart("draft")  # same command line, same port
    req = _request(prompt=PROMPTS[0], max_tokens=16, ignore_eos=True, policy="fixed")
    give_up = time.monotonic() + 15  # the router tries the draft service again every draft_retry_s (1 s)
    while True:
        (c,) = stack.stub.Generate(req, metadata=AUTH, timeout=TIMEOUT).choices
        assert list(c.token_ids) == ref.greedy(PROMPTS[0], 16)
        if c.stats.drafted > 0 or time.monotonic() > give_up:
            break
        time.sleep(0.5)
    assert c.stats.drafted > 0 and c.stats.accepted > 0, "speculation did not resume on the restarted draft service"


def test_verifier_killed_mid_generation_then_restarted(stack, ref):
    restored = _counter(stack, "dspark_verifier_restored_sessions_total")

    def replace_the_verifier():
        stack.kill("verifier")
        stack.restart("verifier")  # same command line: same port, the SPS table saved by its first start

    ids, last = _stream_while(stack, PROMPTS[3], replace_the_verifier)
    assert ids == ref.greedy(PROMPTS[3], N_LONG)  # re-prefilled from the router's history, nothing lost
    assert _counter(stack, "dspark_verifier_restored_sessions_total") > restored
    assert last.stats.drafted > 0  # still speculative


# -- 7. metrics -------------------------------------------------------------------------------------------------------


def test_metrics_of_all_three_processes(stack, ref):
    req = _request(prompt=PROMPTS[1], max_tokens=16, ignore_eos=True, policy="fixed")
    (c,) = stack.stub.Generate(req, metadata=AUTH, timeout=TIMEOUT).choices
    assert list(c.token_ids) == ref.greedy(PROMPTS[1], 16) and c.stats.accepted > 0

    router = stack.metrics("router")  # served by the Ray Serve replica that runs the decode loop
    for name in ("dspark_rounds_total", "dspark_verified_requests_total", "dspark_draft_tokens_total"):
        assert router[name, ()] > 0, name
    assert router["dspark_budget_tokens_total", ()] >= router["dspark_accepted_tokens_total", ()] > 0
    assert router["dspark_accepted_position_total", (("position", "1"),)] > 0
    assert router["dspark_round_seconds_count", (("phase", "total"),)] == router["dspark_rounds_total", ()]
    assert router["dspark_request_tau_count", ()] > 0
    assert ("dspark_running_requests", ()) in router and ("dspark_queue_depth", ()) in router

    for service, calls in (("verifier", ("prefill", "verify")), ("draft", ("draft",))):
        m = stack.metrics(service)
        for method in calls:
            key = ("dspark_rpc_seconds_count", (("method", method), ("service", service)))
            assert m.get(key, 0) > 0, (service, method)
        assert ("dspark_sessions", (("service", service),)) in m, service
    assert stack.metrics("verifier")["dspark_verifier_kv_capacity_tokens", ()] > 0


# -- 8. tracing ----------------------------------------------------------------------------------------------------


def test_one_trace_per_request_spans_router_draft_service_and_verifier(stack, ref, otlp):
    from dspark.serving import telemetry

    time.sleep(1.0)  # spans of the earlier tests are flushed; then only this request's trace is looked at
    ids = ref.encode("Name the planets of the solar system.")
    req = _request(prompt_token_ids=ids, max_tokens=13, ignore_eos=True, policy="fixed")
    (c,) = stack.stub.Generate(req, metadata=AUTH, timeout=TIMEOUT).choices
    assert list(c.token_ids) == ref.greedy(ids, 13)

    def generate_span(spans):
        return next(
            (
                s
                for s in spans
                if s.name == "dspark.generate"
                and s.attributes.get("dspark.prompt_tokens") == len(ids)
                and s.attributes.get("dspark.max_tokens") == 13  # no other test asks for 13
                and s.attributes.get("dspark.policy") == "fixed"
            ),
            None,
        )

    def complete(spans):  # the request's spans from all three services have arrived
        gen = generate_span(spans)
        if gen is None:
            return False
        mine = [s for s in spans if s.trace_id == gen.trace_id]
        want = {(telemetry.DRAFT, "dspark.draft"), (telemetry.VERIFIER, "dspark.verify")}
        rounds = sum(s.name == "dspark.round" for s in mine)
        return want <= {(s.service, s.name) for s in mine} and rounds == c.stats.rounds

    spans = otlp.wait_for(complete, timeout_s=30)
    gen = generate_span(spans)
    assert gen is not None, f"no dspark.generate span among {len(spans)} received"
    assert gen.service == telemetry.ROUTER and gen.parent_id == ""
    trace = [s for s in spans if s.trace_id == gen.trace_id]
    rounds = [s for s in trace if s.name == "dspark.round"]
    assert len(rounds) == c.stats.rounds and all(r.service == telemetry.ROUTER for r in rounds)
    assert all(r.parent_id == gen.span_id for r in rounds)
    assert sum(r.attributes["dspark.budget"] for r in rounds) == c.stats.budget > 0
    assert sum(r.attributes["dspark.accepted"] for r in rounds) == c.stats.accepted
    assert all(r.attributes["dspark.policy"] == "fixed" and r.attributes["dspark.batch_size"] >= 1 for r in rounds)
    round_ids = {r.span_id for r in rounds}
    for service, name in (
        (telemetry.VERIFIER, "dspark.prefill"),
        (telemetry.DRAFT, "dspark.draft"),
        (telemetry.VERIFIER, "dspark.verify"),
    ):
        mine = [s for s in trace if s.name == name]
        assert mine, name
        assert all(s.service == service and s.parent_id in round_ids for s in mine), name
    # every round verified this request once; each service span links to its batched call's own server span
    assert len([s for s in trace if s.name == "dspark.verify"]) == len(rounds)
    by_id = {s.span_id: s for s in spans}
    for s in (s for s in trace if s.name in ("dspark.draft", "dspark.verify")):
        ((_, linked),) = s.links
        batch_call = by_id.get(linked)
        if batch_call is not None:  # exported in the same flush or an earlier one
            assert batch_call.service == s.service and batch_call.name == s.name
            assert by_id.get(batch_call.parent_id) is None or by_id[batch_call.parent_id].name == "dspark.batch"


def test_sigterm_to_the_router_lets_a_running_stream_finish_then_it_stops(stack, ref):
    """Last in the module: the router drains before Ray Serve's shutdown closes the client's connection (a rolling
    update's old router pod must not cut requests off), exits 0, and the restarted one serves again."""
    router = stack.procs[stack.index("router")]
    ids, last = _stream_while(stack, PROMPTS[1], lambda: router.send_signal(signal.SIGTERM))
    assert ids == ref.greedy(PROMPTS[1], N_LONG) and last.finish_reason == "length"
    assert router.wait(90) == 0
    assert "draining the router's requests" in (stack.logs / "router.log").read_text()
    stack.restart("router")  # the module's teardown checks that its SIGTERM stops Ray's processes too
    req = _request(prompt=PROMPTS[0], max_tokens=8, ignore_eos=True, policy="fixed")
    (c,) = stack.stub.Generate(req, metadata=AUTH, timeout=TIMEOUT).choices
    assert list(c.token_ids) == ref.greedy(PROMPTS[0], 8)
