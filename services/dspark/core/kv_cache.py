"""Slot KV cache: a fixed pool of per-request key/value rows, written at arbitrary per-row positions.

Every layer holds keys and values of shape (S, kvh, C + 1, hd): S request slots, C context positions and
one scratch column where padded query positions write, so padding never touches a live position.
Rolling a request back is only a change of its length: positions past it are dead and get overwritten.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotCache(Cache):
    """Plugs into a transformers decoder as its `cache`; `bind` picks the slots and positions of one forward."""

    def __init__(self, num_layers: int, slots: int, context: int, kv_heads: int, head_dim: int, dtype, device):
        # Deliberately not calling Cache.__init__: this class owns its storage and only serves `update`.
        self.layers = []  # transformers inspects per-layer flags here; none apply
        shape = (slots, kv_heads, context + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.context = context
        self._slots: torch.Tensor | None = None  # (B,)
        self._slot_range: slice | None = None  # the same slots as a contiguous range, when they are one
        self._write_pos: torch.Tensor | None = None  # (B, T) column each new key/value goes to
        self._kv_len = 0  # columns the attention reads in this forward

    def bind(self, slots: list[int], write_pos: torch.Tensor, kv_len: int) -> None:
        device = self.keys[0].device
        self._slots = torch.tensor(slots, dtype=torch.long, device=device)
        lo = slots[0]
        contiguous = slots == list(range(lo, lo + len(slots)))
        self._slot_range = slice(lo, lo + len(slots)) if contiguous else None
        self._write_pos = write_pos
        self._kv_len = kv_len

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states: (B, kvh, T, hd) for the new tokens of the bound slots
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        rows = self._slots[:, None]  # (B, 1)
        k_cache[rows, :, self._write_pos] = key_states.transpose(1, 2)  # (B, T, kvh, hd)
        v_cache[rows, :, self._write_pos] = value_states.transpose(1, 2)
        if self._slot_range is not None:  # a view, no copy
            return k_cache[self._slot_range, :, : self._kv_len], v_cache[self._slot_range, :, : self._kv_len]
        return k_cache[self._slots, :, : self._kv_len], v_cache[self._slots, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def __len__(self) -> int:
        return len(self.keys)
