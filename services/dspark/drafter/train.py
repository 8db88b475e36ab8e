"""`dspark train`: train a DSpark drafter for a frozen target on the target's own responses (paper §3.3).

Pipeline. `dspark data` writes one JSONL line per example (prompt_ids, response_ids). Each example becomes
prompt + response truncated to max_seq_len (when that would cut the response below half the window, the prompt
loses its oldest tokens instead); the response positions form the loss mask, so anchors and labels come from the
target-generated response only. Per step: a batch of sequences, the frozen target's hidden states (the feature
layers, concatenated, and the final normed hidden state), anchors_per_seq anchors per sequence
(sample_anchors), one DSparkDrafter.forward over all blocks, and drafter_loss (position-weighted CE + L1 + confidence
BCE) against the target's next-token distribution. The target's LM head runs only on the gathered block positions
(B*A*gamma rows, the paper's "hidden state communication" trick), never on the full (L, V) logits. AdamW on the
drafter's own parameters (the shared embedding and LM head are frozen and not in drafter.parameters()), linear
warmup then cosine decay to lr*min_lr_ratio, global grad-norm clipping.

Determinism and resume. Batch composition and anchors are functions of (seed, step) alone: example order is a
per-epoch permutation seeded by (seed, epoch), anchors come from a generator seeded by (seed, step). A checkpoint
(drafter state, optimizer, step, RNG state, config, log) is written atomically every checkpoint_every steps and at
the end; `--resume` reloads it and the run continues exactly as an uninterrupted one would (tests check this).

Target features: cache vs recompute. Measured for the default target (SmolLM2-135M, fp32, feature layers
(2, 15, 28)) with cpu-small's shapes (batch 4 x 256 tokens, 16 anchors, gamma 7, 2 draft layers), one torch thread
on this 2-core machine (it is shared; two threads under that contention were slower, not faster):
  - target forward over the batch: 2.64 s (2.6 ms/token); drafter step (forward, backward, AdamW): 2.3-2.8 s, so
    recomputing the features costs ~5.0 s a step. (1 draft layer: 2.2-2.5 s; 3 layers: 2.8 s; 32 anchors: 5.0 s:
    the (B*A*gamma, 49152) vocabulary tensors of the LM head and the loss dominate, not the draft layers.)
  - cache: the same target forward once per example; afterwards a batch is read from float16 memmaps in 3.6 ms, so
    a step is ~2.4 s. Disk: (3 + 1) x 576 x 2 bytes = 4608 B/token (measured), 1.2 MB per 256-token sequence,
    1.2 GB for cpu-small's 1024 sequences. A 12-step `dspark train --config cpu-small` on real `dspark data`
    output ran at 2.19 s a step end to end.
  Caching halves the step as soon as an example is seen more than once: cpu-small (700 steps x 4 of 1024
  sequences, ~2.7 passes) and tiny cache; `full` (GPU: the target forward is cheap there, and a 1.5B target's cache
  would take 12 KB/token) recomputes. feature_cache switches it.

Output directory: checkpoint.pt (resume state; drafter + AdamW moments, ~400 MB for cpu-small), log.json (every
step's ce, tv, conf, loss, per-position acceptance estimate and tau, the evals and the calibration), loss.png (the
curves), feature_cache/ (when cached), and at the end drafter.safetensors (the drafter's own weights only,
drafter_state_dict(): the target's embedding and LM head are not in it)
with drafter.json (its DrafterConfig, the target's name and fingerprint, training summary). The final
confidences are calibrated on held-out examples that training never saw: each held-out block is drafted with
drafter.propose and verified against the target by real rejection sampling, and the per-position temperatures are fit
to those accepted counts, by STS (fit_sts_temperatures, left to right) and jointly (fit_joint_temperatures), or left at
1; whichever has the lowest ECE on a half of the blocks it was not fit on is kept. load_trained_drafter refuses a
drafter whose target fingerprint (hash of the target's architecture config and tokenizer vocabulary) differs from the
target it is given.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gzip
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from dspark.core.engine import softcap
from dspark.core.sampling import SamplingParams, logits_to_probs
from dspark.core.verification import verify
from dspark.drafter.checkpoint import (
    WEIGHTS,
    load_trained_drafter,
    save_trained_drafter,
    target_fingerprint,
)
from dspark.drafter.loss import LossWeights, drafter_loss
from dspark.drafter.model import (
    ContextKV,
    DSparkDrafter,
    block_labels,
    fit_joint_temperatures,
    fit_sts_temperatures,
    gather_blocks,
    prefix_ece,
    sample_anchors,
)
from dspark.drafter.vocab import frequent_tokens
from dspark.models.prompt import eos_token_ids
from dspark.models.registry import DEFAULT_MODEL

CHECKPOINT = "checkpoint.pt"
LOG = "log.json"
PLOT = "loss.png"
CACHE_DIR = "feature_cache"


# -- configuration ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    model: str = DEFAULT_MODEL  # the target: registry name, HF folder or .gguf path
    device: str = "cpu"
    dtype: str = "float32"  # the target's weights
    autocast: bool = False  # bf16 autocast of target and drafter compute (GPU)
    threads: int | None = None  # torch CPU threads (None: torch's default)
    # the drafter
    feature_layers: tuple[int, ...] | None = None  # None: drafter.default_feature_layers of the target
    n_layer: int = 2
    gamma: int = 7
    sequential_head: str = "markov"  # "markov" | "rnn" | "none" (the ablation: pure parallel drafter)
    markov_rank: int = 256
    draft_vocab: int = 0  # train over the N most frequent response tokens only, as drafting uses them (0: all V)
    init_from: str | None = None  # start from this trained drafter (its weights and draft vocabulary), not at random
    init_layers: str = "random"  # "random" | "target": draft layers start as the target's last layers (warm start)
    weights_dtype: str = "float32"  # dtype of the saved drafter.safetensors (training itself is float32)
    # data
    max_seq_len: int = 256  # prompt + response tokens per example
    max_examples: int | None = None  # use the first N examples of the data file (None: all)
    heldout_frac: float = 0.05  # examples kept out of training for eval and STS calibration
    anchors_per_seq: int = 16
    feature_cache: bool = True  # cache target features on disk once (True) or recompute them every step
    # optimisation
    batch_size: int = 4  # sequences per step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.01
    warmup: int = 50
    steps: int = 1000
    grad_clip: float = 1.0
    loss_ce: float = 0.1  # eq. 12 weights
    loss_tv: float = 0.9
    loss_conf: float = 1.0
    position_decay: float | None = None  # loss position weights exp(-(k-1)/decay); None: gamma (paper), 4: DeepSpec
    kl_warmup: int = 0  # first N steps train on forward KL(p_t || p_d) in place of TV, then TV (eq. 12)
    # bookkeeping
    eval_every: int = 100
    eval_batches: int = 2
    checkpoint_every: int = 200
    seed: int = 0
    # STS calibration at the end, by drafting and verifying held-out blocks
    calib_blocks: int = 256  # at most this many held-out blocks
    calib_temperature: float = 1.0  # sampling temperature of drafter and target during calibration (as c* in training)

    def __post_init__(self):
        if self.feature_layers is not None:
            object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))
        if self.init_layers not in ("random", "target"):
            raise ValueError(f"init_layers must be random or target, got {self.init_layers!r}")
        if self.position_decay is not None and self.position_decay <= 0:
            raise ValueError("position_decay must be > 0")
        if self.sequential_head not in ("markov", "rnn", "none"):
            raise ValueError(f"sequential_head must be markov, rnn or none, got {self.sequential_head!r}")
        if not 0.0 < self.heldout_frac < 1.0:
            raise ValueError("heldout_frac must be in (0, 1)")
        if self.steps < 1 or self.batch_size < 1 or self.anchors_per_seq < 1 or self.max_seq_len < 2:
            raise ValueError("steps, batch_size, anchors_per_seq must be >= 1 and max_seq_len >= 2")

    @classmethod
    def preset(cls, name: str, **overrides) -> TrainConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown train config {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def drafter_overrides(self) -> dict:
        return dict(
            n_layer=self.n_layer,
            gamma=self.gamma,
            sequential_head=self.sequential_head,
            markov_rank=self.markov_rank,
            draft_vocab_size=self.draft_vocab,
        )

    @property
    def loss_weights(self) -> LossWeights:
        """Eq. 12's weights, what training converges on and held-out evals report."""
        return LossWeights(ce=self.loss_ce, tv=self.loss_tv, conf=self.loss_conf, decay=self.position_decay)

    def loss_weights_at(self, step: int) -> LossWeights:
        """The weights of step `step` (0-based): during the KL warm-up the TV weight goes to forward KL."""
        w = self.loss_weights
        return replace(w, tv=0.0, kl=self.loss_tv) if step < self.kl_warmup else w


PRESETS: dict[str, TrainConfig] = {
    # CI smoke test: seconds on a tiny target, about a minute for 30 steps on the real default target.
    "tiny": TrainConfig(
        n_layer=1,
        markov_rank=64,
        max_seq_len=128,
        anchors_per_seq=8,
        batch_size=2,
        lr=3e-3,
        warmup=5,
        steps=30,
        eval_every=10,
        eval_batches=1,
        checkpoint_every=10,
        heldout_frac=0.25,
        calib_blocks=32,
    ),
    # A usable drafter for SmolLM2-135M in <= 45 min on 2 CPU cores. Measured (2026-11-29, 689 examples, 2 threads,
    # the machine shared with other work): feature cache 5 min, 1200 steps in 28 min (1.1-1.4 s a step), calibration
    # (320 verified held-out blocks) 1 min: 37 min wall. Choices: 2 draft layers (the paper's 5 add ~0.25 s a step
    # each for a drafter that sees ~0.5M supervised positions); Markov rank 64 and bfloat16 weight files, so the
    # shipped drafter is ~29 MB (rank 256 in float32 is 127 MB, nearly all of it the two V x r Markov matrices);
    # 256-token windows (`dspark data` responses are <= 256 tokens by default); 16 anchors x 4 sequences = 448
    # supervised draft positions a step (the step time is linear in that); cached features (half the step time of
    # recomputing them, see the module docstring). lr 1e-3, 60 warmup steps, cosine to 1e-4.
    "cpu-small": TrainConfig(
        n_layer=2,
        markov_rank=64,
        weights_dtype="bfloat16",
        max_seq_len=256,
        max_examples=1536,
        anchors_per_seq=16,
        batch_size=4,
        lr=1e-3,
        warmup=60,
        steps=1200,
        eval_every=100,
        eval_batches=2,
        checkpoint_every=100,
        heldout_frac=0.04,
        calib_blocks=320,
    ),
    # GPU (deploy/gpu/recipe.py): the paper's 5 draft layers, long windows, many anchors, bf16 autocast; the target
    # forward is recomputed. 8 x 64 anchors x 7 = 3584 supervised positions a step, the loss over an 8,192-token draft
    # vocabulary. Markov rank 128, so that the bf16 drafter (~63 MB for SmolLM2, W1 and W2 span the whole vocabulary)
    # comes back from a device call in 5 files of 15 MiB. Not yet run on a GPU.
    "full": TrainConfig(
        device="cuda",
        dtype="bfloat16",
        autocast=True,
        n_layer=5,
        markov_rank=128,
        draft_vocab=8192,
        weights_dtype="bfloat16",
        max_seq_len=2048,
        anchors_per_seq=64,
        feature_cache=False,
        batch_size=8,
        lr=6e-4,
        warmup=500,
        steps=20000,
        eval_every=500,
        eval_batches=8,
        checkpoint_every=1000,
        heldout_frac=0.02,
        calib_blocks=2048,
    ),
}


# The shipped drafter for SmolLM2-135M: cpu-small over an 8,192-token draft vocabulary (the loss over its columns
# only: 0.99 against 2.11 s a step on the same batches), all the data, and 3.3x the steps. Measured (2026-12-01, AMD
# EPYC, 2 threads, 810 responses, --steps 3000): feature cache 18 min (the cores shared), 3000 steps in 65 min, final
# eval and calibration 8 min. The issue's <= 2 h on all 3,254 responses is not shown yet: the feature cache grows
# with the data (an estimated 40-70 min for all of it) and 4000 steps take about 80 min.
PRESETS["cpu-medium"] = replace(
    PRESETS["cpu-small"],
    draft_vocab=8192,
    max_examples=None,
    warmup=100,
    steps=4000,
    eval_every=250,
    eval_batches=4,
    checkpoint_every=250,
    heldout_frac=0.03,
    calib_blocks=512,
)


# -- data -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    id: str
    ids: tuple[int, ...]  # prompt + response, truncated
    n_prompt: int  # the first n_prompt tokens are prompt (not trained on)


def make_example(id: str, prompt_ids: Sequence[int], response_ids: Sequence[int], max_seq_len: int) -> Example:
    """prompt + response in max_seq_len tokens. The response keeps at least half the window (all of itself when
    shorter); the prompt gets the rest, losing its oldest tokens first."""
    prompt, resp = list(prompt_ids), list(response_ids)
    n_resp = min(len(resp), max(max_seq_len // 2, max_seq_len - len(prompt)))
    n_prompt = min(len(prompt), max_seq_len - n_resp)
    prompt = prompt[len(prompt) - n_prompt :]
    return Example(id, tuple(prompt + resp[: max_seq_len - n_prompt]), n_prompt)


def data_paths(data) -> list[Path]:
    """One `dspark data` file, or several (e.g. a second sample of every prompt at another temperature)."""
    return [Path(data)] if isinstance(data, (str, os.PathLike)) else [Path(p) for p in data]


def load_examples(data, max_seq_len: int, limit: int | None = None) -> list[Example]:
    """Examples of one or more `dspark data` JSONL files (plain or .gz), in order; those with fewer than 2 response
    tokens (no anchor) are skipped. limit: the first N examples in all."""
    out: list[Example] = []
    for path in data_paths(data):
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
            for n, line in enumerate(f, 1):
                if limit is not None and len(out) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    ex = make_example(str(rec["id"]), rec["prompt_ids"], rec["response_ids"], max_seq_len)
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not a `dspark data` line ({e})") from e
                if len(ex.ids) - ex.n_prompt >= 2:
                    out.append(ex)
    if len(out) < 2:
        names = ", ".join(str(p) for p in data_paths(data))
        raise ValueError(f"{names}: need at least 2 examples with a response, found {len(out)}")
    return out


def training_vocab(examples: Sequence[Example], size: int, model, tokenizer) -> list[int]:
    """The draft vocabulary a run trains and drafts over: the `size` most frequent response tokens of its training
    examples, end-of-sequence tokens always included (drafter/vocab.py)."""
    counts = collections.Counter(t for e in examples for t in e.ids[e.n_prompt :])
    vocab_size = model.get_output_embeddings().weight.shape[0]
    return frequent_tokens(counts, min(size, vocab_size), eos_token_ids(model, tokenizer), vocab_size)


def split_heldout(examples: list[Example], frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded shuffle of the prompts (examples sharing an id, e.g. two samples
    of one prompt, stay on one side), at least one prompt on each."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.id, []).append(i)
    ids = list(groups)
    if len(ids) < 2:
        raise ValueError("need examples of at least 2 prompts to hold one out")
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = min(len(ids) - 1, max(1, round(frac * len(ids))))

    def side(part: list[int]) -> list[int]:
        return sorted(i for g in part for i in groups[ids[g]])

    return side(order[n_held:]), side(order[:n_held])


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) right-padded with 0
    attention_mask: torch.Tensor  # (B, L) 1 on real tokens
    loss_mask: torch.Tensor  # (B, L) bool: response tokens
    features: torch.Tensor  # (B, L, F) the target's feature layers, concatenated
    final: torch.Tensor  # (B, L, d) the target's final normed hidden state (the LM head's input)


def collate(examples: Sequence[Example], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    L = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), L, dtype=torch.long)
    attn = torch.zeros(len(examples), L, dtype=torch.long)
    loss = torch.zeros(len(examples), L, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        attn[i, : len(e.ids)] = 1
        loss[i, e.n_prompt : len(e.ids)] = True
    return ids.to(device), attn.to(device), loss.to(device)


# -- the frozen target ------------------------------------------------------------------------------------------


class Target:
    """The frozen HF causal LM: per-token features and final hidden states, and the LM head on chosen rows."""

    def __init__(self, model, feature_layers: Sequence[int], autocast: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.feature_layers = tuple(feature_layers)
        self.device = next(model.parameters()).device
        c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(c, "final_logit_softcapping", None)
        self.autocast = autocast

    def amp(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) right-padded ids -> features (B, L, F) and final hidden (B, L, d), float32."""
        with self.amp():
            out = self.decoder(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False)
        feats = torch.cat([out.hidden_states[i] for i in self.feature_layers], dim=-1)
        return feats.float(), out.last_hidden_state.float()

    @torch.no_grad()
    def final_hidden(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded ids -> the final normed hidden state (B, L, d), without keeping every layer's."""
        with self.amp():
            out = self.decoder(input_ids=ids, attention_mask=attn, use_cache=False)
        return out.last_hidden_state.float()

    @torch.no_grad()
    def logits(self, final: torch.Tensor) -> torch.Tensor:
        """(..., d) final hidden states -> (..., V) float32 next-token logits (softcapped as the model does)."""
        w = self.lm_head.weight
        with self.amp():
            out = self.lm_head(final.to(w.dtype)).float()
        return softcap(out, self.softcap)


class LiveFeatures:
    """Runs the target on every batch (no disk; the choice when the data is seen about once)."""

    def __init__(self, target: Target, examples: list[Example]):
        self.target, self.examples = target, examples

    def batch(self, idx: Sequence[int]) -> Batch:
        ids, attn, loss = collate([self.examples[i] for i in idx], self.target.device)
        feats, final = self.target.hidden(ids, attn)
        return Batch(ids, attn, loss, feats, final)


class CachedFeatures:
    """Target features of every example, computed once into float16 memmaps under `root` and reused; a key (target
    fingerprint, feature layers, the examples) decides whether an existing cache is still valid."""

    def __init__(self, target: Target, examples: list[Example], root: Path, key: str, batch_size: int = 8):
        self.target, self.examples, self.root = target, examples, Path(root)
        meta_path = self.root / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if meta.get("key") != key:
            self._build(key, batch_size)
            meta = json.loads(meta_path.read_text())
        self.offsets = meta["offsets"]
        self.feats = np.load(self.root / "features.npy", mmap_mode="r")
        self.final = np.load(self.root / "final.npy", mmap_mode="r")

    def _build(self, key: str, batch_size: int) -> None:
        from tqdm.auto import tqdm

        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "meta.json").unlink(missing_ok=True)
        lens = [len(e.ids) for e in self.examples]
        offsets = [0, *np.cumsum(lens).tolist()]
        F = len(self.target.feature_layers) * self.target.lm_head.weight.shape[1]
        d = self.target.lm_head.weight.shape[1]
        fmm = np.lib.format.open_memmap(self.root / "features.npy", "w+", np.float16, (offsets[-1], F))
        hmm = np.lib.format.open_memmap(self.root / "final.npy", "w+", np.float16, (offsets[-1], d))
        order = sorted(range(len(self.examples)), key=lambda i: lens[i])  # similar lengths together: less padding
        t0 = time.time()
        for s in tqdm(range(0, len(order), batch_size), desc="target features", unit="batch"):
            idx = order[s : s + batch_size]
            ids, attn, _ = collate([self.examples[i] for i in idx], self.target.device)
            feats, final = self.target.hidden(ids, attn)
            for row, i in enumerate(idx):
                a, b = offsets[i], offsets[i + 1]
                f, h = feats[row, : b - a].cpu(), final[row, : b - a].cpu()
                if max(f.abs().max(), h.abs().max()) > 6e4:
                    raise ValueError("target activations overflow float16; set feature_cache=False")
                fmm[a:b] = f.numpy().astype(np.float16)
                hmm[a:b] = h.numpy().astype(np.float16)
        fmm.flush()
        hmm.flush()
        del fmm, hmm
        meta = {"key": key, "offsets": offsets, "build_s": round(time.time() - t0, 1), "tokens": offsets[-1]}
        (self.root / "meta.json").write_text(json.dumps(meta))

    def batch(self, idx: Sequence[int]) -> Batch:
        exs = [self.examples[i] for i in idx]
        dev = self.target.device
        ids, attn, loss = collate(exs, dev)
        B, L = ids.shape
        feats = torch.zeros(B, L, self.feats.shape[1])
        final = torch.zeros(B, L, self.final.shape[1])
        for row, i in enumerate(idx):
            a, b = self.offsets[i], self.offsets[i + 1]
            feats[row, : b - a] = torch.from_numpy(np.asarray(self.feats[a:b], dtype=np.float32))
            final[row, : b - a] = torch.from_numpy(np.asarray(self.final[a:b], dtype=np.float32))
        return Batch(ids, attn, loss, feats.to(dev), final.to(dev))

    @property
    def nbytes(self) -> int:
        return int(self.feats.nbytes + self.final.nbytes)


# -- one step ---------------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt * 104_729) % (2**63 - 1))


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 65_537 + epoch)).tolist())


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The step's positions in 0..n-1: consecutive slices of per-epoch seeded permutations (a function of step)."""
    return [_epoch_order(n, seed, p // n)[p % n] for p in range(step * batch_size, (step + 1) * batch_size)]


def block_loss(drafter: DSparkDrafter, target: Target, batch: Batch, num_anchors: int, gen, weights: LossWeights):
    """Sample anchors in the responses, draft all blocks teacher-forced, and score them against the target."""
    G = drafter.config.gamma
    anchors, keep = sample_anchors(batch.loss_mask.cpu(), num_anchors, gen)
    anchors, keep = anchors.to(batch.input_ids.device), keep.to(batch.input_ids.device)
    labels, valid = block_labels(batch.input_ids, anchors, G, batch.loss_mask)
    valid &= keep[..., None]
    # the target's next-token logits at block position k come from token t+k-1: offset 0
    target_logits = target.logits(gather_blocks(batch.final, anchors, G))  # (B, A, G, V)
    target_lse = None
    if drafter.draft_vocab is not None:  # the loss over the draft vocabulary's columns, p_t normalised over all V
        target_lse = target_logits.logsumexp(-1)  # (B, A, G)
        target_logits = target_logits[..., drafter.draft_vocab]  # (B, A, G, N)
        labels = drafter.draft_column().to(labels.device)[labels]  # -1: off the draft vocabulary
    with target.amp():
        out = drafter(batch.features, batch.input_ids, anchors)
    return drafter_loss(out.logits, target_logits, labels, out.conf_logits, valid, weights, target_lse)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over cfg.warmup steps, then cosine from lr to lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(drafter: DSparkDrafter, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in drafter.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _record(losses, **extra) -> dict:
    return {
        "loss": float(losses.loss.detach()),
        "ce": float(losses.ce.detach()),
        "tv": float(losses.tv.detach()),
        "conf": float(losses.conf.detach()),
        "accept": [round(float(a), 5) for a in losses.accept],
        "tau": float(losses.tau),
        **extra,
    }


@torch.no_grad()
def evaluate(drafter, target, source, heldout: list[int], cfg: TrainConfig) -> dict:
    """Mean losses over up to eval_batches held-out batches, with anchors fixed across evals."""
    drafter.eval()
    recs = []
    for j in range(cfg.eval_batches):
        idx = heldout[j * cfg.batch_size : (j + 1) * cfg.batch_size]
        if not idx:
            break
        gen = step_generator(cfg.seed, j, salt=1)
        recs.append(_record(block_loss(drafter, target, source.batch(idx), cfg.anchors_per_seq, gen, cfg.loss_weights)))
    drafter.train()
    out = {k: float(np.mean([r[k] for r in recs])) for k in ("loss", "ce", "tv", "conf", "tau")}
    out["accept"] = np.mean([r["accept"] for r in recs], axis=0).round(5).tolist()
    return out


# -- calibration -----------------------------------------------------------------------------------------------


@torch.no_grad()
def calibrate(
    drafter, target, source, heldout: list[int], cfg: TrainConfig, chunk: int = 8, blocks_per_call: int = 32
) -> dict:
    """Draft held-out blocks with drafter.propose (real sampling, real previous tokens for the confidence head),
    verify them against the target by rejection sampling, fit the STS temperatures to the accepted counts, and set
    drafter.conf_temperature. Returns the measured acceptance and the ECE before and after."""
    drafter.eval()
    G = drafter.config.gamma
    params = SamplingParams(temperature=cfg.calib_temperature)
    per_seq = max(1, math.ceil(cfg.calib_blocks / len(heldout)))
    gen = step_generator(cfg.seed, 0, salt=2)  # anchors (CPU)
    dgen = torch.Generator(device=target.device)  # drafting and verification, on the compute device
    dgen.manual_seed(cfg.seed + 12_345)
    drafter.conf_temperature.fill_(1.0)
    conf_logits, accepted = [], []
    for s in range(0, len(heldout), chunk):
        if len(accepted) >= cfg.calib_blocks:
            break
        batch = source.batch(heldout[s : s + chunk])
        anchors, keep = sample_anchors(batch.loss_mask.cpu(), per_seq, gen)
        rows, ts = keep.nonzero(as_tuple=True)
        ts = anchors[rows, ts]
        rows, ts = rows[: cfg.calib_blocks - len(accepted)], ts[: cfg.calib_blocks - len(accepted)]
        dev = batch.input_ids.device
        ctx_all = drafter.encode_context(batch.features)
        for lo in range(0, len(rows), blocks_per_call):
            r, t = rows[lo : lo + blocks_per_call].to(dev), ts[lo : lo + blocks_per_call].to(dev)
            ctx = ContextKV([k[r] for k in ctx_all.k], [v[r] for v in ctx_all.v])
            draft = drafter.propose(ctx, t, batch.input_ids[r, t], params, dgen)
            c = draft.confidence.clamp(1e-6, 1 - 1e-6)
            conf_logits.append(torch.log(c) - torch.log1p(-c))
            # the target on prefix + anchor + the G drafts: its distributions after the anchor and after each draft
            n = len(r)
            ids = torch.zeros(n, int(t.max()) + 1 + G, dtype=torch.long, device=dev)
            attn = torch.zeros_like(ids)
            for i, (ri, ti) in enumerate(zip(r.tolist(), t.tolist())):
                ids[i, : ti + 1] = batch.input_ids[ri, : ti + 1]
                ids[i, ti + 1 : ti + 1 + G] = draft.tokens[i]
                attn[i, : ti + 1 + G] = 1
            final = target.final_hidden(ids, attn)
            pos = t[:, None] + torch.arange(G + 1, device=dev)  # (n, G+1)
            tgt = logits_to_probs(target.logits(final[torch.arange(n, device=dev)[:, None], pos]), params)
            for i in range(n):
                accepted.append(verify(draft.tokens[i], draft.probs[i], tgt[i], dgen, greedy=params.greedy).accepted)
    conf_logits = torch.cat(conf_logits).float().cpu()
    acc = torch.tensor(accepted)
    # STS (left to right), the joint fit and no calibration at all, each fit on one half of the blocks and scored on
    # the other; the best on the held-out half is refit on all blocks and kept
    fit, val = torch.arange(0, len(acc), 2), torch.arange(1, len(acc), 2)
    fits = {"none": lambda lg, a: torch.ones(lg.shape[1]), "sts": fit_sts_temperatures, "joint": fit_joint_temperatures}
    scored = {name: fn(conf_logits[fit], acc[fit]) for name, fn in fits.items()}
    val_ece = {name: prefix_ece(conf_logits[val], acc[val], t) for name, t in scored.items()}
    method = min(val_ece, key=val_ece.__getitem__)
    temps = fits[method](conf_logits, acc)
    drafter.conf_temperature.copy_(temps.to(drafter.conf_temperature.device))
    drafter.train()
    ones = torch.ones(G)
    return {
        "blocks": len(accepted),
        "temperature": cfg.calib_temperature,
        "mean_accepted": float(acc.float().mean()),
        "tau": 1.0 + float(acc.float().mean()),
        "accept_at_least": [float((acc > k).float().mean()) for k in range(G)],
        "method": method,
        "temperatures": [round(float(t), 4) for t in temps],
        "heldout_half_ece": val_ece,
        "heldout_half_temperatures": {name: [round(float(t), 4) for t in ts] for name, ts in scored.items()},
        "ece_before": prefix_ece(conf_logits, acc, ones),
        "ece_after": prefix_ece(conf_logits, acc, temps),
    }


# -- persistence ------------------------------------------------------------------------------------------------


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plot_losses(log: dict, path) -> None:
    try:
        import matplotlib
    except ImportError:  # the curves are a convenience; log.json has the numbers
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, ev = log["train"], log["eval"]
    if not train:
        return
    steps = [r["step"] for r in train]

    k = max(1, len(train) // 50)  # moving-average window

    def smooth(xs):
        c = np.cumsum(np.insert(np.asarray(xs, dtype=float), 0, 0.0))
        return [(c[i + 1] - c[max(0, i + 1 - k)]) / min(k, i + 1) for i in range(len(xs))]

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, colour in (("loss", "k"), ("ce", "C0"), ("tv", "C1"), ("conf", "C2")):
        a1.plot(steps, smooth([r[key] for r in train]), colour, label=f"train {key}", lw=1)
        if ev:
            a1.plot([r["step"] for r in ev], [r[key] for r in ev], colour + "o--", ms=3, lw=0.8, label=f"eval {key}")
    a1.set_xlabel("step")
    a1.set_yscale("log")
    a1.set_title("losses (eq. 9-12)")
    a1.legend(fontsize=7, ncol=2)
    a2.plot(steps, smooth([r["tau"] for r in train]), "k", lw=1, label="train tau (1 + sum prod c*)")
    if ev:
        a2.plot([r["step"] for r in ev], [r["tau"] for r in ev], "ko--", ms=3, lw=0.8, label="eval tau")
    cal = log.get("calibration")
    if cal:
        a2.axhline(cal["tau"], color="C3", ls=":", label=f"verified tau {cal['tau']:.2f} (T={cal['temperature']})")
    a2.set_xlabel("step")
    a2.set_title("expected tokens per round")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- the run ----------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    log: dict = field(repr=False)
    drafter: DSparkDrafter | None = field(default=None, repr=False)


_SHAPE_FIELDS = ("model", "feature_layers", "n_layer", "gamma", "sequential_head", "markov_rank", "draft_vocab", "seed")


def _start_from(drafter: DSparkDrafter, path, model, tokenizer) -> None:
    """Copy a trained drafter's weights and draft vocabulary into `drafter` (fine-tuning: new data, a new schedule);
    its shape must be the one this run's config asks for. Its calibration is not kept: the run fits its own."""
    init = load_trained_drafter(path, model, tokenizer)
    want, got = asdict(drafter.config), asdict(init.config)
    diff = [k for k in want if want[k] != got[k]]
    if diff:
        raise ValueError(
            f"cannot start from {path}: its {', '.join(f'{k}={got[k]}' for k in diff)} differ from this run's "
            f"{', '.join(f'{k}={want[k]}' for k in diff)}"
        )
    drafter.load_drafter_state_dict(init.drafter_state_dict())
    drafter.conf_temperature.fill_(1.0)


def train(
    cfg: TrainConfig,
    data,
    out_dir,
    resume: bool = False,
    model=None,
    tokenizer=None,
    target_name: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or, with resume, continue) a drafter on the `dspark data` JSONL `data`, into `out_dir`.
    model/tokenizer: an already loaded target (default: load cfg.model). stop_after: end this call after that many
    steps (the checkpoint is written; a later resume continues), as an interruption would."""
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT
    ckpt = None
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"{ckpt_path}: nothing to resume")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        old = TrainConfig.from_dict(ckpt["config"])
        diff = [f for f in _SHAPE_FIELDS if getattr(old, f) != getattr(cfg, f)]
        if diff:
            raise ValueError(f"cannot resume {ckpt_path} with a different {', '.join(diff)}")
    elif ckpt_path.exists() or (out / WEIGHTS).exists():
        raise ValueError(f"{out} already holds a training run; pass --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    if model is None:
        from dspark.models.model_store import load_model

        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    model = model.to(cfg.device)
    fingerprint = target_fingerprint(model, tokenizer)
    target_name = target_name or cfg.model
    examples = load_examples(data, cfg.max_seq_len, cfg.max_examples)
    train_idx, held_idx = split_heldout(examples, cfg.heldout_frac, cfg.seed)
    drafter = DSparkDrafter.from_target_model(model, feature_layers=cfg.feature_layers, **cfg.drafter_overrides())
    if cfg.init_from and ckpt is None:
        _start_from(drafter, cfg.init_from, model, tokenizer)
    else:
        if cfg.init_layers == "target" and ckpt is None:
            drafter.init_layers_from(model)
        if cfg.draft_vocab:
            vocab = training_vocab([examples[i] for i in train_idx], cfg.draft_vocab, model, tokenizer)
            drafter.set_draft_vocab(vocab)
    drafter = drafter.to(cfg.device).train()
    target = Target(model, drafter.config.feature_layers, autocast=cfg.autocast)
    if cfg.feature_cache:
        key = hashlib.sha256(
            json.dumps([fingerprint, list(drafter.config.feature_layers), [(e.id, e.ids) for e in examples]]).encode()
        ).hexdigest()
        source = CachedFeatures(target, examples, out / CACHE_DIR, key, batch_size=max(cfg.batch_size, 8))
    else:
        source = LiveFeatures(target, examples)

    opt = make_optimizer(drafter, cfg)
    log = {"config": asdict(cfg), "target": {"model": target_name, "fingerprint": fingerprint}, "train": [], "eval": []}
    log["data"] = {
        "path": [str(p) for p in data_paths(data)],
        "examples": len(examples),
        "train": len(train_idx),
        "heldout": len(held_idx),
    }
    start = 0
    if ckpt is not None:
        drafter.load_drafter_state_dict(ckpt["drafter"])
        opt.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
        log["train"], log["eval"] = ckpt["log"]["train"], ckpt["log"]["eval"]
        _set_rng_state(ckpt["rng"])

    def checkpoint(step):
        state = {
            "drafter": drafter.drafter_state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "rng": _rng_state(),
            "config": asdict(cfg),
            "drafter_config": asdict(drafter.config),
            "fingerprint": fingerprint,
            "log": {"train": log["train"], "eval": log["eval"]},
        }
        _atomic_save(state, ckpt_path)
        (out / LOG).write_text(json.dumps(log))

    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    params = [p for p in drafter.parameters() if p.requires_grad]
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="train", unit="step", disable=not progress)
    step = start
    for step in bar:
        t0 = time.time()
        batch = source.batch([train_idx[i] for i in batch_indices(len(train_idx), cfg.batch_size, step, cfg.seed)])
        batch_time = time.time() - t0
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        losses = block_loss(
            drafter, target, batch, cfg.anchors_per_seq, step_generator(cfg.seed, step), cfg.loss_weights_at(step)
        )
        opt.zero_grad(set_to_none=True)
        losses.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        rec = _record(losses, step=step + 1, lr=lr, grad_norm=float(gnorm), time=round(time.time() - t0, 4))
        rec["batch_time"] = round(batch_time, 4)
        log["train"].append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tau=f"{rec['tau']:.2f}")
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0:
            log["eval"].append({"step": done, **evaluate(drafter, target, source, held_idx, cfg)})
            bar.write(f"step {done}: eval loss {log['eval'][-1]['loss']:.4f} tau {log['eval'][-1]['tau']:.3f}")
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < end:
            checkpoint(done)
    bar.close()
    step = end
    checkpoint(step)
    if step < cfg.steps:  # interrupted on purpose: resume later
        plot_losses(log, out / PLOT)
        return TrainResult(out, step, log, drafter)

    if not log["eval"] or log["eval"][-1]["step"] != step:
        log["eval"].append({"step": step, **evaluate(drafter, target, source, held_idx, cfg)})
    log["calibration"] = calibrate(drafter, target, source, held_idx, cfg)
    summary = {
        "train_config": asdict(cfg),
        "steps": step,
        "final_eval": log["eval"][-1],
        "calibration": log["calibration"],
        "data": log["data"],
    }
    save_trained_drafter(drafter, out, target_name, fingerprint, extra=summary, dtype=cfg.weights_dtype)
    (out / LOG).write_text(json.dumps(log))
    plot_losses(log, out / PLOT)
    return TrainResult(out, step, log, drafter)
