"""`dspark health HOST:PORT` (the chart's exec probe before Kubernetes 1.24) against a real grpc.aio server of the
services' shell: exit 0 while SERVING, 1 when NOT_SERVING (draining), 3 when the check itself fails (nothing
answers, an unknown service name), 2 on a bad address."""

from __future__ import annotations

import pytest

from dspark import cli
from dspark.serving import grpc_server, health
from dspark.stack.port import free_port

VERIFIER = "dspark.v1.VerifierService"


@pytest.fixture
def service(bg):
    svc = bg.run(grpc_server.start(grpc_server.ServerConfig(address="127.0.0.1:0"), [], [VERIFIER]))
    yield svc
    bg.run(svc.stop(0))


def test_health_exits_0_when_the_service_is_serving(service, capsys):
    assert cli.main(["health", f"127.0.0.1:{service.port}"]) == health.SERVING == 0
    assert "SERVING" in capsys.readouterr().out


def test_health_checks_a_named_service(service):
    assert health.check(f"127.0.0.1:{service.port}", VERIFIER).status == "SERVING"
    unknown = health.check(f"127.0.0.1:{service.port}", "dspark.v1.NoSuchService")
    assert (unknown.code, unknown.status) == (health.UNREACHABLE, "NOT_FOUND")


def test_health_exits_1_when_the_service_is_draining(service, bg, capsys):
    bg.run(service.set_serving(False))
    assert cli.main(["health", f"127.0.0.1:{service.port}", "--service", VERIFIER]) == health.NOT_SERVING == 1
    assert "NOT_SERVING" in capsys.readouterr().out


def test_health_exits_3_when_nothing_listens(capsys):
    assert cli.main(["health", f"127.0.0.1:{free_port()}", "--timeout", "1"]) == health.UNREACHABLE == 3
    assert "UNAVAILABLE" in capsys.readouterr().out


@pytest.mark.parametrize("address", ["localhost", "localhost:http", ":50061", "localhost:0", "localhost:70000"])
def test_health_refuses_an_address_that_is_not_host_colon_port(address, capsys):
    assert cli.main(["health", address]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_health_refuses_a_timeout_that_is_not_positive():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        health.check("127.0.0.1:1", timeout_s=0)
