"""`dspark profile`: the SPS(B) cost table is measured, saved, found again by key, and refused for another key."""

from __future__ import annotations

import json

import pytest

from dspark.core import sps_profile
from dspark.core.config import EngineConfig
from dspark.core.engine import TargetEngine

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def engine():
    return TargetEngine(EngineConfig(model="tiny", max_requests=4, max_context=160), model=tiny_model())


def test_sizes():
    assert sps_profile.full_sizes(5) == [1, 2, 3, 4, 5]
    quick = sps_profile.quick_sizes(256)
    assert quick[:16] == list(range(1, 17)) and quick[-1] == 256 and len(quick) < 60
    assert quick == sorted(set(quick))


def test_measure_save_load_roundtrip(engine, tmp_path):
    rows = sps_profile.measure(engine, [1, 3, 8, 9, 20], context=16, repeats=2)
    assert [r["B"] for r in rows] == [1, 3, 8, 9, 20] and [r["requests"] for r in rows] == [1, 1, 1, 2, 3]
    assert all(r["sps"] > 0 for r in rows)
    assert engine.free_slots == 4  # profiling requests are released
    key = sps_profile.ProfileKey.of(engine)
    path = sps_profile.save(tmp_path / key.filename, key, rows, context=16, kind="full")
    doc = json.loads(path.read_text())
    assert {"model", "device", "dtype", "threads", "context", "rows"} <= doc.keys() and doc["device"] == "cpu"
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    table = sps_profile.load(path, key)
    assert table.batch_tokens == (1, 3, 8, 9, 20) and table == sps_profile.table_of(rows)
    other = sps_profile.ProfileKey(key.model, key.device, "bfloat16", key.threads)
    with pytest.raises(ValueError, match="profiled for"):
        sps_profile.load(path, other)


def test_the_table_fits_step_time_non_decreasing():
    """A larger step measured faster than a smaller one is pooled with it; rises stay as measured."""
    assert sps_profile.nondecreasing([1.0, 2.0, 2.0, 5.0]) == [1.0, 2.0, 2.0, 5.0]
    assert sps_profile.nondecreasing([1.0, 3.0, 2.0, 4.0, 1.0]) == pytest.approx([1.0, 2.5, 2.5, 2.5, 2.5])
    # the loaded machine's quick profile: B=2 258 ms, B=3 303 ms, B=5 181 ms
    steps_ms = [150.0, 258.0, 303.0, 239.0, 181.0, 215.0, 214.0, 204.0, 264.0]
    rows = [{"B": b, "sps": 1000 / t} for b, t in enumerate(steps_ms, 1)]
    table = sps_profile.table_of(rows)
    fitted = [1000 / table(b) for b in range(1, 10)]
    assert fitted == sorted(fitted) and fitted[0] == pytest.approx(150.0) and fitted[-1] == pytest.approx(264.0)
    assert sum(fitted) == pytest.approx(sum(steps_ms))  # a least-squares fit of the means keeps their sum


def test_measure_needs_free_slots(engine):
    with pytest.raises(ValueError, match="free engine slots"):
        sps_profile.measure(engine, [64])


def test_load_or_profile_profiles_once_then_loads(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    msgs = []
    t1 = sps_profile.load_or_profile(engine, log=msgs.append)
    assert msgs and "quick profile" in msgs[0] and t1.batch_tokens[-1] == 32  # 4 slots x 8 tokens
    assert [r for r, _ in t1.by_rows] == [2, 3, 4]  # and a table per row count the slots allow
    assert (tmp_path / "profiles" / sps_profile.ProfileKey.of(engine).filename).is_file()
    msgs.clear()
    t2 = sps_profile.load_or_profile(engine, log=msgs.append)
    assert not msgs and t2 == t1


def test_row_shapes_run_from_one_token_a_row_to_whole_blocks():
    shapes = sps_profile.row_shapes(8)
    assert sorted({r for r, _ in shapes}) == [2, 3, 4, 6, 8]
    assert [b for r, b in shapes if r == 2] == list(range(2, 17))  # every B while few
    eight = [b for r, b in shapes if r == 8]
    assert eight[0] == 8 and eight[-1] == 64 and len(eight) == 12 and eight == sorted(set(eight))
    assert sps_profile.row_shapes(1) == []


def test_row_tables_are_measured_in_their_shape_saved_and_loaded(engine, tmp_path):
    """B tokens over R rows, as a round of R requests verifies them; the table a round of R rows is priced with."""
    rows = sps_profile.measure(engine, [1, 2, 4, 8, 16], context=16, repeats=1)
    by_rows = sps_profile.measure_shapes(engine, [(2, 2), (2, 5), (2, 16), (4, 4), (4, 9)], context=16, repeats=2)
    assert [(r["requests"], r["B"]) for r in by_rows] == [(2, 2), (2, 5), (2, 16), (4, 4), (4, 9)]
    assert engine.free_slots == 4
    key = sps_profile.ProfileKey.of(engine)
    path = sps_profile.save(tmp_path / key.filename, key, rows, context=16, kind="full", by_rows=by_rows)
    table = sps_profile.load(path, key)
    assert table == sps_profile.table_of(rows, by_rows)
    assert [r for r, _ in table.by_rows] == [2, 4]
    assert table.for_rows(1) is table and table.for_rows(2).batch_tokens == (2, 5, 16)
    assert table.for_rows(3) is table.for_rows(4) and table.for_rows(4).batch_tokens == (4, 9)  # next one up
    assert table.for_rows(9) is table.for_rows(4)  # past the last: the largest measured
    with pytest.raises(ValueError, match="query tokens a row"):
        sps_profile.measure_shapes(engine, [(2, 17)])


def test_a_profile_without_row_tables_prices_every_round_packed(engine, tmp_path):
    rows = sps_profile.measure(engine, [1, 2], context=16, repeats=1)
    key = sps_profile.ProfileKey.of(engine)
    path = sps_profile.save(tmp_path / key.filename, key, rows, context=16, kind="full")
    doc = json.loads(path.read_text())
    del doc["by_rows"]  # a profile from before row tables
    path.write_text(json.dumps(doc))
    table = sps_profile.load(path, key)
    assert table.by_rows == () and table.for_rows(4) is table


def test_a_burst_of_other_load_in_some_passes_does_not_reach_the_table(engine, monkeypatch):
    """Other load only slows a step: each shape keeps its fastest pass, so a burst over three of five passes (a
    median would keep it) leaves the table as the quiet passes measured it."""
    calls = []

    def timed(fn, device):
        fn()
        calls.append(None)
        n = len(calls) - 1  # 2 shapes a pass; passes 1-3 (0-based) are slowed 10x
        return 0.010 * (1 + (n % 2)) * (10 if 1 <= n // 2 <= 3 else 1)

    monkeypatch.setattr(sps_profile, "seconds_of", timed)
    rows = sps_profile.measure_shapes(engine, [(1, 1), (2, 4)], context=8, repeats=5)
    assert [r["step_ms"] for r in rows] == [10.0, 20.0]
