"""The report of a load-test run, from the per-request records the users write (locustfile --dspark-records):
per policy and step, p50/p90/p99 of TTFT, TPOT, inter-token latency and end-to-end latency over the step's steady
state (requests started after its warm-up), throughput (output tokens delivered inside the step's steady window, so a
request straddling a step's end counts for what it streamed in it), per-user tokens/s and goodput (requests meeting
both the TTFT and the TPOT SLO); CSV + JSON + Markdown, and two PNGs: throughput against per-user tokens/s per policy
(the paper's Fig. 7 for the deployed system) and latency percentiles against offered load."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2e")


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    tpot_s: float = 0.25

    def met(self, r: dict) -> bool:
        return (
            bool(r["ok"])
            and r["ttft_s"] is not None
            and r["ttft_s"] <= self.ttft_s
            and (r["tpot_s"] or 0) <= self.tpot_s
        )


def read_records(paths) -> list[dict]:
    out = []
    for p in paths:
        with open(p) as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out


def offered(step: str) -> tuple[str, float]:
    """("concurrency" | "rate" | "run", the number) of a step label such as c=4 or rate=0.5."""
    kind, _, value = step.partition("=")
    return {"c": "concurrency", "rate": "rate"}.get(kind, "run"), float(value or 0)


def _pct(values) -> dict[int, float | None]:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return {p: (float(np.percentile(v, p)) if v.size else None) for p in PERCENTILES}


def delivered_tokens(r: dict, lo: float, hi: float) -> float:
    """A record's output tokens delivered between wall-clock times lo and hi: its first token at started + TTFT, the
    rest spread evenly from there to its end (the records time token-carrying messages, not every token)."""
    if not r["ok"] or r["ttft_s"] is None or r["tokens"] <= 0:
        return 0.0
    first, end = r["started"] + r["ttft_s"], r["started"] + r["e2e_s"]
    n = 1.0 if lo <= first <= hi else 0.0
    rest = r["tokens"] - 1
    if rest <= 0:
        return n
    if end <= first:
        return n + (rest if lo <= end <= hi else 0.0)
    overlap = max(0.0, min(hi, end) - max(lo, first))
    return n + rest * overlap / (end - first)


def summarize(records: list[dict], step_s: float, warmup_s: float, slo: Slo) -> list[dict]:
    """One row per (policy, step) of the good users' requests, in the order the steps ran."""
    good = [r for r in records if "ttft_s" in r]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(good, key=lambda r: r["started"]):
        groups.setdefault((r["policy"] or "router-policy", r["step"]), []).append(r)
    rows = []
    for (policy, step), rs in groups.items():
        t0 = rs[0]["started"]
        window = [r for r in rs if r["started"] >= t0 + warmup_s] or rs
        span = max(step_s - warmup_s, 1e-9) if step_s else max(r["started"] + r["e2e_s"] for r in rs) - t0
        ok = [r for r in window if r["ok"]]
        kind, load = offered(step)
        row = {
            "policy": policy,
            "step": step,
            "kind": kind,
            "offered": load,
            "requests": len(window),
            "failures": len(window) - len(ok),
            "achieved_rps": round(len(window) / span, 4),
            # tokens streamed inside [t0 + warm-up, t0 + step] by any of the step's requests (whole run: every token)
            "throughput_tok_s": round(
                sum(delivered_tokens(r, t0 + warmup_s, t0 + step_s) for r in rs) / span
                if step_s
                else sum(r["tokens"] for r in ok) / span,
                3,
            ),
            "per_user_tok_s": None,
            "goodput_rps": round(sum(slo.met(r) for r in window) / span, 4),
            "goodput_share": round(sum(slo.met(r) for r in window) / max(1, len(window)), 4),
            "tau": round(float(np.mean([r["tau"] for r in ok if r.get("tau")] or [0])), 3),
            "budget": round(float(np.mean([r["budget"] for r in ok if r.get("budget") is not None] or [0])), 2),
        }
        tpots = [r["tpot_s"] for r in ok if r["tpot_s"]]
        if tpots:
            row["per_user_tok_s"] = round(1.0 / float(np.median(tpots)), 3)
        values = {
            "ttft": [r["ttft_s"] for r in ok],
            "tpot": tpots,
            "itl": [g for r in ok for g in r["gaps_s"]],
            "e2e": [r["e2e_s"] for r in ok],
        }
        for m in METRICS:
            for p, v in _pct(values[m]).items():
                row[f"{m}_p{p}_ms"] = None if v is None else round(v * 1000, 1)
        rows.append(row)
    return rows


def bad_input(records: list[dict]) -> dict[str, dict[str, int]]:
    """Per bad-input case: how many got their clear error ("ok") and how many did not."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        if "case" in r:
            c = out.setdefault(r["case"], {"ok": 0, "wrong": 0})
            c["ok" if r["ok"] else "wrong"] += 1
    return out


COLUMNS = ("policy", "step", "requests", "failures", "throughput_tok_s", "per_user_tok_s", "goodput_rps", "tau")
COLUMNS += ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms")


def markdown(rows: list[dict], columns=COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


SIDE_BY_SIDE = ("throughput_tok_s", "per_user_tok_s", "ttft_p50_ms", "tpot_p50_ms", "e2e_p99_ms", "goodput_rps")


def side_by_side(rows: list[dict], columns=SIDE_BY_SIDE) -> str:
    """One line per step, each policy's value of each column next to the others' (the policies compared)."""
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    steps = list(dict.fromkeys(r["step"] for r in rows))
    by = {(r["policy"], r["step"]): r for r in rows}
    head = ["step"] + [f"{c} {p}" for c in columns for p in policies]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in steps:
        cells = [step]
        for c in columns:
            for pol in policies:
                v = by.get((pol, step), {}).get(c)
                cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(rows: list[dict], out: Path, meta: dict, bad: dict | None = None) -> list[Path]:
    """summary.csv, summary.json, summary.md and the PNGs under out; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "summary.csv", out / "summary.json", out / "summary.md"]
    if rows:
        with open(paths[0], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        paths[0].write_text("")
    paths[1].write_text(json.dumps({"meta": meta, "steps": rows, "bad_input": bad or {}}, indent=1))
    text = markdown(rows)
    if len({r["policy"] for r in rows}) > 1:
        text += "\n\n" + side_by_side(rows)
    if bad:
        text += "\n\nbad input (clear error / not):\n" + "\n".join(
            f"- {k}: {v['ok']} / {v['wrong']}" for k, v in bad.items()
        )
    paths[2].write_text(text + "\n")
    paths += plot(rows, out)
    return paths


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted({r["policy"] for r in rows})
    colors = dict(zip(policies, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    written = []

    conc = [r for r in rows if r["kind"] == "concurrency" and r["per_user_tok_s"]]
    if conc:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for pol in policies:
            pts = sorted((r for r in conc if r["policy"] == pol), key=lambda r: r["offered"])
            if pts:
                xs, ys = [r["per_user_tok_s"] for r in pts], [r["throughput_tok_s"] for r in pts]
                ax.plot(xs, ys, "o-", color=colors[pol], label=pol)
                for r, x, y in zip(pts, xs, ys):
                    ax.annotate(r["step"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("per-user tokens/s (1 / median TPOT)")
        ax.set_ylabel("throughput (output tokens/s)")
        ax.set_title("throughput vs per-user speed, by concurrency")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(out / "throughput_vs_per_user.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    kinds = [k for k in ("concurrency", "rate") if any(r["kind"] == k for r in rows)]
    if kinds:
        fig, axes = plt.subplots(2, len(kinds), figsize=(6 * len(kinds), 8), squeeze=False)
        for j, kind in enumerate(kinds):
            for i, metric in enumerate(("ttft", "tpot")):
                ax = axes[i][j]
                for pol in policies:
                    pts = sorted(
                        (r for r in rows if r["kind"] == kind and r["policy"] == pol), key=lambda r: r["offered"]
                    )
                    for p, style in zip(PERCENTILES, ("-", "--", ":")):
                        xs = [r["offered"] for r in pts if r[f"{metric}_p{p}_ms"] is not None]
                        ys = [r[f"{metric}_p{p}_ms"] for r in pts if r[f"{metric}_p{p}_ms"] is not None]
                        ax.plot(xs, ys, style, marker="o", color=colors[pol], label=f"{pol} p{p}")
                ax.set_xlabel("concurrent users" if kind == "concurrency" else "offered requests/s")
                ax.set_ylabel(f"{metric.upper()} (ms)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle("latency percentiles vs offered load")
        fig.tight_layout()
        written.append(out / "latency_vs_load.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def main(argv=None) -> int:
    """python -m loadtest.report RECORDS.jsonl... --out DIR: the report of records from any Locust run."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("records", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--step-s", type=float, default=0.0, help="each step's length (0: from the records)")
    ap.add_argument("--warmup-s", type=float, default=0.0)
    ap.add_argument("--slo-ttft-s", type=float, default=Slo.ttft_s)
    ap.add_argument("--slo-tpot-s", type=float, default=Slo.tpot_s)
    a = ap.parse_args(argv)
    records = read_records(a.records)
    rows = summarize(records, a.step_s, a.warmup_s, Slo(a.slo_ttft_s, a.slo_tpot_s))
    for p in write(rows, Path(a.out), vars(a), bad_input(records)):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
