"""The router as a Ray Serve application: one deployment whose replicas each run a decode loop (router.py) against the
draft and verifier services over gRPC, serving the public GenerationService through Ray Serve's gRPC ingress and the
OpenAI-compatible HTTP API through its HTTP proxy.

Requests reach a replica once (Serve's proxy -> replica); every round inside it is one Draft and one Verify call for
all of that replica's requests, never a Serve hop per request per round. Replica counts and autoscaling live in the
Serve config (deploy/serve.yaml), not here.

    serve run deploy/serve.yaml                 # or: dspark serve router
"""

# no `from __future__ import annotations`: Serve reads app_builder's annotation to validate its args
import os

from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application

from dspark.router.grpc_api import ApiError, check_token, generate, generate_stream
from dspark.router.loop import Router, RouterConfig
from dspark.v1 import generation_pb2 as gpb

GRPC_SERVICER_FUNCTIONS = ["dspark.v1.generation_pb2_grpc.add_GenerationServiceServicer_to_server"]


class RouterArgs(BaseModel):
    """The application's arguments (the `args:` block of the Serve config)."""

    verifier: str = Field("127.0.0.1:50061", description="verifier service host:port")
    draft: str | None = Field("127.0.0.1:50062", description="draft service host:port; null = plain decoding")
    model: str | None = Field(None, description="tokenizer (registry name or folder); null = the verifier's model")
    policy: str = Field("dspark", description="verification policy; requests may override it")
    num_draft: int | None = Field(None, description="draft tokens per round; null = the drafter's block size")
    threshold: float = Field(0.5, description="survival threshold of the threshold policy")
    max_tokens: int = Field(4096, description="largest max_tokens a request may ask for")
    max_queue: int = Field(1024, description="requests in flight (choices) before new ones get RESOURCE_EXHAUSTED")
    verifier_recover_s: float = Field(
        60.0, description="how long a round waits for a lost verifier before its requests fail with UNAVAILABLE"
    )
    draft_retry_s: float = Field(1.0, description="plain decoding this long after the draft service fails")
    max_request_bytes: int = Field(1 << 20, description="HTTP bodies larger than this get 413 before parsing")
    api_key: str | None = Field(None, description="bearer token for the public API; null = $DSPARK_API_KEY or open")

    def config(self) -> RouterConfig:
        d = self.model_dump()
        d["api_key"] = d["api_key"] or os.environ.get("DSPARK_API_KEY") or None
        return RouterConfig(**d)


_replica: dict[str, Router] = {}  # this replica's router, for the HTTP routes


def _http_app():
    from dspark.router.openai_api import build_app

    return build_app(lambda: _replica["router"])


@serve.deployment(name="DSparkRouter", max_ongoing_requests=256)
@serve.ingress(_http_app)
class DSparkRouter:
    def __init__(self, args: RouterArgs | dict):
        import dspark.router.app as module  # this class may arrive pickled by value: reach the imported module
        from dspark.serving import telemetry

        telemetry.setup(telemetry.ROUTER)
        args = args if isinstance(args, RouterArgs) else RouterArgs.model_validate(args)
        self.router = Router(args.config())
        module._replica["router"] = self.router

    async def Generate(self, request: gpb.GenerateRequest, grpc_context) -> gpb.GenerateResponse:
        try:
            check_token(self.router.config.api_key, grpc_context.invocation_metadata())
            return await generate(self.router, request)
        except ApiError as e:
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.message)
            return gpb.GenerateResponse()

    async def GenerateStream(self, request: gpb.GenerateRequest, grpc_context):
        try:
            check_token(self.router.config.api_key, grpc_context.invocation_metadata())
            async for m in generate_stream(self.router, request):
                yield m
        except ApiError as e:
            # Serve's proxy passes the context on only with a yielded message, or with an exception raised after the
            # code is set: raise, so a stream that fails (before or after its first delta) ends with this status
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.message)
            raise

    def in_flight(self) -> int:
        """Requests this replica is still answering: `dspark serve router` waits for 0 before shutting Serve down."""
        return self.router.in_flight

    def check_health(self) -> None:
        if not self.router._thread.is_alive():
            raise RuntimeError("the decode loop thread died")

    def __del__(self):
        if getattr(self, "router", None) is not None:
            self.router.close()


def app_builder(args: RouterArgs) -> Application:
    """Typed application builder: `import_path: dspark.router.app:app_builder` in a Serve config."""
    return DSparkRouter.bind(args)
