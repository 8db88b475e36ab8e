"""`dspark health HOST:PORT`: one gRPC health check (grpc.health.v1.Health/Check) against a dspark service, as an
exit code. Kubernetes before 1.24 has no native gRPC probe, so the Helm chart's verifier and draft pods run this as
their exec probe there; it imports grpc only, so a probe costs a fraction of a second."""

from __future__ import annotations

from dataclasses import dataclass

SERVING, NOT_SERVING, UNREACHABLE = 0, 1, 3  # exit codes (2 is a usage error, as everywhere in the CLI)


@dataclass(frozen=True)
class HealthResult:
    code: int  # SERVING, NOT_SERVING or UNREACHABLE
    status: str  # the service's status name (SERVING, NOT_SERVING, SERVICE_UNKNOWN, ...) or the RPC error's code
    detail: str = ""


def parse_address(address: str) -> str:
    """HOST:PORT, checked: a bad address is a clear error instead of a probe that fails for an unclear reason."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"health: expected HOST:PORT with a port in 1..65535, got {address!r}")
    return address


def check(address: str, service: str = "", timeout_s: float = 3.0) -> HealthResult:
    """Ask the service at `address` whether `service` ('' = the whole server) is SERVING, within timeout_s."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if timeout_s <= 0:
        raise ValueError(f"health: timeout must be > 0 seconds, got {timeout_s}")
    with grpc.insecure_channel(parse_address(address)) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, wait_for_ready=False
            )
        except grpc.RpcError as e:
            return HealthResult(UNREACHABLE, e.code().name, e.details() or "")
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return HealthResult(SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING, name)
