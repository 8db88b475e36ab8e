"""The evaluation prompt sets shipped with the package (see data/eval/README.md for their licences)."""

from __future__ import annotations

import json
from pathlib import Path

EVAL_DIR = Path(__file__).parents[1] / "data" / "eval"
EVAL_SETS = tuple(sorted(p.stem for p in EVAL_DIR.glob("*.jsonl")))


def load_turns(name_or_path: str) -> list[list[str]]:
    """Each record's `turns` (user messages), from a shipped set name or a JSONL path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = EVAL_DIR / f"{name_or_path}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{name_or_path}: no such JSONL file or shipped set ({', '.join(EVAL_SETS)})")
    out = []
    with open(path, newline="\n") as f:  # a "\r" inside a prompt is not a line break
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line, strict=False)["turns"])
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{path}:{n}: not a JSON object with a 'turns' list ({e})") from None
    return out


def first_turns(name_or_path: str, limit: int | None = None) -> list[str]:
    return [t[0] for t in load_turns(name_or_path)][:limit]
