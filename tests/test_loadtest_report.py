"""The load test's pure parts, without a stack or Locust running: load shapes (steps, arrival rates) and the report
(percentiles per step over its steady state, throughput, goodput under both SLOs, the tables and PNGs)."""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository root: loadtest/ is not part of the package

from loadtest import report, shapes  # noqa: E402


def test_a_load_spec_parses_into_steps_and_bad_ones_are_refused_by_name():
    plan = shapes.Plan.parse("concurrency:1,2,4", step_s=30)
    assert [(s.label, s.users, s.rate) for s in plan.steps] == [("c=1", 1, None), ("c=2", 2, None), ("c=4", 4, None)]
    plan = shapes.Plan.parse("rate:0.5,2", step_s=10, rate_users=8, burstiness=0.5)
    assert [(s.label, s.users, s.rate) for s in plan.steps] == [("rate=0.5", 8, 0.5), ("rate=2", 8, 2.0)]
    for spec in ("steps:1,2", "concurrency:", "rate:a,b", "concurrency:0,1"):
        with pytest.raises(ValueError, match="DSPARK_LOAD"):
            shapes.Plan.parse(spec, step_s=10)
    with pytest.raises(ValueError, match="positive"):
        shapes.Plan.parse("rate:1", step_s=0)


@pytest.mark.parametrize("burstiness", [1.0, 0.5])
def test_a_rate_step_paces_each_user_at_its_share_of_the_rate(monkeypatch, burstiness):
    step = shapes.Step("rate=2", users=4, rate=2.0)
    monkeypatch.setattr(shapes, "PLAN", shapes.Plan("rate", (step,), 10.0, burstiness))
    monkeypatch.setitem(shapes.CURRENT, "step", step)
    clock = [0.0]
    monkeypatch.setattr(shapes.time, "monotonic", lambda: clock[0])
    pacer = shapes.Pacer(seed=1)
    gaps = []
    for _ in range(4000):
        wait = pacer.wait()
        gaps.append(wait)
        clock[0] += wait  # the request itself takes no time here
    assert statistics.mean(gaps) == pytest.approx(4 / 2.0, rel=0.06)  # 4 users share 2 req/s: 0.5 req/s each
    cv = statistics.pstdev(gaps) / statistics.mean(gaps)  # Poisson: 1; gamma of shape k: 1/sqrt(k)
    assert cv == pytest.approx(1 / burstiness**0.5, rel=0.1)
    monkeypatch.setitem(shapes.CURRENT, "step", shapes.Step("c=2", users=2))
    assert pacer.wait() == 0.0  # closed loop outside rate steps


def _record(step, started, ttft, tokens, e2e, ok=True, policy="dspark", gaps=None):
    tpot = (e2e - ttft) / (tokens - 1) if ok and tokens > 1 else None
    return {
        "api": "grpc",
        "policy": policy,
        "step": step,
        "started": started,
        "ok": ok,
        "error": "" if ok else "UNAVAILABLE: gone",
        "ttft_s": ttft if ok else None,
        "gaps_s": gaps or [0.1] * (tokens - 1),
        "e2e_s": e2e,
        "tokens": tokens,
        "tpot_s": tpot,
        "tau": 1.5,
        "budget": 3,
    }


def test_the_report_leaves_out_each_steps_warm_up_and_counts_goodput_under_both_slos():
    rng = random.Random(0)
    records = [_record("c=1", 0.0, 9.0, 11, 20.0)]  # in the warm-up: left out (its TTFT would be the p99)
    for i in range(100):
        ttft = 0.1 + 0.01 * i  # 0.10 .. 1.09 s
        records.append(_record("c=1", 5.0 + i * 0.25, ttft, 11, ttft + 10 * (0.05 if i % 2 else 0.5)))
    records.append(_record("c=1", 30.0, 0.2, 11, 5.0, ok=False))
    records += [_record("c=2", 40.0 + rng.random(), 0.3, 5, 1.0, policy="autoregressive") for _ in range(3)]
    records.append({"user": "BadInputUser", "api": "http", "case": "http logprobs", "ok": True, "error": ""})
    slo = report.Slo(ttft_s=0.6, tpot_s=0.1)
    rows = report.summarize(records, step_s=40.0, warmup_s=5.0, slo=slo)
    first, second = rows
    assert (first["policy"], first["step"], first["kind"], first["offered"]) == ("dspark", "c=1", "concurrency", 1.0)
    assert first["requests"] == 101 and first["failures"] == 1
    assert first["ttft_p50_ms"] == pytest.approx(595, abs=1) and first["ttft_p99_ms"] == pytest.approx(1080, abs=1)
    # meeting both SLOs: TTFT <= 0.6 s (i <= 50) and TPOT 0.05 s (odd i): 25 of the 101 requests in the window
    assert first["goodput_share"] == pytest.approx(25 / 101, abs=1e-4)
    assert first["goodput_rps"] == pytest.approx(25 / 35, abs=1e-3)
    # every token streamed inside [5, 40] s counts, the warm-up request's too (its tokens arrive from 9 s on)
    assert first["throughput_tok_s"] == pytest.approx(101 * 11 / 35, abs=1e-2)
    assert first["tpot_p50_ms"] == pytest.approx(275, abs=1)  # half at 50 ms, half at 500 ms
    assert second["policy"] == "autoregressive" and second["requests"] == 3
    assert report.bad_input(records) == {"http logprobs": {"ok": 1, "wrong": 0}}


def test_throughput_counts_the_tokens_streamed_inside_the_steps_window():
    # first token at 2 s, the other 10 spread evenly over 2..12 s
    r = _record("c=1", 1.0, 1.0, 11, 11.0)
    assert report.delivered_tokens(r, 0.0, 20.0) == 11
    assert report.delivered_tokens(r, 7.0, 20.0) == pytest.approx(5.0)  # the second half of the stream
    assert report.delivered_tokens(r, 0.0, 4.0) == pytest.approx(1 + 2.0)  # the first token and 2 of 10 s
    assert report.delivered_tokens(r, 13.0, 20.0) == 0
    assert report.delivered_tokens(_record("c=1", 0.0, 0.5, 11, 3.0, ok=False), 0.0, 20.0) == 0
    # a step of 20 s after a 5 s warm-up: requests that end after the step count for what they streamed in it
    records = [_record("c=2", 10.0 * i, 1.0, 21, 21.0) for i in range(3)]  # streams over 1..21, 11..31, 21..41 s
    (row,) = report.summarize(records, step_s=25.0, warmup_s=5.0, slo=report.Slo())
    inside = 16 * 20 / 20 + (1 + 14 * 20 / 20) + (1 + 4 * 20 / 20)  # over [5, 25] s
    assert row["throughput_tok_s"] == pytest.approx(inside / 20, abs=1e-3)


def test_the_driver_interleaves_the_policies_step_by_step_in_alternating_order():
    from loadtest import drive

    a = drive.parse(["loadtest", "--policies", "dspark,autoregressive", "--concurrency", "1,8", "--rates", "0.5"])
    assert drive.sweep(a) == [
        ("dspark", "concurrency:1"),
        ("autoregressive", "concurrency:1"),
        ("autoregressive", "concurrency:8"),
        ("dspark", "concurrency:8"),
        ("dspark", "rate:0.5"),
        ("autoregressive", "rate:0.5"),
    ]
    names = [drive.run_name(load) for _, load in drive.sweep(a)]
    assert names[:2] == ["concurrency-1", "concurrency-1"] and names[-1] == "rate-0_5"
    loads = ["rate:0.25", "rate:0.5", "rate:1", "concurrency:16"]  # one file per step, none overwriting another
    assert len({(Path(drive.run_name(x)).with_suffix(".jsonl")) for x in loads}) == len(loads)
    a = drive.parse(["loadtest", "--no-interleave", "--concurrency", "1,8", "--rates", ""])
    assert drive.sweep(a) == [("dspark", "concurrency:1,8"), ("autoregressive", "concurrency:1,8")]


def test_the_report_files_hold_the_percentile_fields_and_the_plots(tmp_path):
    records = [
        _record(f"{step}", 100.0 * k + i, 0.2 * (k + 1), 9, 1.0 * (k + 1), policy=p)
        for p in ("dspark", "autoregressive")
        for k, step in enumerate(["c=1", "c=2", "rate=0.5"])
        for i in range(5)
    ]
    rows = report.summarize(records, step_s=0, warmup_s=0, slo=report.Slo())
    paths = report.write(rows, tmp_path, {"run": "test"})
    names = {p.name for p in paths}
    assert names == {"summary.csv", "summary.json", "summary.md", "throughput_vs_per_user.png", "latency_vs_load.png"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["steps"]) == 6
    for m in report.METRICS:
        for p in report.PERCENTILES:
            assert f"{m}_p{p}_ms" in summary["steps"][0]
    header = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert "ttft_p99_ms" in header and "goodput_rps" in header
    assert all((tmp_path / n).stat().st_size > 10_000 for n in names if n.endswith(".png"))


def test_the_driver_and_the_report_do_not_monkey_patch_the_process():
    """Only the locustfile imports Locust (whose import patches sockets and threads for gevent): the driver, the
    report and the shapes run in ordinary processes (and in this test suite)."""
    import subprocess

    code = "import sys, loadtest.drive, loadtest.report, loadtest.shapes, loadtest.calls, loadtest.workload; "
    code += "print(sorted(m for m in ('locust', 'gevent') if m in sys.modules))"
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
