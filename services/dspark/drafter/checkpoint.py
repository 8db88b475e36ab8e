"""A trained drafter on disk: drafter.safetensors + drafter.json as `dspark train` writes them, the drafters shipped in
this package, and loading one bound to its target (refused when it was trained for another)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dspark.core.config import EngineConfig
from dspark.core.engine import TargetEngine
from dspark.drafter.model import DrafterConfig, DSparkDrafter

SHIPPED_DRAFTERS = Path(__file__).parents[1] / "data" / "drafters"

WEIGHTS = "drafter.safetensors"
METADATA = "drafter.json"


FORMAT_VERSION = 1


class TargetMismatchError(ValueError):
    """A trained drafter was loaded for a target other than the one it was trained on."""


_ARCH_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "hidden_activation",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "sliding_window",
    "layer_types",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "query_pre_attn_scalar",
    "bos_token_id",
    "eos_token_id",
)


def target_fingerprint(model, tokenizer=None) -> str:
    """sha256 of the target's architecture (a fixed list of config keys, so a transformers upgrade that adds
    unrelated config fields does not change it) and its tokenizer's vocabulary (token -> id; None: no tokenizer)."""
    cfg = model.config
    c = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    d = c.to_dict()
    arch = {k: d[k] for k in _ARCH_KEYS if d.get(k) is not None}
    vocab = sorted(tokenizer.get_vocab().items()) if tokenizer is not None else None
    blob = json.dumps({"config": arch, "vocab": vocab}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_trained_drafter(
    drafter: DSparkDrafter, out_dir, target_name: str, fingerprint: str, extra=None, dtype: str = "float32"
) -> Path:
    """drafter.safetensors (the drafter's own weights in `dtype`, the confidence temperatures in float32) +
    drafter.json (its config and the target it belongs to). Returns the weights' path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to = getattr(torch, dtype)
    state = {
        k: (v.to(to) if v.is_floating_point() and k != "conf_temperature" else v).detach().contiguous().cpu()
        for k, v in drafter.drafter_state_dict().items()
    }
    save_file(state, str(out / WEIGHTS), metadata={"format": "dspark-drafter", "target_fingerprint": fingerprint})
    meta = {
        "format_version": FORMAT_VERSION,
        "drafter_config": asdict(drafter.config),
        "target": {"model": target_name, "fingerprint": fingerprint},
        **(extra or {}),
    }
    (out / METADATA).write_text(json.dumps(meta, indent=1))
    return out / WEIGHTS


def load_trained_drafter(path, target_model, tokenizer=None, device=None) -> DSparkDrafter:
    """A drafter saved by `dspark train` (its output folder, its drafter.safetensors, or a checkpoint.pt: an
    unfinished run's drafter with uncalibrated confidences), bound to target_model's embedding and LM head. Raises
    TargetMismatchError when it was trained for another target (architecture or tokenizer vocabulary differ)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix == ".pt":
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such checkpoint")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        meta = {"drafter_config": ckpt["drafter_config"], "target": {"model": ckpt["config"]["model"]}}
        meta["target"]["fingerprint"] = ckpt["fingerprint"]
        folder, state = path, ckpt["drafter"]
    else:
        folder = path if path.is_dir() else path.parent
        meta_path = folder / METADATA
        if not meta_path.exists() or not (folder / WEIGHTS).exists():
            raise FileNotFoundError(f"{folder}: no {WEIGHTS} + {METADATA}; is it a `dspark train` output?")
        meta = json.loads(meta_path.read_text())
        state = None
    want = meta["target"]["fingerprint"]
    got = target_fingerprint(target_model, tokenizer)
    if want != got:
        raise TargetMismatchError(
            f"the drafter in {folder} was trained for target {meta['target']['model']!r} (fingerprint {want[:12]}), "
            f"but the given target has fingerprint {got[:12]}: a different architecture or tokenizer. "
            "Train a drafter for this target with `dspark train`."
        )
    dc = meta["drafter_config"]
    config = DrafterConfig(**{**dc, "feature_layers": tuple(dc["feature_layers"])})
    drafter = DSparkDrafter(config, target_model.get_input_embeddings(), target_model.get_output_embeddings())
    drafter.load_drafter_state_dict(state if state is not None else load_file(str(folder / WEIGHTS)))
    dev = device or next(target_model.parameters()).device
    return drafter.to(dev).eval()


def default_drafter_path(model: str) -> Path:
    """The drafter shipped in this package for a registry model."""
    path = SHIPPED_DRAFTERS / Path(model).name
    if not path.is_dir():
        raise FileNotFoundError(
            f"no shipped drafter for {model!r} (looked in {path}); train one with `dspark train` and pass its "
            "output folder with --drafter"
        )
    return path


def load_target_with_drafter(config: EngineConfig, drafter_path: Path):
    """(TargetEngine, DSparkDrafter): the target, the `dspark train` drafter at drafter_path bound to its embedding
    and LM head (refused when trained for another target), and the engine returning the drafter's feature layers."""
    from dspark.models.model_store import load_model

    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    drafter = load_trained_drafter(drafter_path, model, tokenizer)
    config = replace(config, feature_layers=tuple(drafter.config.feature_layers))
    return TargetEngine(config, model=model, tokenizer=tokenizer), drafter
