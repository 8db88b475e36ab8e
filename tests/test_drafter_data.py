"""The drafter's training data never contains an evaluation prompt: the shipped train prompts, and every prompt the
shipped regenerated snapshot was generated from, are disjoint from every turn of the shipped eval sets (exactly, and
after normalising case, whitespace and punctuation)."""

from __future__ import annotations

import gzip
import json
import re

from dspark.drafter.data import TRAIN_DIR, training_prompts
from dspark.drafter.eval_sets import EVAL_DIR, EVAL_SETS, load_turns

REGENERATED = TRAIN_DIR.parent / "regenerated"


def normal(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def eval_turns() -> set[str]:
    return {normal(t) for name in EVAL_SETS for turns in load_turns(name) for t in turns}


def test_the_shipped_sets_are_there():
    assert set(EVAL_SETS) >= {"gsm8k", "mt-bench", "humaneval", "math500", "mbpp"}
    assert len(training_prompts()) >= 3000 and (EVAL_DIR / "README.md").is_file()


def test_no_eval_prompt_is_a_training_prompt():
    evals = eval_turns()
    train = {normal(text) for _, text in training_prompts()}
    assert train.isdisjoint(evals)
    # nor a long shared stretch: the first 200 normalised characters of each long eval turn never open a train prompt
    heads = {t[:200] for t in evals if len(t) >= 200}
    assert not any(t[:200] in heads for t in train)


def test_the_regenerated_snapshot_comes_from_training_prompts_only():
    ids = {pid for pid, _ in training_prompts()}
    for path in sorted(REGENERATED.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            seen = [json.loads(line)["id"] for line in f if line.strip()]
        assert seen and set(seen) <= ids, path.name
        assert len(seen) == len(set(seen)), f"{path.name}: a prompt twice"
