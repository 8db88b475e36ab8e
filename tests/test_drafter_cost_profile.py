"""The drafter's cost table t_draft(R, K) (drafter/cost_profile.py) on a tiny random drafter: what is measured, the
file it is kept in, and when a saved one is measured again."""

from __future__ import annotations

import json

import pytest
import torch
from test_core_decoding_stats import _tiny_llama

from dspark.drafter import cost_profile
from dspark.drafter.model import DSparkDrafter
from dspark.drafter.proposer import DSparkProposer


@pytest.fixture(scope="module")
def proposer():
    model = _tiny_llama(seed=0, hidden=32, layers=2, heads=4, kv_heads=2)
    torch.manual_seed(1)
    return DSparkProposer(DSparkDrafter.from_target_model(model, feature_layers=(0, 1, 2), n_layer=1, gamma=3))


def test_measure_times_every_row_count_and_position(proposer):
    rows = cost_profile.measure(proposer, [1, 2], context=8, repeats=1)
    assert [r["R"] for r in rows] == [1, 2] and all(len(r["seconds"]) == 3 for r in rows)
    assert all(s > 0 for r in rows for s in r["seconds"])
    assert not proposer._ctx  # its sessions are released
    table = cost_profile.table_of(rows)
    assert table.gamma == 3 and table(2, 3) >= max(table(1, 3), table(2, 1))  # fitted: more drafting, more time


def test_the_table_never_prices_more_drafting_below_less():
    """The measured dips (R=2 below R=1, K=2 below K=1) are pooled away; rises stay."""
    rows = [{"R": 1, "seconds": [0.012, 0.016, 0.020]}, {"R": 2, "seconds": [0.020, 0.018, 0.023]}]
    table = cost_profile.table_of(rows)
    assert table.seconds[0] == pytest.approx((0.012, 0.016, 0.020))
    assert table.seconds[1] == pytest.approx((0.019, 0.019, 0.023))


def test_saved_table_is_reused_only_for_what_it_was_measured_for(proposer, tmp_path):
    path = tmp_path / "draft.json"
    first = cost_profile.load_or_profile(proposer, "tiny", max_rows=2, path=path, log=None)
    assert path.exists() and path.with_suffix(".png").exists() and first.rows == (1, 2)
    assert cost_profile.load_or_profile(proposer, "tiny", max_rows=2, path=path, log=None) == first  # loaded
    wider = cost_profile.load_or_profile(proposer, "tiny", max_rows=4, path=path, log=None)  # measured again
    assert wider.rows == (1, 2, 4)
    doc = json.loads(path.read_text())
    doc["threads"] += 1
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="profiled for"):
        cost_profile.load(path, cost_profile.DraftCostKey.of(proposer, "tiny"))


def test_a_drafter_served_with_onednn_drafts_what_it_drafts_with_torch_and_has_its_own_table():
    """use_linear_kernel swaps the drafter's own projections for oneDNN's prepacked ones (the serving paths do it
    with the engine's kernel): the same draft distributions to float tolerance, the same greedy tokens, and a cost
    table kept under another name (a table measured with the other kernel is not reused)."""
    from dspark.core.linear_kernel import onednn_available
    from dspark.core.proposer import DraftRequest
    from dspark.core.sampling import SamplingParams

    if not onednn_available("cpu", torch.float32):
        pytest.fail("this torch build has no oneDNN linear on CPU; the serving default relies on it")
    model = _tiny_llama(seed=0, hidden=32, layers=2, heads=4, kv_heads=2)
    torch.manual_seed(1)
    plain = DSparkDrafter.from_target_model(model, feature_layers=(0, 1, 2), n_layer=1, gamma=3)
    served = DSparkDrafter.from_target_model(model, feature_layers=(0, 1, 2), n_layer=1, gamma=3)
    served.load_drafter_state_dict(plain.drafter_state_dict())
    assert served.use_linear_kernel("auto") == "onednn"
    a, b = DSparkProposer(plain), DSparkProposer(served)
    feats = torch.randn(8, plain.config.feature_size)
    history = [(5 * j + 3) % plain.config.vocab_size for j in range(9)]
    greedy = SamplingParams(temperature=0.0, max_tokens=64)
    pa, pb = (p.propose([DraftRequest("r", history, 3, greedy, feats)])[0] for p in (a, b))
    assert torch.equal(pa.token_ids, pb.token_ids)
    torch.testing.assert_close(pa.probs, pb.probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pa.confidence, pb.confidence, atol=1e-5, rtol=1e-4)
    ka, kb = (cost_profile.DraftCostKey.of(p, "tiny") for p in (a, b))
    assert (ka.backbone, kb.backbone) == ("torch", "onednn") and ka.filename != kb.filename
