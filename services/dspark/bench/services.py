"""`make bench-services`: the same eval prompts in this process and through the disaggregated deployment (verifier,
draft service and router as real local processes, called through the public gRPC API), at concurrency 1 and 8.

Closed loop: at concurrency c, c requests are in flight and each finished one is replaced by the next until all are
done. The two modes run interleaved at each level (A B, then B A on the next repeat), so machine drift hits both
alike. Per mode and concurrency: throughput (output tokens / wall time), per-token latency (each request's latency
divided by its output tokens; mean, p50, p90), mean request latency and tau. Ratios are disaggregated / in-process of
the same run; the goal (issue 5) is a per-token latency within 15% of in-process at concurrency 1 on the default
model. Both modes decode the same way (same drafter, SPS table, policy and seeds), so at temperature 0 their outputs
must be identical; the run checks it. Writes services.json and prints a table.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dspark.bench.policies import closed_loop, eval_prompts, round_breakdown
from dspark.core.decoding import LoopTimes
from dspark.core.proposer import DraftTimes
from dspark.core.sampling import SamplingParams
from dspark.stack.port import free_port

IN_PROCESS, DISAGGREGATED = "in-process", "disaggregated"
SERVED_PLAIN = "served-plain"  # the same stack, each request on the autoregressive policy: the baseline
GOAL_LATENCY_RATIO = 1.15  # disaggregated per-token latency at concurrency 1, relative to in-process


@dataclass(frozen=True)
class Sample:
    """One finished request."""

    index: int  # the prompt
    tokens: int  # output tokens
    seconds: float  # submitted -> finished
    rounds: int
    accepted: int  # draft tokens accepted
    token_ids: tuple[int, ...]


# -- pure: statistics, ratios, table ----------------------------------------------------------------------------------


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(mode: str, concurrency: int, runs: list[tuple[list[Sample], float]]) -> dict:
    """One row from the repeats of one mode at one concurrency: (samples, wall seconds) per repeat."""
    samples = [s for ss, _ in runs for s in ss]
    wall = sum(w for _, w in runs)
    tokens = sum(s.tokens for s in samples)
    per_token = [1000.0 * s.seconds / s.tokens for s in samples if s.tokens]
    rounds = sum(s.rounds for s in samples)
    return {
        "mode": mode,
        "concurrency": concurrency,
        "requests": len(samples),
        "tokens": tokens,
        "wall_s": wall,
        "throughput_tps": tokens / wall if wall > 0 else 0.0,
        "ms_per_token": statistics.mean(per_token) if per_token else 0.0,
        "ms_per_token_p50": _quantile(per_token, 0.5) if per_token else 0.0,
        "ms_per_token_p90": _quantile(per_token, 0.9) if per_token else 0.0,
        "request_s": statistics.mean(s.seconds for s in samples) if samples else 0.0,
        "tau": (sum(s.accepted for s in samples) + rounds) / rounds if rounds else 0.0,
    }


def ratios(rows: list[dict]) -> list[dict]:
    """Disaggregated / in-process at each concurrency both modes ran: per-token latency (lower is better, so a ratio
    above 1 is overhead) and throughput (above 1 is better)."""
    at = {(r["mode"], r["concurrency"]): r for r in rows}
    out = []
    for c in sorted({r["concurrency"] for r in rows}):
        local, remote = at.get((IN_PROCESS, c)), at.get((DISAGGREGATED, c))
        if local is None or remote is None:
            continue
        out.append(
            {
                "concurrency": c,
                "ms_per_token": remote["ms_per_token"] / local["ms_per_token"] if local["ms_per_token"] else None,
                "throughput": remote["throughput_tps"] / local["throughput_tps"] if local["throughput_tps"] else None,
            }
        )
    return out


def versus_plain(rows: list[dict]) -> dict[int, float]:
    """Throughput of the policy through the services / plain decoding through the same services, per level."""
    at = {(r["mode"], r["concurrency"]): r for r in rows}
    return {
        c: at[DISAGGREGATED, c]["throughput_tps"] / at[SERVED_PLAIN, c]["throughput_tps"]
        for c in sorted({r["concurrency"] for r in rows})
        if (DISAGGREGATED, c) in at and at.get((SERVED_PLAIN, c), {}).get("throughput_tps")
    }


def goals(ratio_rows: list[dict]) -> dict:
    c1 = next((r for r in ratio_rows if r["concurrency"] == 1), None)
    if c1 is None or c1["ms_per_token"] is None:
        return {}
    return {
        "c1_ms_per_token_ratio": c1["ms_per_token"],
        "c1_throughput_ratio": c1["throughput"],
        f"c1_within_{round(100 * (GOAL_LATENCY_RATIO - 1))}pct": c1["ms_per_token"] <= GOAL_LATENCY_RATIO,
    }


def format_table(rows: list[dict], ratio_rows: list[dict]) -> str:
    head = (
        f"{'mode':14s} {'conc':>4s} {'reqs':>4s} {'tok/s':>8s} {'ms/token':>8s} {'p50':>7s} {'p90':>7s} "
        f"{'req s':>7s} {'tau':>5s}"
    )
    lines = [head]
    by_c = {r["concurrency"]: r for r in ratio_rows}
    for c in sorted({r["concurrency"] for r in rows}):
        for r in (r for r in rows if r["concurrency"] == c):
            lines.append(
                f"{r['mode']:14s} {c:4d} {r['requests']:4d} {r['throughput_tps']:8.2f} {r['ms_per_token']:8.1f} "
                f"{r['ms_per_token_p50']:7.1f} {r['ms_per_token_p90']:7.1f} {r['request_s']:7.2f} {r['tau']:5.2f}"
            )
        q = by_c.get(c)
        if q is not None:
            tps = "-" if q["throughput"] is None else f"{q['throughput']:.3f}x"
            lat = "-" if q["ms_per_token"] is None else f"{q['ms_per_token']:.3f}x"
            lines.append(f"{'dis / in':14s} {c:4d} {'':4s} {tps:>8s} {lat:>8s}")
        vp = versus_plain(rows).get(c)
        if vp is not None:
            lines.append(f"{'dis / plain':14s} {c:4d} {'':4s} {vp:7.3f}x")
    return "\n".join(lines)


# what the services' /metrics say about a run, as deltas: (metric sample name, labels) per column
SERVICE_PHASES = {
    "draft_ms": ("router", "dspark_round_seconds_sum", {"phase": "draft"}),  # the router's Draft call
    "verify_ms": ("router", "dspark_round_seconds_sum", {"phase": "verify"}),  # the router's Verify call
    "other_ms": ("router", "dspark_round_seconds_sum", {"phase": "other"}),  # the router's own work in the round
    "draft_context_ms": ("draft", "dspark_draft_phase_seconds_sum", {"phase": "context"}),
    "draft_backbone_ms": ("draft", "dspark_draft_phase_seconds_sum", {"phase": "backbone"}),
    "draft_head_ms": ("draft", "dspark_draft_phase_seconds_sum", {"phase": "head"}),
    "verify_service_ms": ("verifier", "dspark_rpc_seconds_sum", {"service": "verifier", "method": "verify"}),
}
ROUNDS = ("router", "dspark_rounds_total", {})


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text exposition -> {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def service_breakdown(before: dict[str, dict], after: dict[str, dict]) -> dict[str, float]:
    """Per router round, from two scrapes of each service ({"router" | "draft" | "verifier": parse_metrics(...)}):
    the router's draft call, verify call and other work; the draft service's compute phases; what the verifier
    service spent in Verify calls (its queue included). The draft call less the draft service's phases is the draft
    wire (RPC, serialisation, queue); the verify call less the service's is the verify wire."""

    def delta(where, name, labels):
        key = (name, frozenset(labels.items()))
        return after.get(where, {}).get(key, 0.0) - before.get(where, {}).get(key, 0.0)

    rounds = delta(*ROUNDS)
    if rounds <= 0:
        return {}
    out = {col: 1000.0 * delta(*spec) / rounds for col, spec in SERVICE_PHASES.items()}
    compute = out["draft_context_ms"] + out["draft_backbone_ms"] + out["draft_head_ms"]
    out["draft_wire_ms"] = max(0.0, out["draft_ms"] - compute)
    out["verify_wire_ms"] = max(0.0, out["verify_ms"] - out["verify_service_ms"])
    out["rounds"] = rounds
    return out


def format_breakdown(rows: list[dict]) -> str:
    """Milliseconds per round, by phase, for the rows that have a breakdown."""
    cols = ("draft_ms", "draft_context_ms", "draft_backbone_ms", "draft_head_ms", "draft_wire_ms", "verify_ms")
    cols += ("verify_wire_ms", "other_ms")
    names = ("draft", "ctx", "bb", "head", "d-wire", "verify", "v-wire", "other")
    lines = [f"{'ms per round':14s} {'conc':>4s} " + " ".join(f"{n:>6s}" for n in names)]
    for r in rows:
        b = r.get("per_round_ms")
        if b:
            lines.append(f"{r['mode']:14s} {r['concurrency']:4d} " + " ".join(f"{b.get(c, 0.0):6.1f}" for c in cols))
    return "\n".join(lines)


def matching(a: list[Sample], b: list[Sample]) -> float:
    """Fraction of prompts whose outputs are identical in both lists (by prompt index; first sample of each)."""
    first_a, first_b = {}, {}
    for s in a:
        first_a.setdefault(s.index, s.token_ids)
    for s in b:
        first_b.setdefault(s.index, s.token_ids)
    common = set(first_a) & set(first_b)
    return sum(first_a[i] == first_b[i] for i in common) / len(common) if common else 0.0


# -- the two modes --------------------------------------------------------------------------------------------------


def run_in_process(dec, prompts: list[list[int]], params: list[SamplingParams], concurrency: int, tag: str):
    """All prompts through the Decoder in this process at `concurrency` in flight: (samples, wall seconds)."""
    runs, wall = closed_loop(dec, prompts, params, concurrency, tag)
    samples = [Sample(i, len(c.token_ids), t, c.stats.rounds, c.stats.accepted, tuple(c.token_ids)) for i, c, t in runs]
    return samples, wall


def run_remote(
    stub, prompts: list[list[int]], params: list[SamplingParams], concurrency: int, timeout_s: float, policy: str = ""
):
    """All prompts through the router's GenerationService.Generate, `concurrency` calls in flight: (samples, wall).
    policy: the per-request policy ("": the router's own)."""
    from dspark.v1 import generation_pb2 as gpb

    queue = list(range(len(prompts)))
    lock = threading.Lock()
    out: list[Sample] = []

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            p = params[i]
            req = gpb.GenerateRequest(
                prompt_token_ids=prompts[i],
                max_tokens=p.max_tokens,
                temperature=p.temperature,
                ignore_eos=True,
                policy=policy,
            )
            if p.seed is not None:
                req.seed = p.seed
            t0 = time.perf_counter()
            c = stub.Generate(req, timeout=timeout_s).choices[0]
            sample = Sample(
                i, len(c.token_ids), time.perf_counter() - t0, c.stats.rounds, c.stats.accepted, tuple(c.token_ids)
            )
            with lock:
                out.append(sample)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(min(concurrency, len(prompts)))]:
            f.result()
    return out, time.perf_counter() - start


def scrape(urls: dict[str, str]) -> dict[str, dict]:
    """Each service's /metrics, parsed; a service that does not answer gives {}."""
    import urllib.request

    out = {}
    for where, url in urls.items():
        try:
            with urllib.request.urlopen(url, timeout=5) as f:
                out[where] = parse_metrics(f.read().decode())
        except OSError:
            out[where] = {}
    return out


def run(a, config) -> dict:
    import grpc
    import torch

    from dspark.core import sps_profile
    from dspark.models.model_store import dspark_home
    from dspark.runtime import build_dspark_decoder
    from dspark.stack.launcher import StackConfig, local_stack
    from dspark.v1 import generation_pb2_grpc

    levels = sorted(set(a.concurrency))
    log = lambda m: print(m, flush=True)  # noqa: E731
    # in this process first: it loads (or quick-profiles and saves) the SPS table the verifier then loads too
    dec = build_dspark_decoder(config, a.drafter, policy=a.policy, sps_profile_path=a.sps_profile, log=log)
    if dec.engine.config.max_requests < max(levels):
        raise ValueError(f"--max-requests {dec.engine.config.max_requests} is below concurrency {max(levels)}")
    threads = torch.get_num_threads()  # the verifier and draft service get as many as this process has
    sps_path = a.sps_profile or str(sps_profile.default_path(sps_profile.ProfileKey.of(dec.engine)))
    n_max = max(a.requests or max(4, 2 * c) for c in levels)
    prompts = eval_prompts(dec.engine.tokenizer, n_max, a.max_prompt)
    params = [
        SamplingParams(temperature=a.temperature, max_tokens=a.max_tokens, ignore_eos=True, seed=a.seed + i)
        for i in range(n_max)
    ]
    stack = StackConfig(
        replace(config, threads=threads),
        drafter=a.drafter,
        sps_profile=sps_path,
        policy=a.policy,
        verifier_port=free_port(),
        draft_port=free_port(),
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_ports=(free_port(), free_port()),
        no_ray=not a.ray,
        wait=a.wait,
    )
    logs = dspark_home() / "logs" / "bench-services"
    runs: dict[tuple[str, int], list[tuple[list[Sample], float]]] = {}
    scrapes: dict[tuple[str, int], list[tuple[dict, dict]]] = {}  # (before, after) of each run through the stack
    draft_times: dict[tuple[str, int], list] = {}  # in process: (LoopTimes, DraftTimes, wall) of each run
    urls = {
        "router": f"http://127.0.0.1:{stack.http_port}/metrics",
        "verifier": f"http://127.0.0.1:{stack.metrics_ports[0]}/metrics",
        "draft": f"http://127.0.0.1:{stack.metrics_ports[1]}/metrics",
    }
    with local_stack(stack, logs, log=log):
        with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            warm = [SamplingParams(temperature=a.temperature, max_tokens=min(8, a.max_tokens), ignore_eos=True)] * 2
            run_in_process(dec, prompts[:2], warm, 2, "warm")
            run_remote(stub, prompts[:2], warm, 2, a.timeout)
            modes = {
                IN_PROCESS: lambda ps, c, tag: run_in_process(dec, ps, params, c, tag),
                DISAGGREGATED: lambda ps, c, tag: run_remote(stub, ps, params, c, a.timeout),
            }
            if a.policy != "autoregressive" and not a.no_baseline:
                modes[SERVED_PLAIN] = lambda ps, c, tag: run_remote(stub, ps, params, c, a.timeout, "autoregressive")
            for c in levels:
                n = a.requests or max(4, 2 * c)
                for rep in range(a.repeats):
                    order = list(modes) if rep % 2 == 0 else list(reversed(modes))
                    for mode in order:
                        if mode == IN_PROCESS:  # the decoder's own clocks; the services' come from /metrics
                            ptimes = getattr(dec.proposer, "times", None) or DraftTimes()
                            dec.times, draft_before = LoopTimes(), ptimes.copy()
                            samples, wall = modes[mode](prompts[:n], c, f"{c}-{rep}")
                            spent = ptimes.minus(draft_before)
                            draft_times.setdefault((mode, c), []).append((dec.times, spent, wall))
                        else:
                            before = scrape(urls)
                            samples, wall = modes[mode](prompts[:n], c, f"{c}-{rep}")
                            scrapes.setdefault((mode, c), []).append((before, scrape(urls)))
                        runs.setdefault((mode, c), []).append((samples, wall))
                        row = summarise(mode, c, [(samples, wall)])
                        log(
                            f"  {mode:14s} c={c} repeat {rep}: {row['throughput_tps']:.2f} tok/s, "
                            f"{row['ms_per_token']:.1f} ms/token"
                        )
    rows = [summarise(mode, c, runs[mode, c]) for c in levels for mode in modes]
    for r in rows:
        key = (r["mode"], r["concurrency"])
        if key in scrapes:  # the repeats pooled: the first scrape before, the last after, counters only grow
            r["per_round_ms"] = service_breakdown(scrapes[key][0][0], scrapes[key][-1][1])
        elif key in draft_times:
            loops = draft_times[key]
            loop, spent = LoopTimes(), DraftTimes()
            for lt, d, _ in loops:
                loop, spent = loop.plus(lt), spent.plus(d)
            r["per_round_ms"] = round_breakdown(loop, spent, sum(w for _, _, w in loops))
    same = {
        c: matching(
            [s for ss, _ in runs[IN_PROCESS, c] for s in ss], [s for ss, _ in runs[DISAGGREGATED, c] for s in ss]
        )
        for c in levels
    }
    ratio_rows = ratios(rows)
    result = {
        "config": {**asdict(dec.engine.config), "threads": threads},
        "drafter": str(a.drafter or "shipped"),
        "gamma": dec.num_draft,
        "policy": a.policy,
        "temperature": a.temperature,
        "max_tokens": a.max_tokens,
        "repeats": a.repeats,
        "router": "ray serve" if a.ray else "grpc.aio (--no-ray)",
        "sps_profile": sps_path,
        "rows": rows,
        "ratios": ratio_rows,
        "identical_outputs": same,
        "goals": {**goals(ratio_rows), "throughput_vs_served_plain": versus_plain(rows)},
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "services.json").write_text(json.dumps(result, indent=1))
    print(format_table(rows, ratio_rows))
    print(format_breakdown(rows))
    print("identical outputs (fraction of prompts): " + ", ".join(f"c={c}: {f:.2f}" for c, f in same.items()))
    print(json.dumps(result["goals"], indent=1))
    print(f"wrote {out / 'services.json'}")
    return result
