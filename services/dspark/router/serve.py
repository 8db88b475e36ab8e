"""`dspark serve router`: the router application on a local Ray Serve instance (gRPC ingress + HTTP proxy), or with
--no-ray in this process (a grpc.aio server and uvicorn), until SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import threading


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

    from dspark.router.app import GRPC_SERVICER_FUNCTIONS, DSparkRouter

    ray.init(include_dashboard=False, configure_logging=False)
    try:
        serve.start(
            http_options={"host": a.host, "port": a.http_port},
            grpc_options={"port": a.grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS},
        )
        serve.run(DSparkRouter.options(num_replicas=a.replicas).bind(_args(a)), name="dspark", route_prefix="/")
        print(f"dspark router (Ray Serve) gRPC on localhost:{a.grpc_port}, HTTP on http://{a.host}:{a.http_port}/v1")
        print("ready", flush=True)
        _wait_for_signal()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


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
        await svc.wait(10.0)
    finally:
        http.should_exit = True
        await task
        router.close()
    return 0
