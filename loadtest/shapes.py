"""Load shapes: fixed-concurrency steps and an arrival-rate sweep (Poisson, or gamma with burstiness != 1), each
step held for step_s seconds, then the run stops by itself.

DSPARK_LOAD picks one: `concurrency:1,2,4,8,16` (that many users, each sending its next request as soon as the last
one ends) or `rate:0.5,1,2` (requests per second offered by a pool of DSPARK_RATE_USERS users, each sending on its
own renewal process of rate/users; a user whose last request is still running sends late, and the report shows the
rate achieved next to the one offered). DSPARK_STEP_S is each step's length. The current step is module state the
users read when a request starts (Locust runs shape and users in one process here). No Locust import here:
importing Locust monkey-patches the process (gevent), which only the locustfile may do."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    label: str  # "c=4" or "rate=1.0"
    users: int
    rate: float | None = None  # requests/s over all users; None: closed loop


@dataclass(frozen=True)
class Plan:
    kind: str  # "concurrency" or "rate"
    steps: tuple[Step, ...]
    step_s: float
    burstiness: float = 1.0  # gamma shape of the inter-arrival times; 1 = Poisson

    @classmethod
    def parse(cls, spec: str, step_s: float, rate_users: int = 16, burstiness: float = 1.0) -> Plan:
        kind, _, values = spec.partition(":")
        try:
            numbers = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            numbers = []
        if kind not in ("concurrency", "rate") or not numbers or min(numbers) <= 0:
            raise ValueError(f"DSPARK_LOAD={spec!r}: expected concurrency:1,2,4 or rate:0.5,1,2 (positive numbers)")
        if step_s <= 0 or burstiness <= 0:
            raise ValueError("DSPARK_STEP_S and DSPARK_BURSTINESS must be positive")
        if kind == "concurrency":
            steps = tuple(Step(f"c={int(n)}", int(n)) for n in numbers)
        else:
            steps = tuple(Step(f"rate={n:g}", rate_users, n) for n in numbers)
        return cls(kind, steps, step_s, burstiness)

    @classmethod
    def from_env(cls) -> Plan | None:
        spec = os.environ.get("DSPARK_LOAD")
        if not spec:
            return None
        return cls.parse(
            spec,
            float(os.environ.get("DSPARK_STEP_S", 30)),
            int(os.environ.get("DSPARK_RATE_USERS", 16)),
            float(os.environ.get("DSPARK_BURSTINESS", 1.0)),
        )


PLAN = Plan.from_env()
CURRENT = {"step": None}  # the Step running now (None: no shape, plain Locust flags)


def current_label() -> str:
    step = CURRENT["step"]
    return step.label if step is not None else "run"


def progress(line: str) -> None:
    print(f"[loadtest] {time.strftime('%H:%M:%S')} {line}", flush=True)


def tick(run_time: float) -> tuple[int, int] | None:
    """What a Locust shape returns at run_time: (users, spawn rate) of PLAN's step then, None after the last one
    (the end of the run). Updates CURRENT when a new step begins."""
    if PLAN is None:
        return None
    i = int(run_time // PLAN.step_s)
    if i >= len(PLAN.steps):
        return None
    step = PLAN.steps[i]
    if CURRENT["step"] is not step:
        CURRENT["step"] = step
        progress(f"step {i + 1}/{len(PLAN.steps)} {step.label}: {step.users} users for {PLAN.step_s:g} s")
    return step.users, step.users  # all users of a step start at once


class Pacer:
    """A user's send times under a rate step: a renewal process of rate/users per user, gamma inter-arrival times of
    shape `burstiness` (1: exponential, Poisson arrivals) and the matching mean. Closed loop outside rate steps."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.next_at: float | None = None
        self.step = None

    def wait(self) -> float:
        step = CURRENT["step"]
        if step is None or step.rate is None:
            self.next_at = None
            return 0.0
        if step is not self.step:  # a new rate: start its process now
            self.step, self.next_at = step, time.monotonic()
        per_user = step.rate / step.users
        k = PLAN.burstiness if PLAN is not None else 1.0
        self.next_at += self.rng.gammavariate(k, 1.0 / (k * per_user))
        return max(0.0, self.next_at - time.monotonic())
