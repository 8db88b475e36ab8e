"""The GPU training recipe (deploy/gpu/): the carry fits a device call beside the working tree and joins back to the
pinned GGUF, and the recipe runs every stage end to end on CPU with tiny sizes (--dry-run), so it cannot rot before a
GPU is lent."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dspark.models.model_store import dspark_home

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "deploy" / "gpu" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


prepare, recipe = load("prepare"), load("recipe")


def test_parts_fit_and_join_back(tmp_path):
    blob = bytes(range(256)) * 4000 + b"tail"  # 1,024,004 bytes
    src = tmp_path / "model.gguf"
    src.write_bytes(blob)
    parts = prepare.split_file(src, tmp_path / "carry" / "model", 300_000)
    assert [p["bytes"] for p in parts] == [300_000, 300_000, 300_000, 124_004]
    manifest = {
        "model": "m",
        "packages": [{"package": "pkg_m", "file": "model.gguf"}],
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "parts": parts,
    }
    (tmp_path / "carry" / "manifest.json").write_text(json.dumps(manifest))
    got = recipe.join_model(tmp_path / "carry", tmp_path / "site")
    assert Path(got["file"]).read_bytes() == blob and (tmp_path / "site" / "pkg_m" / "__init__.py").exists()
    calls = prepare.plan(manifest)
    assert [c["carry"] for c in calls[:-1]] == [[".gpu/model/part-00"], [".gpu/model/part-01"], [".gpu/model/part-02"]]
    assert calls[-1]["carry"] == [".gpu/model/part-03", ".gpu/wheels", ".gpu/manifest.json"]
    assert calls[-1]["command"] == "python3 deploy/gpu/recipe.py" and all(c["command"] == "true" for c in calls[:-1])
    # a part that went missing (the machine went cold between calls) or changed is refused, not joined
    (tmp_path / "carry" / "model" / "part-02").write_bytes(b"x")
    with pytest.raises(SystemExit, match="sha256"):
        recipe.join_model(tmp_path / "carry", tmp_path / "site2")
    (tmp_path / "carry" / "model" / "part-02").unlink()
    with pytest.raises(SystemExit, match="went cold"):
        recipe.join_model(tmp_path / "carry", tmp_path / "site3")


def test_results_come_back_in_parts_a_call_returns(tmp_path):
    f = tmp_path / "drafter.safetensors"
    f.write_bytes(b"ab" * 1000)
    out = tmp_path / "out"
    out.mkdir()
    names = recipe.split_into(f, out, part_bytes=700)
    assert names == [f"drafter.safetensors.part-{i:02d}" for i in range(3)]
    assert b"".join((out / n).read_bytes() for n in names) == f.read_bytes()


@pytest.mark.slow
def test_prepare_and_a_dry_run_of_the_whole_recipe(real_model, tmp_path):
    """prepare.py cuts the real GGUF to fit beside this tree; recipe.py --dry-run joins it, regenerates, trains with
    the full preset, evaluates at T=0 and T=1 and writes what a device call would bring back."""
    carry = tmp_path / "carry"
    assert prepare.main(["--out", str(carry), "--no-wheels"]) == 0
    m = json.loads((carry / "manifest.json").read_text())
    budget = prepare.LIMIT - m["tree_bytes"] - prepare.MARGIN
    assert all(p["bytes"] <= budget for p in m["parts"]) and sum(p["bytes"] for p in m["parts"]) == m["bytes"]
    out = tmp_path / "out"
    # the model converted once already (DSPARK_HOME), as a warm device call would have it; on the device the
    # stand-in package is where the model store finds the GGUF, which the last check below shows
    env = dict(os.environ, DSPARK_HOME=str(dspark_home()))
    r = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "gpu" / "recipe.py"), "--dry-run", "--carry", str(carry), "--out",
         str(out), "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads((out / "recipe.json").read_text())
    assert {"setup", "data", "data_t1", "train", "eval_t0.0", "eval_t1.0", "total"} <= rec["stages"].keys()
    assert rec["data"] == {"data-recommended.jsonl": 3, "data-t1.jsonl": 3}
    assert set(rec["eval"]) == {"0.0", "1.0"} and all(e["mean_tau"] >= 1.0 for e in rec["eval"].values())
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).stat().st_size < 16 * 2**20 for f in files)
    meta = json.loads((out / "drafter.json").read_text())
    assert meta["drafter_config"]["draft_vocab_size"] == 8192 and meta["train_config"]["weights_dtype"] == "bfloat16"
    joined = tmp_path / "drafter"
    joined.mkdir()
    (joined / "drafter.safetensors").write_bytes(b"".join((out / n).read_bytes() for n in rec["weights"]))
    (joined / "drafter.json").write_text((out / "drafter.json").read_text())
    from dspark.drafter.checkpoint import load_trained_drafter

    model, tokenizer = real_model
    d = load_trained_drafter(joined, model, tokenizer)
    assert d.config.n_layer == 5 and d.config.draft_vocab_size == 8192
    site = tmp_path / "work" / "site"
    pkg = m["packages"][0]
    where = subprocess.run(
        [sys.executable, "-c", f"from dspark.models.model_store import package_file as f; print(f({pkg['package']!r}, "
         f"{pkg['file']!r}))"],
        capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=f"{site}:{ROOT / 'services'}"),
    ).stdout.strip()  # fmt: skip
    assert Path(where).parent.parent == site
