"""`dspark` command line: generate, serve, health, models, profile, benchmarks, data, train, eval."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

from dspark.core.scheduler import POLICIES
from dspark.models.registry import DEFAULT_MODEL, REGISTRY


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, HF folder or .gguf path")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-requests", type=int, default=8)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--linear-kernel",
        default="auto",
        choices=["auto", "torch", "transposed", "onednn"],
        help="how the target's projections multiply (auto: onednn's prepacked linear on CPU for float32, and for "
        "bfloat16 where the CPU has native bf16; else transformers' nn.Linear; transposed: x @ W)",
    )


def _engine_config(a):
    from dspark.core.config import EngineConfig

    return EngineConfig.from_args(a)


def cmd_generate(a) -> int:
    if a.server:
        return _generate_remote(a)
    from dspark.core.sampling import SamplingParams
    from dspark.models.prompt import encode_prompt
    from dspark.runtime import build_decoder, build_dspark_decoder

    policy = a.policy or "dspark"
    if a.draft is not None:  # an independent draft LM: no confidences, so fixed-length verification
        if policy not in ("fixed", "autoregressive"):
            raise SystemExit(f"--draft LM has no confidence head: use --policy fixed, not {policy}")
        dec = build_decoder(_engine_config(a), draft_model=a.draft, num_draft=a.num_draft or 4, policy=policy)
    elif policy == "autoregressive":
        dec = build_decoder(_engine_config(a))
    else:
        log = (lambda m: print(m, file=sys.stderr)) if a.json else print
        dec = build_dspark_decoder(
            _engine_config(a), a.drafter, policy, a.sps_profile, a.threshold, a.num_draft, log=log
        )
    tok = dec.engine.tokenizer
    ids = encode_prompt(tok, a.prompt)
    params = [
        SamplingParams(
            temperature=a.temperature,
            top_p=a.top_p,
            top_k=a.top_k,
            max_tokens=a.max_tokens,
            seed=None if a.seed is None else a.seed + i,
        )
        for i in range(a.n)
    ]
    outs = dec.generate([ids] * a.n, params)
    choices = [
        _choice(
            tok.decode(c.token_ids, skip_special_tokens=True),
            c.token_ids,
            c.finish_reason,
            c.stats.tau,
            c.stats.rounds,
            c.stats.drafted,
            c.stats.scheduled,
            c.stats.accepted,
            c.stats.accepted_per_position,
        )
        for c in outs
    ]
    return _print_choices(a, choices)


def _choice(text, token_ids, finish_reason, tau, rounds, drafted, budget, accepted, per_position) -> dict:
    """One choice of `dspark generate --json`, the same whether it ran here or on a server."""
    return {
        "text": text,
        "token_ids": list(token_ids),
        "finish_reason": finish_reason,
        "stats": {
            "tau": round(tau, 4),
            "rounds": rounds,
            "drafted": drafted,
            "budget": budget,
            "accepted": accepted,
            "accepted_per_position": list(per_position),
        },
    }


def _print_choices(a, choices: list[dict]) -> int:
    if a.json:
        print(json.dumps(choices[0] if a.n == 1 else {"choices": choices}))
    else:
        for c in choices:
            print(c["text"])
            print(f"-- {c['finish_reason']}, tau={c['stats']['tau']}, rounds={c['stats']['rounds']}", file=sys.stderr)
    return 0


def _generate_remote(a) -> int:
    """The gRPC client of a running deployment (`dspark serve router` / `make run`)."""
    import grpc

    from dspark.v1 import generation_pb2 as gpb
    from dspark.v1 import generation_pb2_grpc

    req = gpb.GenerateRequest(
        prompt=a.prompt, max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, n=a.n
    )
    if a.seed is not None:
        req.seed = a.seed
    if a.policy:
        req.policy = a.policy
    key = a.api_key or os.environ.get("DSPARK_API_KEY")
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    with grpc.insecure_channel(a.server) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        try:
            r = stub.Generate(req, metadata=metadata, timeout=a.timeout)
        except grpc.RpcError as e:
            print(f"dspark: error from {a.server}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    choices = [
        _choice(
            c.text,
            c.token_ids,
            c.finish_reason,
            c.stats.tau,
            c.stats.rounds,
            c.stats.drafted,
            c.stats.budget,
            c.stats.accepted,
            c.stats.accepted_per_position,
        )
        for c in r.choices
    ]
    return _print_choices(a, choices)


# -- dspark serve ------------------------------------------------------------------------------------------------


def _env(name: str, default=None):
    value = os.environ.get(f"DSPARK_{name}", default)
    # Kubernetes gives every pod <SERVICE>_PORT=tcp://IP:PORT for each Service of its namespace: with a release named
    # dspark the Service dspark-verifier sets DSPARK_VERIFIER_PORT to such a link, which is not a port of ours
    if name.endswith("PORT") and isinstance(value, str) and value.startswith(("tcp://", "udp://", "sctp://")):
        return default
    return value


def _server_config(a):
    from dspark.serving.grpc_server import ServerConfig

    return ServerConfig(
        address=f"{a.host}:{a.port}", max_message_mb=a.max_message_mb, session_ttl_s=a.session_ttl, drain_s=a.drain
    )


def cmd_serve(a) -> int:
    import logging

    logging.basicConfig(level=os.environ.get("DSPARK_LOG", "INFO"), format="%(asctime)s %(name)s %(message)s")
    if a.service == "verifier":
        from dspark.stack.serve import serve_verifier

        return serve_verifier(
            _engine_config(a), _server_config(a), a.drafter, a.sps_profile, a.metrics_port, a.feature_dtype
        )
    if a.service == "draft":
        from dspark.stack.serve import serve_draft

        return serve_draft(_engine_config(a), _server_config(a), a.drafter, a.max_support, a.metrics_port)
    if a.service == "local":
        from dspark.stack.launcher import StackConfig, run_local

        stack = StackConfig(
            _engine_config(a),
            drafter=a.drafter,
            sps_profile=a.sps_profile,
            policy=a.policy,
            verifier_port=a.verifier_port,
            draft_port=a.draft_port,
            grpc_port=a.grpc_port,
            http_port=a.http_port,
            max_queue=a.max_queue,
            no_ray=a.no_ray,
            wait=a.wait,
        )
        return run_local(stack)
    from dspark.router.serve import serve_router

    return serve_router(a)


def cmd_models(a) -> int:
    from dspark.models.model_store import model_dir

    if a.prepare:
        print(model_dir(a.prepare))
        return 0
    for spec in REGISTRY.values():
        tag = " (default)" if spec.name == DEFAULT_MODEL else ""
        print(f"{spec.name:22s} {spec.hf_name}{tag}\n{'':22s} {spec.notes}")
    return 0


def cmd_health(a) -> int:
    from dspark.serving.health import check

    r = check(a.address, a.service, a.timeout)
    print(f"{a.address}{'/' + a.service if a.service else ''}: {r.status}{': ' + r.detail if r.detail else ''}")
    return r.code


def cmd_profile(a) -> int:
    import math
    from dataclasses import replace
    from pathlib import Path

    from dspark.core import sps_profile
    from dspark.core.engine import TargetEngine

    config = replace(_engine_config(a), max_requests=max(a.max_requests, math.ceil(a.max_b / sps_profile.BLOCK)))
    engine = TargetEngine(config)
    key = sps_profile.ProfileKey.of(engine)
    sizes = sps_profile.quick_sizes(a.max_b) if a.quick else sps_profile.full_sizes(a.max_b)
    print(f"dspark profile: {key}, {len(sizes)} batch sizes up to B={a.max_b}, context {a.context}", flush=True)
    rows = sps_profile.measure(engine, sizes, a.context, a.repeats, log=lambda m: print(m, flush=True))
    shapes = sps_profile.row_shapes(a.max_requests)
    print(f"dspark profile: {len(shapes)} shapes of R = 2..{a.max_requests} rows (--max-requests)", flush=True)
    by_rows = sps_profile.measure_shapes(engine, shapes, a.context, a.repeats, log=lambda m: print(m, flush=True))
    path = Path(a.out) if a.out else sps_profile.default_path(key)
    sps_profile.save(path, key, rows, a.context, "quick" if a.quick else "full", by_rows)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    if a.no_drafter:
        return 0
    from dspark.drafter import cost_profile
    from dspark.drafter.checkpoint import default_drafter_path, load_trained_drafter
    from dspark.drafter.proposer import DSparkProposer

    drafter_path = Path(a.drafter) if a.drafter else default_drafter_path(config.model)
    drafter = load_trained_drafter(drafter_path, engine.model, engine.tokenizer)
    drafter.use_linear_kernel(config.linear_kernel)
    proposer = DSparkProposer(drafter, max_support=a.max_support or None)
    dkey = cost_profile.DraftCostKey.of(proposer, drafter_path.name)
    draft_rows = cost_profile.quick_rows(a.max_rows) if a.quick else cost_profile.full_rows(a.max_rows)
    print(f"dspark profile: drafter {dkey}, R up to {a.max_rows}, K = 1..{proposer.gamma}", flush=True)
    drows = cost_profile.measure(proposer, draft_rows, a.context, a.repeats, log=lambda m: print(m, flush=True))
    dpath = cost_profile.default_path(dkey) if not a.out else path.with_name(path.stem + "-draft.json")
    cost_profile.save(dpath, dkey, drows, a.context, "quick" if a.quick else "full", a.max_support)
    print(f"wrote {dpath} and {dpath.with_suffix('.png')}")
    return 0


def cmd_draft_vocab(a) -> int:
    import shutil
    from pathlib import Path

    from dspark.drafter.checkpoint import METADATA, default_drafter_path, load_trained_drafter, save_trained_drafter
    from dspark.drafter.vocab import frequent_tokens, token_counts, with_draft_vocab
    from dspark.models.model_store import load_model
    from dspark.models.prompt import eos_token_ids

    src = Path(a.drafter) if a.drafter else default_drafter_path(a.model)
    model, tokenizer = load_model(a.model)
    drafter = load_trained_drafter(src, model, tokenizer)
    counts = token_counts(a.data)
    ids = frequent_tokens(counts, a.size, eos_token_ids(model, tokenizer), drafter.config.vocab_size)
    covered = sum(counts[t] for t in ids) / max(1, sum(counts.values()))
    meta = json.loads((src / METADATA).read_text()) if (src / METADATA).exists() else {}
    extra = {k: v for k, v in meta.items() if k not in ("format_version", "drafter_config", "target")}
    extra["draft_vocab"] = {
        "size": len(ids),
        "data": [Path(p).name for p in a.data],
        "response_tokens_covered": covered,
    }
    out = Path(a.out)
    dtype = str(next(iter(drafter.drafter_state_dict().values())).dtype).removeprefix("torch.")
    dtype = meta.get("train_config", {}).get("weights_dtype", dtype)
    save_trained_drafter(
        with_draft_vocab(drafter, ids),
        out,
        meta["target"]["model"],
        meta["target"]["fingerprint"],
        extra=extra,
        dtype=dtype,
    )
    for f in src.iterdir():  # the model card and plots travel with the weights
        if f.suffix in (".md", ".png") and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    print(f"wrote {out}: {len(ids)} draft tokens covering {100 * covered:.2f}% of the response tokens in the data")
    return 0


def cmd_bench_policies(a) -> int:
    from dspark.bench.policies import run

    run(a, _engine_config(a))
    return 0


def cmd_bench_services(a) -> int:
    from dspark.bench.services import run

    run(a, _engine_config(a))
    return 0


def cmd_bench_engine(a) -> int:
    from dspark.bench.engine import run

    run(_engine_config(a), a)
    return 0


def cmd_data(a) -> int:
    from pathlib import Path

    from dspark.core.sampling import SamplingParams
    from dspark.drafter.data import regenerate, training_prompts
    from dspark.models.model_store import dspark_home
    from dspark.models.registry import REGISTRY
    from dspark.runtime import build_decoder

    spec = REGISTRY.get(a.model)
    params = SamplingParams(
        temperature=a.temperature if a.temperature is not None else (spec.temperature if spec else 0.7),
        top_p=a.top_p if a.top_p is not None else (spec.top_p if spec else 0.9),
        top_k=spec.top_k if spec else 0,
        max_tokens=a.max_tokens,
    )
    prompts = training_prompts(a.files)
    random.Random(a.seed).shuffle(prompts)  # a partial (resumed) run still covers every domain
    prompts = prompts[: a.limit]
    out = Path(a.out) if a.out else dspark_home() / "data" / f"{Path(a.model).name}.jsonl"
    dec = build_decoder(_engine_config(a))
    n = regenerate(dec, prompts, out, params, seed=a.seed)
    print(f"wrote {n} responses to {out} ({params.temperature=}, {params.top_p=}, {params.top_k=})")
    return 0


# -- dspark train ------------------------------------------------------------------------------------------------


def cmd_train(a) -> int:
    from pathlib import Path

    from dspark.drafter.train import TrainConfig, train
    from dspark.models.model_store import dspark_home

    overrides = {}
    keys = ("model", "device", "dtype", "steps", "sequential_head", "markov_rank", "max_examples", "threads")
    keys += ("init_from", "lr", "warmup", "init_layers", "position_decay", "kl_warmup", "gamma", "draft_vocab")
    for key in (*keys, "autocast"):
        if getattr(a, key) is not None:
            overrides[key] = getattr(a, key)
    cfg = TrainConfig.preset(a.config, **overrides)
    out = Path(a.out) if a.out else dspark_home() / "drafters" / f"{Path(cfg.model).name}-{a.config}"
    r = train(cfg, a.data, out, resume=a.resume, stop_after=a.stop_after)
    if r.step < cfg.steps:
        print(f"stopped after step {r.step} of {cfg.steps}; continue with --resume")
        return 0
    cal = r.log.get("calibration") or {}
    ev = r.log["eval"][-1] if r.log["eval"] else {}
    print(
        f"drafter in {out} after {r.step} steps: eval loss {ev.get('loss', float('nan')):.4f}, "
        f"verified tau {cal.get('tau', float('nan')):.3f} at T={cal.get('temperature')}"
    )
    return 0


# -- dspark eval -------------------------------------------------------------------------------------------------


def cmd_eval(a) -> int:
    from dspark.drafter.evaluate import run_eval

    run_eval(a)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dspark", description="DSpark speculative decoding")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text in this process, or on a running deployment with --server")
    _engine_args(g)
    where = g.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run in this process (the default)")
    where.add_argument("--server", default=None, metavar="HOST:PORT", help="a router's gRPC endpoint instead")
    g.add_argument("--api-key", default=None, help="bearer token for --server (default: $DSPARK_API_KEY)")
    g.add_argument("--timeout", type=float, default=600.0, help="--server deadline in seconds")
    g.add_argument("--policy", default=None, choices=POLICIES, help="verification policy (default: dspark)")
    g.add_argument("--drafter", default=None, help="`dspark train` output folder (default: shipped one for --model)")
    g.add_argument("--draft", default=None, help="an independent draft LM instead (registry name, or 'self')")
    g.add_argument("--num-draft", type=int, default=None, help="draft tokens per round (default: drafter's gamma)")
    g.add_argument("--threshold", type=float, default=0.5, help="survival threshold of the threshold policy")
    g.add_argument("--sps-profile", default=None, help="SPS table JSON (default: the one for this model/device)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true")
    g.add_argument("prompt")
    g.set_defaults(fn=cmd_generate)

    m = sub.add_parser("models", help="list registry models, or --prepare NAME to convert and cache one")
    m.add_argument("--prepare", default=None)
    m.set_defaults(fn=cmd_models)

    h = sub.add_parser("health", help="gRPC health check of a verifier or draft service; exit 0 = SERVING (probes)")
    h.add_argument("address", metavar="HOST:PORT")
    h.add_argument("--service", default="", help="a service name to check (default: the whole server)")
    h.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    h.set_defaults(fn=cmd_health)

    b = sub.add_parser("bench-engine", help="engine benchmark: SPS(B), plain vs transformers, speculative")
    _engine_args(b)
    b.add_argument("--draft", default="self", help="independent draft LM for the speculative row")
    b.add_argument("--num-draft", type=int, default=4)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--prompts", type=int, default=4)
    b.add_argument("--max-b", type=int, default=256)
    b.add_argument("--out", default="bench-results/engine.json")
    b.set_defaults(fn=cmd_bench_engine)

    pr = sub.add_parser("profile", help="measure the verifier's steps/s SPS(B) for B = 1..B_max; save JSON + PNG")
    _engine_args(pr)
    pr.add_argument("--max-b", type=int, default=256, help="largest total query tokens per forward")
    pr.add_argument("--quick", action="store_true", help="every B to 16, then ~12%% apart (what start-up does)")
    pr.add_argument("--context", type=int, default=128, help="cached tokens per request")
    pr.add_argument("--repeats", type=int, default=3, help="timed forwards per B (the median is kept)")
    pr.add_argument("--out", default=None, help="JSON path (default: $DSPARK_HOME/profiles/, where serving looks)")
    pr.add_argument("--drafter", default=None, help="drafter to profile (default: the shipped one for --model)")
    pr.add_argument("--no-drafter", action="store_true", help="profile the verifier only")
    pr.add_argument("--max-rows", type=int, default=32, help="largest number of requests one draft call drafts")
    pr.add_argument("--max-support", type=int, default=64, help="the draft service's support cap (0: none)")
    pr.set_defaults(fn=cmd_profile)

    bp = sub.add_parser("bench-policies", help="every verification policy over a concurrency sweep (JSON + PNGs)")
    _engine_args(bp)
    bp.set_defaults(max_requests=32)
    bp.add_argument("--drafter", default=None, help="`dspark train` output folder (default: shipped one for --model)")
    bp.add_argument("--policies", nargs="+", default=["autoregressive", "fixed", "threshold", "dspark", "dspark-async"])
    bp.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    bp.add_argument("--requests-per-level", type=int, default=None, help="default: max(4, 2 x concurrency)")
    bp.add_argument("--max-tokens", type=int, default=64)
    bp.add_argument("--repeats", type=int, default=2, help="runs per policy and level, interleaved; rows pool them")
    bp.add_argument("--max-prompt", type=int, default=256, help="prompts keep their last N tokens")
    bp.add_argument("--temperature", type=float, default=1.0)
    bp.add_argument("--seed", type=int, default=0)
    bp.add_argument("--sps-profile", default=None, help="SPS table JSON (default: the one for this model/device)")
    bp.add_argument("--out", default="bench-results/policies")
    bp.set_defaults(fn=cmd_bench_policies)

    bs = sub.add_parser(
        "bench-services", help="in-process vs disaggregated (verifier, draft, router processes): latency, throughput"
    )
    _engine_args(bs)
    bs.add_argument("--drafter", default=None, help="`dspark train` output folder (default: shipped one for --model)")
    bs.add_argument("--policy", default="dspark", choices=POLICIES)
    bs.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    bs.add_argument("--requests", type=int, default=None, help="prompts per level (default: max(4, 2 x concurrency))")
    bs.add_argument("--repeats", type=int, default=2, help="runs of each mode per level, interleaved")
    bs.add_argument("--max-tokens", type=int, default=64)
    bs.add_argument("--max-prompt", type=int, default=256, help="prompts keep their last N tokens")
    bs.add_argument("--temperature", type=float, default=0.0, help="0: both modes must give identical outputs")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--sps-profile", default=None, help="SPS table JSON (default: the one for this model/device)")
    bs.add_argument("--no-baseline", action="store_true", help="skip plain decoding through the same services")
    bs.add_argument("--ray", action="store_true", help="the router on Ray Serve (default: --no-ray, same decode loop)")
    bs.add_argument("--wait", type=float, default=600.0, help="seconds each service may take to become healthy")
    bs.add_argument("--timeout", type=float, default=600.0, help="deadline of each gRPC call")
    bs.add_argument("--out", default="bench-results/services")
    bs.set_defaults(fn=cmd_bench_services)

    d = sub.add_parser("data", help="regenerate drafter training responses with the target (resumable)")
    _engine_args(d)
    d.add_argument("--files", nargs="*", default=None, help="prompt JSONL files (default: the shipped train sets)")
    d.add_argument("--limit", type=int, default=None, help="first N prompts only")
    d.add_argument("--max-tokens", type=int, default=256)
    d.add_argument("--temperature", type=float, default=None, help="default: the model's recommended")
    d.add_argument("--top-p", type=float, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default=None, help="JSONL output (default: $DSPARK_HOME/data/MODEL.jsonl)")
    d.set_defaults(fn=cmd_data)

    t = sub.add_parser("train", help="train a DSpark drafter on `dspark data` output (resumable)")
    t.add_argument("--data", nargs="+", required=True, help="JSONL files written by `dspark data` (.gz too)")
    t.add_argument(
        "--config", required=True, choices=["tiny", "cpu-small", "cpu-medium", "full"], help="training preset"
    )
    t.add_argument("--out", default=None, help="output folder (default: $DSPARK_HOME/drafters/MODEL-CONFIG)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: the preset's)")
    t.add_argument("--sequential-head", default=None, choices=["markov", "rnn", "none"], help="'none': ablation")
    t.add_argument("--markov-rank", type=int, default=None, help="rank r of the Markov head (default: the preset's)")
    t.add_argument("--max-examples", type=int, default=None, help="use the first N examples of --data")
    t.add_argument("--stop-after", type=int, default=None, help="end this run after N steps (resume later)")
    t.add_argument(
        "--init-from",
        default=None,
        help="fine-tune: start from this trained drafter (folder or .safetensors), keeping its draft vocabulary",
    )
    t.add_argument(
        "--init-layers",
        default=None,
        choices=["random", "target"],
        help="'target': draft layers start as the target's last layers (default: random, as DeepSpec)",
    )
    t.add_argument(
        "--position-decay", type=float, default=None, help="loss weights exp(-(k-1)/D) (default: gamma, the paper's)"
    )
    t.add_argument("--kl-warmup", type=int, default=None, help="first N steps on forward KL instead of TV")
    t.add_argument("--gamma", type=int, default=None, help="block size: draft tokens per round (default: 7)")
    t.add_argument("--draft-vocab", type=int, default=None, help="draft vocabulary size (0: all; default: preset's)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    t.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: the preset's)")
    t.add_argument("--model", default=None, help="target (default: the preset's, the default model)")
    t.add_argument("--device", default=None, help="torch device (default: the preset's)")
    t.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="target weights")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument(
        "--autocast", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: the preset's)"
    )
    t.set_defaults(fn=cmd_train)

    dv = sub.add_parser("draft-vocab", help="restrict a trained drafter to the N most frequent response tokens")
    dv.add_argument("--model", default=DEFAULT_MODEL, help="the target (registry name, HF folder or .gguf)")
    dv.add_argument("--drafter", default=None, help="`dspark train` output folder (default: shipped one for --model)")
    dv.add_argument("--data", nargs="+", required=True, help="`dspark data` JSONL files (.gz too) to count tokens in")
    dv.add_argument("--size", type=int, required=True, help="N, tokens in the draft vocabulary (EOS always kept)")
    dv.add_argument("--out", required=True, help="folder for the restricted drafter")
    dv.set_defaults(fn=cmd_draft_vocab)

    e = sub.add_parser("eval", help="speculative decoding with a DSpark drafter on eval sets: tau, acceptance, ECE/AUC")
    _engine_args(e)
    e.add_argument("--drafter", default=None, help="`dspark train` output folder (default: shipped one for --model)")
    e.add_argument("--datasets", nargs="+", required=True, help="shipped eval set names or JSONL files with 'turns'")
    e.add_argument("--gamma", type=int, default=None, help="drafts per round (default: the drafter's block size)")
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--max-tokens", type=int, default=256)
    e.add_argument("--limit", type=int, default=None, help="first N records of each dataset")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.add_argument("--out", default=None, help="folder for eval.json and the plots")
    e.set_defaults(fn=cmd_eval)

    sv = sub.add_parser("serve", help="run one piece of the distributed deployment: verifier, draft or router")
    svs = sv.add_subparsers(dest="service", required=True)
    for name, port, metrics_port, what in [
        ("verifier", 50061, 9461, "the target model: prefill + batched verification (gRPC)"),
        ("draft", 50062, 9462, "the DSpark drafter (gRPC)"),
    ]:
        p = svs.add_parser(name, help=what)
        _engine_args(p)
        p.add_argument("--drafter", default=_env("DRAFTER"), help="`dspark train` output (default: the shipped one)")
        p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address (internal: a private network)")
        p.add_argument("--port", type=int, default=int(_env(f"{name.upper()}_PORT", port)))
        p.add_argument("--max-message-mb", type=int, default=64, help="gRPC message size limit, both directions")
        p.add_argument("--session-ttl", type=float, default=600.0, help="release sessions idle this many seconds")
        p.add_argument("--drain", type=float, default=10.0, help="seconds running calls get after SIGTERM")
        p.add_argument(
            "--metrics-port",
            type=int,
            default=int(_env(f"{name.upper()}_METRICS_PORT", metrics_port)),
            help="Prometheus /metrics port (0 = off)",
        )
        if name == "verifier":
            p.add_argument("--sps-profile", default=None, help="SPS table JSON (default: the one for this model)")
            p.add_argument(
                "--feature-dtype",
                default=None,
                choices=["float32", "bfloat16", "float16"],
                help="dtype of the features sent to the drafter (default: the target's; 16-bit halves the traffic)",
            )
        else:
            p.add_argument("--max-support", type=int, default=64, help="draft distribution support cap (0 = none)")
        p.set_defaults(fn=cmd_serve)
    r = svs.add_parser("router", help="the Ray Serve router: decode loop, public gRPC + OpenAI HTTP APIs")
    r.add_argument(
        "--verifier",
        default=_env("VERIFIER", "127.0.0.1:50061"),
        help="verifier host:port; comma-separated for replicas; k8s://[namespace/]service[:port]: every ready pod",
    )
    r.add_argument(
        "--draft", default=_env("DRAFT", "127.0.0.1:50062"), help="draft host:port[,...] or k8s://... ('' = none)"
    )
    r.add_argument("--model", default=_env("MODEL"), help="tokenizer (default: the verifier's model)")
    r.add_argument("--policy", default=_env("POLICY", "dspark"), choices=POLICIES)
    r.add_argument("--num-draft", type=int, default=None, help="draft tokens per round (default: drafter's gamma)")
    r.add_argument("--threshold", type=float, default=0.5)
    r.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask for")
    r.add_argument("--max-queue", type=int, default=1024, help="requests in flight (choices) before RESOURCE_EXHAUSTED")
    r.add_argument(
        "--verifier-recover-s",
        type=float,
        default=60.0,
        help="how long a round waits for a lost verifier before its requests fail with UNAVAILABLE",
    )
    r.add_argument("--draft-retry-s", type=float, default=1.0, help="plain decoding this long after the drafter fails")
    r.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger HTTP bodies get 413 before parsing")
    r.add_argument("--api-key", default=_env("API_KEY"), help="bearer token the public API requires")
    r.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    r.add_argument("--http-port", type=int, default=int(_env("HTTP_PORT", 8000)))
    r.add_argument("--grpc-port", type=int, default=int(_env("GRPC_PORT", 50051)))
    r.add_argument("--replicas", type=int, default=1, help="router replicas (autoscaling: deploy/serve.yaml)")
    r.add_argument(
        "--drain", type=float, default=30.0, help="on SIGTERM: seconds running requests get before the router stops"
    )
    r.add_argument("--no-ray", action="store_true", help="serve from this process without Ray Serve")
    r.add_argument(
        "--config",
        default=_env("SERVE_CONFIG"),
        help="Ray Serve: a Serve config file (deploy/serve.yaml's shape, ${VAR}s from the environment), not the flags",
    )
    r.set_defaults(fn=cmd_serve)
    lo = svs.add_parser("local", help="verifier + draft + router on this machine, until Ctrl-C (make run)")
    _engine_args(lo)
    lo.add_argument("--drafter", default=_env("DRAFTER"), help="`dspark train` output (default: the shipped one)")
    lo.add_argument("--policy", default="dspark", choices=POLICIES)
    lo.add_argument("--sps-profile", default=None, help="the verifier's SPS table JSON (default: per model/device)")
    lo.add_argument("--verifier-port", type=int, default=50061)
    lo.add_argument("--draft-port", type=int, default=50062)
    lo.add_argument("--grpc-port", type=int, default=50051)
    lo.add_argument("--http-port", type=int, default=8000)
    lo.add_argument("--max-queue", type=int, default=1024, help="the router's requests in flight (choices) limit")
    lo.add_argument("--wait", type=float, default=600.0, help="seconds each piece may take to become healthy")
    lo.add_argument("--no-ray", action="store_true", help="router without Ray Serve")
    lo.set_defaults(fn=cmd_serve)

    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"dspark: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
