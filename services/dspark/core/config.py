"""Frozen configuration read once at the process edge and passed to constructors."""

from __future__ import annotations

from dataclasses import dataclass

from dspark.core.linear_kernel import KERNELS
from dspark.models.registry import DEFAULT_MODEL

# the EngineConfig fields the command line's engine flags set (EngineConfig.from_args)
ENGINE_FLAGS = ("model", "device", "dtype", "max_requests", "max_context", "threads", "linear_kernel")


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL  # registry name, local HF folder or .gguf path
    device: str = "cpu"  # any torch device string: "cpu", "cuda", "cuda:1"
    dtype: str = "float32"  # "float32" or "bfloat16"
    max_requests: int = 8  # concurrent requests, one KV slot each
    max_context: int = 2048  # prompt + generated tokens per request
    feature_layers: tuple[int, ...] = ()  # hidden-state layers returned per token (0 = embeddings)
    threads: int | None = None  # torch CPU threads; None = torch's default
    linear_kernel: str = "auto"  # how projections multiply (core/linear_kernel.py): auto, torch, transposed

    @classmethod
    def from_args(cls, a) -> EngineConfig:
        """The config the command line's engine flags (--model, --device, --dtype, --max-requests, --max-context,
        --threads, --linear-kernel) ask for; an argparse namespace. The feature layers come from the drafter, later."""
        return cls(**{name: getattr(a, name) for name in ENGINE_FLAGS})

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_requests < 1 or self.max_context < 2:
            raise ValueError("max_requests must be >= 1 and max_context >= 2")
        if self.linear_kernel not in KERNELS:
            raise ValueError(f"linear_kernel must be one of {', '.join(KERNELS)}, got {self.linear_kernel!r}")
