"""Ready the GPU training recipe's carry, here on the development machine (deploy/gpu/README.md).

A device call carries at most 64 MiB: the working tree that always travels plus the folders a call names in `carry`.
The target's GGUF does not fit beside the tree in one call, so it goes in parts, one per call, into the git-ignored
`.gpu/` (files carried earlier stay on the machine while it is warm). This script writes

    .gpu/model/part-NN     the GGUF of --model, cut to fit beside the tree
    .gpu/wheels/*.whl      the packages the device image lacks (KINDS.md: gguf), for its Python 3.12
    .gpu/manifest.json     the GGUF's name, size, sha256 and parts, the wheels

and prints the device calls to make, in order: every call but the last carries one part and runs `true`; the last
carries the last part, the wheels and the manifest and runs `python3 deploy/gpu/recipe.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 64 * 2**20  # bytes one device call carries, the working tree included
MARGIN = 2 * 2**20  # for what the tree gains before the calls (a log, a note)
WHEELS = ("gguf==0.19.0",)  # missing from the device image; its torch 2.11 and transformers 5.17 are used as they are
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")


def tree_bytes(root: Path = ROOT) -> int:
    """What always travels: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    return sum((root / p).stat().st_size for p in out.decode().split("\0") if p and (root / p).is_file())


def split_file(path: Path, dest: Path, part_bytes: int, prefix: str = "part-") -> list[dict]:
    """Cut `path` into dest/{prefix}00, {prefix}01, ... of at most part_bytes each (earlier parts of that name are
    removed first); their names, sizes and sha256. recipe.py cuts the trained drafter with it too."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob(f"{prefix}*"):
        old.unlink()
    parts = []
    with open(path, "rb") as f:
        while chunk := f.read(part_bytes):
            name = f"{prefix}{len(parts):02d}"
            (dest / name).write_bytes(chunk)
            parts.append({"name": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    return parts


def download_wheels(dest: Path, wheels=WHEELS) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run([*cmd, *wheels], check=True)
    return sorted(p.name for p in dest.glob("*.whl"))


def plan(manifest: dict, carry_dir: str = ".gpu") -> list[dict]:
    """The device calls, in order: (carry, command) each."""
    parts = [f"{carry_dir}/model/{p['name']}" for p in manifest["parts"]]
    calls = [{"carry": [p], "command": "true"} for p in parts[:-1]]
    last = [parts[-1], f"{carry_dir}/wheels", f"{carry_dir}/manifest.json"]
    calls.append({"carry": last, "command": "python3 deploy/gpu/recipe.py", "timeout_s": 600})
    return calls


def main(argv: list[str] | None = None) -> int:
    from dspark.models.model_store import file_sha256, gguf_file
    from dspark.models.registry import get_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="registry name of the target")
    ap.add_argument("--out", default=str(ROOT / ".gpu"), help="the carry folder (git-ignored)")
    ap.add_argument("--no-wheels", action="store_true", help="skip pip download (the wheels are already there)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    spec = get_spec(a.model)
    gguf = gguf_file(spec)
    wheels = sorted(p.name for p in (out / "wheels").glob("*.whl")) if a.no_wheels else download_wheels(out / "wheels")
    wheel_bytes = sum((out / "wheels" / w).stat().st_size for w in wheels)
    tree = tree_bytes()
    budget = LIMIT - tree - MARGIN - wheel_bytes - 4096
    if budget < 2**20:
        raise SystemExit(f"the working tree ({tree / 2**20:.1f} MiB) leaves no room to carry the model")
    size = gguf.stat().st_size
    n = math.ceil(size / budget)
    parts = split_file(gguf, out / "model", math.ceil(size / n))
    manifest = {
        "model": spec.name,
        "packages": [{"package": pkg, "file": rel} for pkg, rel in spec.parts],
        "file": gguf.name,
        "bytes": size,
        "sha256": spec.sha256 or file_sha256(gguf),
        "parts": parts,
        "wheels": wheels,
        "tree_bytes": tree,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"{gguf.name}: {size / 2**20:.1f} MiB in {n} parts beside a {tree / 2**20:.1f} MiB tree; device calls:")
    carry_dir = os.path.relpath(out.resolve(), ROOT)
    for i, call in enumerate(plan(manifest, carry_dir), 1):
        print(f"  {i}. {json.dumps(call)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
