"""How the target's linear layers multiply: the kernel behind every projection and the LM head.

transformers' `nn.Linear` keeps W as (out, in) and computes x @ Wᵀ with MKL's sgemm on CPU ("torch"). "transposed"
stores W (in, out) once at load time and computes x @ W, another MKL path. "onednn" reorders W once into oneDNN's
blocked layout and runs oneDNN's linear (the prepacked path torch's inductor uses on CPU); MKL's sgemm is slow for the
few rows a decoding step has (a 49,152 x 576 LM head: 17.7 ms for 1 row, 41.7 ms for 2, 47.2 ms for 8; prepacked
8.5-10, 9.9-10.5, 13-16 ms). Measured side by side on a 2-core AMD EPYC (AVX2, 2 threads, SmolLM2-135M, 200 cached
tokens, medians of 8, both engines in one process), a verifier step over B rows x T tokens cost, kernel / torch:

    B x T        1x1   2x1   4x1   8x1   16x1   1x8   2x8   4x8   8x8
    transposed  0.92  0.82  1.15  1.13  1.12   1.23  1.11
    onednn      0.96  0.57  0.67  0.78  0.83   0.75  0.82  0.76  0.88

so "auto" is "onednn" wherever it runs and transformers' own kernel elsewhere (CUDA, float16). On a CPU with native
bf16 (avx512_bf16 / AMX) oneDNN packs bfloat16 weights as well: on a 2-core Intel Xeon with AMX, the 211 matrices of
SmolLM2-135M (cold in cache, as in a step) took 29 ms for 1 row and 22 ms for 8-16 rows prepacked in bf16, against
32 / 69 / 75 ms for 1 / 8 / 16 rows in float32 and 41 / 35 / 30 ms through nn.Linear in bf16, and `dspark profile`
(bf16) gave SPS(8) / SPS(1) = 0.91 with it against 0.54 for float32 through nn.Linear. On AVX2-only CPUs oneDNN
reports no bf16 support and bf16 stays with nn.Linear. Prepacked bf16 results do not depend on the row count there
(1 row at a time and 2-16 rows together gave identical outputs). A kernel changes the order of floating-point sums,
never what is computed: plain decoding and verification run the same kernel, so speculative output stays exactly
plain decoding's (and the real-model tests check it still equals transformers' own greedy decoding).
"""

from __future__ import annotations

import torch
from torch import nn

KERNELS = ("auto", "torch", "transposed", "onednn")


def onednn_available(device: str | torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's prepacked linear: CPU tensors, float32, or bfloat16 where oneDNN says the CPU runs it natively
    (avx512_bf16 / AMX; on an AVX2-only CPU bf16 stays with transformers' own linear)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def resolve_kernel(kernel: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """The kernel a config's `linear_kernel` names on this device and dtype: "auto" is "onednn" where oneDNN's
    prepacked linear runs (float32 on CPU; bfloat16 on CPUs with native bf16), transformers' own linear elsewhere
    (see the measurements above)."""
    if kernel not in KERNELS:
        raise ValueError(f"linear kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "onednn" and not onednn_available(device, dtype):
        raise ValueError(
            f"the onednn linear kernel runs on CPU only, float32 or bf16 where the CPU has it, not {dtype} on {device}"
        )
    if kernel == "auto":
        return "onednn" if onednn_available(device, dtype) else "torch"
    return kernel


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


class OneDnnLinear(nn.Module):
    """y = x Wᵀ + b through oneDNN, W reordered once into oneDNN's blocked layout (`batch_hint`: the row count the
    layout is tuned for; any row count runs). `.weight` stays the usual (out, in) parameter for code that reads the
    weights (the drafter's shared LM head, fingerprints), so the layer holds its weights twice. Moved to another
    dtype or device (`.to`), it computes as nn.Linear does; copied or pickled, it packs its weights again."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 64):
        super().__init__()
        self.in_features, self.out_features, self.batch_hint = linear.in_features, linear.out_features, batch_hint
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)  # (out, in)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self._pack()

    def _pack(self) -> None:
        w = self.weight.detach()
        runs = onednn_available(w.device, w.dtype)
        self._packed = torch.ops.mkldnn._reorder_linear_weight(w, self.batch_hint) if runs else None  # opaque

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self._packed is None or x.dtype != self.weight.dtype or (torch.is_grad_enabled() and x.requires_grad):
            return nn.functional.linear(x, self.weight, self.bias)  # oneDNN's op has no backward
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._pack()
        return out

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_packed"}  # an opaque tensor neither copies nor pickles

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pack()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _as_linear(m: TransposedLinear | OneDnnLinear) -> nn.Linear:
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device)
    lin.weight = nn.Parameter(m.weight.contiguous(), requires_grad=False)
    lin.bias = m.bias
    return lin


_MAKE = {"torch": None, "transposed": TransposedLinear, "onednn": OneDnnLinear}


def linear_over(weight: torch.Tensor, kernel: str = "auto") -> nn.Module:
    """A bias-free linear layer computing x @ weightᵀ (weight (out, in), not copied) with `kernel` ("auto": the
    fastest that runs on weight's device and dtype), for matrices that are not a model's own layers (the drafter's
    rows of the LM head over its draft vocabulary)."""
    kernel = resolve_kernel(kernel, weight.device, weight.dtype)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return lin if kernel == "torch" else _MAKE[kernel](lin)


_KINDS = (nn.Linear, TransposedLinear, OneDnnLinear)


def kernel_of(model: nn.Module) -> str:
    """The kernel a model's linear layers run (the first one found; "torch" with none of this module's)."""
    for m in model.modules():
        if isinstance(m, OneDnnLinear):
            return "onednn"
        if isinstance(m, TransposedLinear):
            return "transposed"
    return "torch"


def apply_linear_kernel(model: nn.Module, kernel: str) -> int:
    """Makes every linear layer of `model` (decoder projections and the LM head) run `kernel`, in place, from any
    other kernel. Returns how many layers changed (0 when the model already runs `kernel`). The LM head gets its own
    module, so a tied input embedding keeps reading its rows."""
    if kernel not in _MAKE:
        raise ValueError(f"unknown linear kernel {kernel!r}")
    want = nn.Linear if _MAKE[kernel] is None else _MAKE[kernel]
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) in _KINDS and type(child) is not want
    ]
    for parent, name, child in swaps:
        lin = child if type(child) is nn.Linear else _as_linear(child)
        setattr(parent, name, lin if want is nn.Linear else want(lin))
    return len(swaps)
