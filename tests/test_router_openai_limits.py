"""The OpenAI-compatible HTTP API against input a new user (or a load test's bad users) sends: bodies that are not
JSON objects, bodies over the size limit, wrong types, prompts far past the context, OpenAI parameters the server
does not implement. Each gets a 4xx naming what is wrong, and the server goes on serving (tiny models on localhost,
a letter tokenizer)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from test_router_apis import Letters, text
from test_verifier_draft_services import PROMPTS, make_draft_core, make_verifier_core

from dspark.router.loop import Router, RouterConfig
from dspark.stack.port import free_port
from dspark.stack.serve import start_draft, start_verifier

pytestmark = pytest.mark.usefixtures("one_thread")
LIMIT = 4096  # the router's max_request_bytes here


class CountingLetters(Letters):
    """Letters with a vocabulary (one letter a token) that counts the characters it was asked to tokenize."""

    def __init__(self):
        self.encoded_chars = 0

    def get_vocab(self):
        return {chr(97 + i): i for i in range(8)}

    def encode(self, text, add_special_tokens=True):
        self.encoded_chars += len(text)
        return super().encode(text, add_special_tokens)


@pytest.fixture(scope="module")
def target_model():
    from test_core_decoding_stats import _tiny_llama

    return _tiny_llama(seed=0, hidden=32, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def http(bg, target_model):
    """(base URL, router) of the HTTP API over tiny verifier + draft services."""
    import uvicorn

    from dspark.router.openai_api import build_app

    v = bg.run(start_verifier(make_verifier_core(target_model)))
    d = bg.run(start_draft(make_draft_core(target_model)))
    addresses = dict(verifier=f"127.0.0.1:{v.port}", draft=f"127.0.0.1:{d.port}")
    router = Router(RouterConfig(**addresses, max_tokens=16, max_request_bytes=LIMIT), tokenizer=CountingLetters())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(lambda: router), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", router
    server.should_exit = True
    t.join(10)
    router.close()
    for s in (v, d):
        bg.run(s.stop(0))


def post(base: str, path: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data, {"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ok_body(**kw) -> dict:
    return {"messages": [{"role": "user", "content": text(PROMPTS[0])}], "max_tokens": 4, **kw}


def test_a_json_body_that_is_not_an_object_gets_400(http):
    base, _ = http
    for body in ([ok_body()], "hi", 3, None):
        status, out = post(base, "/v1/chat/completions", body)
        assert status == 400 and "must be a JSON object" in out["error"]["message"], (body, status, out)
    status, out = post(base, "/v1/completions", b"{not json")
    assert status == 400 and "not JSON" in out["error"]["message"]


def test_a_body_over_the_limit_gets_413_before_it_is_parsed(http):
    base, router = http
    before = router.tokenizer.encoded_chars
    big = ok_body(messages=[{"role": "user", "content": "a" * (2 * LIMIT)}])
    status, out = post(base, "/v1/chat/completions", big)
    assert status == 413 and f"at most {LIMIT}" in out["error"]["message"]
    # no content-length (chunked): counted as it arrives; sent at once, so the early answer breaks no pipe
    payload = json.dumps(big).encode()
    pieces = [payload[i : i + 1000] for i in range(0, len(payload), 1000)]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in pieces)
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        conn.sendall(head.encode() + b"transfer-encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n")
        assert conn.recv(64).startswith(b"HTTP/1.1 413")
    assert router.tokenizer.encoded_chars == before  # nothing was tokenized


def test_a_prompt_far_past_the_context_is_refused_without_tokenizing_it(http):
    base, router = http
    max_context = router.decoder.verifier.max_context
    before = router.tokenizer.encoded_chars
    status, out = post(base, "/v1/completions", {"prompt": "a" * (max_context * 3), "max_tokens": 4})
    assert status == 400 and "max_context" in out["error"]["message"]
    assert router.tokenizer.encoded_chars == before
    status, out = post(base, "/v1/completions", {"prompt": "a" * max_context, "max_tokens": 4})
    assert status == 400 and "max_context" in out["error"]["message"]  # at the limit: tokenized, then counted
    assert router.tokenizer.encoded_chars == before + max_context


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"max_tokens": "many"}, "'max_tokens' must be an integer"),
        ({"max_tokens": 2.5}, "'max_tokens' must be an integer"),
        ({"n": [1]}, "'n' must be an integer"),
        ({"n": True}, "'n' must be an integer"),
        ({"n": 0}, "n must be in 1..16"),
        ({"temperature": "hot"}, "'temperature' must be a number"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"seed": "x"}, "'seed' must be an integer"),
        ({"stop": [1, 2]}, "'stop' must be a string or a list of strings"),
        ({"stream": "yes"}, "'stream' must be true or false"),
        ({"policy": "eager"}, "unknown policy"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0] must be an object"),
        ({"max_token": 4}, "unknown parameter(s): max_token"),
        ({"logprobs": True, "top_logprobs": 2}, "not implemented by this server: logprobs, top_logprobs"),
        ({"presence_penalty": 0.5}, "not implemented by this server: presence_penalty"),
        ({"tools": [{"type": "function"}]}, "not implemented by this server: tools"),
    ],
    ids=lambda x: json.dumps(x)[:30] if isinstance(x, dict) else None,
)
def test_wrong_types_bad_values_and_unimplemented_parameters_get_400_naming_them(http, extra, words):
    base, _ = http
    for stream in (False, True):
        status, out = post(base, "/v1/chat/completions", {**ok_body(stream=stream), **extra})
        assert status == 400 and words in out["error"]["message"], (status, out)


def test_no_op_values_of_unimplemented_parameters_and_text_parts_are_accepted(http, target_model):
    from test_verifier_draft_services import plain_greedy

    from dspark.core.sampling import SamplingParams

    base, _ = http
    (want,) = plain_greedy(target_model, [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=4))
    noops = {"logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "user": "me", "model": "m"}
    parts = [{"role": "user", "content": [{"type": "text", "text": text(PROMPTS[0])}]}]
    status, out = post(base, "/v1/chat/completions", ok_body(messages=parts, **noops))
    assert status == 200 and out["choices"][0]["message"]["content"] == text(want)
    status, out = post(base, "/v1/completions", {"prompt": text(PROMPTS[0]), "max_tokens": 4, "logprobs": None})
    assert status == 200 and out["choices"][0]["text"] == text(want)


def test_stream_options_include_usage_ends_the_stream_with_the_usage(http):
    base, _ = http
    body = json.dumps(ok_body(stream=True, stream_options={"include_usage": True})).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    assert last["usage"]["prompt_tokens"] == len(PROMPTS[0])
