"""What the load test sends: prompts from the shipped eval sets (a mix of short chat, math and code prompts, so
prompt lengths vary), and the request settings every user reads (max_tokens, temperature, policies), from Locust
options or DSPARK_* variables."""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass

SETS = ("mt-bench", "gsm8k", "humaneval", "mbpp", "math500")


def prompts(per_set: int = 40, seed: int = 0) -> list[str]:
    """First turns of the shipped eval sets, `per_set` of each, shuffled with a fixed seed (mixed lengths)."""
    from dspark.drafter.eval_sets import first_turns

    out = [p for name in SETS for p in first_turns(name, per_set)]
    random.Random(seed).shuffle(out)
    return out


@dataclass(frozen=True)
class Settings:
    max_tokens: int = 64
    temperature: float = 0.0
    policies: tuple[str, ...] = ("",)  # requests cycle through these ("" = the router's own)
    timeout_s: float = 300.0  # per request
    api_key: str = ""
    http: str = "http://localhost:8000"  # the OpenAI HTTP API's base URL ($DSPARK_HTTP)

    @classmethod
    def from_env(cls, options=None) -> Settings:
        """Locust's parsed options when there are (--max-tokens, --temperature, --policy), else DSPARK_* variables."""

        def get(name: str, default):
            v = getattr(options, name, None) if options is not None else None
            return v if v not in (None, "") else os.environ.get(f"DSPARK_{name.upper()}", default)

        policies = tuple(p.strip() for p in str(get("policy", "")).split(","))
        return cls(
            max_tokens=int(get("max_tokens", cls.max_tokens)),
            temperature=float(get("temperature", cls.temperature)),
            policies=policies or ("",),
            timeout_s=float(get("request_timeout", cls.timeout_s)),
            api_key=os.environ.get("DSPARK_API_KEY", ""),
            http=os.environ.get("DSPARK_HTTP", cls.http).rstrip("/"),
        )

    def metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


class Cycle:
    """Prompts and policies handed out in turn (each user its own offset), so every policy sees the same prompts."""

    def __init__(self, items: list, start: int = 0):
        self._it = itertools.islice(itertools.cycle(items), start % max(1, len(items)), None)

    def __next__(self):
        return next(self._it)
