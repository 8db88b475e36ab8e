"""The engine's linear kernels: transposed weights and oneDNN's prepacked weights compute what nn.Linear computes, in
place and back again, and plain decoding and verification agree under each (they run the same kernel)."""

from __future__ import annotations

import copy

import pytest
import torch

from dspark.core.config import EngineConfig
from dspark.core.decoding import Decoder
from dspark.core.draft_lm import DraftModelProposer
from dspark.core.engine import TargetEngine
from dspark.core.linear_kernel import (
    OneDnnLinear,
    TransposedLinear,
    apply_linear_kernel,
    linear_over,
    onednn_available,
    resolve_kernel,
)
from dspark.core.sampling import SamplingParams

from conftest import tiny_model


def linears(model) -> dict[type, int]:
    kinds = [type(m) for m in model.modules() if isinstance(m, (torch.nn.Linear, TransposedLinear, OneDnnLinear))]
    return {k: kinds.count(k) for k in set(kinds)}


def test_transposed_linear_computes_what_nn_linear_computes():
    torch.manual_seed(0)
    for bias in (False, True):
        lin = torch.nn.Linear(24, 40, bias=bias)
        t = TransposedLinear(lin)
        assert t.weight_t.shape == (24, 40) and t.weight_t.is_contiguous()
        assert torch.equal(t.weight, lin.weight)  # (out, in) as a view, for code that reads the weights
        for shape in [(1, 24), (3, 24), (2, 5, 24)]:
            x = torch.randn(shape)
            torch.testing.assert_close(t(x), lin(x), atol=1e-6, rtol=1e-5)


def test_onednn_linear_computes_what_nn_linear_computes():
    torch.manual_seed(0)
    for bias in (False, True):
        lin = torch.nn.Linear(24, 40, bias=bias)
        o = OneDnnLinear(lin, batch_hint=4)
        assert torch.equal(o.weight, lin.weight)  # the (out, in) parameter, for code that reads the weights
        for shape in [(1, 24), (3, 24), (2, 5, 24), (70, 24)]:  # any row count, above the hint too
            x = torch.randn(shape)
            torch.testing.assert_close(o(x), lin(x), atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 24)
    c = copy.deepcopy(o)  # packs its own copy
    torch.testing.assert_close(c(x), lin(x), atol=1e-5, rtol=1e-5)
    b = copy.deepcopy(o).to(torch.bfloat16)  # repacked in bf16 where the CPU has it, else computes as nn.Linear does
    assert (b._packed is not None) == onednn_available("cpu", torch.bfloat16)
    torch.testing.assert_close(b(x.bfloat16()), lin.to(torch.bfloat16)(x.bfloat16()))


def test_onednn_linear_passes_gradients_to_its_input_and_linear_over_wraps_a_matrix():
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40, bias=False)
    x = torch.randn(3, 24, requires_grad=True)
    OneDnnLinear(lin)(x).sum().backward()  # oneDNN's op has no backward: it computes as nn.Linear then
    want = torch.autograd.grad(lin(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, want)
    w = torch.randn(40, 24)
    for kernel in ("auto", "torch", "transposed", "onednn"):
        layer = linear_over(w, kernel)
        assert layer.weight.shape == (40, 24)
        torch.testing.assert_close(layer(x.detach()), x.detach() @ w.t(), atol=1e-5, rtol=1e-5)


def test_model_runs_each_kernel_in_place_and_back():
    model = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        want = model(ids).logits
    embed = model.get_input_embeddings().weight.data_ptr()
    n = apply_linear_kernel(model, "transposed")
    assert n > 0 and linears(model) == {TransposedLinear: n}
    assert apply_linear_kernel(model, "transposed") == 0  # idempotent
    assert model.get_input_embeddings().weight.data_ptr() == embed  # a tied embedding keeps its rows
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
    assert apply_linear_kernel(model, "onednn") == n and linears(model) == {OneDnnLinear: n}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
    assert apply_linear_kernel(model, "torch") == n and linears(model) == {torch.nn.Linear: n}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_auto_is_onednn_on_cpu_where_it_runs_and_transformers_own_kernel_elsewhere():
    want = "onednn" if onednn_available("cpu", torch.float32) else "torch"  # every x86 torch build has oneDNN
    assert resolve_kernel("auto", "cpu", torch.float32) == want  # faster at every B x T (module docstring)
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # avx512_bf16 / AMX: native bf16, else nn.Linear
    assert onednn_available("cpu", torch.bfloat16) == bf16
    assert resolve_kernel("auto", "cpu", torch.bfloat16) == ("onednn" if bf16 else "torch")
    assert resolve_kernel("auto", "cpu", torch.float16) == "torch"
    assert resolve_kernel("auto", "cuda", torch.float32) == "torch"
    with pytest.raises(ValueError, match="on CPU only"):
        resolve_kernel("onednn", "cuda", torch.float32)
    assert resolve_kernel("torch") == "torch"
    assert resolve_kernel("transposed") == "transposed"
    with pytest.raises(ValueError, match="linear kernel"):
        resolve_kernel("fast")
    with pytest.raises(ValueError, match="linear_kernel"):
        EngineConfig(linear_kernel="fast")


BF16_ONEDNN = pytest.mark.skipif(
    not onednn_available("cpu", torch.bfloat16), reason="this CPU has no native bf16 (avx512_bf16 / AMX)"
)


@pytest.mark.parametrize(
    "kernel,dtype",
    [("torch", "float32"), ("transposed", "float32"), ("onednn", "float32"), ("torch", "bfloat16")]
    + [pytest.param("onednn", "bfloat16", marks=BF16_ONEDNN)],
)
def test_speculative_greedy_equals_plain_greedy_under_each_kernel(kernel, dtype):
    """Plain decoding and verification run the same kernel, so greedy speculative output is plain decoding's."""
    model = tiny_model("llama").to(getattr(torch, dtype))
    target = TargetEngine(EngineConfig(max_requests=3, max_context=64, linear_kernel=kernel, dtype=dtype), model=model)
    assert target.linear_kernel == kernel
    draft = TargetEngine(EngineConfig(max_requests=3, max_context=64), model=tiny_model("llama", seed=1))
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11], [2, 6]]
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    plain = Decoder(target).generate(prompts, sp)
    spec = Decoder(target, DraftModelProposer(draft), num_draft=4, policy="fixed").generate(prompts, sp)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
