"""The deployment as real processes on the real default model: `dspark serve verifier`, `dspark serve draft`,
`dspark serve router --no-ray`; `dspark generate --server` prints exactly what `dspark generate --local` prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from dspark.stack.port import free_port

pytestmark = pytest.mark.slow


def _drafter() -> str:
    if os.environ.get("DSPARK_TEST_DRAFTER"):
        return os.environ["DSPARK_TEST_DRAFTER"]
    from dspark.drafter.checkpoint import default_drafter_path
    from dspark.models.registry import DEFAULT_MODEL

    try:
        return str(default_drafter_path(DEFAULT_MODEL))
    except FileNotFoundError as e:
        pytest.skip(f"no drafter: {e}")


def _wait(url_or_addr: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
        try:
            if url_or_addr.startswith("http"):
                with urllib.request.urlopen(url_or_addr, timeout=2):
                    return
            with grpc.insecure_channel(url_or_addr) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except (OSError, grpc.RpcError):
            pass
        time.sleep(1)
    raise TimeoutError(url_or_addr)


def test_generate_server_equals_generate_local(tmp_path, capsys):
    from dspark.cli import main

    drafter = _drafter()
    sps = str(tmp_path / "sps.json")
    vp, dp, gp, hp = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--threads", "1", "--drafter", drafter, "--metrics-port", "0", "--max-requests", "4"]
    cmds = [
        ["verifier", *common, "--sps-profile", sps, "--port", str(vp)],
        ["draft", *common, "--port", str(dp)],
        ["router", "--no-ray", "--verifier", f"127.0.0.1:{vp}", "--draft", f"127.0.0.1:{dp}"]
        + ["--grpc-port", str(gp), "--http-port", str(hp)],
    ]
    procs = []

    def start(cmd):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "dspark.cli", "serve", *cmd],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        return procs[-1]

    try:
        verifier, draft = start(cmds[0]), start(cmds[1])  # the two model services load side by side
        _wait(f"127.0.0.1:{vp}", verifier)
        _wait(f"127.0.0.1:{dp}", draft)
        _wait(f"http://127.0.0.1:{hp}/healthz", start(cmds[2]))
        prompt = "What is speculative decoding?"
        for policy in ("dspark", "fixed"):
            flags = ["--max-tokens", "24", "--policy", policy, "--json", prompt]
            assert main(["generate", "--server", f"localhost:{gp}", *flags]) == 0
            remote = json.loads(capsys.readouterr().out)
            local_flags = ["--threads", "1", "--drafter", drafter, "--sps-profile", sps, "--max-requests", "4"]
            assert main(["generate", "--local", *local_flags, *flags]) == 0
            local = json.loads(capsys.readouterr().out)
            if policy == "dspark":  # its plan prices the draft call, and a remote one costs an RPC round trip more
                assert remote.pop("stats")["rounds"] > 0 and local.pop("stats")["rounds"] > 0  # so drafts may differ
            assert remote == local, policy  # the same greedy text and tokens, and for fixed the same rounds too
        assert remote["stats"]["budget"] == remote["stats"]["drafted"] > 0  # fixed: every draft verified
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
