"""`dspark serve router`: the router application on a local Ray Serve instance (gRPC ingress + HTTP proxy), or with
--no-ray in this process (a grpc.aio server and uvicorn), until SIGTERM. With --config, a Serve config file
(deploy/serve.yaml's shape, the Helm chart's ConfigMap) gives the ports, the application's args and the DSparkRouter
deployment's options (replicas, autoscaling) instead of the flags; its ${VAR}s are filled in from the environment, so
a pod can name the services by the addresses Kubernetes puts there (DSPARK_VERIFIER_SERVICE_HOST, ...)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class ServeConfig:
    """What `dspark serve router --config` takes from a Serve config file."""

    args: dict  # the application's args (RouterArgs fields)
    deployment: dict = field(default_factory=dict)  # DSparkRouter's options: autoscaling_config, max_ongoing_requests
    http_host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 50051


def expand_env(text: str, environ: Mapping[str, str] = os.environ) -> str:
    """${VAR} -> its value; a variable that is not set is an error (not an address like '${X}:50061' failing later)."""
    missing = sorted({m for m in _VAR.findall(text) if m not in environ})
    if missing:
        raise ValueError(f"serve config: environment variable(s) {', '.join(missing)} not set")
    return _VAR.sub(lambda m: environ[m.group(1)], text)


def read_serve_config(text: str, environ: Mapping[str, str] = os.environ) -> ServeConfig:
    """Parse a Serve config with one application (dspark.router.app:app_builder), its ${VAR}s expanded."""
    import yaml

    cfg = yaml.safe_load(expand_env(text, environ)) or {}
    apps = cfg.get("applications") or []
    if len(apps) != 1 or apps[0].get("import_path") != "dspark.router.app:app_builder":
        raise ValueError("serve config: expected one application with import_path dspark.router.app:app_builder")
    deps = [d for d in apps[0].get("deployments") or [] if d.get("name") == "DSparkRouter"]
    http, grpc_options = cfg.get("http_options") or {}, cfg.get("grpc_options") or {}
    return ServeConfig(
        args=dict(apps[0].get("args") or {}),
        deployment={k: v for k, v in (deps[0] if deps else {}).items() if k != "name"},
        http_host=http.get("host", "0.0.0.0"),
        http_port=int(http.get("port", 8000)),
        grpc_port=int(grpc_options.get("port", 50051)),
    )


def _args(a):
    """RouterArgs from the `dspark serve router` flags, one flag per field (--draft '': no draft service)."""
    from dspark.router.app import RouterArgs

    flags = {name: getattr(a, name) for name in RouterArgs.model_fields}
    return RouterArgs(**{**flags, "draft": a.draft or None})


def serve_router(a) -> int:
    return _serve_plain(a) if a.no_ray else _serve_ray(a)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _serve_ray(a) -> int:
    import ray
    from ray import serve

    from dspark.router.app import GRPC_SERVICER_FUNCTIONS, DSparkRouter, RouterArgs

    if a.config:
        with open(a.config) as f:
            c = read_serve_config(f.read())
        args, options = RouterArgs(**c.args), c.deployment
    else:
        c = ServeConfig(args={}, http_host=a.host, http_port=a.http_port, grpc_port=a.grpc_port)
        args, options = _args(a), {"num_replicas": a.replicas}
    ray.init(include_dashboard=False, configure_logging=False)
    try:
        serve.start(
            http_options={"host": c.http_host, "port": c.http_port},
            grpc_options={"port": c.grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS},
        )
        serve.run(DSparkRouter.options(**options).bind(args), name="dspark", route_prefix="/")
        print(
            f"dspark router (Ray Serve) gRPC on localhost:{c.grpc_port}, HTTP on http://{c.http_host}:{c.http_port}/v1"
        )
        print("ready", flush=True)
        _wait_for_signal()
        _drain(serve.get_deployment_handle("DSparkRouter", app_name="dspark"), a.drain)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _drain(handle, seconds: float, quiet_polls: int = 3, poll_s: float = 0.2, flush_s: float = 1.0) -> bool:
    """After SIGTERM, before Serve's shutdown closes its proxies' connections: wait until the router replicas
    answer no request (`quiet_polls` polls in a row see 0: a call reaches one replica, so several must be asked),
    at most `seconds`, then `flush_s` for the proxy to pass the last messages on. The pod's preStop and readiness
    have already taken it out of its Service, so no new connection arrives meanwhile; a client's open connection may
    still bring new calls (kube-proxy steers connections, not calls), and those can keep it from going quiet until
    `seconds` run out. True when it drained in time."""
    deadline, quiet = time.monotonic() + seconds, 0
    print(f"SIGTERM: draining the router's requests for up to {seconds:.0f} s", flush=True)
    while time.monotonic() < deadline:
        try:
            busy = handle.in_flight.remote().result(timeout_s=max(0.1, deadline - time.monotonic()))
        except Exception as e:  # a replica that is gone answers nothing: nothing to wait for there
            print(f"drain: {type(e).__name__}: {e}", flush=True)
            busy = 0
        quiet = quiet + 1 if busy == 0 else 0
        if quiet >= quiet_polls:
            time.sleep(flush_s)
            return True
        time.sleep(poll_s)
    print("drain: time is up with requests still running", flush=True)
    return False


def _serve_plain(a) -> int:
    return asyncio.run(_plain(a))


async def _plain(a) -> int:
    import uvicorn

    from dspark.router import grpc_api
    from dspark.router.loop import Router
    from dspark.router.openai_api import build_app
    from dspark.serving import grpc_server, telemetry

    telemetry.setup(telemetry.ROUTER)
    router = Router(_args(a).config())
    svc = await grpc_api.start(router, grpc_server.ServerConfig(address=f"{a.host}:{a.grpc_port}"))
    http = uvicorn.Server(uvicorn.Config(build_app(lambda: router), host=a.host, port=a.http_port, log_level="warning"))
    http.install_signal_handlers = lambda: None  # ours below
    task = asyncio.create_task(http.serve())
    print(f"dspark router gRPC on localhost:{svc.port}, HTTP on http://{a.host}:{a.http_port}/v1")
    print("ready", flush=True)
    try:
        await svc.wait(a.drain)
    finally:
        http.should_exit = True
        await task
        router.close()
    return 0
