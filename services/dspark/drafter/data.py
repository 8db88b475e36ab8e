"""`dspark data`: regenerate responses to the training prompts with the target itself (paper §4.1).

Each output line holds the prompt and response token ids, so training never re-tokenizes. The run is
resumable: lines already in the output file (by `id`) are skipped, and results are appended as each
request finishes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from dspark.core.decoding import Decoder
from dspark.core.sampling import SamplingParams
from dspark.drafter.eval_sets import load_turns
from dspark.models.prompt import encode_prompt

TRAIN_DIR = Path(__file__).parents[1] / "data" / "train"


def training_prompts(files: list[str] | None = None) -> list[tuple[str, str]]:
    """(id, first user turn) for every record of the given JSONL files (default: the shipped training sets)."""
    paths = [Path(f) for f in files] if files else sorted(TRAIN_DIR.glob("*.jsonl"))
    out = []
    for p in paths:
        for i, turns in enumerate(load_turns(str(p))):
            out.append((f"{p.stem}:{i}", turns[0]))
    return out


def done_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    ids = set()
    with open(path) as f:
        for line in f:
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by an interrupted run; its prompt is redone
    return ids


def regenerate(
    decoder: Decoder,
    prompts: list[tuple[str, str]],
    out_path: Path,
    params: SamplingParams,
    max_prompt_tokens: int = 768,
    seed: int = 0,
) -> int:
    """Generate a response for every prompt not yet in `out_path`; returns how many were written."""
    tok = decoder.engine.tokenizer
    done = done_ids(out_path)
    todo = [(pid, text) for pid, text in prompts if pid not in done]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    by_rid: dict[str, tuple[str, list[int]]] = {}
    written = 0
    with open(out_path, "a") as out, tqdm(total=len(todo), desc="regenerate", unit="prompt") as bar:
        pending = iter(todo)
        for k, (pid, text) in enumerate(pending):
            ids = encode_prompt(tok, text)[-max_prompt_tokens:]
            sp = SamplingParams(
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                max_tokens=params.max_tokens,
                seed=seed + k + len(done),
            )
            by_rid[decoder.add_request(ids, sp)] = (pid, ids)
            # keep the queue short so finished work is written as it completes
            while decoder.has_work and len(by_rid) >= 2 * decoder.engine.config.max_requests:
                written += _drain(decoder.step(), by_rid, out, bar)
        while decoder.has_work:
            written += _drain(decoder.step(), by_rid, out, bar)
    return written


def _drain(finished, by_rid, out, bar) -> int:
    for c in finished:
        pid, ids = by_rid.pop(c.request_id)
        out.write(
            json.dumps({"id": pid, "prompt_ids": ids, "response_ids": c.token_ids, "finish_reason": c.finish_reason})
            + "\n"
        )
        bar.update(1)
    out.flush()
    return len(finished)
