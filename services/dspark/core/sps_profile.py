"""The verifier's cost table SPS(B): steps per second of one target forward over B query tokens, measured on the
device and dtype it serves with (`dspark profile`). The scheduler prices every round with it.

B query tokens are spread over ceil(B / 8) requests (anchor + 7 drafts each, the paper's block) with `context`
cached tokens each. The sizes are measured in interleaved passes (every B once per pass, the median over passes), so a
burst of other load lands on many sizes instead of all repeats of one. The JSON keeps the measured medians; the
table the scheduler sees is their least-squares non-decreasing fit in step time (pool adjacent violators): the rises
(BLAS kernel switches, cache sizes, CUDA tile boundaries) are real and stay, while a larger step measured faster than
a smaller one is noise the scheduler must not chase (a quick profile on a loaded 2-core CPU once put B=5 at 181 ms,
B=2 at 258 ms and B=3 at 303 ms; Algorithm 1's early stop then stops before B=5 for a reason that is not there).

A table is saved as JSON next to a PNG of the curve, under $DSPARK_HOME/profiles/ by default, keyed by model, device,
dtype, linear kernel and CPU threads; the serving path loads the matching table at start-up and runs a quick profile
when there is none.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, fields
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


def measure(engine: TargetEngine, sizes: list[int], context: int = 128, repeats: int = 3, log=None) -> list[dict]:
    """Median forward time for each B in sizes over `repeats` interleaved passes (one warm-up each first). Needs
    ceil(max(sizes) / 8) free engine slots."""
    n_req = math.ceil(max(sizes) / BLOCK)
    if engine.free_slots < n_req:
        raise ValueError(f"profiling B up to {max(sizes)} needs {n_req} free engine slots, {engine.free_slots} free")
    ids = [f"sps-profile-{i}" for i in range(n_req)]
    try:
        for i, rid in enumerate(ids):
            engine.add(rid)
            engine.prefill(rid, [(7 * i + j + 100) % engine.vocab_size for j in range(context)])
        calls = []
        for b in sizes:
            query = [42 % engine.vocab_size] * BLOCK
            blocks = [QueryBlock(ids[i], query[: min(BLOCK, b - i * BLOCK)]) for i in range(math.ceil(b / BLOCK))]
            calls.append((b, blocks, lambda blocks=blocks: engine.forward(blocks)))
            calls[-1][2]()  # warm-up
        times: list[list[float]] = [[] for _ in sizes]
        for n in range(repeats):
            for i, (_, _, fn) in enumerate(calls):
                times[i].append(seconds_of(fn, engine.device))
            if log:
                log(f"  pass {n + 1}/{repeats}: B={sizes[0]}..{sizes[-1]}")
        rows = []
        for (b, blocks, _), ts in zip(calls, times):
            step = statistics.median(ts)
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


def table_of(rows: list[dict]) -> SpsTable:
    """The scheduler's table: step time fitted non-decreasing in B (see the module's docstring)."""
    steps = nondecreasing([1 / r["sps"] for r in rows])
    return SpsTable(tuple(r["B"] for r in rows), tuple(1 / t for t in steps))


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


def save(path: Path, key: ProfileKey, rows: list[dict], context: int, kind: str) -> Path:
    doc = {"format": FORMAT, **key.__dict__, "context": context, "kind": kind, "block": BLOCK, "rows": rows}
    return write_profile(path, doc, plot)


def load(path: Path, key: ProfileKey | None = None) -> SpsTable:
    """The table in path; with key, raises ValueError unless the table was measured for it."""
    return table_of(read_profile(path, FORMAT, key)["rows"])


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
    save(path, key, rows, context=128, kind="quick")
    return table_of(rows)


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

    fitted = table_of(doc["rows"]).steps_per_s

    def draw(a1, a2):
        a1.plot(bs, [r["sps"] for r in doc["rows"]], ".", ms=3, label="measured")
        a1.plot(bs, fitted, "-", lw=1, label="fitted (step time non-decreasing): what the scheduler uses")
        a1.set(xlabel="query tokens B", ylabel="verifier steps / s", title="SPS(B)")
        a1.legend(fontsize=7)
        a2.plot(bs, [b * f for b, f in zip(bs, fitted)], ".-", lw=1, ms=3, color="tab:green")
        a2.set(xlabel="query tokens B", ylabel="query tokens / s", title="B x SPS(B)")

    title = f"{doc['model']} {doc['device']} {doc['dtype']} threads={doc['threads']} context={doc['context']}"
    two_panels(path, title, draw)
