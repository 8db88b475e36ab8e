"""The runs behind `make loadtest`, `make loadtest-chaos` and `make soak`: Locust headless (a subprocess per policy and
load shape) against a stack, then the report.

- loadtest: a concurrency sweep and an arrival-rate sweep on the same stack, each step run once per policy before the
  next (the policies' order alternating, so drift hits both sides of a ratio alike); tables + PNGs.
- chaos: Locust drives a local stack (good users and bad-input users) while the draft service, then the verifier,
  is SIGKILLed and restarted on the same command line; seeded T=0 probes sent all along must return the tokens they
  returned before the faults, and the run must end with 0 failed good requests. Reports what each fault cost.
- soak: the saturating step for a long time, RSS and open sessions of all three services every 10 s.

Without --host, each run starts its own local stack (dspark.stack.launcher, what `make run` starts) on free ports
and stops it by PID at the end; chaos and soak need a local stack (they kill its processes or read their memory).

    python -m loadtest.drive loadtest --policies dspark,autoregressive --concurrency 1,2,4,8,16 --rates 0.5,1
    python -m loadtest.drive chaos
    python -m loadtest.drive soak --duration 1800
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dspark.stack.port import free_port
from loadtest import report
from loadtest.shapes import progress

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
GOOD_USERS = ("GrpcStreamUser", "OpenAIStreamUser")


@dataclass
class Target:
    """Where the load goes: the public gRPC address, the HTTP base URL; for a local stack its config and processes."""

    grpc: str
    http: str
    stack: object = None  # launcher.StackConfig
    procs: list | None = None
    logs: Path | None = None

    def piece(self, name: str) -> int:
        from dspark.stack.launcher import pieces

        return [p.name for p in pieces(self.stack)].index(name)

    def router_metrics(self) -> dict[str, float]:
        """The router's Prometheus samples without labels (and summed over labels)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"{self.http}/metrics", timeout=30) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out


@contextlib.contextmanager
def target(a):
    """a.host/a.http if given, else a local stack on free ports for the duration (stopped by PID at the end)."""
    if a.host:
        yield Target(a.host, a.http or os.environ.get("DSPARK_HTTP", "http://localhost:8000"))
        return
    from dspark.core.config import EngineConfig
    from dspark.models.registry import DEFAULT_MODEL
    from dspark.stack.launcher import StackConfig, local_stack

    cfg = StackConfig(  # the SPS table under DSPARK_HOME (a restarted verifier reads it again: keep it there)
        EngineConfig(model=a.model or DEFAULT_MODEL, max_requests=a.max_requests, max_context=2048),
        policy="dspark",
        verifier_port=free_port(),
        draft_port=free_port(),
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_ports=(free_port(), free_port()),
        no_ray=a.no_ray,
        wait=600.0,
    )
    logs = a.out / "logs"
    progress(f"starting a local stack ({'no Ray' if a.no_ray else 'Ray Serve'}); logs in {logs}")
    with local_stack(cfg, logs, log=progress) as procs:
        progress(f"stack up: gRPC 127.0.0.1:{cfg.grpc_port}, HTTP http://127.0.0.1:{cfg.http_port}")
        yield Target(f"127.0.0.1:{cfg.grpc_port}", f"http://127.0.0.1:{cfg.http_port}", cfg, procs, logs)


def locust(t: Target, prefix: Path, load: str, step_s: float, a, users=GOOD_USERS, policy: str = "") -> Path:
    """One headless Locust run of `load` (shapes.py) against t; Locust's CSV/HTML under prefix*, the records file."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    records = prefix.with_suffix(".jsonl")
    records.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", t.grpc]
    cmd += ["--csv", str(prefix), "--html", f"{prefix}.html", "--dspark-records", str(records), "--only-summary"]
    cmd += ["--max-tokens", str(a.max_tokens), "--temperature", str(a.temperature), "--policy", policy]
    cmd += ["--stop-timeout", f"{a.stop_timeout:.0f}", "--loglevel", "WARNING", *users]
    env = {**os.environ, "DSPARK_LOAD": load, "DSPARK_STEP_S": str(step_s), "DSPARK_HTTP": t.http}
    env["DSPARK_RATE_USERS"] = str(a.rate_users)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with open(f"{prefix}.log", "w") as log:
        # progress lines on our stdout, Locust's own output in the log
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        for line in p.stdout:
            log.write(line)
            if line.startswith("[loadtest]"):
                print(f"  {policy or 'router-policy'}: {line.strip()}", flush=True)
        rc = p.wait()
    if rc not in (0, 1):  # 1: some requests failed (the report says which)
        raise RuntimeError(f"locust exited with {rc}; see {prefix}.log")
    return records


def _slo(a) -> report.Slo:
    return report.Slo(a.slo_ttft_s, a.slo_tpot_s)


def sweep(a) -> list[tuple[str, str]]:
    """(policy, load) runs in the order they run. Interleaved (the default): each load step once per policy before
    the next step, the policies' order reversed every other step (A B, B A, ...), so a machine that drifts within
    minutes (these 2-core hosts do, by +-10%) moves both sides of a ratio alike. Otherwise each policy's whole
    concurrency sweep, then its rate sweep."""
    policies = a.policies.split(",")  # "" = the router's own policy
    conc = [f"concurrency:{c}" for c in a.concurrency.split(",") if c.strip()] if a.concurrency else []
    rates = [f"rate:{r}" for r in a.rates.split(",") if r.strip()] if a.rates else []
    if not a.interleave:
        sweeps = ([f"concurrency:{a.concurrency}"] if conc else []) + ([f"rate:{a.rates}"] if rates else [])
        return [(p, load) for p in policies for load in sweeps]
    return [(p, load) for i, load in enumerate(conc + rates) for p in (policies if i % 2 == 0 else policies[::-1])]


def run_name(load: str, interleave: bool = True) -> str:
    """The files' prefix of one run: its load kind for a whole sweep, else its step (rate:0.25 -> rate-0_25, no dot
    the .jsonl/.log suffixes would replace)."""
    return load.replace(":", "-").replace(".", "_") if interleave else load.split(":")[0]


def run_loadtest(a) -> int:
    files = []
    with target(a) as t:
        runs = sweep(a)
        for i, (policy, load) in enumerate(runs, 1):
            progress(f"run {i}/{len(runs)}: {policy or 'router-policy'}, {load}")
            files.append(locust(t, a.out / policy / run_name(load, a.interleave), load, a.step_s, a, policy=policy))
    records = report.read_records(files)
    rows = report.summarize(records, a.step_s, a.warmup_s, _slo(a))
    meta = {k: str(v) for k, v in vars(a).items() if k != "fn"}
    for p in report.write(rows, a.out, meta):
        progress(f"wrote {p}")
    print(report.markdown(rows))
    print(report.side_by_side(rows))
    return 0 if all(r["failures"] == 0 for r in rows) else 1


# -- chaos -------------------------------------------------------------------------------------------------------

PROBES = ("What is speculative decoding?", "List three prime numbers.", "Write a haiku about the sea.")


def _probe(t: Target, prompt: str, max_tokens: int):
    import grpc

    from dspark.v1 import generation_pb2_grpc
    from loadtest.calls import grpc_request, grpc_stream

    with grpc.insecure_channel(t.grpc) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        req = grpc_request(prompt, max_tokens, 0.0, "fixed", seed=1234, ignore_eos=True)
        return grpc_stream(stub, req, 300.0, keep_ids=True)


def chaos(t: Target, a) -> dict:
    """One chaos run against the local stack t; its findings as a dict (chaos.json)."""
    from dspark.stack.launcher import pieces, start_piece

    if t.procs is None:
        raise ValueError("chaos needs a local stack (no --host): it kills and restarts its processes")
    reference = {p: _probe(t, p, a.probe_tokens) for p in PROBES}
    for p, s in reference.items():
        if not s.ok:
            raise RuntimeError(f"probe {p!r} failed before any fault: {s.error}")
    progress(f"probe references taken ({a.probe_tokens} tokens each, seeded, T=0, policy fixed)")

    probes: list[dict] = []
    stop = threading.Event()

    def probe_loop():
        i = 0
        while not stop.is_set():
            prompt = PROBES[i % len(PROBES)]
            s = _probe(t, prompt, a.probe_tokens)
            same = s.ok and s.token_ids == reference[prompt].token_ids
            probes.append({"started": s.started, "e2e_s": s.e2e_s, "ok": s.ok, "same": same, "error": s.error})
            i += 1

    users = (*GOOD_USERS, "BadInputUser")
    prefix = a.out / "chaos" / "locust"
    result: dict = {"faults": []}
    box: dict = {}

    def drive_load():
        try:
            box["records"] = locust(t, prefix, f"concurrency:{a.users}", a.duration, a, users)
        except Exception as e:  # noqa: BLE001 - raised below, once the faults are done
            box["error"] = e

    runner = threading.Thread(target=drive_load, daemon=True)
    runner.start()
    prober = threading.Thread(target=probe_loop, daemon=True)
    prober.start()
    t_start = time.time()
    for name, at in zip(a.faults.split(","), (a.first_fault_s, None)):
        time.sleep(max(0.0, (at or a.gap_s)))
        before = t.router_metrics()
        i = t.piece(name)
        killed = time.time()
        t.procs[i].kill()
        t.procs[i].wait(30)
        progress(f"SIGKILL the {name} (pid {t.procs[i].pid}) at +{killed - t_start:.0f} s; restarting it")
        t.procs[i] = start_piece(pieces(t.stack)[i], t.logs, t.stack.wait, restart=True)
        healthy = time.time()
        progress(f"the {name} is back after {healthy - killed:.1f} s (pid {t.procs[i].pid})")
        time.sleep(5)
        after = t.router_metrics()
        result["faults"].append(
            {
                "service": name,
                "killed": killed,
                "healthy": healthy,
                "down_s": round(healthy - killed, 2),
                "fallback_rounds": after.get("dspark_draft_fallback_rounds_total", 0)
                - before.get("dspark_draft_fallback_rounds_total", 0),
                "restored_sessions": after.get("dspark_verifier_restored_sessions_total", 0)
                - before.get("dspark_verifier_restored_sessions_total", 0),
            }
        )
    runner.join()
    stop.set()
    prober.join(600)
    if "error" in box:
        raise box["error"]
    records = report.read_records([box["records"]])
    good = [r for r in records if "ttft_s" in r]
    result["good_requests"] = len(good)
    result["good_failures"] = [r["error"] for r in good if not r["ok"]]
    result["bad_input"] = report.bad_input(records)
    result["probes"] = len(probes)
    result["probes_changed"] = [p for p in probes if not p["same"]]
    calm = [r for r in good if r["started"] + r["e2e_s"] < result["faults"][0]["killed"]] if result["faults"] else good
    base = report._pct([g for r in calm for g in r["gaps_s"]])
    result["baseline_itl_p99_ms"] = None if base[99] is None else round(base[99] * 1000, 1)
    for f in result["faults"]:  # what the fault cost: the requests running while the service was down
        hit = [r for r in good if r["started"] < f["healthy"] and r["started"] + r["e2e_s"] > f["killed"]]
        f["requests_hit"] = len(hit)
        f["max_itl_ms"] = round(max((g for r in hit for g in r["gaps_s"]), default=0) * 1000, 1)
        f["max_e2e_ms"] = round(max((r["e2e_s"] for r in hit), default=0) * 1000, 1)
        f["killed"], f["healthy"] = round(f["killed"] - t_start, 1), round(f["healthy"] - t_start, 1)
    return result


def run_chaos(a) -> int:
    with target(a) as t:
        result = chaos(t, a)
    (a.out / "chaos").mkdir(parents=True, exist_ok=True)
    (a.out / "chaos" / "chaos.json").write_text(json.dumps(result, indent=1))
    progress(f"wrote {a.out / 'chaos' / 'chaos.json'}")
    print(chaos_text(result))
    return 0 if chaos_passed(result) else 1


def chaos_passed(r: dict) -> bool:
    bad_wrong = sum(c["wrong"] for c in r["bad_input"].values())
    return not r["good_failures"] and not r["probes_changed"] and r["probes"] > 0 and bad_wrong == 0


def chaos_text(r: dict) -> str:
    lines = [
        f"good requests {r['good_requests']}, failed {len(r['good_failures'])}; "
        f"seeded T=0 probes {r['probes']}, changed {len(r['probes_changed'])}; "
        f"baseline ITL p99 {r['baseline_itl_p99_ms']} ms",
        "| fault | killed at s | back after s | requests hit | max ITL ms | max e2e ms | fallback rounds | restored |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in r["faults"]:
        lines.append(
            f"| {f['service']} | {f['killed']} | {f['down_s']} | {f['requests_hit']} | {f['max_itl_ms']} | "
            f"{f['max_e2e_ms']} | {f['fallback_rounds']:.0f} | {f['restored_sessions']:.0f} |"
        )
    lines.append(
        "bad input (clear error / not): " + ", ".join(f"{k} {v['ok']}/{v['wrong']}" for k, v in r["bad_input"].items())
    )
    return "\n".join(lines)


# -- soak --------------------------------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (the router's Ray processes), MiB."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for q in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += q.memory_info().rss
    return total / 2**20


def _sessions(t: Target) -> dict[str, int]:
    """Open sessions of the verifier and the draft service (their Info calls)."""
    import grpc

    from dspark.v1 import draft_pb2_grpc, verifier_pb2_grpc
    from dspark.v1 import verifier_pb2 as vpb

    out = {}
    for name, port, stub in (
        ("verifier", t.stack.verifier_port, verifier_pb2_grpc.VerifierServiceStub),
        ("draft", t.stack.draft_port, draft_pb2_grpc.DraftServiceStub),
    ):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            out[f"{name}_sessions"] = stub(ch).Info(vpb.InfoInput(), timeout=10).active_sessions
    return out


def sample(t: Target) -> dict:
    """One soak sample: RSS of the three services, their open sessions, the router's running + queued requests."""
    row = {"t": time.time()}
    for name, proc in zip(("verifier", "draft", "router"), t.procs):
        row[f"{name}_rss_mb"] = round(_rss_mb(proc.pid), 1)
    try:
        row |= _sessions(t)
        m = t.router_metrics()
        row["router_running"] = m.get("dspark_running_requests", 0) + m.get("dspark_queue_depth", 0)
    except Exception as e:  # noqa: BLE001 - a sample that failed is a finding, not a crash
        row["error"] = str(e)
    return row


def run_soak(a) -> int:
    import csv

    with target(a) as t:
        if t.procs is None:
            raise ValueError("soak needs a local stack (no --host): it samples its processes' memory")
        rows: list[dict] = [sample(t)]
        stop = threading.Event()

        def sampler():
            while not stop.wait(a.sample_s):
                rows.append(sample(t))

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        records = locust(t, a.out / "soak" / "locust", f"concurrency:{a.users}", a.duration, a)
        stop.set()
        th.join(60)
        time.sleep(a.sample_s)
        rows.append(sample(t) | {"idle": True})
    out = a.out / "soak"
    with open(out / "soak.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    good = [r for r in report.read_records([records]) if "ttft_s" in r]
    result = {"duration_s": a.duration, "users": a.users, "requests": len(good)}
    result["failures"] = sum(not r["ok"] for r in good)
    half = [r for r in rows[len(rows) // 2 : -1] if "verifier_rss_mb" in r] or rows
    import numpy as np

    for name in ("verifier", "draft", "router"):
        ts = np.array([r["t"] for r in half]) - rows[0]["t"]
        mb = np.array([r[f"{name}_rss_mb"] for r in half])
        slope = float(np.polyfit(ts / 60, mb, 1)[0]) if len(half) > 2 else 0.0
        result[name] = {
            "rss_start_mb": rows[0][f"{name}_rss_mb"],
            "rss_end_mb": rows[-1][f"{name}_rss_mb"],
            "rss_max_mb": max(r[f"{name}_rss_mb"] for r in rows),
            "second_half_slope_mb_per_min": round(slope, 3),
        }
    result["sessions_max"] = {k: max(r.get(k, 0) for r in rows) for k in ("verifier_sessions", "draft_sessions")}
    result["sessions_after_idle"] = {
        k: rows[-1].get(k) for k in ("verifier_sessions", "draft_sessions", "router_running")
    }
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    _plot_soak(rows, out / "soak.png")
    progress(f"wrote {out / 'soak.csv'}, {out / 'soak.json'}, {out / 'soak.png'}")
    print(json.dumps(result, indent=1))
    return 0 if result["failures"] == 0 else 1


def _plot_soak(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = rows[0]["t"]
    ts = [(r["t"] - t0) / 60 for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name in ("verifier", "draft", "router"):
        ax1.plot(ts, [r[f"{name}_rss_mb"] for r in rows], label=name)
    ax1.set_ylabel("RSS (MiB)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for key in ("verifier_sessions", "draft_sessions", "router_running"):
        ax2.plot(ts, [r.get(key, float("nan")) for r in rows], label=key)
    ax2.set_ylabel("open sessions / requests")
    ax2.set_xlabel("minutes")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle("soak: memory and sessions of the three services")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the command line --------------------------------------------------------------------------------------------


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m loadtest.drive", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="run", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="", help="gRPC host:port of a running stack (default: start a local one)")
    common.add_argument("--http", default="", help="its HTTP base URL (default $DSPARK_HTTP)")
    common.add_argument("--out", type=Path, default=None, help="results folder (default bench-results/loadtest/TIME)")
    common.add_argument("--model", default=None)
    common.add_argument("--max-requests", type=int, default=16, help="the local stack's verifier/draft slots")
    common.add_argument("--no-ray", action="store_true", help="local stack: the router without Ray Serve")
    common.add_argument("--max-tokens", type=int, default=64)
    common.add_argument("--temperature", type=float, default=0.0)
    common.add_argument("--stop-timeout", type=float, default=120.0, help="s running requests get at a run's end")
    common.add_argument("--rate-users", type=int, default=16, help="users that offer a rate step's requests")
    common.add_argument("--slo-ttft-s", type=float, default=report.Slo.ttft_s)
    common.add_argument("--slo-tpot-s", type=float, default=report.Slo.tpot_s)
    lt = sub.add_parser("loadtest", parents=[common], help="concurrency and rate sweeps per policy")
    lt.add_argument("--policies", default="dspark,autoregressive")
    lt.add_argument("--concurrency", default="1,2,4,8,16", help="'' = no concurrency sweep")
    lt.add_argument("--rates", default="0.25,0.5,1", help="requests/s; '' = no rate sweep")
    lt.add_argument("--step-s", type=float, default=60.0)
    lt.add_argument("--warmup-s", type=float, default=10.0, help="the start of each step left out of its stats")
    lt.add_argument(
        "--no-interleave",
        dest="interleave",
        action="store_false",
        help="run each policy's whole sweep in turn (default: each step for every policy, order alternating)",
    )
    lt.set_defaults(fn=run_loadtest)
    ch = sub.add_parser("chaos", parents=[common], help="SIGKILL + restart the draft service, then the verifier")
    ch.add_argument("--faults", default="draft,verifier")
    ch.add_argument("--users", type=int, default=4)
    ch.add_argument("--duration", type=float, default=150.0, help="s of load in all")
    ch.add_argument("--first-fault-s", type=float, default=30.0)
    ch.add_argument("--gap-s", type=float, default=20.0, help="s between one service back and the next kill")
    ch.add_argument("--probe-tokens", type=int, default=48)
    ch.set_defaults(fn=run_chaos)
    so = sub.add_parser("soak", parents=[common], help="the saturating step for --duration s, memory sampled")
    so.add_argument("--users", type=int, default=8, help="the saturating concurrency")
    so.add_argument("--duration", type=float, default=1800.0)
    so.add_argument("--sample-s", type=float, default=10.0)
    so.set_defaults(fn=run_soak)
    a = ap.parse_args(argv)
    if a.out is None:
        a.out = ROOT / "bench-results" / "loadtest" / time.strftime("%Y%m%d-%H%M%S") / a.run
    a.out = a.out.resolve()
    return a


def main(argv=None) -> int:
    a = parse(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    return a.fn(a)


if __name__ == "__main__":
    raise SystemExit(main())
