"""Target engine: many requests at once, each with its own KV rows; one forward pass scores a padded batch
of query blocks of different lengths, its linear layers over the real tokens only (core/ragged_rows.py).

The engine knows nothing about drafting or acceptance. A request's *committed* length is how many of its
tokens are in the cache. `forward` writes keys/values for the query tokens after that length without
committing them; `commit` keeps the first n of them. Whatever is not committed is rolled back for free.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

from dspark.core.attention import use_grouped_sdpa
from dspark.core.config import EngineConfig
from dspark.core.kv_cache import SlotCache
from dspark.core.linear_kernel import apply_linear_kernel, resolve_kernel
from dspark.core.ragged_rows import pack_layers, real_tokens
from dspark.models.model_store import load_model


class CapacityError(RuntimeError):
    """No free request slot; nothing running is affected."""


class ContextLengthError(ValueError):
    """A request would outgrow the configured context length."""


class UnknownRequestError(KeyError):
    """The request id is not (or no longer) held by the engine."""


@dataclass(frozen=True)
class QueryBlock:
    request_id: str
    token_ids: list[int]  # tokens right after the request's committed length


@dataclass(frozen=True)
class ForwardOutput:
    logits: torch.Tensor  # (T, V) float32: next-token logits after each query token ("last": (1, V))
    features: torch.Tensor | None  # (T, F) concatenated hidden states of config.feature_layers, or None


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The final logit softcapping some models apply (Gemma: cap * tanh(logits / cap)); None or 0: unchanged."""
    return torch.tanh(logits / cap) * cap if cap else logits


class TargetEngine:
    def __init__(self, config: EngineConfig, model=None, tokenizer=None):
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.device = torch.device(config.device)
        if model is None:
            model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.linear_kernel = resolve_kernel(config.linear_kernel, self.device, next(self.model.parameters()).dtype)
        apply_linear_kernel(self.model, self.linear_kernel)
        use_grouped_sdpa(self.model)  # no copy of grouped keys/values per layer on CPU (core/attention.py)
        self.tokenizer = tokenizer
        self.decoder = model.get_decoder()
        # the MLPs, attention projections and LM head of a padded forward compute its real tokens only
        # (core/ragged_rows.py): a verify step costs about what its real tokens cost, not rows x the longest block
        self.ragged = pack_layers(self.decoder)
        # transformers renamed the decoder's cache argument (past_key_values up to 5.2x, then cache); an unknown
        # keyword would be swallowed by **kwargs and the slot cache silently never used
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.lm_head = model.get_output_embeddings()
        mc = model.config
        self.vocab_size = mc.vocab_size
        self.num_layers = mc.num_hidden_layers
        for layer in config.feature_layers:
            if not 0 <= layer <= self.num_layers:
                raise ValueError(f"feature layer {layer} out of range 0..{self.num_layers}")
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        self.cache = SlotCache(
            self.num_layers,
            config.max_requests,
            config.max_context,
            mc.num_key_value_heads,
            head_dim,
            model.dtype,
            self.device,
        )
        layer_types = getattr(mc, "layer_types", None) or ["full_attention"] * self.num_layers
        self._sliding_window = getattr(mc, "sliding_window", None) if "sliding_attention" in layer_types else None
        self._softcap = getattr(mc, "final_logit_softcapping", None)
        self._free = list(range(config.max_requests - 1, -1, -1))  # pop() hands out slot 0 first
        self._slot: dict[str, int] = {}
        self._length: dict[str, int] = {}

    # -- bookkeeping ------------------------------------------------------------------------------------

    def add(self, request_id: str) -> None:
        if request_id in self._slot:
            raise ValueError(f"request {request_id!r} is already in the engine")
        if not self._free:
            raise CapacityError(f"all {self.config.max_requests} request slots are busy; retry when one finishes")
        self._slot[request_id] = self._free.pop()
        self._length[request_id] = 0

    def release(self, request_id: str) -> None:
        """Frees the request's slot; unknown ids are ignored (release is idempotent)."""
        slot = self._slot.pop(request_id, None)
        if slot is not None:
            del self._length[request_id]
            self._free.append(slot)

    def length(self, request_id: str) -> int:
        return self._length[self._check(request_id)]

    def commit(self, request_id: str, n: int) -> None:
        """Keep n more tokens of the last forward in the cache (0 <= n <= tokens forwarded)."""
        new = self._length[self._check(request_id)] + n
        if n < 0 or new > self.config.max_context:
            raise ValueError(f"cannot commit {n} tokens for {request_id!r}")
        self._length[request_id] = new

    def truncate(self, request_id: str, length: int) -> None:
        """Roll the committed length back to `length` (<= current)."""
        if not 0 <= length <= self._length[self._check(request_id)]:
            raise ValueError(f"cannot truncate {request_id!r} to {length}")
        self._length[request_id] = length

    @property
    def active(self) -> int:
        return len(self._slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def _check(self, request_id: str) -> str:
        if request_id not in self._slot:
            raise UnknownRequestError(f"request {request_id!r} is not in the engine")
        return request_id

    # -- compute ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, blocks: list[QueryBlock], logits: str = "all") -> list[ForwardOutput]:
        """Score each block after its request's committed tokens. logits: "all" positions or the "last" one."""
        for b in blocks:
            self._check(b.request_id)
            if not b.token_ids:
                raise ValueError(f"empty query block for {b.request_id!r}")
            if self._length[b.request_id] + len(b.token_ids) > self.config.max_context:
                raise ContextLengthError(
                    f"request {b.request_id!r} would reach {self._length[b.request_id] + len(b.token_ids)} tokens, "
                    f"over max_context={self.config.max_context}"
                )
        # rows in slot order: when the batch holds a contiguous run of slots (e.g. all of them) the cache is read
        # as a view instead of being gathered (a copy of every layer's keys and values)
        order = sorted(range(len(blocks)), key=lambda i: self._slot[blocks[i].request_id])
        if order != list(range(len(blocks))):
            outs = self.forward([blocks[i] for i in order], logits)
            back = [None] * len(blocks)
            for j, i in enumerate(order):
                back[i] = outs[j]
            return back
        dev = self.device
        T = max(len(b.token_ids) for b in blocks)
        start = torch.tensor([self._length[b.request_id] for b in blocks], device=dev)  # (B,)
        n_real = torch.tensor([len(b.token_ids) for b in blocks], device=dev)  # (B,)
        ids = torch.zeros(len(blocks), T, dtype=torch.long, device=dev)  # (B, T)
        for i, b in enumerate(blocks):
            ids[i, : len(b.token_ids)] = torch.tensor(b.token_ids, device=dev)
        t = torch.arange(T, device=dev)
        pos = start[:, None] + t  # (B, T) absolute position of each query token
        real = t < n_real[:, None]  # (B, T)
        write_pos = torch.where(real, pos, self.config.max_context)  # padding writes to the scratch column
        kv_len = int((start + n_real).max())
        self.cache.bind([self._slot[b.request_id] for b in blocks], write_pos, kv_len)

        j = torch.arange(kv_len, device=dev)
        allowed = j[None, None, :] <= pos[:, :, None]  # (B, T, L) causal over the request's own tokens
        mask = allowed[:, None]  # (B, 1, T, L)
        if self._sliding_window is not None:
            sliding = allowed & (j[None, None, :] > pos[:, :, None] - self._sliding_window)
            mask = {"full_attention": mask, "sliding_attention": sliding[:, None]}

        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        want_features = bool(self.config.feature_layers)
        with real_tokens(real) if self.ragged else contextlib.nullcontext():
            out = self.decoder(
                input_ids=ids,
                position_ids=pos.clamp_max(self.config.max_context - 1),
                attention_mask=mask,
                **{self._cache_arg: self.cache},
                use_cache=True,
                output_hidden_states=want_features,
            )
        hidden = out.last_hidden_state  # (B, T, C)
        lengths = [len(b.token_ids) for b in blocks]
        if logits == "last":
            scores = self._scores(hidden[torch.arange(len(blocks), device=dev), n_real - 1])  # (B, V)
            per_row = list(scores[:, None])  # (1, V) each
        else:  # the real positions only, row after row
            flat = hidden.reshape(-1, hidden.shape[-1])[real.reshape(-1)]  # (N, C)
            per_row = list(self._scores(flat).split(lengths))  # (n_i, V) each
        feats = None
        if want_features:
            feats = torch.cat([out.hidden_states[i] for i in self.config.feature_layers], dim=-1)  # (B, T, F)
        return [
            ForwardOutput(logits=per_row[i], features=None if feats is None else feats[i, :n])
            for i, n in enumerate(lengths)
        ]

    def _scores(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, C) -> (N, V) float32
        return softcap(self.lm_head(hidden).float(), self._softcap)

    def prefill(self, request_id: str, token_ids: list[int], chunk: int = 512) -> ForwardOutput:
        """Forward and commit a whole prompt in chunks: the last position's logits (1, V) and, when configured,
        the features of every prompt token (len(token_ids), F)."""
        if not token_ids:
            raise ValueError(f"empty prompt for {request_id!r}")
        outs = []
        for s in range(0, len(token_ids), chunk):
            piece = token_ids[s : s + chunk]
            (out,) = self.forward([QueryBlock(request_id, piece)], logits="last")
            self.commit(request_id, len(piece))
            outs.append(out)
        features = None if outs[0].features is None else torch.cat([o.features for o in outs])
        return ForwardOutput(logits=outs[-1].logits, features=features)
