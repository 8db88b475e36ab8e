"""Shared fixtures: tiny random-weight models for fast tests, the real default model for `slow` ones, transformers'
greedy decoding as the exactness reference, and an asyncio loop in a thread for tests that host grpc.aio servers in
process."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch


def tiny_model(arch: str = "llama", vocab: int = 32, seed: int = 0, layers: int = 2):
    """A random-weight causal LM of the given architecture, small enough to run in milliseconds."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(
            **common,
            head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"][:layers] + ["full_attention"] * max(0, layers - 2),
        )
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.config._attn_implementation = "sdpa"
    return model.eval().requires_grad_(False)


def transformers_greedy(model, prompts: list[list[int]], n: int, **generate_kw) -> list[list[int]]:
    """The exactness reference: transformers' own greedy decoding (generate, do_sample=False) of each prompt on its
    own (no padding), up to n new tokens; generate_kw go to generate (min_new_tokens=n: exactly n, EOS or not)."""
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, **generate_kw)
        outs.append(gen[0, len(ids) :].tolist())
    return outs


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread (two OpenMP threads on a busy two-core box can crawl);
    the previous thread count comes back when the module is done."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_model():
    """(model, tokenizer) of the real default target, fp32 on CPU (converted once into DSPARK_HOME)."""
    from dspark.models.model_store import load_model
    from dspark.models.registry import DEFAULT_MODEL

    return load_model(DEFAULT_MODEL, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def reference_model():
    """(model, tokenizer) of the real default target exactly as transformers builds it, for references only: it is
    never given to an engine, whose linear kernel (core/linear_kernel.py) rebuilds the projections of the model it
    runs (`real_model`)."""
    from dspark.models.model_store import load_model
    from dspark.models.registry import DEFAULT_MODEL

    return load_model(DEFAULT_MODEL, dtype="float32", device="cpu")


class Background:
    """An asyncio loop in a thread, hosting grpc.aio servers while the test drives a client."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def bg():
    b = Background()
    yield b
    b.close()
