"""`make bench-engine`: verifier step time vs query tokens B, plain decoding vs transformers `generate` at
batch 1, and speculative decoding with an independent draft LM — all measured in one run, as ratios."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dspark.bench.policies import eval_prompts
from dspark.core import sps_profile
from dspark.core.decoding import Decoder
from dspark.core.engine import TargetEngine
from dspark.core.sampling import SamplingParams
from dspark.runtime import build_decoder, build_proposer

SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def sps_curve(engine: TargetEngine, max_b: int) -> list[dict]:
    rows = sps_profile.measure(engine, [b for b in SIZES if b <= max_b], repeats=5, log=lambda m: print(m, flush=True))
    return [{**r, "tokens_per_s": r["B"] * r["sps"]} for r in rows]


def hf_generate_tokens_per_s(model, ids: list[int], n: int) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        x = torch.tensor([ids], device=model.device)
        model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return n / (time.perf_counter() - t)


def decoder_tokens_per_s(dec, ids: list[int], n: int) -> tuple[float, float]:
    """(tokens/s, tau) for one greedy request of n new tokens, prefill included as for `generate`."""
    t = time.perf_counter()
    (c,) = dec.generate([ids], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    return len(c.token_ids) / (time.perf_counter() - t), c.stats.tau


def run(config, a) -> dict:
    config = replace(config, max_requests=max(config.max_requests, math.ceil(a.max_b / sps_profile.BLOCK)))
    plain = build_decoder(config)
    engine = plain.engine
    print(
        f"dspark bench-engine: model={config.model} device={config.device} dtype={config.dtype} "
        f"threads={torch.get_num_threads()}",
        flush=True,
    )
    print("verifier step time vs query tokens B (8 tokens per request, 128 cached tokens each):", flush=True)
    curve = sps_curve(engine, a.max_b)

    prompts = eval_prompts(engine.tokenizer, a.prompts, max_prompt=256)
    n = a.new_tokens
    print(f"batch 1, greedy, {len(prompts)} prompts x {n} new tokens:", flush=True)
    spec = Decoder(engine, build_proposer(config, engine, a.draft), a.num_draft, plain.eos_token_ids)
    hf_generate_tokens_per_s(engine.model, prompts[0], 8)  # warm-up
    decoder_tokens_per_s(plain, prompts[0], 8)
    decoder_tokens_per_s(spec, prompts[0], 8)
    hf_per, ours_per, sp_per, taus = [], [], [], []
    for ids in prompts:  # interleaved, so drift on a noisy machine hits all three alike
        hf_per.append(hf_generate_tokens_per_s(engine.model, ids, n))
        ours_per.append(decoder_tokens_per_s(plain, ids, n)[0])
        tps, tau = decoder_tokens_per_s(spec, ids, n)
        sp_per.append(tps)
        taus.append(tau)
    hf, ours, sp, tau = (statistics.mean(x) for x in (hf_per, ours_per, sp_per, taus))
    print(f"  transformers generate : {hf:7.2f} tok/s", flush=True)
    print(f"  dspark plain          : {ours:7.2f} tok/s   ratio vs generate {ours / hf:.3f}x", flush=True)
    print(
        f"  dspark speculative    : {sp:7.2f} tok/s   ratio vs plain {sp / ours:.3f}x  "
        f"(draft={a.draft}, k={a.num_draft}, tau={tau:.2f})",
        flush=True,
    )

    result = {
        "config": asdict(config),
        "threads": torch.get_num_threads(),
        "sps_curve": curve,
        "batch1": {
            "new_tokens": n,
            "prompts": len(prompts),
            "transformers_generate_tps": hf,
            "plain_tps": ours,
            "plain_vs_generate": ours / hf,
            "speculative_tps": sp,
            "speculative_vs_plain": sp / ours,
            "draft": a.draft,
            "num_draft": a.num_draft,
            "tau": tau,
            "per_prompt": {"generate": hf_per, "plain": ours_per, "speculative": sp_per},
        },
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result
