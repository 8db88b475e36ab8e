"""The Locust load test against one local stack on the real default model (verifier, draft service, router without Ray
Serve to keep start-up short; all on free loopback ports, stopped by PID at the end): a short headless run of both
streaming users and the bad-input user, and a chaos run that SIGKILLs and restarts the draft service under load.
Bounded: ~20 s of load each (see the module's --durations)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository root: loadtest/ is not part of the package

from loadtest import drive, report  # noqa: E402

pytestmark = pytest.mark.slow
LOAD_S = 20.0


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """(the running stack as a drive.Target, the chaos run's arguments)."""
    from dspark.drafter.checkpoint import default_drafter_path
    from dspark.models.registry import DEFAULT_MODEL

    try:
        default_drafter_path(DEFAULT_MODEL)
    except FileNotFoundError as e:
        pytest.skip(f"no drafter: {e}")
    out = tmp_path_factory.mktemp("loadtest")
    a = drive.parse(
        ["chaos", "--no-ray", "--out", str(out), "--max-requests", "8", "--max-tokens", "12", "--stop-timeout", "120"]
        + ["--users", "3", "--duration", str(LOAD_S), "--faults", "draft", "--first-fault-s", "3"]
        + ["--probe-tokens", "16"]
    )
    with drive.target(a) as t:
        yield t, a


def test_a_headless_run_of_both_users_reports_ttft_itl_e2e_percentiles_and_no_failures(local):
    t, a = local
    prefix = a.out / "run" / "locust"
    users = (*drive.GOOD_USERS, "BadInputUser")
    records = report.read_records([drive.locust(t, prefix, "concurrency:3", LOAD_S, a, users, policy="fixed")])

    with open(f"{prefix}_stats.csv") as f:
        stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    for api in ("grpc", "http"):
        for kind in ("ttft", "itl", "e2e"):
            row = stats[api, f"{kind} fixed"]
            assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0, (api, kind, row)
            assert all(row[p] not in ("", "N/A") for p in ("50%", "90%", "99%"))
    assert Path(f"{prefix}.html").stat().st_size > 0

    good = [r for r in records if "ttft_s" in r]
    assert {r["api"] for r in good} == {"grpc", "http"} and all(r["ok"] for r in good)
    assert all(r["tokens"] > 0 and r["tpot_s"] > 0 and r["tau"] >= 1.0 for r in good)
    # gRPC under gevent (init_gevent): a gRPC stream and an HTTP stream were in flight at the same time
    grpc_spans = [(r["started"], r["started"] + r["e2e_s"]) for r in good if r["api"] == "grpc"]
    assert any(
        s < r["started"] + r["e2e_s"] and r["started"] < e for r in good if r["api"] == "http" for s, e in grpc_spans
    )
    bad = report.bad_input(records)
    assert bad and all(v["wrong"] == 0 for v in bad.values()), bad

    rows = report.summarize(records, LOAD_S, 0.0, report.Slo())
    paths = report.write(rows, a.out / "run", {"test": True}, bad)
    (row,) = json.loads((a.out / "run" / "summary.json").read_text())["steps"]
    assert row["step"] == "c=3" and row["failures"] == 0 and row["throughput_tok_s"] > 0
    assert all(row[f"{m}_p{p}_ms"] is not None for m in ("ttft", "itl", "e2e", "tpot") for p in (50, 90, 99))
    assert any(p.name == "latency_vs_load.png" for p in paths)


def test_the_draft_service_killed_under_load_costs_no_request_and_no_token(local):
    t, a = local
    result = drive.chaos(t, a)
    print(drive.chaos_text(result))
    (fault,) = result["faults"]
    assert fault["service"] == "draft" and fault["fallback_rounds"] > 0  # rounds ran as plain decoding meanwhile
    assert result["good_requests"] > 0 and result["good_failures"] == []
    assert result["probes"] > 0 and result["probes_changed"] == []  # seeded T=0: the same tokens as before the kill
    assert drive.chaos_passed(result)
