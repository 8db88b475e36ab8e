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
