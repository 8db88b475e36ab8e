"""Conversions between the decode loop's tensors/dataclasses and the dspark.v1 protobuf messages.

Draft distributions travel sparse: only the tokens with nonzero probability, as (token id, probability) pairs in
float32. A proposer with max_support samples from at most that many tokens, so the verifier rebuilds exactly the
dense q the token was drawn from (zeros elsewhere) and rejection sampling stays exact. Features travel as raw
little-endian bytes in the dtype they were computed in (or a narrower one if asked).
"""

from __future__ import annotations

import numpy as np
import torch

from dspark.sampling import SamplingParams
from dspark.v1 import verifier_pb2 as vpb

_NP = {"float32": np.float32, "float16": np.float16}


def tensor_to_proto(t: torch.Tensor, dtype: str | None = None) -> vpb.Tensor:
    """(..) tensor -> Tensor message; dtype: "float32", "float16" or "bfloat16" (default: the tensor's own)."""
    t = t.detach().cpu()
    dtype = dtype or str(t.dtype).removeprefix("torch.")
    t = t.to(getattr(torch, dtype)).contiguous()
    if dtype == "bfloat16":  # numpy has no bfloat16: ship the raw 16-bit words
        data = t.view(torch.int16).numpy().tobytes()
    else:
        data = t.numpy().astype(_NP[dtype], copy=False).tobytes()
    return vpb.Tensor(shape=list(t.shape), dtype=dtype, data=data)


def tensor_from_proto(m: vpb.Tensor, device: str | torch.device = "cpu") -> torch.Tensor | None:
    """Tensor message -> float32 tensor on device; None for an unset (empty-shape) message."""
    if not m.shape:
        return None
    shape = tuple(m.shape)
    if m.dtype == "bfloat16":
        t = torch.frombuffer(bytearray(m.data), dtype=torch.int16).view(torch.bfloat16)
    elif m.dtype in _NP:
        t = torch.from_numpy(np.frombuffer(m.data, dtype=_NP[m.dtype]).copy())
    else:
        raise ValueError(f"unknown tensor dtype {m.dtype!r}")
    if t.numel() != int(np.prod(shape)):
        raise ValueError(f"tensor of shape {shape} needs {int(np.prod(shape))} values, got {t.numel()}")
    return t.reshape(shape).float().to(device)


def sparse_from_dense(probs: torch.Tensor) -> list[vpb.SparseDistribution]:
    """(k, V) distributions -> k sparse ones holding exactly the nonzero entries."""
    out = []
    for row in probs.detach().float().cpu():
        ids = row.nonzero().squeeze(-1)
        out.append(vpb.SparseDistribution(token_ids=ids.tolist(), probs=row[ids].tolist()))
    return out


def dense_from_sparse(rows, vocab_size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """k sparse distributions -> (k, V) float32, zeros elsewhere."""
    q = torch.zeros(len(rows), vocab_size, dtype=torch.float32)
    for i, r in enumerate(rows):
        ids = torch.tensor(list(r.token_ids), dtype=torch.long)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"draft distribution has token ids outside the vocabulary (0..{vocab_size - 1})")
        q[i, ids] = torch.tensor(list(r.probs), dtype=torch.float32)
    return q.to(device)


def params_to_proto(p: SamplingParams) -> vpb.SamplingParams:
    m = vpb.SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p)
    if p.seed is not None:
        m.seed = p.seed
    return m


def params_from_proto(m: vpb.SamplingParams, **extra) -> SamplingParams:
    """Raises ValueError (with the parameter named) for out-of-range values."""
    return SamplingParams(
        temperature=m.temperature,
        top_k=m.top_k,
        top_p=m.top_p if m.top_p else 1.0,
        seed=m.seed if m.HasField("seed") else None,
        **extra,
    )
