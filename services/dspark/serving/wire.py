"""Conversions between the decode loop's tensors/dataclasses and the dspark.v1 protobuf messages.

Draft distributions travel sparse: only the tokens with nonzero probability, as (token id, probability) pairs in
float32. A proposer with max_support samples from at most that many tokens, so the verifier rebuilds exactly the
dense q the token was drawn from (zeros elsewhere) and rejection sampling stays exact. Features travel as raw
little-endian bytes in the dtype they were computed in (or a narrower one if asked).
"""

from __future__ import annotations

import numpy as np
import torch

from dspark.core.planner import DraftCost
from dspark.core.sampling import SamplingParams
from dspark.core.scheduler import SpsTable
from dspark.v1 import draft_pb2 as dpb
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


class SparseRows:
    """k sparse draft distributions as they arrived (SparseDistribution messages), standing in for a dense (k, V)
    tensor where the decode loop only slices and forwards them: the router passes them from the draft service to
    the verifier without ever building the dense rows."""

    def __init__(self, rows, vocab_size: int):
        self.rows, self.vocab_size = list(rows), vocab_size

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.vocab_size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice) -> SparseRows:
        return SparseRows(self.rows[index], self.vocab_size)

    def dense(self, device: str | torch.device = "cpu") -> torch.Tensor:
        return dense_from_sparse(self.rows, self.vocab_size, device)


def sparse_from_dense(probs) -> list[vpb.SparseDistribution]:
    """(k, V) distributions -> k sparse ones holding exactly the nonzero entries."""
    if isinstance(probs, SparseRows):
        return probs.rows
    p = probs.detach().float().cpu()
    nz = p.nonzero()  # (N, 2), row-major
    vals = p[nz[:, 0], nz[:, 1]].tolist()
    cols = nz[:, 1].tolist()
    out, i = [], 0
    for n in torch.bincount(nz[:, 0], minlength=p.shape[0]).tolist():
        out.append(vpb.SparseDistribution(token_ids=cols[i : i + n], probs=vals[i : i + n]))
        i += n
    return out


def dense_from_sparse(rows, vocab_size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """k sparse distributions -> (k, V) float32, zeros elsewhere."""
    counts = [len(r.token_ids) for r in rows]
    if any(len(r.probs) != n for r, n in zip(rows, counts)):
        raise ValueError("a draft distribution needs one probability per token id")
    ids = torch.tensor([t for r in rows for t in r.token_ids], dtype=torch.long)
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"draft distribution has token ids outside the vocabulary (0..{vocab_size - 1})")
    vals = torch.tensor([p for r in rows for p in r.probs], dtype=torch.float32)
    row = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(counts, dtype=torch.long))
    q = torch.zeros(len(rows), vocab_size, dtype=torch.float32)
    q[row, ids] = vals
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


def draft_cost_to_proto(cost: DraftCost) -> dpb.DraftCostTable:
    return dpb.DraftCostTable(
        rows=list(cost.rows), positions=cost.gamma, seconds=[s for row in cost.seconds for s in row]
    )


def draft_cost_from_proto(m: dpb.DraftCostTable) -> DraftCost | None:
    """None for an absent table (a draft service that has not profiled its drafter)."""
    if not m.rows:
        return None
    k = m.positions
    if k < 1 or len(m.seconds) != k * len(m.rows):
        raise ValueError(f"a draft cost table needs {k} x {len(m.rows)} times, got {len(m.seconds)}")
    return DraftCost(tuple(m.rows), tuple(tuple(m.seconds[i * k : (i + 1) * k]) for i in range(len(m.rows))))


def sps_to_proto(sps: SpsTable) -> vpb.SpsTable:
    return vpb.SpsTable(
        batch_tokens=list(sps.batch_tokens),
        steps_per_s=list(sps.steps_per_s),
        by_rows=[
            vpb.SpsRowTable(rows=r, batch_tokens=list(t.batch_tokens), steps_per_s=list(t.steps_per_s))
            for r, t in sps.by_rows
        ],
    )


def sps_from_proto(m: vpb.SpsTable) -> SpsTable | None:
    """None for an absent table (a verifier that has not profiled itself)."""
    if not m.batch_tokens:
        return None
    return SpsTable(
        tuple(m.batch_tokens),
        tuple(m.steps_per_s),
        tuple((t.rows, SpsTable(tuple(t.batch_tokens), tuple(t.steps_per_s))) for t in m.by_rows),
    )
