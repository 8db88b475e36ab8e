"""`dspark serve local` (what `make run` runs): the verifier, the draft service and the Ray Serve router as three local
processes, started in order, each waited for until healthy; then the endpoints and a client command are printed and
everything runs until Ctrl-C / SIGTERM, when the processes are stopped in reverse order (each drains)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def _grpc_healthy(address: str, timeout_s: float, proc: subprocess.Popen) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    give_up = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < give_up:
            if proc.poll() is not None:
                raise RuntimeError(f"the process for {address} exited with code {proc.returncode}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(1)
    raise TimeoutError(f"{address} not healthy after {timeout_s:.0f} s")


def _http_healthy(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            raise RuntimeError(f"the router exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f} s")


def _pieces(a) -> list[tuple[str, list[str], str]]:
    """(name, `dspark serve` arguments, health address) of the verifier, draft service and router, in start order."""
    engine = ["--model", a.model, "--device", a.device, "--dtype", a.dtype, "--max-requests", str(a.max_requests)]
    engine += ["--max-context", str(a.max_context)] + (["--threads", str(a.threads)] if a.threads else [])
    drafter = ["--drafter", a.drafter] if a.drafter else []
    sps = ["--sps-profile", a.sps_profile] if a.sps_profile else []
    v_addr, d_addr = f"127.0.0.1:{a.verifier_port}", f"127.0.0.1:{a.draft_port}"
    router = ["router", "--verifier", v_addr, "--draft", d_addr, "--policy", a.policy]
    router += ["--grpc-port", str(a.grpc_port), "--http-port", str(a.http_port)] + (["--no-ray"] if a.no_ray else [])
    metrics = getattr(a, "metrics_ports", None)  # (verifier, draft); None: the services' defaults
    v_metrics = ["--metrics-port", str(metrics[0])] if metrics else []
    d_metrics = ["--metrics-port", str(metrics[1])] if metrics else []
    return [
        ("verifier", ["verifier", *engine, *drafter, *sps, *v_metrics, "--port", str(a.verifier_port)], v_addr),
        ("draft", ["draft", *engine, *drafter, *d_metrics, "--port", str(a.draft_port)], d_addr),
        ("router", router, f"http://127.0.0.1:{a.http_port}/healthz"),
    ]


@contextlib.contextmanager
def local_stack(a, logs: Path, log=print):
    """Start the verifier, the draft service and the router (`a`: the `dspark serve local` flags) as processes, in
    order, each waited for until healthy; yield the processes; stop them in reverse order (each drains)."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        for name, args, health in _pieces(a):
            path = logs / f"{name}.log"
            log(f"starting the {name} (log: {path})")
            with open(path, "w") as out:
                cmd = [sys.executable, "-m", "dspark.cli", "serve", *args]
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
            if health.startswith("http"):
                _http_healthy(health, a.wait, procs[-1])
            else:  # the verifier may quick-profile its SPS table on the first start
                _grpc_healthy(health, a.wait, procs[-1])
        yield procs
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def run_local(a) -> int:
    from dspark.model_store import dspark_home

    logs = dspark_home() / "logs"
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with local_stack(a, logs, log=lambda m: print(m, flush=True)) as procs:
            print(
                f"\ndspark is up on {a.model}:\n"
                f"  gRPC  (dspark.v1.GenerationService)  localhost:{a.grpc_port}\n"
                f"  HTTP  (OpenAI-compatible)            http://localhost:{a.http_port}/v1\n"
                f"  verifier localhost:{a.verifier_port}, draft service localhost:{a.draft_port} (internal)\n"
                f"  metrics  http://localhost:{a.http_port}/metrics (router), :9461/metrics (verifier), "
                ":9462 (draft)\n\n"
                "try:\n"
                f"  {Path(sys.executable).parent / 'dspark'} generate --server localhost:{a.grpc_port} --json "
                '"Explain speculative decoding in two sentences."\n'
                f"  curl -s http://localhost:{a.http_port}/v1/chat/completions -H 'content-type: application/json' "
                '-d \'{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}\'\n\n'
                "Ctrl-C stops all three.",
                flush=True,
            )
            while not stop.is_set():
                if any(p.poll() is not None for p in procs):
                    print("a service exited; stopping the others", file=sys.stderr)
                    return 1
                stop.wait(1)
            return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"dspark: {e}; see the logs in {logs}", file=sys.stderr)
        return 1
