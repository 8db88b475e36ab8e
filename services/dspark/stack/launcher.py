"""`dspark serve local` (what `make run` runs): the verifier, the draft service and the Ray Serve router as three local
processes, started in order, each waited for until healthy; then the endpoints and a client command are printed and
everything runs until Ctrl-C / SIGTERM, when the processes are stopped in reverse order (each drains).

`pieces` gives each process's command line, `start_piece` / `stop_piece` start (or restart, on the same command line
and port) and stop one, `local_stack` runs all three; bench-services and the process-level tests use them too."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from dspark.core.config import EngineConfig


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


# The services of one machine take turns on the same cores: after each call, torch's OpenMP workers would spin for
# libgomp's default 300,000 rounds, taking cores from the other service's next call. A short spin keeps the wake-up
# fast inside one forward pass and frees the cores between calls (bench-services, c=1 on 2 cores: 92 -> 83 ms a round
# against 75 in one process). Set GOMP_SPINCOUNT yourself to override it.
SHARED_CORES_ENV = {"GOMP_SPINCOUNT": "30000"}


@dataclass(frozen=True)
class StackConfig:
    """What `dspark serve local` starts (its flags; bench-services and the process tests build it directly)."""

    engine: EngineConfig  # the verifier's and the draft service's model, device, dtype, slots, context, threads
    drafter: str | None = None  # None: the shipped drafter of the model
    sps_profile: str | None = None  # None: the verifier's per model/device table
    policy: str = "dspark"
    verifier_port: int = 50061
    draft_port: int = 50062
    grpc_port: int = 50051
    http_port: int = 8000
    max_queue: int | None = None  # the router's requests in flight; None: its default
    metrics_ports: tuple[int, int] | None = None  # (verifier, draft); None: the services' defaults
    no_ray: bool = False
    wait: float = 600.0  # seconds each piece may take to become healthy


class Piece(NamedTuple):
    """One process of the stack: its name, its `dspark serve` arguments, and where it answers when healthy."""

    name: str  # "verifier", "draft" or "router" (also its log file's name)
    args: list[str]  # `dspark serve` arguments
    health: str  # host:port of a gRPC health service, or an http:// URL that answers 200

    @property
    def command(self) -> list[str]:
        """The whole command line: the same on every start, so a restart comes back on the same port."""
        return [sys.executable, "-m", "dspark.cli", "serve", *self.args]


def pieces(a: StackConfig) -> list[Piece]:
    """The verifier, draft service and router of `a`, in start order."""
    e = a.engine
    engine = ["--model", e.model, "--device", e.device, "--dtype", e.dtype, "--max-requests", str(e.max_requests)]
    engine += ["--max-context", str(e.max_context)] + (["--threads", str(e.threads)] if e.threads else [])
    drafter = ["--drafter", a.drafter] if a.drafter else []
    sps = ["--sps-profile", a.sps_profile] if a.sps_profile else []
    v_addr, d_addr = f"127.0.0.1:{a.verifier_port}", f"127.0.0.1:{a.draft_port}"
    router = ["router", "--verifier", v_addr, "--draft", d_addr, "--policy", a.policy]
    router += ["--grpc-port", str(a.grpc_port), "--http-port", str(a.http_port)] + (["--no-ray"] if a.no_ray else [])
    if a.max_queue:
        router += ["--max-queue", str(a.max_queue)]
    v_metrics = ["--metrics-port", str(a.metrics_ports[0])] if a.metrics_ports else []
    d_metrics = ["--metrics-port", str(a.metrics_ports[1])] if a.metrics_ports else []
    return [
        Piece("verifier", ["verifier", *engine, *drafter, *sps, *v_metrics, "--port", str(a.verifier_port)], v_addr),
        Piece("draft", ["draft", *engine, *drafter, *d_metrics, "--port", str(a.draft_port)], d_addr),
        Piece("router", router, f"http://127.0.0.1:{a.http_port}/healthz"),
    ]


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_piece(
    piece: Piece, logs: Path, wait_s: float, env: dict[str, str] | None = None, restart: bool = False
) -> subprocess.Popen:
    """Start one piece (output to logs/NAME.log; a restart appends to it) and wait until it is healthy. `env`:
    variables set on top of this process's environment (and of SHARED_CORES_ENV, unless that is set). On failure
    the process is killed and the error carries the tail of its log."""
    path = logs / f"{piece.name}.log"
    with open(path, "a" if restart else "w") as out:
        if restart:
            out.write(f"\n--- restarted: {' '.join(piece.command)}\n")
            out.flush()
        proc = subprocess.Popen(
            piece.command, stdout=out, stderr=subprocess.STDOUT, env={**SHARED_CORES_ENV, **os.environ, **(env or {})}
        )
    try:
        if piece.health.startswith("http"):
            _http_healthy(piece.health, wait_s, proc)
        else:  # the verifier may quick-profile its SPS table on the first start
            _grpc_healthy(piece.health, wait_s, proc)
    except (RuntimeError, TimeoutError) as e:
        stop_piece(proc, timeout_s=5)
        raise type(e)(f"the {piece.name}: {e}; the end of {path}:\n{log_tail(path)}") from e
    return proc


def stop_piece(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM (the piece drains and shuts down), SIGKILL after timeout_s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def local_stack(a: StackConfig, logs: Path, log=print, env: dict[str, str] | None = None):
    """Start the verifier, the draft service and the router of `a` as processes, in
    order, each waited for until healthy (`env`: extra environment of all three); yield the processes, in the order
    of pieces(a); stop them in reverse order (each drains). The yielded list is the one stopped: a caller that
    restarts a piece (start_piece(..., restart=True)) puts the new process in its place."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        for piece in pieces(a):
            log(f"starting the {piece.name} (log: {logs / piece.name}.log)")
            procs.append(start_piece(piece, logs, a.wait, env))
        yield procs
    finally:
        for p in reversed(procs):
            stop_piece(p)


def run_local(a: StackConfig) -> int:
    from dspark.models.model_store import dspark_home

    logs = dspark_home() / "logs"
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with local_stack(a, logs, log=lambda m: print(m, flush=True)) as procs:
            print(
                f"\ndspark is up on {a.engine.model}:\n"
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
        print(f"dspark: {e}\n(all logs: {logs})", file=sys.stderr)
        return 1
