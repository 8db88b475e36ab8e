"""Sampling parameters and the pure helpers that turn logits into a distribution and a token.

The same `logits_to_probs` is applied to target and draft logits, so temperature, top-k and top-p
change both sides of the rejection test identically (which is what keeps it lossless).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (the argmax limit)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_tokens: int = 128  # generated tokens, bonus tokens included
    seed: int | None = None  # per-request RNG seed; None = drawn from the global RNG
    stop_token_ids: tuple[int, ...] = ()  # besides the model's end-of-sequence tokens
    ignore_eos: bool = False  # benchmarks: always run to max_tokens

    def __post_init__(self):
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 probabilities after temperature, top-k and top-p."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = _top_p(logits, params.top_p)
    return logits.softmax(-1)


_NUCLEUS_CANDIDATES = 256  # the nucleus almost always lies inside the top few hundred tokens


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask all but the smallest set of top tokens holding top_p of the mass. Looks among the top candidates first
    (a partial sort) and sorts the whole vocabulary only for rows whose nucleus is wider; the result is the same."""
    k = min(_NUCLEUS_CANDIDATES, logits.shape[-1])
    probs = logits.softmax(-1)
    cand_p, cand_i = torch.topk(probs, k, dim=-1)  # sorted, descending
    if not bool((cand_p.sum(-1) >= top_p).all()):
        cand_p, cand_i = torch.sort(probs, dim=-1, descending=True)
    # keep a token while the tokens ranked above it hold less than top_p of the mass
    keep_sorted = (cand_p.cumsum(-1) - cand_p) < top_p
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, cand_i, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def logits_to_probs_rows(logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams]) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities, row b under params[b] (or one params for all): rows that share
    temperature, top-k and top-p go through `logits_to_probs` together, not one by one."""
    if isinstance(params, SamplingParams):
        return logits_to_probs(logits, params)
    groups: dict[tuple, list[int]] = {}
    for b, p in enumerate(params):
        groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(b)
    if len(groups) == 1:
        return logits_to_probs(logits, params[0])
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for rows in groups.values():
        idx = torch.tensor(rows, device=logits.device)
        out[idx] = logits_to_probs(logits[idx], params[rows[0]])
    return out


def sample(probs: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """(..., V) probabilities -> (...) token ids, by inversion of the CDF (exact, and far cheaper than multinomial
    on a large vocabulary). Rows need not be normalised. generator: one for all rows, or one per row (each row's
    uniform draw from its own, exactly as sampling that row alone would)."""
    flat = probs.reshape(-1, probs.shape[-1]).double()
    cdf = flat.cumsum(-1)  # (N, V)
    dev = probs.device
    if generator is None or isinstance(generator, torch.Generator):
        u = torch.rand(flat.shape[0], 1, generator=generator, device=dev, dtype=torch.float64)
    else:
        u = torch.cat([torch.rand(1, 1, generator=g, device=dev, dtype=torch.float64) for g in generator])
    u = u * cdf[:, -1:]
    # the first token whose CDF exceeds u: zero-probability tokens never qualify
    idx = torch.searchsorted(cdf, u, right=True).clamp_max(probs.shape[-1] - 1)
    return idx.reshape(probs.shape[:-1])


def draw(probs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """`sample`, except that greedy distributions (one-hot) are read off with argmax, which is exact and cheaper."""
    return probs.argmax(-1) if params.greedy else sample(probs, generator)


_MASK64 = (1 << 64) - 1
DRAFT_STREAM = 1  # the drafter's generator for a request; the verifier's is stream 0


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def make_generator(
    seed: int | None, device: str | torch.device = "cpu", stream: int = 0, position: int = 0
) -> torch.Generator:
    """A per-request generator. The user's seed is hashed (splitmix64) together with a stream number, so requests
    with consecutive seeds get unrelated streams, and a request's verifier (stream 0) and drafter (stream 1) never
    share one; a nonzero position is hashed in as well (see RandomStreams)."""
    g = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    g.manual_seed(_key(seed, stream, position))
    return g


def _key(seed: int, stream: int, position: int) -> int:
    key = _splitmix64(_splitmix64(seed & _MASK64) ^ stream)
    if position:
        key = _splitmix64(key ^ position)
    return key >> 1


class RandomStreams:
    """The random numbers of many requests, keyed by (seed, stream, position): the draws for the tokens from
    `position` on come from a generator seeded with all three. A request's randomness then depends only on its seed
    and where it is, never on what ran before: a session restored on another verifier, or a retried call, draws
    exactly what the lost one would have, so a seeded request reproduces through failures. Positions only grow, so
    no two rounds of a request share a seed. A request without a seed gets a random one when it is opened."""

    def __init__(self, stream: int, device: str | torch.device = "cpu"):
        self.stream, self.device = stream, device
        self._seeds: dict[str, int] = {}
        self._generators: dict[str, torch.Generator] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._seeds

    def open(self, request_id: str, seed: int | None) -> None:
        self._seeds[request_id] = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed
        self._generators[request_id] = torch.Generator(device=self.device)

    def at(self, request_id: str, position: int) -> torch.Generator:
        """The request's generator for the draws of the tokens from `position` (index in prompt + output) on."""
        g = self._generators[request_id]
        g.manual_seed(_key(self._seeds[request_id], self.stream, position))
        return g

    def release(self, request_id: str) -> None:
        self._seeds.pop(request_id, None)
        self._generators.pop(request_id, None)
