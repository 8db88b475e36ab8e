"""Locust load test of a dspark deployment: a gRPC streaming user (GenerationService.GenerateStream), an OpenAI HTTP
streaming user (/v1/chat/completions, SSE) and a user that sends bad input. Run from the repository root:

    locust -f loadtest/locustfile.py --headless -u 4 -r 4 -t 30s --host localhost:50051 --csv PREFIX
    DSPARK_LOAD=concurrency:1,2,4 DSPARK_STEP_S=30 locust -f loadtest/locustfile.py --headless --host ...

--host is the gRPC address; the HTTP user reads its base URL from DSPARK_HTTP (default http://localhost:8000).
Each request fires Locust events of its own: `ttft <policy>`, `itl <policy>` (each gap between token messages),
`e2e <policy>` (the whole request, its token count as the response length; a failure carries the gRPC status or the
HTTP code), so Locust's CSV, HTML report and web UI show them. --dspark-records FILE also writes one JSON line per
request (TPOT, tokens, tau, budget, the step) for loadtest/report.py. DSPARK_LOAD picks a load shape (shapes.py);
without it Locust's -u/-r/-t apply.
"""

from __future__ import annotations

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel: gRPC's blocking calls then yield to other users' greenlets

import itertools  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402

import grpc  # noqa: E402
import requests  # noqa: E402
from locust import LoadTestShape, User, events, task  # noqa: E402

from loadtest import shapes, workload  # noqa: E402
from loadtest.calls import Sample, chat_body, grpc_request, grpc_stream, http_stream  # noqa: E402

if shapes.PLAN is not None:  # Locust runs the shape class it finds in this module; without one, -u/-r/-t apply

    class StepLoad(LoadTestShape):
        """shapes.PLAN's steps in order, then the end of the run."""

        def tick(self):
            return shapes.tick(self.get_run_time())


_ids = itertools.count()
_records = {"file": None, "lock": threading.Lock()}


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--max-tokens", type=int, default=64, help="dspark: max_tokens of each request")
    parser.add_argument("--temperature", type=float, default=0.0, help="dspark: sampling temperature")
    parser.add_argument("--policy", default="", help="dspark: per-request policy, comma-separated to alternate")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="dspark: seconds per request")
    parser.add_argument("--dspark-records", default="", help="dspark: write one JSON line per request here")


@events.test_start.add_listener
def _open_records(environment, **_):
    path = getattr(environment.parsed_options, "dspark_records", "")
    if path and _records["file"] is None:
        _records["file"] = open(path, "a")  # noqa: SIM115 - closed at test_stop


@events.test_stop.add_listener
def _close_records(environment, **_):
    if _records["file"] is not None:
        _records["file"].close()
        _records["file"] = None


def _write(record: dict) -> None:
    with _records["lock"]:
        if _records["file"] is not None:
            _records["file"].write(json.dumps(record) + "\n")
            _records["file"].flush()


def _fire(environment, s: Sample, user: str) -> None:
    """Locust events of one request, and its record."""
    fire = environment.events.request.fire
    name = s.policy or "router-policy"
    if s.ttft_s is not None:
        fire(request_type=s.api, name=f"ttft {name}", response_time=s.ttft_s * 1000, response_length=0)
    for gap in s.gaps_s:
        fire(request_type=s.api, name=f"itl {name}", response_time=gap * 1000, response_length=0)
    error = None if s.ok else RuntimeError(s.error)
    fire(
        request_type=s.api, name=f"e2e {name}", response_time=s.e2e_s * 1000, response_length=s.tokens, exception=error
    )
    _write({**s.record(), "user": user})


class _DsparkUser(User):
    abstract = True

    def on_start(self):
        self.settings = workload.Settings.from_env(self.environment.parsed_options)
        n = next(_ids)
        self.prompts = workload.Cycle(workload.prompts(), start=7 * n)
        self.policies = workload.Cycle(list(self.settings.policies), start=n)
        self.pacer = shapes.Pacer(seed=n)

    def wait_time(self):
        return self.pacer.wait()


class GrpcStreamUser(_DsparkUser):
    """GenerationService.GenerateStream at --host (host:port)."""

    weight = 2

    def on_start(self):
        super().on_start()
        self.channel = grpc.insecure_channel(self.host or "localhost:50051")
        from dspark.v1 import generation_pb2_grpc

        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)

    def on_stop(self):
        self.channel.close()

    @task
    def generate_stream(self):
        st = self.settings
        req = grpc_request(next(self.prompts), st.max_tokens, st.temperature, next(self.policies))
        s = Sample("grpc", req.policy, step=shapes.current_label())
        grpc_stream(self.stub, req, st.timeout_s, st.metadata(), sample=s)
        _fire(self.environment, s, type(self).__name__)


class OpenAIStreamUser(_DsparkUser):
    """/v1/chat/completions with "stream": true at $DSPARK_HTTP."""

    weight = 2

    def on_start(self):
        super().on_start()
        self.session = requests.Session()
        self.headers = {"authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}

    def on_stop(self):
        self.session.close()

    @task
    def chat_stream(self):
        st = self.settings
        body = chat_body(next(self.prompts), st.max_tokens, st.temperature, next(self.policies))
        s = Sample("http", body.get("policy", ""), step=shapes.current_label())
        http_stream(self.session, f"{st.http}/v1/chat/completions", body, st.timeout_s, self.headers, sample=s)
        _fire(self.environment, s, type(self).__name__)


# -- bad input: each case names what it sends and the answer it must get -----------------------------------------


def _grpc_case(kw: dict, want: str):
    def run(user):
        from dspark.v1 import generation_pb2 as gpb

        try:
            list(user.stub.GenerateStream(gpb.GenerateRequest(**kw), timeout=60, metadata=user.settings.metadata()))
        except grpc.RpcError as e:
            return None if e.code().name == want else f"{e.code().name}: {e.details()}"
        return "accepted"

    return run


def _http_case(body, want: int):
    def run(user):
        data = body() if callable(body) else json.dumps(body).encode()
        url = f"{user.settings.http}/v1/chat/completions"
        r = user.session.post(url, data=data, headers={"content-type": "application/json", **user.headers}, timeout=60)
        ok = r.status_code == want and "error" in r.json()
        return None if ok else f"HTTP {r.status_code}: {r.text[:120]}"

    return run


def _cancelled_grpc(user):
    """A client that cancels mid-stream: two messages read, then gone."""
    req = grpc_request("Write a long story about the sea.", 256, 0.0, "")
    call = user.stub.GenerateStream(req, timeout=60, metadata=user.settings.metadata())
    try:
        next(call)
        next(call)
    except (grpc.RpcError, StopIteration) as e:
        return f"the stream ended before the cancel: {e}"
    call.cancel()
    return None


def _cancelled_http(user):
    body = chat_body("Write a long story about the sea.", 256, 0.0, "")
    url = f"{user.settings.http}/v1/chat/completions"
    with user.session.post(url, json=body, stream=True, timeout=60, headers=user.headers) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        next(r.iter_content(chunk_size=None))
    return None  # the connection is closed with the stream unread


_MESSAGES = [{"role": "user", "content": "Hi"}]
BAD_CASES = {
    "grpc negative temperature": _grpc_case(dict(prompt="Hi", temperature=-1.0), "INVALID_ARGUMENT"),
    "grpc max_tokens 0": _grpc_case(dict(prompt="Hi", max_tokens=0), "INVALID_ARGUMENT"),
    "grpc top_p 2": _grpc_case(dict(prompt="Hi", top_p=2.0), "INVALID_ARGUMENT"),
    "grpc unknown policy": _grpc_case(dict(prompt="Hi", policy="eager"), "INVALID_ARGUMENT"),
    "grpc prompt past the context": _grpc_case(dict(prompt_token_ids=[28] * 50_000), "INVALID_ARGUMENT"),
    "grpc cancelled mid-stream": _cancelled_grpc,
    "http body is an array": _http_case([{"messages": _MESSAGES}], 400),
    "http max_tokens a string": _http_case({"messages": _MESSAGES, "max_tokens": "many"}, 400),
    "http n a list": _http_case({"messages": _MESSAGES, "n": [1]}, 400),
    "http temperature 9": _http_case({"messages": _MESSAGES, "temperature": -9}, 400),
    "http logprobs": _http_case({"messages": _MESSAGES, "logprobs": True}, 400),
    "http prompt past the context": _http_case({"messages": [{"role": "user", "content": "a " * 300_000}]}, 400),
    "http 2 MB body": _http_case(lambda: b'{"messages": "' + b"a" * (2 << 20) + b'"}', 413),
    "http cancelled mid-stream": _cancelled_http,
}


class BadInputUser(_DsparkUser):
    """Malformed requests over both APIs; a case passes when it gets its clear 4xx / INVALID_ARGUMENT answer."""

    weight = 1

    def on_start(self):
        super().on_start()
        from dspark.v1 import generation_pb2_grpc

        self.channel = grpc.insecure_channel(self.host or "localhost:50051")
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self.session = requests.Session()
        self.headers = {"authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        self.rng = random.Random(next(_ids))

    def on_stop(self):
        self.channel.close()
        self.session.close()

    def wait_time(self):
        return 0.5  # a share of the traffic, not a flood

    @task
    def bad_request(self):
        import time

        name = self.rng.choice(sorted(BAD_CASES))
        t = time.perf_counter()
        try:
            wrong = BAD_CASES[name](self)
        except (requests.RequestException, ValueError) as e:  # ValueError: a 4xx/5xx whose body is not JSON
            wrong = f"{type(e).__name__}: {e}"
        ms = (time.perf_counter() - t) * 1000
        error = None if wrong is None else RuntimeError(wrong)
        self.environment.events.request.fire(
            request_type="bad-" + name.split()[0], name=name, response_time=ms, response_length=0, exception=error
        )
        _write(
            {"user": "BadInputUser", "api": name.split()[0], "case": name, "ok": wrong is None, "error": wrong or ""}
        )
