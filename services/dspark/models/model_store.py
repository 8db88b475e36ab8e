"""Model store: turns a registry name, a local HF folder or a GGUF path into a loaded (model, tokenizer).

First use of a GGUF model dequantizes it through transformers' GGUF support and caches the result as
safetensors under DSPARK_HOME (default ~/.cache/dspark); later loads read the cache in seconds.
Multi-part GGUF files are joined in order and their sha256 checked; a mismatch is an error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from dspark.models.registry import REGISTRY, ModelSpec, get_spec

_CHUNK = 1 << 22


class ChecksumError(RuntimeError):
    """The joined weights do not hash to the pinned sha256."""


class ModelNotInstalledError(RuntimeError):
    """A package that carries the weights is not installed."""


def dspark_home() -> Path:
    return Path(os.environ.get("DSPARK_HOME", Path.home() / ".cache" / "dspark"))


def package_file(package: str, relpath: str) -> Path:
    # find_spec, not importlib.resources: importing some weight packages fails (missing plugins).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"package {package!r} is not installed; run `make models MODEL=...` to install the model packages"
        )
    path = Path(spec.submodule_search_locations[0]) / relpath
    if not path.is_file():
        raise ModelNotInstalledError(f"{path} is missing from package {package!r}")
    return path


def join_parts(parts: list[Path], dest: Path, sha256: str | None) -> str:
    """Concatenate `parts` into `dest`, hashing as it goes. Returns the hex digest.

    Raises ChecksumError (and leaves no file behind) when `sha256` is given and does not match.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".partial")
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"join {dest.name}") as bar:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    got = digest.hexdigest()
    if sha256 is not None and got != sha256:
        tmp.unlink()
        raise ChecksumError(f"{dest.name}: sha256 {got} does not match the pinned {sha256}; refusing to load")
    tmp.replace(dest)
    return got


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_file(spec: ModelSpec) -> Path:
    """The GGUF file of `spec`, joined and checked if it comes in parts."""
    paths = [package_file(pkg, rel) for pkg, rel in spec.parts]
    if len(paths) == 1:
        if spec.sha256 is not None and (got := file_sha256(paths[0])) != spec.sha256:
            raise ChecksumError(f"{paths[0]}: sha256 {got} does not match the pinned {spec.sha256}")
        return paths[0]
    dest = dspark_home() / "gguf" / f"{spec.name}.gguf"
    # a joined file left by an earlier run is trusted only if it still hashes to the pin
    if dest.exists() and spec.sha256 is not None and file_sha256(dest) != spec.sha256:
        dest.unlink()
    if not dest.exists():
        join_parts(paths, dest, spec.sha256)
    return dest


def _convert_gguf(gguf: Path, out_dir: Path, source_sha256: str | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dspark: converting {gguf.name} to safetensors in {out_dir} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; it is plain float weights by now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "dspark.json").write_text(json.dumps({"source": gguf.name, "source_sha256": source_sha256}, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)


def model_dir(name_or_path: str) -> Path:
    """A local HF folder holding config, safetensors and tokenizer for `name_or_path`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.suffix == ".gguf" and path.is_file():
        out = dspark_home() / "models" / f"{path.stem}-{file_sha256(path)[:12]}"
        if not (out / "dspark.json").exists():
            _convert_gguf(path, out, None)
        return out
    if name_or_path not in REGISTRY and (path.exists() or os.sep in name_or_path):
        raise FileNotFoundError(f"{name_or_path}: not a registry name, an HF folder with config.json, or a .gguf file")
    spec = get_spec(name_or_path)
    out = dspark_home() / "models" / spec.name
    if not (out / "dspark.json").exists():
        _convert_gguf(gguf_file(spec), out, spec.sha256)
    return out


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir(name_or_path)))


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer), model in eval mode on `device` with `dtype` (a torch dtype name)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = model_dir(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model.to(device).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(str(d))
