"""`make bench-policies`: every verification policy at concurrency 1, 2, 4, ... on the eval prompts, in one run.

Closed loop: at concurrency c, c requests are in flight and each finished one is replaced by the next until all
are done. Per policy and concurrency: aggregate tokens/s (all output tokens / wall time), per-user tokens/s (mean
over requests of output tokens / (finish - arrival)), the mean verification budget (draft tokens verified per request
per round), tau (tokens emitted per round, the recovered/bonus token included). Ratios are against the
autoregressive and fixed rows of the same run. Writes JSON and two PNGs: throughput vs per-user speed (paper Fig. 7)
and budget vs concurrency (Fig. 8).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from dspark.core.decoding import Completion, Decoder, LoopTimes
from dspark.core.proposer import DraftTimes
from dspark.core.sampling import SamplingParams
from dspark.core.scheduler import POLICIES
from dspark.drafter.eval_sets import EVAL_SETS, first_turns
from dspark.models.prompt import encode_prompt


def eval_prompts(tokenizer, n: int, max_prompt: int) -> list[list[int]]:
    """n prompts taken round-robin from the shipped eval sets (first turns), each cut to its last max_prompt tokens."""
    per_set = {s: first_turns(s, limit=n) for s in EVAL_SETS}
    texts = [per_set[EVAL_SETS[i % len(EVAL_SETS)]][i // len(EVAL_SETS)] for i in range(n)]
    return [encode_prompt(tokenizer, t)[-max_prompt:] for t in texts]


def closed_loop(
    dec: Decoder, prompts: list[list[int]], params: list[SamplingParams], concurrency: int, tag: str, policy=None
) -> tuple[list[tuple[int, Completion, float]], float]:
    """All prompts through dec with `concurrency` in flight, each finished request replaced by the next:
    ([(prompt index, completion, seconds from arrival to finish)], wall seconds)."""
    queue = list(range(len(prompts)))
    arrival: dict[str, tuple[int, float]] = {}
    out = []

    def submit():
        i = queue.pop(0)
        rid = dec.add_request(prompts[i], params[i], request_id=f"bench-{tag}-{i}", policy=policy)
        arrival[rid] = (i, time.perf_counter())

    start = time.perf_counter()
    for _ in range(min(concurrency, len(queue))):
        submit()
    while dec.has_work:
        for c in dec.step():
            i, t0 = arrival.pop(c.request_id)
            out.append((i, c, time.perf_counter() - t0))
            if queue:
                submit()
    return out, time.perf_counter() - start


def round_breakdown(loop: LoopTimes, draft: DraftTimes | None, wall_s: float) -> dict[str, float]:
    """Milliseconds per round: the draft call (its context, backbone, heads and wire, where the proposer reports
    them), the verify step, prefills, and the rest of the loop (planning, scheduling, bookkeeping)."""
    n = max(1, loop.rounds)
    out = loop.per_round_ms()
    out["prefill_ms"] = 1000 * loop.prefill_s / n
    out["other_ms"] = 1000 * max(0.0, wall_s - loop.draft_s - loop.verify_s - loop.prefill_s) / n
    if draft is not None:
        for name in ("context", "backbone", "head", "wire"):
            out[f"draft_{name}_ms"] = 1000 * getattr(draft, f"{name}_s") / n
    return out


def run_level(dec: Decoder, prompts: list[list[int]], params: SamplingParams, policy: str, concurrency: int) -> dict:
    """All prompts through dec at `concurrency` requests in flight under `policy`."""
    dec.times = LoopTimes()
    draft_times = getattr(dec.proposer, "times", None)
    draft_before = None if draft_times is None else draft_times.copy()
    runs, wall = closed_loop(dec, prompts, [params] * len(prompts), concurrency, f"{policy}-{concurrency}", policy)
    done = [c for _, c, _ in runs]
    tokens = sum(len(c.token_ids) for c in done)
    rounds = sum(c.stats.rounds for c in done)
    return {
        "policy": policy,
        "concurrency": concurrency,
        "requests": len(done),
        "tokens": tokens,
        "wall_s": wall,
        "throughput_tps": tokens / wall,
        "per_user_tps": statistics.mean(len(c.token_ids) / latency for _, c, latency in runs),
        "budget_per_round": sum(c.stats.scheduled for c in done) / max(1, rounds),
        "drafted_per_round": sum(c.stats.drafted for c in done) / max(1, rounds),
        "tau": (sum(c.stats.accepted for c in done) + rounds) / max(1, rounds),
        # where a round's time went: the draft call (by phase), the verify step, the rest
        **round_breakdown(dec.times, None if draft_times is None else draft_times.minus(draft_before), wall),
    }


def pooled(runs: list[dict]) -> dict:
    """One row from repeats of the same (policy, level): throughput over all their tokens and wall time, the other
    numbers averaged, and the spread of the repeats' throughputs (how much of a ratio is noise)."""
    if len(runs) == 1:
        return {**runs[0], "repeats": 1, "throughput_range": [runs[0]["throughput_tps"]] * 2}
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            out[key] = statistics.mean(r[key] for r in runs)
    out["requests"] = sum(r["requests"] for r in runs)
    out["tokens"] = sum(r["tokens"] for r in runs)
    out["wall_s"] = sum(r["wall_s"] for r in runs)
    out["throughput_tps"] = out["tokens"] / out["wall_s"]
    out["repeats"] = len(runs)
    out["throughput_range"] = [min(r["throughput_tps"] for r in runs), max(r["throughput_tps"] for r in runs)]
    return out


def goals(rows: list[dict]) -> dict:
    """The serving goals as ratios of this run: dspark against autoregressive (>= 0.97 at every level: never slower
    than plain decoding beyond noise) and against the best of the static policies, per level."""
    at = {(r["policy"], r["concurrency"]): r for r in rows}
    out = {}
    if ("dspark", 1) in at and ("autoregressive", 1) in at:
        out["c1_per_user_dspark_vs_autoregressive"] = (
            at["dspark", 1]["per_user_tps"] / at["autoregressive", 1]["per_user_tps"]
        )
    levels = sorted({c for p, c in at if p == "dspark"})
    out["throughput_dspark_vs_autoregressive"] = {
        c: at["dspark", c]["throughput_tps"] / at["autoregressive", c]["throughput_tps"]
        for c in levels
        if ("autoregressive", c) in at
    }
    baselines = ("autoregressive", "fixed", "threshold")
    out["throughput_dspark_vs_best_baseline"] = {
        c: at["dspark", c]["throughput_tps"] / max(at[p, c]["throughput_tps"] for p in baselines if (p, c) in at)
        for c in levels
        if any((p, c) in at for p in baselines)
    }
    return out


def plot(rows: list[dict], out_dir: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for p in policies:
        rs = sorted((r for r in rows if r["policy"] == p), key=lambda r: r["concurrency"])
        ax.plot([r["per_user_tps"] for r in rs], [r["throughput_tps"] for r in rs], "o-", label=p, ms=4)
        for r in rs:
            ax.annotate(str(r["concurrency"]), (r["per_user_tps"], r["throughput_tps"]), fontsize=7)
    ax.set(xlabel="per-user tokens/s", ylabel="aggregate tokens/s", title=f"throughput vs per-user speed\n{title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "throughput_vs_per_user.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for p in policies:
        rs = sorted((r for r in rows if r["policy"] == p), key=lambda r: r["concurrency"])
        ax.plot([r["concurrency"] for r in rs], [r["budget_per_round"] for r in rs], "o-", label=p, ms=4)
    ax.set(xscale="log", xlabel="concurrency", ylabel="verified draft tokens per request per round")
    ax.set_title(f"verification budget vs concurrency\n{title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "budget_vs_concurrency.png", dpi=110)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    """One line per row; the ms columns are per round: draft (ctx = context, bb = backbone, head), verify, other."""
    lines = [
        f"{'policy':15s} {'conc':>4s} {'agg tok/s':>9s} {'user tok/s':>10s} {'budget':>6s} {'tau':>5s} "
        f"{'calls':>5s} {'draft':>6s} {'ctx':>5s} {'bb':>5s} {'head':>5s} {'verify':>6s} {'other':>5s}"
    ]
    for r in rows:
        lines.append(
            f"{r['policy']:15s} {r['concurrency']:4d} {r['throughput_tps']:9.2f} {r['per_user_tps']:10.2f} "
            f"{r['budget_per_round']:6.2f} {r['tau']:5.2f} {r.get('draft_calls_per_round', 0):5.2f} "
            f"{r.get('draft_ms', 0):6.1f} {r.get('draft_context_ms', 0):5.1f} {r.get('draft_backbone_ms', 0):5.1f} "
            f"{r.get('draft_head_ms', 0):5.1f} {r.get('verify_ms', 0):6.1f} {r.get('other_ms', 0):5.1f}"
        )
    return "\n".join(lines)


def run(a, config) -> dict:
    from dspark.runtime import build_dspark_decoder

    for p in a.policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
    levels = sorted(set(a.concurrency))
    dec = build_dspark_decoder(config, a.drafter, policy="dspark", sps_profile_path=a.sps_profile)
    if dec.engine.config.max_requests < max(levels):
        raise ValueError(f"--max-requests {dec.engine.config.max_requests} is below concurrency {max(levels)}")
    n_max = max(a.requests_per_level or 2 * c for c in levels)
    prompts = eval_prompts(dec.engine.tokenizer, max(n_max, 4), a.max_prompt)
    params = SamplingParams(temperature=a.temperature, max_tokens=a.max_tokens, ignore_eos=True, seed=a.seed)
    run_level(dec, prompts[:2], params, "dspark", 2)  # warm-up
    rows = []
    for c in levels:
        n = a.requests_per_level or max(4, 2 * c)
        runs = []
        for rep in range(a.repeats):  # policies interleaved per level, the order reversed every other repeat,
            order = a.policies if rep % 2 == 0 else a.policies[::-1]  # so machine drift hits all alike
            for p in order:
                row = run_level(dec, prompts[:n], params, p, c)
                runs.append(row)
                print(f"[{rep + 1}/{a.repeats}] " + format_table([row]).splitlines()[1], flush=True)
        rows += [pooled([r for r in runs if r["policy"] == p]) for p in a.policies]
    rows.sort(key=lambda r: (a.policies.index(r["policy"]), r["concurrency"]))
    result = {
        "config": asdict(dec.engine.config),
        "drafter": str(a.drafter or "shipped"),
        "gamma": dec.num_draft,
        "temperature": a.temperature,
        "max_tokens": a.max_tokens,
        "rows": rows,
        "goals": goals(rows),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "policies.json").write_text(json.dumps(result, indent=1))
    plot(rows, out, f"{Path(config.model).name} {config.device} {config.dtype}, T={a.temperature}")
    print(format_table(rows))
    print(json.dumps(result["goals"], indent=1))
    print(f"wrote {out / 'policies.json'} and PNGs")
    return result
