"""The verifier's cost table SPS(B): steps per second of one target forward over B query tokens, measured on the
device and dtype it serves with (`dspark profile`). The scheduler prices every round with it.

B query tokens are spread over ceil(B / 8) requests (anchor + 7 drafts each, the paper's block) with `context`
cached tokens each. The sizes are measured in interleaved passes (every B once per pass, the fastest pass kept), so a
burst of other load lands on many sizes instead of all repeats of one, and other load only ever slows a step: the
fastest pass is the least disturbed one. A median let a burst through: on a 2-core EPYC VM whose neighbours came and
went, the median of 5 passes put 2 rows of 3 + 2 tokens at 42 ms and of 8 + 8 at 56 ms, where the packed table had
measured the same 8 + 8 at 39 ms a minute earlier; the planner then saw a 10 ms cliff at the 5th token of a 2-request
round and dspark drafted 0.25-0.7 tokens a round where fixed-length drafting ran 25% faster. What serving adds to the
table (its own load, the machine's drift) the decode loop learns as rounds run (planner.VerifyRowCost). The JSON
keeps the measured times; the
table the scheduler sees is their least-squares non-decreasing fit in step time (pool adjacent violators): the rises
(BLAS kernel switches, cache sizes, CUDA tile boundaries) are real and stay, while a larger step measured faster than
a smaller one is noise the scheduler must not chase (a quick profile on a loaded 2-core CPU once put B=5 at 181 ms,
B=2 at 258 ms and B=3 at 303 ms; Algorithm 1's early stop then stops before B=5 for a reason that is not there).

A round of R requests verifies its B tokens in R rows, not ceil(B / 8): on a 2-core EPYC a round of 2 requests with
one token each took 52-55 ms where one row of 2 tokens took 47 ms, and the packed table's rise from B = 8 (one row)
to B = 9 (two) then read as a price of the 9th token, so Algorithm 1 stopped before it at 2 requests. `dspark profile`
also measures row tables, B tokens spread over R rows for R = 2, 3, 4, 6, 8, ... (`row_shapes`), and a round of R
requests is priced with the table of R rows (`SpsTable.for_rows`).

A table is saved as JSON next to a PNG of the curve, under $DSPARK_HOME/profiles/ by default, keyed by model, device,
dtype, linear kernel and CPU threads; the serving path loads the matching table at start-up and runs a quick profile
when there is none.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from dspark.core.engine import QueryBlock, TargetEngine
from dspark.core.scheduler import SpsTable
from dspark.models.model_store import dspark_home

BLOCK = 8  # query tokens per request: anchor + 7 drafts
FORMAT = "dspark-sps-profile/1"


@dataclass(frozen=True)
class ProfileKey:
    """What a cost table is valid for."""

    model: str
    device: str
    dtype: str
    threads: int  # torch CPU threads (they change CPU speed; recorded on GPU too)
    kernel: str = "torch"  # the engine's linear kernel (core/linear_kernel.py): it changes the curve's shape

    @classmethod
    def of(cls, engine: TargetEngine) -> ProfileKey:
        c = engine.config
        device = torch.device(c.device).type
        return cls(Path(c.model).name, device, c.dtype, torch.get_num_threads(), engine.linear_kernel)

    @property
    def filename(self) -> str:
        return f"{self.model}-{self.device}-{self.dtype}-{self.kernel}-t{self.threads}.json"


def full_sizes(max_b: int) -> list[int]:
    """Every B from 1 to max_b: the full profile."""
    return list(range(1, max_b + 1))


def quick_sizes(max_b: int) -> list[int]:
    """Every B to 16, then ~12% apart: a start-up profile in seconds that still catches the big steps."""
    sizes, b = [], 1
    while b <= max_b:
        sizes.append(b)
        b = b + 1 if b < 16 else max(b + 1, int(b * 1.125))
    if sizes[-1] != max_b:
        sizes.append(max_b)
    return sizes


def row_shapes(max_rows: int, points: int = 12) -> list[tuple[int, int]]:
    """(R, B) shapes of the row tables: for R = 2, 3, 4, 6, 8, 12, 16, ... and max_rows itself, B from R (one token a
    row, plain decoding) to R x BLOCK (every row a whole block), every B while that is at most 16 sizes, else
    `points` spread."""
    counts = {n for k in range(1, 12) for n in (2**k, 3 * 2 ** (k - 1)) if n <= max_rows}
    shapes = []
    for r in sorted(counts | ({max_rows} if max_rows >= 2 else set())):
        lo, hi = r, r * BLOCK
        n = points - 1
        bs = range(lo, hi + 1) if hi - lo < 16 else sorted({lo + round(i * (hi - lo) / n) for i in range(points)})
        shapes += [(r, b) for b in bs]
    return shapes


def measure(engine: TargetEngine, sizes: list[int], context: int = 128, repeats: int = 3, log=None) -> list[dict]:
    """The packed table: forward time for each B in sizes (the fastest of `repeats` interleaved passes), B query
    tokens in ceil(B / 8) rows."""
    return measure_shapes(engine, [(math.ceil(b / BLOCK), b) for b in sizes], context, repeats, log)


def measure_shapes(
    engine: TargetEngine, shapes: list[tuple[int, int]], context: int = 128, repeats: int = 3, log=None
) -> list[dict]:
    """Forward time of each (R, B) shape, B query tokens spread as evenly as they go over R rows (at most BLOCK a
    row): the fastest of `repeats` interleaved passes (one warm-up each first; see the module's docstring). Needs max
    R free engine slots."""
    n_req = max(r for r, _ in shapes)
    if any(not r <= b <= r * BLOCK for r, b in shapes):
        raise ValueError(f"every shape needs between 1 and {BLOCK} query tokens a row: {shapes}")
    if engine.free_slots < n_req:
        raise ValueError(f"profiling {n_req} rows needs {n_req} free engine slots, {engine.free_slots} free")
    ids = [f"sps-profile-{i}" for i in range(n_req)]
    try:
        for i, rid in enumerate(ids):
            engine.add(rid)
            engine.prefill(rid, [(7 * i + j + 100) % engine.vocab_size for j in range(context)])
        calls = []
        query = 42 % engine.vocab_size
        for r, b in shapes:
            blocks = [QueryBlock(ids[i], [query] * (b // r + (i < b % r))) for i in range(r)]
            calls.append((b, blocks, lambda blocks=blocks: engine.forward(blocks)))
            calls[-1][2]()  # warm-up
        times: list[list[float]] = [[] for _ in shapes]
        for n in range(repeats):
            for i, (_, _, fn) in enumerate(calls):
                times[i].append(seconds_of(fn, engine.device))
            if log:
                log(f"  pass {n + 1}/{repeats}: {len(shapes)} shapes")
        rows = []
        for (b, blocks, _), ts in zip(calls, times):
            step = min(ts)
            rows.append({"B": b, "requests": len(blocks), "step_ms": round(1000 * step, 3), "sps": 1 / step})
            if log:
                log(f"  B={b:4d} requests={len(blocks):3d} step={1000 * step:8.2f} ms  SPS={1 / step:8.2f}")
    finally:
        for rid in ids:
            engine.release(rid)
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn, device: torch.device) -> float:
    """Wall time of one fn() call, the device synchronised around it."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls after one warm-up."""
    fn()
    return statistics.median(seconds_of(fn, device) for _ in range(repeats))


def nondecreasing(values: list[float]) -> list[float]:
    """The least-squares non-decreasing fit of values (pool adjacent violators): each run that falls is replaced by
    its mean."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(n)]


def table_of(rows: list[dict], by_rows: list[dict] = ()) -> SpsTable:
    """The scheduler's table: step time fitted non-decreasing in B (see the module's docstring), for the packed
    measurements `rows` and, per row count, for `by_rows` (measurements with their "requests")."""

    def fitted(rs: list[dict]) -> SpsTable:
        rs = sorted(rs, key=lambda r: r["B"])
        steps = nondecreasing([1 / r["sps"] for r in rs])
        return SpsTable(tuple(r["B"] for r in rs), tuple(1 / t for t in steps))

    counts = sorted({r["requests"] for r in by_rows})
    return replace(fitted(rows), by_rows=tuple((n, fitted([r for r in by_rows if r["requests"] == n])) for n in counts))


def write_profile(path: Path, doc: dict, plot_fn) -> Path:
    """A cost profile's JSON (written atomically) and its PNG (plot_fn(doc, png path)) next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    plot_fn(doc, path.with_suffix(".png"))
    return path


def read_profile(path: Path, fmt: str, key=None) -> dict:
    """A cost profile's JSON; raises ValueError unless it has format fmt and, with key (a dataclass), the fields
    of key equal to it: a table is used only for what it was measured for."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} profile")
    if key is not None:
        got = type(key)(**{f.name: doc.get(f.name) for f in fields(key)})
        if got != key:
            raise ValueError(f"{path} was profiled for {got}, not {key}")
    return doc


def save(path: Path, key: ProfileKey, rows: list[dict], context: int, kind: str, by_rows: list[dict] = ()) -> Path:
    doc = {"format": FORMAT, **key.__dict__, "context": context, "kind": kind, "block": BLOCK, "rows": rows}
    return write_profile(path, doc | {"by_rows": list(by_rows)}, plot)


def load(path: Path, key: ProfileKey | None = None) -> SpsTable:
    """The table in path; with key, raises ValueError unless the table was measured for it. A profile written before
    row tables existed has none: every round is then priced with the packed table."""
    doc = read_profile(path, FORMAT, key)
    return table_of(doc["rows"], doc.get("by_rows", ()))


def default_path(key: ProfileKey) -> Path:
    return dspark_home() / "profiles" / key.filename


def load_or_profile(engine: TargetEngine, path: Path | None = None, log=print) -> SpsTable:
    """The engine's cost table: the saved one for its model/device/dtype/threads, else a quick profile (saved)."""
    key = ProfileKey.of(engine)
    path = Path(path) if path else default_path(key)
    if path.exists():
        return load(path, key)
    max_b = min(256, BLOCK * engine.free_slots)
    if log:
        log(f"no SPS profile for {key} at {path}: quick profile up to B={max_b} (run `dspark profile` for all B)")
    rows = measure(engine, quick_sizes(max_b), repeats=2)
    by_rows = measure_shapes(engine, row_shapes(min(16, engine.free_slots), points=6), repeats=2)
    save(path, key, rows, context=128, kind="quick", by_rows=by_rows)
    return table_of(rows, by_rows)


def two_panels(path: Path, title: str, draw) -> None:
    """A PNG of two side-by-side plots, draw(left axes, right axes) filling them; nothing without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    draw(*axes)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(doc: dict, path: Path) -> None:
    bs = [r["B"] for r in doc["rows"]]
    table = table_of(doc["rows"], doc.get("by_rows", ()))
    fitted = table.steps_per_s

    def draw(a1, a2):
        a1.plot(bs, [r["sps"] for r in doc["rows"]], ".", ms=3, label="measured, packed (ceil(B/8) rows)")
        a1.plot(bs, fitted, "-", lw=1, label="fitted (step time non-decreasing): what the scheduler uses")
        for n, t in table.by_rows:
            a1.plot(t.batch_tokens, t.steps_per_s, "-", lw=0.8, alpha=0.8, label=f"fitted, {n} rows")
        a1.set(xlabel="query tokens B", ylabel="verifier steps / s", title="SPS(B)")
        a1.legend(fontsize=6)
        a2.plot(bs, [b * f for b, f in zip(bs, fitted)], ".-", lw=1, ms=3, color="tab:green")
        a2.set(xlabel="query tokens B", ylabel="query tokens / s", title="B x SPS(B), packed")

    title = f"{doc['model']} {doc['device']} {doc['dtype']} threads={doc['threads']} context={doc['context']}"
    two_panels(path, title, draw)
