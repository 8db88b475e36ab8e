"""How the target's linear layers multiply: the kernel behind every projection and the LM head.

transformers' `nn.Linear` keeps W as (out, in) and computes x @ Wᵀ ("torch", the default everywhere). "transposed"
keeps W stored (in, out) once at load time and computes x @ W instead, another MKL path on CPU. Measured side by side
on a 2-core AMD EPYC (AVX2, 2 threads, SmolLM2-135M, 200 cached tokens, medians of 8, both engines in one process),
a verifier step over B rows x T tokens cost, transposed / torch:

    1x1 0.92   2x1 0.82   4x1 1.15   8x1 1.13   16x1 1.12   1x8 1.23   2x8 1.11

so it speeds up one- and two-row steps (plain decoding at low load) and slows the multi-token steps verification
runs; "auto" therefore stays transformers' own kernel until a kernel wins at every B (`dspark profile` shows the
curve). A kernel changes the order of floating-point sums, never what is computed: plain decoding and verification
run the same kernel, so speculative output stays exactly plain decoding's.
"""

from __future__ import annotations

import torch
from torch import nn

KERNELS = ("auto", "torch", "transposed")


def resolve_kernel(kernel: str) -> str:
    """The kernel a config's `linear_kernel` names: "auto" is transformers' own linear, on every device (see the
    measurements above)."""
    if kernel not in KERNELS:
        raise ValueError(f"linear kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    return "torch" if kernel == "auto" else kernel


class TransposedLinear(nn.Module):
    """y = x @ W + b with W stored (in, out) contiguously. `.weight` still reads as the usual (out, in) matrix (a
    view), so code that looks at the weights (the drafter's shared LM head, fingerprints) sees the same numbers."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()  # (out, in), a view

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = x.reshape(-1, self.in_features) @ self.weight_t  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _as_linear(m: TransposedLinear) -> nn.Linear:
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight_t.device)
    lin.weight = nn.Parameter(m.weight.contiguous(), requires_grad=False)
    lin.bias = m.bias
    return lin


def apply_linear_kernel(model: nn.Module, kernel: str) -> int:
    """Makes every linear layer of `model` (decoder projections and the LM head) run `kernel`, in place, either way:
    "transposed" rebuilds each `nn.Linear` as a `TransposedLinear`, "torch" turns them back. Returns how many layers
    changed (0 when the model already runs `kernel`). The LM head gets its own copy, so a tied input embedding keeps
    reading its rows."""
    if kernel == "transposed":
        old, make = nn.Linear, TransposedLinear
    elif kernel == "torch":
        old, make = TransposedLinear, _as_linear
    else:
        raise ValueError(f"unknown linear kernel {kernel!r}")
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is old
    ]
    for parent, name, child in swaps:
        setattr(parent, name, make(child))
    return len(swaps)
