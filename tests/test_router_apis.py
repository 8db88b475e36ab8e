"""The router and the public APIs over the real services on localhost (tiny models, a character tokenizer): gRPC
GenerationService (unary, streaming, n > 1, stop strings, errors, bearer token) and the OpenAI-compatible HTTP API
through the official openai client."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from test_verifier_draft_services import PROMPTS, make_draft_core, make_verifier_core, plain_greedy

from dspark.core.sampling import SamplingParams
from dspark.router import grpc_api
from dspark.router.loop import Router, RouterConfig
from dspark.serving import grpc_server
from dspark.stack.port import free_port
from dspark.stack.serve import start_draft, start_verifier
from dspark.v1 import generation_pb2 as gpb
from dspark.v1 import generation_pb2_grpc

pytestmark = pytest.mark.usefixtures("one_thread")
V = 8  # test_core_decoding_stats' tiny vocabulary: token i is the letter chr(97 + i)


class Letters:
    """A tokenizer for the tiny models: one letter per token, a trivial chat template."""

    chat_template = "letters"
    eos_token_id = None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) - 97 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=False):
        return self.encode("".join(m["content"] for m in messages))


def text(ids):
    return Letters().decode(ids)


@pytest.fixture(scope="module")
def deployment(bg, target_model):
    """verifier + draft services, a router, and its public gRPC server (token required: 'sesame')."""
    v = bg.run(start_verifier(make_verifier_core(target_model)))
    d = bg.run(start_draft(make_draft_core(target_model)))
    config = RouterConfig(verifier=f"127.0.0.1:{v.port}", draft=f"127.0.0.1:{d.port}", max_tokens=16, api_key="sesame")
    router = Router(config, tokenizer=Letters())
    pub = bg.run(grpc_api.start(router))
    channel = grpc.insecure_channel(f"127.0.0.1:{pub.port}")
    router.public_port = pub.port  # for the CLI test
    yield router, generation_pb2_grpc.GenerationServiceStub(channel)
    channel.close()
    router.close()
    for s in (pub, v, d):
        bg.run(s.stop(0))


@pytest.fixture(scope="module")
def target_model():
    from test_core_decoding_stats import _tiny_llama

    return _tiny_llama(seed=0, hidden=32, layers=2, heads=4, kv_heads=2)


AUTH = (("authorization", "Bearer sesame"),)


def test_generate_greedy_equals_plain_greedy(deployment, target_model):
    _, stub = deployment
    want = plain_greedy(target_model, params=SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    for prompt, expected in zip(PROMPTS, want):
        r = stub.Generate(gpb.GenerateRequest(prompt=text(prompt), max_tokens=12, ignore_eos=True), metadata=AUTH)
        (c,) = r.choices
        assert list(c.token_ids) == expected and c.text == text(expected) and c.finish_reason == "length"
        assert c.stats.rounds > 0 and c.stats.drafted > 0 and r.usage.completion_tokens == 12


def test_stream_n_and_stop_strings(deployment, target_model):
    _, stub = deployment
    (expected,) = plain_greedy(
        target_model, [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    )
    req = gpb.GenerateRequest(prompt_token_ids=PROMPTS[0], max_tokens=12, ignore_eos=True, n=2)
    by_choice = {0: [], 1: []}
    finals = {}
    for m in stub.GenerateStream(req, metadata=AUTH):
        by_choice[m.index] += list(m.token_ids)
        if m.finish_reason:
            finals[m.index] = m
    assert by_choice[0] == by_choice[1] == expected  # greedy: both choices are the same
    assert set(finals) == {0, 1} and finals[0].stats.rounds > 0 and finals[0].usage.completion_tokens == 12
    # a stop string: the text ends right before it, finish_reason "stop"
    full = text(expected)
    stop = full[5:7]
    r = stub.Generate(gpb.GenerateRequest(prompt_token_ids=PROMPTS[0], max_tokens=12, stop=[stop]), metadata=AUTH)
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        m.text
        for m in stub.GenerateStream(
            gpb.GenerateRequest(prompt_token_ids=PROMPTS[0], max_tokens=12, stop=[stop]), metadata=AUTH
        )
    )
    assert streamed == full[: full.find(stop)]


def test_seeded_sampling_is_reproducible_across_calls(deployment):
    _, stub = deployment
    req = gpb.GenerateRequest(prompt="abc", max_tokens=10, temperature=1.0, seed=3, n=2)
    a = stub.Generate(req, metadata=AUTH)
    b = stub.Generate(req, metadata=AUTH)
    assert [list(c.token_ids) for c in a.choices] == [list(c.token_ids) for c in b.choices]


@pytest.mark.parametrize(
    "req, code, words",
    [
        (gpb.GenerateRequest(prompt=""), "INVALID_ARGUMENT", "exactly one"),
        (gpb.GenerateRequest(prompt="abc", max_tokens=0), "INVALID_ARGUMENT", "max_tokens"),
        (gpb.GenerateRequest(prompt="abc", max_tokens=17), "INVALID_ARGUMENT", "max_tokens"),
        (gpb.GenerateRequest(prompt="abc", temperature=-1), "INVALID_ARGUMENT", "temperature"),
        (gpb.GenerateRequest(prompt="abc", top_p=0), "INVALID_ARGUMENT", "top_p"),
        (gpb.GenerateRequest(prompt="abcdefgh" * 3), "INVALID_ARGUMENT", "max_context"),
        (gpb.GenerateRequest(prompt_token_ids=[3, 99]), "INVALID_ARGUMENT", "vocabulary"),
        (gpb.GenerateRequest(prompt="abc", policy="eager"), "INVALID_ARGUMENT", "unknown policy"),
        (gpb.GenerateRequest(prompt="abc", n=17), "INVALID_ARGUMENT", "n must be"),
    ],
)
def test_bad_requests_get_invalid_argument(deployment, req, code, words):
    _, stub = deployment
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(req, metadata=AUTH)
    assert e.value.code().name == code and words in e.value.details()


def test_token_required_and_deadline(deployment):
    _, stub = deployment
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(gpb.GenerateRequest(prompt="abc"))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(gpb.GenerateRequest(prompt="abc"), metadata=(("authorization", "Bearer nope"),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(gpb.GenerateRequest(prompt="abc", max_tokens=16, ignore_eos=True), metadata=AUTH, timeout=0.001)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_openai_http_api(deployment, target_model):
    import uvicorn
    from openai import OpenAI

    from dspark.router.openai_api import build_app

    router, _ = deployment
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(lambda: router), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sesame", max_retries=0)
        (expected,) = plain_greedy(target_model, [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=8))
        r = client.completions.create(model="m", prompt=text(PROMPTS[0]), max_tokens=8, temperature=0)
        assert r.choices[0].text == text(expected) and r.usage.completion_tokens == len(expected)
        chunks = list(
            client.completions.create(model="m", prompt=text(PROMPTS[0]), max_tokens=8, temperature=0, stream=True)
        )
        assert "".join(c.choices[0].text for c in chunks) == text(expected)
        c = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": text(PROMPTS[0])}], max_tokens=8, temperature=0
        )
        assert c.choices[0].message.content == text(expected)
        s = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": text(PROMPTS[0])}], max_tokens=8, stream=True
        )
        assert "".join(x.choices[0].delta.content or "" for x in s) == text(expected)
        import openai

        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.completions.create(model="m", prompt="abc", max_tokens=100)
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0).completions.create(
                model="m", prompt="abc"
            )
    finally:
        server.should_exit = True
        t.join(10)


def test_cli_generate_server_prints_what_generate_local_prints(deployment, capsys, target_model):
    import json

    from dspark.cli import main

    router, _ = deployment
    addr = f"localhost:{router.public_port}"
    argv = ["generate", "--server", addr, "--api-key", "sesame", "--max-tokens", "8", "--json", text(PROMPTS[0])]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    (expected,) = plain_greedy(target_model, [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=8))
    assert list(out) == ["text", "token_ids", "finish_reason", "stats"]  # the keys and order of --local's output
    assert list(out["stats"]) == ["tau", "rounds", "drafted", "budget", "accepted", "accepted_per_position"]
    assert out["token_ids"] == expected and out["text"] == text(expected)
    assert main(argv[:-1] + ["--n", "2", text(PROMPTS[0])]) == 0
    assert [c["token_ids"] for c in json.loads(capsys.readouterr().out)["choices"]] == [expected, expected]
    assert main(["generate", "--server", addr, "--json", "abc"]) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_ray_serve_application(bg, target_model):
    """The Serve app (typed builder, gRPC ingress, HTTP proxy) in a local Ray instance, over the tiny services."""
    import json
    import urllib.request

    import ray
    from ray import serve

    from dspark.router.app import GRPC_SERVICER_FUNCTIONS, RouterArgs, app_builder

    v = bg.run(start_verifier(make_verifier_core(target_model)))
    d = bg.run(start_draft(make_draft_core(target_model)))
    grpc_port, http_port = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS},
        )
        args = RouterArgs(verifier=f"127.0.0.1:{v.port}", draft=f"127.0.0.1:{d.port}", model="smollm2-135m")
        serve.run(app_builder(args), name="dspark", route_prefix="/")
        sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        (expected,) = plain_greedy(target_model, [PROMPTS[0]], sp)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            r = stub.Generate(gpb.GenerateRequest(prompt_token_ids=PROMPTS[0], max_tokens=10, ignore_eos=True))
            assert list(r.choices[0].token_ids) == expected and r.choices[0].stats.drafted > 0
            streamed = []
            req = gpb.GenerateRequest(prompt_token_ids=PROMPTS[0], max_tokens=10, ignore_eos=True)
            for m in stub.GenerateStream(req):
                streamed += list(m.token_ids)
            assert streamed == expected
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(gpb.GenerateRequest(prompt_token_ids=PROMPTS[0], max_tokens=0))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 10, "ignore_eos": True}).encode()
        url = f"http://127.0.0.1:{http_port}/v1/completions"
        req = urllib.request.Request(url, body, {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())
        assert out["usage"]["completion_tokens"] == 10 and out["choices"][0]["dspark"]["rounds"] > 0
    finally:
        serve.shutdown()
        ray.shutdown()
        bg.run(v.stop(0))
        bg.run(d.stop(0))


def test_a_cancelled_stream_frees_its_sessions(deployment):
    router, stub = deployment
    req = gpb.GenerateRequest(prompt_token_ids=PROMPTS[1], max_tokens=16, ignore_eos=True, n=2)
    call = stub.GenerateStream(req, metadata=AUTH)
    next(call)  # the first delta: both choices are decoding now
    call.cancel()
    for _ in range(100):
        if not router.decoder.has_work and router.decoder.verifier.free_slots == router.decoder.verifier.max_sessions:
            break
        time.sleep(0.05)
    assert not router.decoder.has_work
    assert router.decoder.verifier.free_slots == router.decoder.verifier.max_sessions
    assert router._pending == 0  # every request of the module so far is accounted for


def test_a_full_queue_answers_resource_exhausted(deployment):
    router, _ = deployment
    cfg = RouterConfig(verifier=router.config.verifier, draft=router.config.draft, max_queue=1)
    busy = Router(cfg, tokenizer=Letters())
    try:
        import asyncio

        from dspark.core.engine import CapacityError

        sp = SamplingParams(temperature=0.0, max_tokens=4)
        with pytest.raises(CapacityError, match="retry later"):
            asyncio.run(busy.generate([3, 4], [sp, sp]))  # n=2 does not fit a queue of 1
        (one,) = asyncio.run(busy.generate([3, 4], [sp]))
        assert one.finish_reason == "length"
    finally:
        busy.close()


def test_a_verifier_gone_for_longer_than_the_router_waits_answers_unavailable_then_serving_resumes(bg, target_model):
    v = bg.run(start_verifier(make_verifier_core(target_model)))
    d = bg.run(start_draft(make_draft_core(target_model)))
    port = v.port
    cfg = RouterConfig(verifier=f"127.0.0.1:{port}", draft=f"127.0.0.1:{d.port}", verifier_recover_s=1.0)
    router = Router(cfg, tokenizer=Letters())
    pub = bg.run(grpc_api.start(router))
    channel = grpc.insecure_channel(f"127.0.0.1:{pub.port}")
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    req = gpb.GenerateRequest(prompt_token_ids=PROMPTS[0], max_tokens=8, ignore_eos=True)
    try:
        bg.run(v.stop(0))
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"127.0.0.1:{port}" in e.value.details() and "retry later" in e.value.details()
        v = bg.run(start_verifier(make_verifier_core(target_model), grpc_server.ServerConfig(f"127.0.0.1:{port}")))
        (c,) = stub.Generate(req, timeout=30).choices  # the router survived its dead peer
        (want,) = plain_greedy(target_model, [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=8))
        assert list(c.token_ids) == want
    finally:
        channel.close()
        router.close()
        for s in (pub, v, d):
            bg.run(s.stop(0))


def test_the_serve_config_builds_the_typed_application():
    """What `serve run deploy/serve.yaml` does with the config's args: validated into RouterArgs."""
    import yaml
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from dspark.router.app import RouterArgs, app_builder

    with open(Path(__file__).parents[1] / "deploy" / "serve.yaml") as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    (app_config,) = config.applications
    assert app_config.import_path == "dspark.router.app:app_builder"
    app = call_user_app_builder_with_args_if_necessary(app_builder, app_config.args)
    (args,) = app._bound_deployment.init_args
    assert isinstance(args, RouterArgs) and args.verifier == "127.0.0.1:50061"
    assert app_config.deployments[0].autoscaling_config["max_replicas"] >= 1
