"""Starting the gRPC services: `dspark serve verifier` and `dspark serve draft` (the router lives in router_app.py).

`start_verifier` / `start_draft` take a ready core and return a running Service (tests call them with tiny models);
`serve_verifier` / `serve_draft` build the core from command-line flags, serve until SIGTERM, then drain.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

from dspark.draft.service import SERVICE_NAME as DRAFT_SERVICE
from dspark.draft.service import DraftCore, DraftServicer
from dspark.serving import grpc_server, metrics, telemetry
from dspark.serving.grpc_server import CoreServicer, ServerConfig, Service
from dspark.v1 import draft_pb2_grpc, verifier_pb2_grpc
from dspark.verifier.service import SERVICE_NAME as VERIFIER_SERVICE
from dspark.verifier.service import VerifierCore, VerifierServicer

log = logging.getLogger("dspark.stack.serve")


async def start_verifier(core: VerifierCore, config: ServerConfig | None = None) -> Service:
    add = verifier_pb2_grpc.add_VerifierServiceServicer_to_server
    return await _start(config, add, VerifierServicer(core), VERIFIER_SERVICE)


async def start_draft(core: DraftCore, config: ServerConfig | None = None) -> Service:
    return await _start(config, draft_pb2_grpc.add_DraftServiceServicer_to_server, DraftServicer(core), DRAFT_SERVICE)


async def _start(config: ServerConfig | None, add, servicer: CoreServicer, service_name: str) -> Service:
    """Serve one servicer, expiring its core's idle sessions a few times per session TTL."""
    config = config or ServerConfig()
    svc = await grpc_server.start(config, [(add, servicer)], [service_name])
    svc.every(max(1.0, config.session_ttl_s / 4), servicer.core.expire)
    return svc


def build_verifier_core(
    engine_config, drafter: str | None, sps_profile: str | None, ttl_s: float, feature_dtype: str | None = None
) -> VerifierCore:
    """The target engine with the feature layers the drafter reads, and its SPS table (loaded or quick-profiled)."""
    from dspark.core import sps_profile as sps_mod
    from dspark.core.engine import TargetEngine
    from dspark.drafter.checkpoint import default_drafter_path, load_trained_drafter
    from dspark.models.model_store import load_model
    from dspark.models.prompt import eos_token_ids

    model, tokenizer = load_model(engine_config.model, dtype=engine_config.dtype, device=engine_config.device)
    path = Path(drafter) if drafter else default_drafter_path(engine_config.model)
    layers = load_trained_drafter(path, model, tokenizer).config.feature_layers
    engine = TargetEngine(replace(engine_config, feature_layers=tuple(layers)), model=model, tokenizer=tokenizer)
    sps = sps_mod.load_or_profile(engine, sps_profile, log=log.info)
    return VerifierCore(engine, sps, eos_token_ids(model, tokenizer), ttl_s=ttl_s, feature_dtype=feature_dtype)


def build_draft_core(
    engine_config, drafter: str | None, max_support: int, ttl_s: float, draft_cost_path: str | None = None
) -> DraftCore:
    """The trained drafter with its own copy of the target's embedding and LM head (loaded from the target's
    weights, which the draft process then drops), and its cost table t_draft(R, K) (loaded or quick-profiled)."""
    import torch

    from dspark.drafter import cost_profile
    from dspark.drafter.checkpoint import default_drafter_path, load_trained_drafter
    from dspark.drafter.proposer import DSparkProposer
    from dspark.models.model_store import load_model

    if engine_config.threads:
        torch.set_num_threads(engine_config.threads)
    model, tokenizer = load_model(engine_config.model, dtype=engine_config.dtype, device=engine_config.device)
    path = Path(drafter) if drafter else default_drafter_path(engine_config.model)
    d = load_trained_drafter(path, model, tokenizer).to(engine_config.device)
    d.use_linear_kernel(engine_config.linear_kernel)
    del model
    proposer = DSparkProposer(d, max_support=max_support or None)
    proposer.draft_cost = cost_profile.load_or_profile(
        proposer, path.name, engine_config.max_requests, draft_cost_path, log=log.info
    )
    return DraftCore(proposer, ttl_s=ttl_s)


def serve_verifier(
    engine_config, server: ServerConfig, drafter=None, sps_profile=None, metrics_port=0, feature_dtype=None
) -> int:
    telemetry.setup(telemetry.VERIFIER)
    metrics.start_exporter(metrics_port)
    core = grpc_server.on_model_thread(
        build_verifier_core, engine_config, drafter, sps_profile, server.session_ttl_s, feature_dtype
    )
    return asyncio.run(_serve(start_verifier(core, server), "verifier", server))


def serve_draft(engine_config, server: ServerConfig, drafter=None, max_support: int = 64, metrics_port=0) -> int:
    telemetry.setup(telemetry.DRAFT)
    metrics.start_exporter(metrics_port)
    core = grpc_server.on_model_thread(build_draft_core, engine_config, drafter, max_support, server.session_ttl_s)
    return asyncio.run(_serve(start_draft(core, server), "draft", server))


async def _serve(starting, name: str, server: ServerConfig) -> int:
    svc = await starting
    host = server.address.rsplit(":", 1)[0]
    print(f"dspark {name} service listening on {host}:{svc.port}", flush=True)
    await svc.wait(server.drain_s)
    return 0
