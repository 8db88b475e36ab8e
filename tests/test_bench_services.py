"""`dspark bench-services`: its pure parts (statistics, ratios of the same run, the table) and the process list it
starts (the `dspark serve local` pieces)."""

from __future__ import annotations

import pytest

from dspark.bench.services import (
    DISAGGREGATED,
    IN_PROCESS,
    SERVED_PLAIN,
    Sample,
    format_breakdown,
    format_table,
    goals,
    matching,
    parse_metrics,
    ratios,
    service_breakdown,
    summarise,
    versus_plain,
)


def _s(i, tokens, seconds, rounds=4, accepted=4, ids=(1, 2)):
    return Sample(i, tokens, seconds, rounds, accepted, tuple(ids))


def test_summarise_pools_repeats():
    row = summarise(IN_PROCESS, 1, [([_s(0, 10, 1.0), _s(1, 10, 2.0)], 3.0), ([_s(0, 20, 1.0)], 1.0)])
    assert row["requests"] == 3 and row["tokens"] == 40 and row["wall_s"] == 4.0
    assert row["throughput_tps"] == pytest.approx(10.0)
    assert row["ms_per_token"] == pytest.approx((100 + 200 + 50) / 3)
    assert row["ms_per_token_p50"] == pytest.approx(100.0)
    assert row["request_s"] == pytest.approx(4 / 3)
    assert row["tau"] == pytest.approx((12 + 12) / 12)


def test_ratios_goal_and_table():
    local = summarise(IN_PROCESS, 1, [([_s(0, 10, 1.0)], 1.0)])
    remote = summarise(DISAGGREGATED, 1, [([_s(0, 10, 1.1)], 1.1)])
    only_local = summarise(IN_PROCESS, 8, [([_s(0, 10, 1.0)], 1.0)])
    rows = [local, remote, only_local]
    r = ratios(rows)
    assert len(r) == 1 and r[0]["concurrency"] == 1
    assert r[0]["ms_per_token"] == pytest.approx(1.1) and r[0]["throughput"] == pytest.approx(1 / 1.1)
    g = goals(r)
    assert g["c1_ms_per_token_ratio"] == pytest.approx(1.1) and g["c1_within_15pct"] is True
    assert goals(ratios([local, summarise(DISAGGREGATED, 1, [([_s(0, 10, 1.2)], 1.2)])]))["c1_within_15pct"] is False
    assert goals([]) == {}
    table = format_table(rows, r).splitlines()
    assert table[0].split()[:4] == ["mode", "conc", "reqs", "tok/s"]
    assert table[1].split()[:2] == [IN_PROCESS, "1"] and table[2].split()[:2] == [DISAGGREGATED, "1"]
    assert table[3].split() == ["dis", "/", "in", "1", "0.909x", "1.100x"]
    assert table[4].split()[:2] == [IN_PROCESS, "8"] and len(table) == 5


def test_the_policy_is_compared_with_plain_decoding_through_the_same_services():
    rows = [
        summarise(DISAGGREGATED, 1, [([_s(0, 10, 1.0)], 1.0)]),
        summarise(SERVED_PLAIN, 1, [([_s(0, 10, 1.25)], 1.25)]),
        summarise(DISAGGREGATED, 8, [([_s(0, 10, 1.0)], 1.0)]),
    ]
    assert versus_plain(rows) == pytest.approx({1: 1.25})
    assert format_table(rows, []).splitlines()[3].split() == ["dis", "/", "plain", "1", "1.250x"]


def test_matching_compares_outputs_by_prompt():
    a = [_s(0, 2, 1.0, ids=(1, 2)), _s(1, 2, 1.0, ids=(3, 4))]
    b = [_s(1, 2, 1.0, ids=(3, 4)), _s(0, 2, 1.0, ids=(1, 5))]
    assert matching(a, b) == 0.5 and matching(a, a) == 1.0 and matching(a, []) == 0.0


def test_the_stack_it_starts_is_the_serve_local_one():
    from dataclasses import replace

    from dspark.core.config import EngineConfig
    from dspark.stack.launcher import StackConfig, pieces

    a = StackConfig(
        EngineConfig(model="m", threads=1),
        sps_profile="/x/sps.json",
        verifier_port=1,
        draft_port=2,
        grpc_port=3,
        http_port=4,
        no_ray=True,
        metrics_ports=(0, 0),
    )
    (vn, va, vh), (dn, da, dh), (rn, ra, rh) = pieces(a)
    assert (vn, dn, rn) == ("verifier", "draft", "router")
    assert va[0] == "verifier" and "--sps-profile" in va and va[va.index("--metrics-port") + 1] == "0"
    assert da[da.index("--threads") + 1] == "1" and da[da.index("--port") + 1] == "2"
    assert ra[ra.index("--verifier") + 1] == vh == "127.0.0.1:1" and ra[ra.index("--draft") + 1] == dh
    assert "--no-ray" in ra and rh == "http://127.0.0.1:4/healthz"
    a = replace(a, metrics_ports=None)  # `dspark serve local`: the services' default metrics ports
    assert "--metrics-port" not in pieces(a)[0][1]


def _router(rounds, draft, verify, other):
    return parse_metrics(
        f"""# TYPE dspark_rounds_total counter
dspark_rounds_total {rounds}
# TYPE dspark_round_seconds histogram
dspark_round_seconds_sum{{phase="draft"}} {draft}
dspark_round_seconds_sum{{phase="verify"}} {verify}
dspark_round_seconds_sum{{phase="other"}} {other}
"""
    )


def _draft(context, backbone, head):
    return parse_metrics(
        "".join(
            f'dspark_draft_phase_seconds_sum{{phase="{p}"}} {v}\n'
            for p, v in (("context", context), ("backbone", backbone), ("head", head))
        )
    )


def test_a_round_through_the_services_is_split_by_phase_from_their_metrics():
    """Two scrapes of router, draft and verifier /metrics: per round, the router's draft and verify calls, the
    draft service's compute phases, and the wire as what a call took beyond the service's own time."""
    verifier = 'dspark_rpc_seconds_sum{service="verifier",method="verify"} %s\n'
    before = {
        "router": _router(10, 1.0, 2.0, 0.5),
        "draft": _draft(0.1, 0.2, 0.3),
        "verifier": parse_metrics(verifier % 1.5),
    }
    after = {
        "router": _router(20, 1.5, 3.0, 0.6),
        "draft": _draft(0.12, 0.4, 0.5),
        "verifier": parse_metrics(verifier % 2.4),
    }
    b = service_breakdown(before, after)
    assert b["rounds"] == 10
    assert (
        b["draft_ms"] == pytest.approx(50)
        and b["verify_ms"] == pytest.approx(100)
        and b["other_ms"] == pytest.approx(10)
    )
    assert [b[k] for k in ("draft_context_ms", "draft_backbone_ms", "draft_head_ms")] == pytest.approx([2, 20, 20])
    assert b["draft_wire_ms"] == pytest.approx(8) and b["verify_wire_ms"] == pytest.approx(10)
    assert service_breakdown(before, before) == {}  # no rounds in between
    assert service_breakdown({}, {"router": _router(5, 0.5, 0.5, 0.0)})["draft_wire_ms"] == pytest.approx(100)
    table = format_breakdown(
        [{"mode": DISAGGREGATED, "concurrency": 1, "per_round_ms": b}, {"mode": "x", "concurrency": 1}]
    )
    assert len(table.splitlines()) == 2 and table.splitlines()[1].split()[:3] == [DISAGGREGATED, "1", "50.0"]
