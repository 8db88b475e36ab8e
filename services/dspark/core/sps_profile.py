"""The verifier's cost table SPS(B): steps per second of one target forward over B query tokens, measured on the
device and dtype it serves with (`dspark profile`). The scheduler prices every round with it.

B query tokens are spread over ceil(B / 8) requests (anchor + 7 drafts each, the paper's block) with `context`
cached tokens each. The curve is kept as measured: jagged steps (BLAS kernel switches, cache sizes, CUDA tile
boundaries) are real and are what the scheduler must see. A table is saved as JSON next to a PNG of the curve,
under $DSPARK_HOME/profiles/ by default, keyed by model, device, dtype, linear kernel and CPU threads; the serving
path loads the matching table at start-up and runs a quick profile when there is none.
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
    """Median forward time for each B in sizes. Needs ceil(max(sizes) / 8) free engine slots."""
    n_req = math.ceil(max(sizes) / BLOCK)
    if engine.free_slots < n_req:
        raise ValueError(f"profiling B up to {max(sizes)} needs {n_req} free engine slots, {engine.free_slots} free")
    ids = [f"sps-profile-{i}" for i in range(n_req)]
    try:
        for i, rid in enumerate(ids):
            engine.add(rid)
            engine.prefill(rid, [(7 * i + j + 100) % engine.vocab_size for j in range(context)])
        rows = []
        for b in sizes:
            query = [42 % engine.vocab_size] * BLOCK
            blocks = [QueryBlock(ids[i], query[: min(BLOCK, b - i * BLOCK)]) for i in range(math.ceil(b / BLOCK))]
            step = median_seconds(lambda blocks=blocks: engine.forward(blocks), engine.device, repeats)
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


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls after one warm-up, the device synchronised around each."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def table_of(rows: list[dict]) -> SpsTable:
    return SpsTable(tuple(r["B"] for r in rows), tuple(r["sps"] for r in rows))


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

    def draw(a1, a2):
        a1.plot(bs, [r["sps"] for r in doc["rows"]], ".-", lw=1, ms=3)
        a1.set(xlabel="query tokens B", ylabel="verifier steps / s", title="SPS(B)")
        a2.plot(bs, [r["B"] * r["sps"] for r in doc["rows"]], ".-", lw=1, ms=3, color="tab:green")
        a2.set(xlabel="query tokens B", ylabel="query tokens / s", title="B x SPS(B)")

    title = f"{doc['model']} {doc['device']} {doc['dtype']} threads={doc['threads']} context={doc['context']}"
    two_panels(path, title, draw)
