"""The engine's attention: transformers' SDPA attention, without copying grouped keys and values on CPU.

For a query block of more than one token under a mask, transformers' "sdpa" attention repeats every key/value head
for its query heads (`repeat_kv`: a copy of each layer's cached keys and values) unless it runs on CUDA without a mask.
The engine always passes a mask and verifies blocks of 2-8 tokens, so each verify step copied the whole KV of its
rows 30 times: on a 2-core Intel Xeon (bf16, SmolLM2-135M, 200 cached tokens) 8 rows x 2 tokens took 97 ms against
73 ms without the copy, and `aten::copy_` fell from 10.7 to 3.2 ms of the step. torch's CPU SDPA takes the grouped
heads itself (`enable_gqa=True`, with a mask too), so on CPU this attention passes them as they are; a single query
token (transformers' own `pack_gqa` path) and every other device keep transformers' "sdpa" as it is. Same
arithmetic, no change in what is computed.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "dspark_sdpa"


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (B, H, T, hd), key/value (B, kvh, L, hd) -> ((B, T, H, hd), None), transformers' attention signature."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        query.device.type != "cpu"
        or groups == 1
        or query.shape[2] == 1
        or attention_mask is None
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )  # (B, H, T, hd)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_grouped_sdpa(model) -> bool:
    """Switches a model that runs transformers' "sdpa" attention to this one, in place; others stay as they are.
    Returns whether it switched."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    config._attn_implementation = NAME
    return True
