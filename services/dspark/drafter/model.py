"""The DSpark drafter (paper §3.1, §3.2.1): a parallel DFlash-style backbone conditioned on the target's hidden states,
a lightweight sequential head that makes the gamma draft tokens of a block depend on each other, and a confidence
head that predicts each draft token's chance of surviving verification.

Block convention (§3.1). The anchor x_0 is the last token the target produced (the bonus token); the target has not
run on it yet, so the context is the target features of the tokens *before* the anchor. A block of gamma inputs
(anchor + gamma-1 mask embeddings) at absolute positions t..t+gamma-1, where t = context length = the anchor's
position, yields gamma draft logits; position k (1-based) predicts x_k, the token k places after the anchor.

Training layout (§3.3, "several anchors per sequence"). For a sequence of L tokens with target features for all of
them, the context keys/values are computed once per layer for all L tokens and shared by every block; A blocks at
anchors t_1..t_A are laid side by side as A*gamma queries, and one boolean mask lets block a see context tokens
j < t_a (exactly what inference at anchor t_a sees) and the gamma keys of its own block (bidirectional), never
another block. One attention call per layer trains all A blocks; a block's logits equal those inference computes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dspark.core.linear_kernel import apply_linear_kernel, linear_over, resolve_kernel
from dspark.core.proposer import DraftTimes, Proposal, synced_clock, truncated
from dspark.core.sampling import SamplingParams, logits_to_probs_rows, sample

SEQUENTIAL_HEADS = ("markov", "rnn", "none")


def default_feature_layers(num_layers: int, count: int = 3) -> tuple[int, ...]:
    """Evenly spread target hidden-state indices (0 = embeddings, i = output of layer i), low to high, skipping the
    embeddings and the last two layers when the target is deep enough (as DFlash/EAGLE-3 pick theirs)."""
    lo, hi = (2, num_layers - 2) if num_layers >= 6 else (1, num_layers)
    count = max(1, min(count, hi - lo + 1))
    if count == 1:
        return ((lo + hi) // 2,)
    return tuple(int(round(lo + i * (hi - lo) / (count - 1))) for i in range(count))


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params.get("full_attention"), dict):  # gemma3: one entry per layer type
        params = params["full_attention"]
    return float(params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0)


@dataclass(frozen=True)
class DrafterConfig:
    # facts about the target (DrafterConfig.from_target reads them from its HF config)
    hidden_size: int  # d: the target's width; the drafter runs at it to share the target's embedding and LM head
    vocab_size: int  # V
    num_target_layers: int
    feature_layers: tuple[int, ...]  # target hidden-state indices concatenated into the context (0 = embeddings)
    num_heads: int  # draft attention heads, as the target's
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # draft MLP width, as the target's
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # plain RoPE; the target's long-context scaling is not needed for a fresh drafter
    # the drafter
    n_layer: int = 2  # draft depth (the paper uses 5; small targets on CPU want fewer)
    gamma: int = 7  # block size: anchor + gamma-1 masks -> gamma draft tokens (paper: 7)
    sequential_head: str = "markov"  # "markov" (eq. 5), "rnn" (eq. 6) or "none" (pure parallel, DFlash ablation)
    markov_rank: int = 256  # r: rank of the Markov transition W1·W2, and the RNN state width (paper: 256)
    mask_token_id: int | None = None  # None: one learned mask embedding; an id: that token's frozen target embedding
    # N: drafting's LM head and Markov W2 cover only N tokens (the draft vocabulary, e.g. the target's most frequent
    # response tokens; FR-Spec / EAGLE-3); the draft distribution is 0 off it, verification still runs over all V
    draft_vocab_size: int = 0  # 0: the whole vocabulary

    def __post_init__(self):
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))
        if self.sequential_head not in SEQUENTIAL_HEADS:
            raise ValueError(f"sequential_head must be one of {SEQUENTIAL_HEADS}, got {self.sequential_head!r}")
        if not self.feature_layers or not all(0 <= i <= self.num_target_layers for i in self.feature_layers):
            raise ValueError(f"feature_layers must be non-empty indices in 0..{self.num_target_layers}")
        if self.n_layer < 1 or self.gamma < 1 or self.markov_rank < 1:
            raise ValueError("n_layer, gamma and markov_rank must be >= 1")
        if self.num_heads % self.num_kv_heads or self.head_dim % 2:
            raise ValueError("num_heads must be a multiple of num_kv_heads and head_dim even")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} outside the vocabulary")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in 0..{self.vocab_size} (0: the whole vocabulary)")

    @property
    def feature_size(self) -> int:  # F = m*d, the width of the concatenated target features
        return len(self.feature_layers) * self.hidden_size

    @classmethod
    def from_target(cls, hf_config, feature_layers: Sequence[int] | None = None, **overrides) -> DrafterConfig:
        """Target facts from a transformers config (llama, qwen2, gemma3 text or multimodal); drafter knobs from
        overrides (n_layer=, gamma=, sequential_head=, ...; target facts can be overridden too)."""
        c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        heads = c.num_attention_heads
        facts = dict(
            hidden_size=c.hidden_size,
            vocab_size=c.vocab_size,
            num_target_layers=c.num_hidden_layers,
            feature_layers=tuple(feature_layers) if feature_layers else default_feature_layers(c.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            intermediate_size=c.intermediate_size,
            rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(c),
        )
        facts.update(overrides)
        return cls(**facts)


@dataclass
class ContextKV:
    """Per draft layer, the keys/values of the injected target context: W_K·H_ctx and W_V·H_ctx of eq. 3, RoPE
    applied at each token's absolute position. A token's entry depends on that token alone, so a proposer can keep
    one per request, append accepted tokens (cat_tokens) and roll back (crop)."""

    k: list[torch.Tensor]  # n_layer x (B, n_kv_head, L, head_dim)
    v: list[torch.Tensor]  # n_layer x (B, n_kv_head, L, head_dim)

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def cat_tokens(self, other: ContextKV) -> ContextKV:
        k = [torch.cat(pair, dim=2) for pair in zip(self.k, other.k)]
        return ContextKV(k, [torch.cat(pair, dim=2) for pair in zip(self.v, other.v)])

    def crop(self, n: int) -> ContextKV:
        return ContextKV([k[:, :, :n] for k in self.k], [v[:, :, :n] for v in self.v])

    def split(self, lengths: Sequence[int]) -> list[ContextKV]:
        """Consecutive token spans of these lengths (views): one context encoded for several requests, taken apart."""
        ks = [k.split(list(lengths), dim=2) for k in self.k]
        vs = [v.split(list(lengths), dim=2) for v in self.v]
        return [ContextKV([k[i] for k in ks], [v[i] for v in vs]) for i in range(len(lengths))]

    @staticmethod
    def batch(items: Sequence[ContextKV]) -> tuple[ContextKV, torch.Tensor]:
        """Right-pad single-or-more-row contexts to one length and stack them; returns (ContextKV, lengths (B,))."""
        if len(items) == 1:  # one request: its own tensors, no copy
            c = items[0]
            return c, torch.full((c.k[0].shape[0],), c.length, device=c.k[0].device)
        L = max(c.length for c in items)

        def pad(t):
            return F.pad(t, (0, 0, 0, L - t.shape[2]))

        k = [torch.cat([pad(c.k[i]) for c in items]) for i in range(len(items[0].k))]
        v = [torch.cat([pad(c.v[i]) for c in items]) for i in range(len(items[0].v))]
        lens = torch.tensor([c.length for c in items for _ in range(c.k[0].shape[0])], device=k[0].device)
        return ContextKV(k, v), lens


@dataclass
class DrafterOutput:
    logits: torch.Tensor  # (B, A, gamma, N) float32: U_k + B_k, the draft distribution's logits (eq. 4), over the
    # draft vocabulary's N tokens (column j is token draft_vocab[j]); N = V without a draft vocabulary
    conf_logits: torch.Tensor  # (B, A, gamma) float32: w·[h_k; W1[x_{k-1}]] before the sigmoid (eq. 7)
    hidden: torch.Tensor  # (B, A, gamma, C): h_k, the backbone's final-normed hidden states


@dataclass
class Draft:
    tokens: torch.Tensor  # (B, k) int64
    probs: torch.Tensor  # (B, k, V) float32: the exact distribution each token was sampled from (q for rejection)
    confidence: torch.Tensor  # (B, k) float32: c_k after STS, P(token k survives | tokens < k survived)

    def proposal(self, i: int) -> Proposal:
        return Proposal(self.tokens[i], self.probs[i])


# -- building blocks --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def apply_rope(x, cos, sin):
    # x (B, H, T, D); cos, sin (B, 1, T, D/2); rotate-half convention, as HF llama/qwen2/gemma3
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class DraftAttention(nn.Module):
    """Block queries attend to the injected context keys/values and bidirectionally to the block's own (eq. 3)."""

    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # per-head q/k norms, as DFlash's Qwen3 layers
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def kv(self, x, cos, sin):
        B, T, _ = x.shape  # (B, T, C) -> (B, n_kv, T, hd) twice; one W_K, W_V for context and block (eq. 3)
        k = apply_rope(self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.hd)).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        return k, v

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask):
        B, T, _ = x.shape  # (B, T, C)
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.hd)).transpose(1, 2), cos, sin)
        k, v = self.kv(x, cos, sin)
        k = torch.cat([ctx_k.to(k.dtype), k], dim=2)  # (B, n_kv, L+T, hd)
        v = torch.cat([ctx_v.to(v.dtype), v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.gate = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DraftLayer(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.ln_1 = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = DraftAttention(c)
        self.ln_2 = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask):
        x = x + self.attn(self.ln_1(x), cos, sin, ctx_k, ctx_v, mask)
        return x + self.mlp(self.ln_2(x))


class MarkovHead(nn.Module):
    """First-order transition bias B(x_{k-1}, ·) = W1[x_{k-1}]·W2, a rank-r factorisation of a V x V matrix (eq. 5)."""

    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.W1 = nn.Embedding(c.vocab_size, c.markov_rank)  # embedding lookup, also read by the confidence head
        self.W2 = nn.Linear(c.markov_rank, c.vocab_size, bias=False)  # logit projection

    def step(self, prev, h, state):
        """The rank-r vector W2 projects to the bias (..., r), and the carried state (none: memoryless)."""
        return self.W1(prev), state


class RNNHead(nn.Module):
    """Gated recurrent bias over the whole in-block prefix (eq. 6): z_k = [s_{k-1}; W1[x_{k-1}]; h_k],
    s_k = σ(W_g z_k) ⊙ s_{k-1} + (1 − σ(W_g z_k)) ⊙ tanh(W_c z_k),  B_k = W2ᵀ tanh(W_o z_k)."""

    def __init__(self, c: DrafterConfig):
        super().__init__()
        r = c.markov_rank
        self.W1 = nn.Embedding(c.vocab_size, r)
        self.gco = nn.Linear(2 * r + c.hidden_size, 3 * r)  # W_g, W_c, W_o as one projection, split in three
        self.W2 = nn.Linear(r, c.vocab_size, bias=False)

    def step(self, prev, h, state):
        e = self.W1(prev)  # (..., r)
        if state is None:
            state = torch.zeros_like(e)  # s_0 = 0
        g, cand, out = self.gco(torch.cat([state, e, h.to(e.dtype)], dim=-1)).chunk(3, dim=-1)
        g = torch.sigmoid(g)
        return torch.tanh(out), g * state + (1 - g) * torch.tanh(cand)  # W2 projects the first to the bias


# -- the drafter ------------------------------------------------------------------------------------------------


class DSparkDrafter(nn.Module):
    def __init__(self, config: DrafterConfig, embed_tokens: nn.Module, lm_head: nn.Module):
        super().__init__()
        c = self.config = config
        # The target's embedding and LM head, shared and frozen. Kept in a tuple so nn.Module does not register
        # them: they are not in parameters() (nothing trains them) nor in state_dict() (nothing saves them).
        embed_tokens.requires_grad_(False)
        lm_head.requires_grad_(False)
        self._shared = (embed_tokens, lm_head)
        d = c.hidden_size
        self.fc = nn.Linear(c.feature_size, d, bias=False)  # W_c of eq. 2
        self.ctx_norm = RMSNorm(d, c.rms_norm_eps)
        self.layers = nn.ModuleList([DraftLayer(c) for _ in range(c.n_layer)])
        self.norm = RMSNorm(d, c.rms_norm_eps)
        self.seq = {"markov": MarkovHead, "rnn": RNNHead, "none": lambda c: None}[c.sequential_head](c)
        # eq. 7: c_k = σ(w·[h_k; W1[x_{k-1}]]); without a sequential head there is no W1 and it reads h_k alone
        self.confidence = nn.Linear(d + (c.markov_rank if self.seq is not None else 0), 1)
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Sequential Temperature Scaling (§3.2.1): per-position temperatures of the confidence logits, fit post hoc
        self.register_buffer("conf_temperature", torch.ones(c.gamma))
        # the draft vocabulary (token ids, ascending), saved with the drafter; None: the whole vocabulary
        self.register_buffer("draft_vocab", torch.arange(c.draft_vocab_size) if c.draft_vocab_size else None)
        self._draft_rows: tuple | None = None  # (key, LM head rows, W2 rows) of the draft vocabulary, cached
        self._column: tuple | None = None  # (key, (V,) column of each token in the draft vocabulary), cached
        self.apply(self._init_weights)
        if self.seq is not None:
            nn.init.normal_(self.seq.W1.weight, std=1.0)  # the scale of the RMS-normed h it is concatenated with
            nn.init.zeros_(self.seq.W2.weight)  # B = 0 at the start: the sequential head starts as a no-op
        nn.init.zeros_(self.confidence.weight)
        nn.init.zeros_(self.confidence.bias)
        if c.mask_token_id is None:
            with torch.no_grad():
                w = embed_tokens.weight
                sample_ids = torch.arange(min(c.vocab_size, 1024), device=w.device)
                std = embed_tokens(sample_ids).float().std().item()  # post-scaling for gemma's scaled embedding
            self.mask_embed = nn.Parameter(torch.randn(d) * std)
        else:
            self.mask_embed = None

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @classmethod
    def from_target_model(cls, model, feature_layers: Sequence[int] | None = None, **overrides) -> DSparkDrafter:
        """A fresh drafter for an HF causal LM, sharing its (frozen) input embedding and LM head."""
        config = DrafterConfig.from_target(model.config, feature_layers=feature_layers, **overrides)
        return cls(config, model.get_input_embeddings(), model.get_output_embeddings())

    @property
    def embed_tokens(self) -> nn.Module:
        return self._shared[0]

    @property
    def lm_head(self) -> nn.Module:
        return self._shared[1]

    @torch.no_grad()
    def init_layers_from(self, model) -> None:
        """Warm start: draft layer j takes the weights of the target's decoder layer L - n_layer + j (its last
        layers: attention and MLP projections, the two pre-norms), the final norm the target's. Biases (Qwen2's q/k/v)
        and the target's own q/k norms have no counterpart and are dropped; Gemma's (1 + w) norms are converted. The
        drafter's per-head q/k norms stay at 1, so attention sees rescaled scores: a starting point, not a copy."""
        layers = model.model.layers
        gemma = model.config.model_type.startswith("gemma")

        def norm(dst: RMSNorm, src: nn.Module) -> None:
            dst.weight.copy_(src.weight.float() + 1.0 if gemma else src.weight)

        for j, dst in enumerate(self.layers):
            src = layers[len(layers) - len(self.layers) + j]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(dst.attn, name).weight.copy_(getattr(src.self_attn, name).weight)
            for mine, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                getattr(dst.mlp, mine).weight.copy_(getattr(src.mlp, theirs).weight)
            norm(dst.ln_1, src.input_layernorm)
            norm(dst.ln_2, src.pre_feedforward_layernorm if gemma else src.post_attention_layernorm)
        norm(self.norm, model.model.norm)

    # -- persistence (the shared target modules are never part of it) ------------------------------------------

    def drafter_state_dict(self) -> dict[str, torch.Tensor]:
        shared = {p.data_ptr() for m in self._shared for p in m.parameters()}
        return {k: v for k, v in self.state_dict().items() if v.data_ptr() not in shared}

    def load_drafter_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        self._draft_rows = None
        return self.load_state_dict(state_dict, strict=strict)

    def use_linear_kernel(self, kernel: str) -> str:
        """Run the drafter's own projections (feature projection, backbone, heads) with `kernel` (core/linear_kernel.py;
        "auto": the fastest on its device and dtype), in place, for serving: a prepacked layer is not trained, so a
        drafter being trained keeps transformers' own. On a 2-core AMD EPYC (float32, 2 threads) oneDNN's prepacked
        backbone took a draft call of one row and 7 positions from 6.8-8.1 ms to 3.8-6.2 ms, of 8 rows from 15-16 ms
        to 11-13 ms. Returns the kernel resolved."""
        resolved = resolve_kernel(kernel, self.fc.weight.device, self.fc.weight.dtype)
        apply_linear_kernel(self, resolved)
        self._draft_rows = None
        return resolved

    def set_draft_vocab(self, token_ids: Sequence[int]) -> None:
        """Restrict drafting to these tokens (the config must have been built with draft_vocab_size = their
        number); the LM head and Markov W2 rows are gathered once, on first use."""
        ids = torch.as_tensor(sorted(set(int(t) for t in token_ids)), dtype=torch.long, device=self.inv_freq.device)
        if self.draft_vocab is None or len(ids) != len(self.draft_vocab):
            raise ValueError(
                f"the drafter was configured for {self.config.draft_vocab_size} draft tokens, got {len(ids)}"
            )
        if bool((ids < 0).any() | (ids >= self.config.vocab_size).any()):
            raise ValueError("draft vocabulary ids outside the vocabulary")
        self.draft_vocab.copy_(ids)
        self._draft_rows = None

    def draft_column(self) -> torch.Tensor:
        """(V,) each token's column in the draft vocabulary, -1 off it (the training loss's labels); built once per
        draft vocabulary and device."""
        vocab = self.draft_vocab
        key = (vocab.device, vocab.data_ptr(), vocab._version)
        if self._column is None or self._column[0] != key:
            column = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=vocab.device)
            column[vocab] = torch.arange(len(vocab), device=vocab.device)
            self._column = (key, column)
        return self._column[1]

    # -- pieces -----------------------------------------------------------------------------------------------

    @property
    def _dtype(self):
        return self.fc.weight.dtype

    def _rope(self, pos):
        ang = pos[..., None].float() * self.inv_freq  # (B, T, hd/2)
        return ang.cos()[:, None], ang.sin()[:, None]  # (B, 1, T, hd/2) each

    def _block_inputs(self, anchor_ids):
        """(...,) anchor ids -> (..., gamma, C): the anchor's embedding, then gamma-1 mask embeddings."""
        G, d = self.config.gamma, self.config.hidden_size
        anchor = self.embed_tokens(anchor_ids).to(self._dtype)[..., None, :]  # (..., 1, C)
        if self.mask_embed is not None:
            mask = self.mask_embed.to(self._dtype)
        else:
            mask_id = torch.tensor(self.config.mask_token_id, device=anchor_ids.device)
            mask = self.embed_tokens(mask_id).to(self._dtype)
        return torch.cat([anchor, mask.expand(*anchor_ids.shape, G - 1, d)], dim=-2)

    def _logits(self, h, head: nn.Module | None = None):
        """(..., C) -> (..., V) through the LM head, or (..., N) through `head` (its rows of the draft vocabulary).
        The rows go in as one contiguous 2-D matrix: a strided 3-D input (a slice of the block) makes torch fall back
        to a batched matmul that is 3-5x slower on CPU."""
        head = self.lm_head if head is None else head
        w = head.weight
        flat = h.reshape(-1, h.shape[-1]).to(w.dtype).contiguous()  # (rows, C)
        return head(flat).float().view(*h.shape[:-1], w.shape[0])  # (..., V or N)

    def _draft_weights(self) -> tuple[nn.Module | None, nn.Module | None]:
        """Linear layers over the LM head's and Markov W2's rows of the draft vocabulary, running the fastest kernel
        for their device and dtype (core/linear_kernel.py); (None, None): the whole vocabulary. Gathered again when
        the LM head or W2 changes (another tensor, or trained in place)."""
        if self.draft_vocab is None:
            return None, None
        head = self.lm_head.weight
        w2 = None if self.seq is None else self.seq.W2.weight
        key = (self.draft_vocab.device, head.data_ptr(), head.dtype, head._version, None if w2 is None else w2._version)
        if self._draft_rows is None or self._draft_rows[0] != key:
            rows = None if w2 is None else linear_over(w2[self.draft_vocab].contiguous())
            self._draft_rows = (key, linear_over(head[self.draft_vocab].contiguous()), rows)
        return self._draft_rows[1], self._draft_rows[2]

    def _confidence_logits(self, h, prev):
        x = h if self.seq is None else torch.cat([h, self.seq.W1(prev).to(h.dtype)], dim=-1)
        return self.confidence(x).squeeze(-1).float()

    def _sequential_step(self, base, h, prev, state, w2: nn.Module | None = None):
        """One position of eq. 4's numerator: U_k + B_k(prev, ·), with the head's carried state; w2: a linear layer
        over the rows of W2 that `base` covers (None: W2 itself)."""
        if self.seq is None:
            return base, state
        z, state = self.seq.step(prev, h, state)
        return base + (self.seq.W2 if w2 is None else w2)(z).float(), state

    def encode_context(
        self, features: torch.Tensor, start: int | torch.Tensor = 0, positions: torch.Tensor | None = None
    ) -> ContextKV:
        """(B, L, F) target features of L consecutive tokens at absolute positions start.. -> their context K/V.
        positions (B, L): each token's absolute position instead (tokens of several requests side by side)."""
        B, L, _ = features.shape
        hctx = self.ctx_norm(self.fc(features.to(self._dtype)))  # (B, L, C)  eq. 2: RMSNorm(W_c [H(l1); ...; H(lm)])
        if positions is None:
            start = torch.as_tensor(start, device=features.device).reshape(-1, 1)  # (1 or B, 1)
            positions = (start + torch.arange(L, device=features.device)).expand(B, L)  # (B, L)
        cos, sin = self._rope(positions)
        kv = [layer.attn.kv(hctx, cos, sin) for layer in self.layers]
        return ContextKV([k for k, _ in kv], [v for _, v in kv])

    def backbone(self, ctx: ContextKV, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Block inputs x (B, T, C) at positions pos (B, T); mask (B, T, L+T) bool, True = may attend; the first L
        keys are the context's. Returns h (B, T, C), final-normed: what the LM head and both heads read."""
        cos, sin = self._rope(pos)
        for layer, k, v in zip(self.layers, ctx.k, ctx.v):
            x = layer(x, cos, sin, k, v, mask)
        return self.norm(x)

    # -- training ---------------------------------------------------------------------------------------------

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, anchors: torch.Tensor) -> DrafterOutput:
        """Teacher-forced blocks for training. features (B, L, F), input_ids (B, L), anchors (B, A) positions t with
        0 <= t < L. Block a has anchor token x_{t_a}, sees the features of tokens < t_a, and its sequential and
        confidence heads are fed the ground-truth previous tokens x_{t_a}, ..., x_{t_a+gamma-1} (clamped at L-1;
        mask those positions out of the loss with block_labels). With a draft vocabulary the logits cover only its
        tokens: the LM head's and W2's other rows get no work and no gradient, as they get none when drafting."""
        B, L = input_ids.shape
        A, G = anchors.shape[1], self.config.gamma
        dev = input_ids.device
        ctx = self.encode_context(features)
        x = self._block_inputs(input_ids.gather(1, anchors)).reshape(B, A * G, -1)  # (B, A*G, C)
        pos = (anchors[..., None] + torch.arange(G, device=dev)).reshape(B, A * G)  # (B, A*G)
        q_anchor = anchors.repeat_interleave(G, dim=1)  # (B, A*G): each query's anchor position
        sees_ctx = torch.arange(L, device=dev) < q_anchor[..., None]  # (B, A*G, L): context strictly before anchor
        blk = torch.arange(A, device=dev).repeat_interleave(G)
        sees_blk = (blk[:, None] == blk[None, :]).expand(B, A * G, A * G)  # own block, bidirectional
        h = self.backbone(ctx, x, pos, torch.cat([sees_ctx, sees_blk], dim=-1)).view(B, A, G, -1)  # (B, A, G, C)
        prev = gather_blocks(input_ids, anchors, G)  # (B, A, G): x_{k-1} for k = 1..G, x_0 = the anchor
        # over the draft vocabulary when there is one (N columns, the ones drafting can propose), else all V
        vocab = self.draft_vocab
        head = self.lm_head.weight if vocab is None else self.lm_head.weight[vocab]  # (N, C), frozen
        flat = h.reshape(-1, h.shape[-1]).to(head.dtype).contiguous()  # (B*A*G, C)
        base = F.linear(flat, head).float().view(B, A, G, head.shape[0])  # (B, A, G, N)  U_k
        if self.seq is None:
            logits = base
        else:
            w2 = self.seq.W2.weight if vocab is None else self.seq.W2.weight[vocab]  # (N, r), trained
            if isinstance(self.seq, MarkovHead):
                logits = base + F.linear(self.seq.W1(prev), w2).float()  # all positions at once
            else:
                state, steps = None, []
                for k in range(G):
                    lk, state = self._sequential_step(
                        base[:, :, k], h[:, :, k], prev[:, :, k], state, functools.partial(F.linear, weight=w2)
                    )
                    steps.append(lk)
                logits = torch.stack(steps, dim=2)
        return DrafterOutput(logits, self._confidence_logits(h, prev), h)

    # -- inference --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def propose(
        self,
        context: ContextKV | torch.Tensor,
        ctx_lens: torch.Tensor | Sequence[int],
        anchor_ids: torch.Tensor | Sequence[int],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        num_draft: int | None = None,
        max_support: int | None = None,
        times: DraftTimes | None = None,
    ) -> Draft:
        """Draft num_draft (<= gamma) tokens for each of B requests. context: ContextKV or (B, L, F) features (row b
        valid for its first ctx_lens[b] tokens, the tokens before its anchor); anchor_ids (B,). params (default:
        SamplingParams()) and generator may be one for all rows or one per row. Tokens are sampled left to right,
        each from q_k = logits_to_probs(U_k + B_k(x_{<k}), params), which is returned as the rejection-sampling q.
        max_support caps q's support at that many tokens (a top-k on top of params), so q is small on the wire.
        times: add the backbone's and the heads' seconds to it (the device synchronised around each)."""
        K = self.config.gamma if num_draft is None else num_draft
        if not 0 <= K <= self.config.gamma:
            raise ValueError(f"num_draft must be in 0..{self.config.gamma}, got {K}")
        if isinstance(context, torch.Tensor):
            context = self.encode_context(context)
        dev = context.k[0].device
        anchor_ids = torch.as_tensor(anchor_ids, device=dev).reshape(-1)
        ctx_lens = torch.as_tensor(ctx_lens, device=dev).reshape(-1)
        B, L, G = anchor_ids.shape[0], context.length, self.config.gamma
        if ctx_lens.shape[0] != B or bool((ctx_lens > L).any()):
            raise ValueError(f"need one context length <= {L} per anchor, got {ctx_lens.tolist()}")
        pos = ctx_lens[:, None] + torch.arange(G, device=dev)  # (B, G): the block sits right after its context
        sees_ctx = (torch.arange(L, device=dev) < ctx_lens[:, None])[:, None].expand(B, G, L)  # (B, G, L)
        mask = torch.cat([sees_ctx, torch.ones(B, G, G, dtype=torch.bool, device=dev)], dim=-1)
        t0 = 0.0 if times is None else synced_clock(dev)
        h = self.backbone(context, self._block_inputs(anchor_ids), pos, mask)[:, :K]  # (B, K, C)
        t1 = 0.0 if times is None else synced_clock(dev)
        vocab = self.draft_vocab  # (N,) token ids, or None: all V
        head_w, w2 = self._draft_weights()
        base = self._logits(h, head_w)  # (B, K, N or V)
        rows = params if isinstance(params, SamplingParams) else SamplingParams() if params is None else list(params)
        rows = (
            truncated(rows, max_support)
            if isinstance(rows, SamplingParams)
            else [truncated(p, max_support) for p in rows]
        )
        gens = generator if generator is None or isinstance(generator, torch.Generator) else list(generator)
        V = self.config.vocab_size
        tokens, conf = [], []
        # (B, K, V): each position's q written in place; 0 off the draft vocabulary when there is one
        probs = torch.zeros(B, K, V, device=dev) if vocab is not None else torch.empty(B, K, V, device=dev)
        prev, state = anchor_ids, None
        for k in range(K):
            logits, state = self._sequential_step(base[:, k], h[:, k], prev, state, w2)  # (B, N or V)
            conf.append(torch.sigmoid(self._confidence_logits(h[:, k], prev) / self.conf_temperature[k]))
            q = logits_to_probs_rows(logits, rows)  # (B, N or V)
            prev = sample(q, gens)  # (B,) indices into the draft vocabulary (or token ids)
            if vocab is not None:
                prev = vocab[prev]  # token ids
                probs[:, k].index_copy_(1, vocab, q)
            else:
                probs[:, k] = q
            tokens.append(prev)
        if times is not None:
            times.backbone_s += t1 - t0
            times.head_s += synced_clock(dev) - t1
        if K == 0:
            empty = torch.zeros(B, 0, device=dev)
            return Draft(empty.long(), probs, empty)
        return Draft(torch.stack(tokens, 1), probs, torch.stack(conf, 1))


# -- training helpers -------------------------------------------------------------------------------------------


def gather_blocks(x: torch.Tensor, anchors: torch.Tensor, gamma: int, offset: int = 0) -> torch.Tensor:
    """x (B, L, *) -> (B, A, gamma, *): x[b, anchors[b, a] + offset + j] for j < gamma, indices clamped to L-1.
    offset 0 on input_ids: the previous tokens x_{k-1}; on per-position target logits: p_t for draft position k.
    offset 1 on input_ids: the labels x_k."""
    B, L = x.shape[:2]
    idx = (anchors[..., None] + offset + torch.arange(gamma, device=x.device)).clamp(max=L - 1)  # (B, A, G)
    flat = idx.reshape(B, -1)
    if x.dim() == 2:
        return x.gather(1, flat).view(*idx.shape)
    return x[torch.arange(B, device=x.device)[:, None], flat].view(*idx.shape, *x.shape[2:])


def block_labels(
    input_ids: torch.Tensor, anchors: torch.Tensor, gamma: int, loss_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (B, A, gamma) = x_{t+1..t+gamma} and valid (B, A, gamma): the label exists, is trained on (loss_mask),
    and so are all labels before it in the block (a block is supervised as a contiguous prefix)."""
    L = input_ids.shape[1]
    idx = anchors[..., None] + 1 + torch.arange(gamma, device=input_ids.device)  # (B, A, G)
    valid = idx < L
    if loss_mask is not None:
        valid &= gather_blocks(loss_mask.bool(), anchors, gamma, offset=1)
    return gather_blocks(input_ids, anchors, gamma, offset=1), valid.int().cumprod(-1).bool()


def sample_anchors(
    loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw up to num_anchors distinct anchors per sequence, uniformly among positions t whose token and next token
    are both trained on (loss_mask (B, L)): the anchor is a response token, as a bonus token is at inference.
    Returns anchors (B, A) sorted, and keep (B, A) bool (False pads rows with fewer candidates; those anchors are 0)."""
    B, L = loss_mask.shape
    m = loss_mask.bool()
    cand = torch.zeros_like(m)
    cand[:, :-1] = m[:, :-1] & m[:, 1:]
    score = torch.rand(B, L, generator=generator, device=None if generator is None else generator.device).to(m.device)
    score = torch.where(cand, score, torch.full_like(score, 2.0))  # non-candidates sort last
    A = min(num_anchors, L)
    picked = score.topk(A, dim=1, largest=False).indices  # (B, A)
    keep = cand.gather(1, picked)
    anchors = torch.where(keep, picked, torch.zeros_like(picked))
    order = torch.where(keep, anchors, torch.full_like(anchors, L)).argsort(dim=1)
    return anchors.gather(1, order), keep.gather(1, order)


# -- Sequential Temperature Scaling (§3.2.1) ---------------------------------------------------------------------


def expected_calibration_error(pred: torch.Tensor, label: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with equal-width bins: sum over bins of (bin share) * |mean prediction - mean outcome|."""
    bins = (pred.clamp(0, 1) * n_bins).long().clamp(max=n_bins - 1)
    n = torch.bincount(bins, minlength=n_bins).float()
    gap = torch.bincount(bins, weights=pred.float() - label.float(), minlength=n_bins)
    return float(gap.abs().sum() / n.sum().clamp(min=1))


def fit_sts_temperatures(
    conf_logits: torch.Tensor, accepted: torch.Tensor, grid: torch.Tensor | None = None, n_bins: int = 15
) -> torch.Tensor:
    """Fit the per-position confidence temperatures left to right (STS). conf_logits (N, K) of N fully verified
    blocks; accepted (N,) how many of each block's drafts were accepted. At position k the temperature minimising the
    ECE of the prefix-survival estimate prod_{i<=k} c_i against 1[accepted >= k] is kept, earlier ones fixed.
    Returns (K,); copy into drafter.conf_temperature[:K]."""
    grid = torch.logspace(-1, 1, 41) if grid is None else grid
    prefix = torch.ones(conf_logits.shape[0], device=conf_logits.device)
    temps = []
    for k in range(conf_logits.shape[1]):
        label = (accepted > k).float()
        errs = [expected_calibration_error(prefix * torch.sigmoid(conf_logits[:, k] / t), label, n_bins) for t in grid]
        t = float(grid[min(range(len(errs)), key=errs.__getitem__)])
        temps.append(t)
        prefix = prefix * torch.sigmoid(conf_logits[:, k] / t)
    return torch.tensor(temps)


def prefix_ece(conf_logits: torch.Tensor, accepted: torch.Tensor, temps: torch.Tensor, n_bins: int = 15) -> float:
    """Mean over positions k of the ECE of prod_{i<=k} sigmoid(l_i / T_i) against 1[accepted > k]."""
    prefix = torch.sigmoid(conf_logits / temps.to(conf_logits)).cumprod(-1)  # (N, K)
    errs = [expected_calibration_error(prefix[:, k], (accepted > k).float(), n_bins) for k in range(prefix.shape[1])]
    return float(sum(errs) / len(errs))


def fit_joint_temperatures(
    conf_logits: torch.Tensor,
    accepted: torch.Tensor,
    grid: torch.Tensor | None = None,
    n_bins: int = 15,
    sweeps: int = 4,
) -> torch.Tensor:
    """All per-position temperatures fit together: coordinate descent on the mean prefix ECE over every position
    (a temperature at position k moves the prefix estimates of all positions >= k, which the left-to-right STS fit
    ignores). Starts from T = 1; each sweep revisits every position; stops when a sweep changes nothing."""
    grid = torch.logspace(-1, 1, 41) if grid is None else grid
    temps = torch.ones(conf_logits.shape[1])
    best = prefix_ece(conf_logits, accepted, temps, n_bins)
    for _ in range(sweeps):
        changed = False
        for k in range(len(temps)):
            for t in grid:
                trial = temps.clone()
                trial[k] = t
                err = prefix_ece(conf_logits, accepted, trial, n_bins)
                if err < best - 1e-9:
                    best, temps, changed = err, trial, True
        if not changed:
            break
    return temps
