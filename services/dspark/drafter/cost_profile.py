"""The drafter's cost table t_draft(R, K): seconds of one DSparkProposer.propose for R rows drafting K positions,
measured on the device, dtype and threads it serves with (`dspark profile` writes it next to the verifier's SPS(B)).

Each row holds a context of `context` tokens (random target features: the time does not depend on their values)
and drafts at temperature 1 with the proposer's support cap (max_support): the sampled path, the dearer of the two
(greedy rows take an argmax instead of a sort and a draw). The backbone runs once per call, the LM head, sequential
head, confidence head and sampling once per position, so the table is measured for every K = 1..gamma. Saved as
JSON (+ PNG) under $DSPARK_HOME/profiles/, keyed by drafter (name and config), device, dtype and threads (the support
cap it was measured with is recorded; it changes the time little next to the LM head); the serving path loads the
matching table at start-up and measures a quick one when there is none. As with SPS(B), the JSON keeps the measured
medians and the planner's table is fitted non-decreasing, in R for each K and then in K for each R: a call that
drafts more never costs less than one that drafts less, and a measured dip is noise the planner must not chase.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark.core.linear_kernel import kernel_of, resolve_kernel
from dspark.core.planner import DraftCost
from dspark.core.proposer import DraftRequest
from dspark.core.sampling import SamplingParams
from dspark.core.sps_profile import median_seconds, nondecreasing, read_profile, two_panels, write_profile
from dspark.drafter.proposer import DSparkProposer
from dspark.models.model_store import dspark_home

FORMAT = "dspark-draft-cost/1"


@dataclass(frozen=True)
class DraftCostKey:
    """What a draft cost table is valid for."""

    drafter: str  # the drafter's name and a hash of its config
    device: str
    dtype: str
    threads: int
    kernel: str = "torch"  # the linear kernel of its LM head rows (core/linear_kernel.py)
    backbone: str = "torch"  # the kernel of its own projections (DSparkDrafter.use_linear_kernel)

    @classmethod
    def of(cls, proposer: DSparkProposer, name: str) -> DraftCostKey:
        d = proposer.drafter
        digest = hashlib.sha256(json.dumps(d.config.__dict__, sort_keys=True, default=str).encode()).hexdigest()
        return cls(
            f"{Path(name).name}-{digest[:8]}",
            proposer.device.type,
            str(d.fc.weight.dtype).removeprefix("torch."),
            torch.get_num_threads(),
            resolve_kernel("auto", proposer.device, d.fc.weight.dtype),
            kernel_of(d),
        )

    @property
    def filename(self) -> str:
        return f"draft-{self.drafter}-{self.device}-{self.dtype}-{self.kernel}-{self.backbone}-t{self.threads}.json"


def quick_rows(max_rows: int) -> list[int]:
    """1, 2, 4, 8, ... up to max_rows (and max_rows itself)."""
    rows, r = [], 1
    while r < max_rows:
        rows.append(r)
        r *= 2
    return rows + [max_rows]


def full_rows(max_rows: int) -> list[int]:
    """Every R to 8, then ~25% apart."""
    rows, r = [], 1
    while r < max_rows:
        rows.append(r)
        r = r + 1 if r < 8 else max(r + 1, int(r * 1.25))
    return rows + [max_rows]


def measure(proposer: DSparkProposer, rows: list[int], context: int = 128, repeats: int = 3, log=None) -> list[dict]:
    """Median propose time for every R in rows and K = 1..gamma. Opens and releases its own sessions."""
    c = proposer.drafter.config
    params = SamplingParams(temperature=1.0, max_tokens=1 << 20, seed=0)
    history = [(7 * j + 100) % c.vocab_size for j in range(context + 1)]
    ids = [f"draft-cost-{i}" for i in range(max(rows))]
    out = []
    try:
        feats = torch.randn(context, c.feature_size, device=proposer.device)
        proposer.propose([DraftRequest(i, history, 0, params, feats) for i in ids])  # open every session
        for r in rows:
            seconds = []
            for k in range(1, proposer.gamma + 1):
                reqs = [DraftRequest(i, history, k, params) for i in ids[:r]]
                seconds.append(median_seconds(lambda reqs=reqs: proposer.propose(reqs), proposer.device, repeats))
            out.append({"R": r, "seconds": seconds})
            if log:
                log(f"  R={r:4d}  " + "  ".join(f"K={k}:{1000 * s:7.2f} ms" for k, s in enumerate(seconds, 1)))
    finally:
        for i in ids:
            proposer.release(i)
    return out


def table_of(rows: list[dict]) -> DraftCost:
    """The planner's table: the measured seconds fitted non-decreasing in R, then in K (see the module's docstring)."""
    columns = [nondecreasing(list(col)) for col in zip(*(r["seconds"] for r in rows))]  # per K, along R
    seconds = [tuple(nondecreasing(list(row))) for row in zip(*columns)]  # per R, along K
    return DraftCost(tuple(r["R"] for r in rows), tuple(seconds))


def default_path(key: DraftCostKey) -> Path:
    return dspark_home() / "profiles" / key.filename


def save(path: Path, key: DraftCostKey, rows: list[dict], context: int, kind: str, max_support: int = 0) -> Path:
    doc = {"format": FORMAT, **key.__dict__, "max_support": max_support, "context": context, "kind": kind}
    return write_profile(path, {**doc, "rows": rows}, plot)


def load(path: Path, key: DraftCostKey | None = None) -> DraftCost:
    """The table in path; with key, raises ValueError unless it was measured for it."""
    return table_of(read_profile(path, FORMAT, key)["rows"])


def load_or_profile(
    proposer: DSparkProposer, name: str, max_rows: int, path: Path | None = None, log=print
) -> DraftCost:
    """The proposer's cost table: the saved one for its drafter/device/dtype/threads/support, else a quick profile
    (saved)."""
    key = DraftCostKey.of(proposer, name)
    path = Path(path) if path else default_path(key)
    if path.exists():
        table = load(path, key)
        if table.rows[-1] >= max_rows:
            return table
        if log:
            log(f"the draft cost profile at {path} stops at R={table.rows[-1]}: measuring up to R={max_rows}")
    elif log:
        log(f"no draft cost profile for {key} at {path}: quick profile up to R={max_rows} (`dspark profile` for more)")
    rows = measure(proposer, quick_rows(max_rows), repeats=2)
    save(path, key, rows, context=128, kind="quick", max_support=proposer.max_support or 0)
    return table_of(rows)


def plot(doc: dict, path: Path) -> None:
    rs = [r["R"] for r in doc["rows"]]
    gamma = len(doc["rows"][0]["seconds"])

    def draw(a1, a2):
        for k in range(gamma):
            a1.plot(rs, [1000 * r["seconds"][k] for r in doc["rows"]], ".-", lw=1, ms=3, label=f"K={k + 1}")
        a1.set(xlabel="rows R", ylabel="ms per draft call", title="t_draft(R, K)")
        for r in doc["rows"]:
            a2.plot(range(1, gamma + 1), [1000 * s for s in r["seconds"]], ".-", lw=1, ms=3, label=f"R={r['R']}")
        a2.set(xlabel="drafted positions K", ylabel="ms per draft call", title="cost per position")
        for a in (a1, a2):
            a.legend(fontsize=7)

    title = f"{doc['drafter']} {doc['device']} {doc['dtype']} threads={doc['threads']} support={doc['max_support']}"
    two_panels(path, title, draw)
