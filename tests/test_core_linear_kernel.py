"""The engine's linear kernel: transposed weights compute what nn.Linear computes, in place and back again, and
plain decoding and verification agree under it (they run the same kernel)."""

from __future__ import annotations

import pytest
import torch

from dspark.core.config import EngineConfig
from dspark.core.decoding import Decoder
from dspark.core.draft_lm import DraftModelProposer
from dspark.core.engine import TargetEngine
from dspark.core.linear_kernel import TransposedLinear, apply_linear_kernel, resolve_kernel
from dspark.core.sampling import SamplingParams

from conftest import tiny_model


def linears(model) -> dict[type, int]:
    kinds = [type(m) for m in model.modules() if isinstance(m, (torch.nn.Linear, TransposedLinear))]
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


def test_model_runs_either_kernel_in_place_and_back():
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
    assert apply_linear_kernel(model, "torch") == n and linears(model) == {torch.nn.Linear: n}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_auto_is_transformers_own_kernel_and_unknown_kernels_are_refused():
    assert resolve_kernel("auto") == "torch"  # transposed loses at B >= 4 (module docstring)
    assert resolve_kernel("torch") == "torch"
    assert resolve_kernel("transposed") == "transposed"
    with pytest.raises(ValueError, match="linear kernel"):
        resolve_kernel("fast")
    with pytest.raises(ValueError, match="linear_kernel"):
        EngineConfig(linear_kernel="fast")


@pytest.mark.parametrize("kernel", ["torch", "transposed"])
def test_speculative_greedy_equals_plain_greedy_under_each_kernel(kernel):
    """Plain decoding and verification run the same kernel, so greedy speculative output is plain decoding's."""
    target = TargetEngine(EngineConfig(max_requests=3, max_context=64, linear_kernel=kernel), model=tiny_model("llama"))
    assert target.linear_kernel == kernel
    draft = TargetEngine(EngineConfig(max_requests=3, max_context=64), model=tiny_model("llama", seed=1))
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11], [2, 6]]
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    plain = Decoder(target).generate(prompts, sp)
    spec = Decoder(target, DraftModelProposer(draft), num_draft=4, policy="fixed").generate(prompts, sp)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
