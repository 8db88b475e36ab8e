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
    assert (tmp_path / "profiles" / sps_profile.ProfileKey.of(engine).filename).is_file()
    msgs.clear()
    t2 = sps_profile.load_or_profile(engine, log=msgs.append)
    assert not msgs and t2 == t1
