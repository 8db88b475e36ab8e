"""The draft vocabulary: the N tokens the drafter may propose, the most frequent ones in the target's own
regenerated responses (FR-Spec / EAGLE-3's reduced draft vocabulary). Drafting's LM head and Markov W2 then cover N
rows instead of V; the draft distribution is zero off the list and rejection sampling runs over the target's full
vocabulary, so verification stays exact; a target token off the list is simply never drafted.
"""

from __future__ import annotations

import collections
import gzip
import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from dspark.drafter.model import DSparkDrafter


def token_counts(paths: Iterable[str | Path]) -> collections.Counter:
    """How often each token appears in the `response_ids` of `dspark data` JSONL files (plain or .gz)."""
    counts: collections.Counter = collections.Counter()
    for path in paths:
        path = Path(path)
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
            for line in f:
                if line.strip():
                    counts.update(json.loads(line)["response_ids"])
    return counts


def frequent_tokens(
    counts: collections.Counter, size: int, always: Sequence[int] = (), vocab_size: int | None = None
) -> list[int]:
    """The `size` most frequent tokens (ties by id), `always` (e.g. the end-of-sequence tokens) included; ascending.
    When fewer than `size` tokens were seen, unseen ids fill the rest in id order (BPE vocabularies put their
    commonest merges first), up to vocab_size."""
    if size < len(set(always)):
        raise ValueError(f"a draft vocabulary of {size} cannot hold the {len(set(always))} tokens it must keep")
    keep = dict.fromkeys(int(t) for t in always)
    for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(keep) >= size:
            break
        keep.setdefault(int(t))
    t = 0
    while vocab_size is not None and len(keep) < min(size, vocab_size) and t < vocab_size:
        keep.setdefault(t)
        t += 1
    return sorted(keep)


def with_draft_vocab(drafter: DSparkDrafter, token_ids: Sequence[int]) -> DSparkDrafter:
    """A drafter with the same weights that drafts only from token_ids (shares the target's embedding and head)."""
    ids = sorted(set(int(t) for t in token_ids))
    if not ids or ids[0] < 0 or ids[-1] >= drafter.config.vocab_size:
        raise ValueError(f"a draft vocabulary needs token ids in 0..{drafter.config.vocab_size - 1}")
    if len(ids) == drafter.config.vocab_size:  # the whole vocabulary: nothing to restrict
        config = replace(drafter.config, draft_vocab_size=0)
    else:
        config = replace(drafter.config, draft_vocab_size=len(ids))
    out = DSparkDrafter(config, drafter.embed_tokens, drafter.lm_head)
    state = {k: v for k, v in drafter.drafter_state_dict().items() if k != "draft_vocab"}
    if config.draft_vocab_size:
        state["draft_vocab"] = torch.tensor(ids, dtype=torch.long)
    out.load_drafter_state_dict(state)
    return out.to(next(drafter.parameters()).device).eval()
