"""`dspark eval`: real speculative decoding with a trained DSpark drafter over evaluation prompt sets.

Fixed-length verification: every round drafts gamma tokens (fewer only where max_tokens or the context leaves no
room), no scheduler. Per dataset it reports the paper's tau (mean tokens per round, the bonus/recovered token
included), the position-wise conditional acceptance P(draft k accepted | drafts < k accepted) (paper Fig. 2), the
per-position ECE and ROC-AUC of the confidence head before calibration (raw sigmoid of the confidence logits) and
after it (with the STS temperatures), and a confidence-threshold sweep (paper Fig. 5): each draft truncated at the
first position whose cumulative confidence falls below t.

The layers: `RecordingProposer` wraps a DSparkProposer and keeps every proposal's confidences, raw and calibrated;
`evaluate_prompts` decodes pre-tokenized prompts and turns the records into metrics (no tokenizer needed);
`run_eval` is the thin CLI layer (model, tokenizer, drafter, datasets, output).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dspark.core.decoding import Completion, Decoder
from dspark.core.engine import TargetEngine
from dspark.core.proposer import DraftRequest, Proposal
from dspark.core.sampling import SamplingParams
from dspark.drafter.model import DSparkDrafter, expected_calibration_error
from dspark.drafter.proposer import DSparkProposer

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
JSON_NAME = "eval.json"


# -- recording the proposals -----------------------------------------------------------------------------------


@dataclass
class ProposalRecord:
    history_len: int  # len(DraftRequest.token_ids): prompt + output up to and including the anchor
    raw: torch.Tensor  # (k,) float32 on CPU: the confidence before the STS temperatures
    confidence: torch.Tensor  # (k,) the proposal's (calibrated) confidence


@dataclass
class Round:
    accepted: int  # drafts that survived verification
    raw: torch.Tensor  # (k,) confidence before calibration
    calibrated: torch.Tensor  # (k,) after STS: what the proposal reported

    @property
    def drafted(self) -> int:
        return len(self.raw)


class RecordingProposer:
    """A DSparkProposer that keeps, per request, each proposal's confidences and the confidence logits they came from
    (STS undone) so that raw and calibrated confidences can be scored after verification."""

    def __init__(self, inner: DSparkProposer):
        self.inner = inner
        self.drafter: DSparkDrafter = inner.drafter
        self.records: dict[str, list[ProposalRecord]] = {}

    @property
    def gamma(self) -> int:
        return self.inner.gamma

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        proposals = self.inner.propose(requests)
        temps = self.drafter.conf_temperature.detach().float().cpu()
        for r, p in zip(requests, proposals):
            conf = p.confidence.detach().float().cpu() if p.confidence is not None else torch.zeros(0)
            c = conf.clamp(1e-7, 1 - 1e-7)
            raw = torch.sigmoid(temps[: len(c)] * (c.log() - (-c).log1p()))  # undo STS: conf = sigmoid(logit / T_k)
            self.records.setdefault(r.request_id, []).append(ProposalRecord(len(r.token_ids), raw, conf))
        return proposals

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)

    def rounds(self, c: Completion) -> list[Round]:
        """The verified rounds of a finished request that drafted at least one token, with their accepted counts.
        A proposal's acceptance shows in the next history: anchor + accepted drafts + one new token. The last one's
        is what the request's stats hold beyond the others (a round the proposer never saw drafted nothing)."""
        recs = self.records.pop(c.request_id, [])
        accepted = [b.history_len - a.history_len - 1 for a, b in zip(recs, recs[1:])]
        if recs:
            accepted.append(c.stats.accepted - sum(accepted))
        out = []
        for rec, acc in zip(recs, accepted):
            k = len(rec.raw)
            if not 0 <= acc <= k:
                raise RuntimeError(
                    f"request {c.request_id}: {acc} of {k} drafts accepted; the records are inconsistent"
                )
            if k:
                out.append(Round(acc, rec.raw, rec.confidence))
        return out


# -- metrics ---------------------------------------------------------------------------------------------------


def roc_auc(scores, labels) -> float | None:
    """ROC-AUC as the Mann-Whitney rank statistic (ties share their mean rank): the probability that a random
    positive scores above a random negative, ties counting half. None when only one class is present."""
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(labels).reshape(-1).bool()
    n_pos, n = int(y.sum()), len(y)
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = torch.argsort(s)
    sorted_s = s[order]
    ranks = torch.empty(n, dtype=torch.float64)
    # average ranks (1-based) over runs of equal scores
    _, counts = torch.unique_consecutive(sorted_s, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = torch.repeat_interleave(mean_rank, counts)
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def threshold_sweep(rounds: list[Round], thresholds=THRESHOLDS) -> list[dict]:
    """Per threshold t: each draft truncated before the first position whose cumulative (calibrated) confidence
    product is < t. Acceptance is a prefix property, so the truncated draft accepts min(accepted, verified).
    Returns the mean verified length, the mean accepted length, and the share of verified drafts wasted (None
    when nothing is verified)."""
    out = []
    for t in thresholds:
        verified = accepted = 0
        for r in rounds:
            below = (torch.cumprod(r.calibrated, 0) < t).nonzero()
            v = int(below[0]) if len(below) else r.drafted
            verified += v
            accepted += min(r.accepted, v)
        n = max(len(rounds), 1)
        out.append(
            {
                "threshold": t,
                "verified": verified / n,
                "accepted": accepted / n,
                "wasted": (verified - accepted) / verified if verified else None,  # nothing verified
            }
        )
    return out


def summarize(completions: list[Completion], rounds: list[Round], gamma: int) -> dict:
    """The per-dataset metrics from the finished requests and their drafted rounds."""
    n_rounds = sum(c.stats.rounds for c in completions)
    n_acc = sum(c.stats.accepted for c in completions)
    reached = [0] * gamma  # rounds in which draft k was verified with all drafts before it accepted
    survived = [0] * gamma
    conf: list[tuple[list[float], list[float], list[int]]] = [([], [], []) for _ in range(gamma)]
    for r in rounds:
        for k in range(min(r.drafted, r.accepted + 1)):
            reached[k] += 1
            survived[k] += int(r.accepted > k)
            conf[k][0].append(float(r.raw[k]))
            conf[k][1].append(float(r.calibrated[k]))
            conf[k][2].append(int(r.accepted > k))

    def ece(k: int, which: int) -> float | None:
        if not reached[k]:
            return None
        return expected_calibration_error(torch.tensor(conf[k][which]), torch.tensor(conf[k][2], dtype=torch.float32))

    return {
        "tau": (n_acc + n_rounds) / n_rounds if n_rounds else 0.0,
        "rounds": n_rounds,
        "requests": len(completions),
        "drafted_rounds": len(rounds),
        "mean_accepted": n_acc / n_rounds if n_rounds else 0.0,
        "reached_by_position": reached,
        "acceptance_by_position": [s / n if n else None for s, n in zip(survived, reached)],
        "ece_before": [ece(k, 0) for k in range(gamma)],
        "ece_after": [ece(k, 1) for k in range(gamma)],
        "auc_before": [roc_auc(conf[k][0], conf[k][2]) if reached[k] else None for k in range(gamma)],
        "auc_after": [roc_auc(conf[k][1], conf[k][2]) if reached[k] else None for k in range(gamma)],
        "threshold_sweep": threshold_sweep(rounds),
    }


# -- decoding --------------------------------------------------------------------------------------------------


def evaluate_prompts(
    engine: TargetEngine,
    drafter: DSparkDrafter,
    prompts: list[list[int]],
    params: SamplingParams,
    gamma: int | None = None,
    eos_token_ids: tuple[int, ...] = (),
    seed: int | None = 0,
    progress: str | None = None,
) -> dict:
    """Speculative decoding of pre-tokenized prompts with `drafter` on `engine` (whose feature_layers must be the
    drafter's), gamma drafts per round; request i samples with seed + i. Returns summarize()'s metrics. progress:
    the label of a progress bar on stderr (prompts done, running tau); None: no bar."""
    gamma = drafter.config.gamma if gamma is None else gamma
    if not 1 <= gamma <= drafter.config.gamma:
        raise ValueError(f"gamma must be in 1..{drafter.config.gamma} (the drafter's block size), got {gamma}")
    if tuple(engine.config.feature_layers) != tuple(drafter.config.feature_layers):
        raise ValueError(
            f"the engine returns features of layers {engine.config.feature_layers}, the drafter reads "
            f"{drafter.config.feature_layers}"
        )
    proposer = RecordingProposer(DSparkProposer(drafter))
    dec = Decoder(engine, proposer, num_draft=gamma, eos_token_ids=eos_token_ids)
    plist = [replace(params, seed=None if seed is None else seed + i) for i in range(len(prompts))]
    completions = _generate(dec, prompts, plist, progress)
    rounds = [r for c in completions for r in proposer.rounds(c)]
    return summarize(completions, rounds, gamma)


def _generate(dec: Decoder, prompts: list[list[int]], params: list[SamplingParams], label: str | None):
    """dec.generate, with a progress bar: prompts done and the running tau of the finished ones."""
    from tqdm.auto import tqdm

    ids = [dec.add_request(p, sp) for p, sp in zip(prompts, params)]
    done: dict[str, Completion] = {}
    accepted = rounds = 0
    with tqdm(total=len(ids), desc=label, unit="prompt", disable=label is None, file=sys.stderr) as bar:
        while dec.has_work:
            for c in dec.step():
                done[c.request_id] = c
                accepted, rounds = accepted + c.stats.accepted, rounds + c.stats.rounds
                bar.set_postfix(tau=f"{(accepted + rounds) / max(1, rounds):.3f}", refresh=False)
                bar.update(1)
    return [done[i] for i in ids]


# -- CLI layer -------------------------------------------------------------------------------------------------


def dataset_name(name_or_path: str) -> str:
    p = Path(name_or_path)
    return p.stem if p.suffix == ".jsonl" else name_or_path


def run_eval(a, out=sys.stdout) -> dict:
    """`dspark eval` (argparse namespace from cli.py): load target + drafter, decode each dataset's first turns."""
    from dspark.core.config import EngineConfig
    from dspark.drafter.checkpoint import default_drafter_path, load_target_with_drafter
    from dspark.drafter.eval_sets import first_turns
    from dspark.models.prompt import encode_prompt, eos_token_ids

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.max_tokens < 1 or a.max_tokens >= a.max_context - 1:
        raise ValueError(f"--max-tokens must be in 1..{a.max_context - 2} (below --max-context {a.max_context})")
    drafter_path = Path(a.drafter) if a.drafter else default_drafter_path(a.model)
    # fail early on a bad dataset, before loading any model
    datasets = {dataset_name(d): first_turns(d, a.limit) for d in a.datasets}
    engine, drafter = load_target_with_drafter(EngineConfig.from_args(a), drafter_path)
    tokenizer = engine.tokenizer
    params = SamplingParams(temperature=a.temperature, max_tokens=a.max_tokens)
    eos = eos_token_ids(engine.model, tokenizer)
    room = a.max_context - a.max_tokens - 1
    result = {
        "drafter": str(drafter_path),
        "model": a.model,
        "gamma": a.gamma if a.gamma is not None else drafter.config.gamma,
        "temperature": a.temperature,
        "max_tokens": a.max_tokens,
        "confidence_temperatures": [round(float(t), 4) for t in drafter.conf_temperature],
        "datasets": {},
    }
    for name, turns in datasets.items():
        prompts = [encode_prompt(tokenizer, t)[-room:] for t in turns]  # keep the tail of over-long prompts
        result["datasets"][name] = evaluate_prompts(
            engine, drafter, prompts, params, gamma=a.gamma, eos_token_ids=eos, seed=a.seed, progress=name
        )
    if a.out:
        write_outputs(result, Path(a.out))
    if a.json:
        print(json.dumps(result), file=out)
    else:
        print(format_table(result), file=out)
    return result


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict) -> str:
    lines = [f"drafter {result['drafter']}  gamma={result['gamma']}  temperature={result['temperature']}"]
    lines.append(f"{'dataset':14s} {'tau':>6s} {'rounds':>7s} {'reqs':>5s}  acceptance by position")
    for name, d in result["datasets"].items():
        acc = " ".join(_fmt(x, ".2f") for x in d["acceptance_by_position"])
        lines.append(f"{name:14s} {d['tau']:6.3f} {d['rounds']:7d} {d['requests']:5d}  {acc}")
    for name, d in result["datasets"].items():
        lines.append(f"\n{name}: per-position calibration (before -> after STS)")
        for k in range(len(d["ece_before"])):
            lines.append(
                f"  pos {k + 1}: ECE {_fmt(d['ece_before'][k])} -> {_fmt(d['ece_after'][k])}   "
                f"AUC {_fmt(d['auc_before'][k])} -> {_fmt(d['auc_after'][k])}   (n={d['reached_by_position'][k]})"
            )
        lines.append("  threshold  verified  accepted  wasted")
        for row in d["threshold_sweep"]:
            if round(row["threshold"] * 100) % 10 == 5 and row["threshold"] not in (0.05, 0.95):
                continue  # the table shows every 0.1 (plus 0.05 and 0.95); the JSON has them all
            wasted = _fmt(row["wasted"], "6.1%")
            lines.append(f"  {row['threshold']:9.2f}  {row['verified']:8.3f}  {row['accepted']:8.3f}  {wasted}")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: Path) -> None:
    """eval.json, and (when matplotlib is installed) acceptance.png and threshold_sweep.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(json.dumps(result, indent=1))
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in result["datasets"].items():
        ys = d["acceptance_by_position"]
        xs = [k + 1 for k, y in enumerate(ys) if y is not None]
        ax.plot(xs, [y for y in ys if y is not None], marker="o", label=name)
    ax.set(xlabel="draft position k", ylabel="P(k accepted | < k accepted)", ylim=(0, 1.02))
    ax.set_title(f"conditional acceptance, gamma={result['gamma']}, T={result['temperature']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "acceptance.png", dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, d in result["datasets"].items():
        ts = [r["threshold"] for r in d["threshold_sweep"]]
        (line,) = left.plot(ts, [r["verified"] for r in d["threshold_sweep"]], label=f"{name} verified")
        left.plot(
            ts, [r["accepted"] for r in d["threshold_sweep"]], "--", color=line.get_color(), label=f"{name} accepted"
        )
        wasted = [(r["threshold"], r["wasted"]) for r in d["threshold_sweep"] if r["wasted"] is not None]
        right.plot([t for t, _ in wasted], [w for _, w in wasted], color=line.get_color(), label=name)
    left.set(xlabel="confidence threshold", ylabel="mean tokens per round")
    right.set(xlabel="confidence threshold", ylabel="wasted share of verified drafts", ylim=(0, 1))
    left.legend(fontsize="small")
    right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_dir / "threshold_sweep.png", dpi=120)
    plt.close(fig)
