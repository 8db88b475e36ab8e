"""Ragged verify steps: the MLPs, attention projections and LM head of a padded forward compute its real tokens only.

The engine runs a forward over query blocks of different lengths as one padded (B, T) batch: the slot cache, the
causal mask and the attention want that layout. Padding is most of a batch when the prefix scheduler does its job:
one confident row drafting 3 tokens next to three rows drafting none is a 4 x 4 batch with 7 real tokens. Linear
layers cost per row of their input, so every padded position paid like a drafted token, and the planner had to price
a draft for one row as a draft for all.

`RealTokens` holds the flat indices of the real positions of the forward running now (`real_tokens`, per thread); a
hook gathers them, (B, T, C) -> (1, N, C), before each decoder layer's MLP and each projection of its attention (q,
k, v, o), and scatters the output back, zeros at padding (whose outputs nobody reads). The hooks are plain functions
of the module, so a copied model (`copy.deepcopy`) keeps them and computes as the original does. The engine computes
the LM head on the N real positions only. The attention itself (rotary embedding, cache, SDPA) and the norms keep
the padded layout. Every real token is computed as before; what changes is how many rows a GEMM multiplies.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class RealTokens:
    """The real positions of one padded forward: flat indices into its (B, T) batch, row-major."""

    def __init__(self, real: torch.Tensor):  # (B, T) bool, True at real query tokens
        self.shape: tuple[int, int] = tuple(real.shape)
        self.index = real.reshape(-1).nonzero().squeeze(1)  # (N,) int64
        self.packed: set[nn.Module] = set()  # modules whose input was gathered and whose output is still due

    def gather(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (1, N, C)
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)[None]

    def scatter(self, y: torch.Tensor) -> torch.Tensor:  # (1, N, C) -> (B, T, C), zeros at padding
        B, T = self.shape
        out = y.new_zeros(B * T, y.shape[-1])
        out.index_copy_(0, self.index, y[0])
        return out.view(B, T, -1)


_in_flight = threading.local()  # .tokens: the RealTokens of this thread's forward, or None


@contextmanager
def real_tokens(real: torch.Tensor) -> Iterator[None]:
    """Within it, this thread's hooked modules compute only the True positions of `real` (B, T) (all of them: no
    change)."""
    outer = getattr(_in_flight, "tokens", None)
    _in_flight.tokens = None if bool(real.all()) else RealTokens(real)
    try:
        yield
    finally:
        _in_flight.tokens = outer


def _gather(module, args, kwargs):
    rt: RealTokens | None = getattr(_in_flight, "tokens", None)
    x = args[0] if args else None
    if rt is None or not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != rt.shape:
        return None
    rt.packed.add(module)
    return (rt.gather(x), *args[1:]), kwargs


def _scatter(module, args, kwargs, out):
    rt: RealTokens | None = getattr(_in_flight, "tokens", None)
    if rt is None or module not in rt.packed:
        return None
    rt.packed.discard(module)
    if isinstance(out, tuple):  # mixture-of-experts MLPs also return their router logits
        return (rt.scatter(out[0]), *out[1:])
    return rt.scatter(out)


def pack_layers(decoder: nn.Module) -> bool:
    """Hooks every decoder layer's MLP (`layers[i].mlp`) and the linear projections of its attention
    (`layers[i].self_attn.*`: q/k/v/o) to compute only the real tokens of a forward run under `real_tokens`, once
    per decoder. False for a decoder without them: it computes every position, as before."""
    if getattr(decoder, "_dspark_ragged", False):
        return True
    hooked = []
    for layer in getattr(decoder, "layers", []):
        mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
        if isinstance(mlp, nn.Module):
            hooked.append(mlp)
        if isinstance(attn, nn.Module):
            hooked += [m for m in attn.children() if isinstance(m, nn.Module) and hasattr(m, "in_features")]
    for m in hooked:
        m.register_forward_pre_hook(_gather, with_kwargs=True)
        m.register_forward_hook(_scatter, with_kwargs=True)
    decoder._dspark_ragged = bool(hooked)
    return decoder._dspark_ragged
