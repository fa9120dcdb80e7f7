"""Anytime-valid comparison of two proportions: the live canary's challenger vs the champion.

The rollout looks after every ingest interval, and a test that is looked at repeatedly must stay
valid however often one looks: a fixed-horizon z-test checked after every batch declares a winner
between two identical arms far more often than its alpha. So the decision rests on a *confidence
sequence* — an interval for the difference d = p_challenger - p_champion that covers the true d at
every look simultaneously with probability 1 - alpha.

Method: the normal-mixture confidence sequence (Robbins' mixture; the always-valid inference of
Johari, Pekelis and Walsh, "Always valid inference", 2017/2022, and Howard et al. 2021, eq. 14).
With V the variance of the estimated difference and a N(0, tau^2) mixture over d, the interval is

    d_hat ± sqrt( V (V + tau^2) / tau^2 * ( 2 log(1/alpha) + log((V + tau^2) / V) ) )

V uses each arm's rate shrunk towards 1/2 by one pseudo-success and one pseudo-failure
((k + 1) / (n + 2)), so that an arm at 0% or 100% still has a width; and no decision is taken before
`min_rated` answers per arm, where the normal approximation behind V is poor. `mixture_sd` (tau)
tunes where the sequence is tightest: about the effect sizes worth detecting (0.1 = 10 points); the
guarantee holds for any tau, only the speed changes.

Decisions (`decide`), in this order:
  rollback  a guardrail rate (regenerate, edit, abandon: higher is worse) is higher for the challenger
            with confidence 1 - guardrail_alpha (each guardrail's own sequence), or the thumbs-up
            difference is below 0 with confidence 1 - alpha
  promote   the thumbs-up difference is above 0 with confidence 1 - alpha; or, once both arms reached
            `max_rated`, above -noninferiority_margin (non-inferior: as good within the margin)
  rollback  at `max_rated` when not even non-inferiority holds
  wait      otherwise, with an estimate of how many more rated answers per arm would decide it

Checked by simulation (tests/test_sequential.py, and at scale by tests/benchmarks/bench_sequential.py).
Pure numpy/scipy: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

GUARDRAILS = ("regenerate", "edit", "abandon")


@dataclass
class Policy:
    """When the live test decides.

    Primary (thumbs-up rate among rated answers):
      alpha: error rate of the whole sequence (promoting a worse or equal challenger as better, or
        rolling back a better one), however often the rollout looks
      mixture_sd: tau of the normal mixture, in rate units (where the sequence is tightest)
      min_rated: rated answers per arm before any decision on the primary metric
      max_rated: rated answers per arm at which the test stops and non-inferiority decides
      noninferiority_margin: at max_rated, promote if the difference is above -margin with confidence
        1 - alpha (null switches non-inferiority off: at max_rated without a winner the champion stays)
    Guardrails (rates among all answers, higher is worse):
      guardrails: which signals guard the release; guardrail_alpha: error rate of each guardrail's
        sequence; guardrail_margin: how much higher the challenger's rate may be before it trips
      min_answers: answers per arm before a guardrail may trip
    """

    alpha: float = 0.05
    mixture_sd: float = 0.1
    min_rated: int = 30
    max_rated: int = 2000
    noninferiority_margin: float | None = 0.05
    guardrails: list[str] = field(default_factory=lambda: list(GUARDRAILS))
    guardrail_alpha: float = 0.05
    guardrail_margin: float = 0.0
    min_answers: int = 30


@dataclass(frozen=True)
class Arm:
    """One arm's counts: rated answers and their thumbs-up; all answers and each guardrail signal."""

    rated: int
    thumbs_up: int
    answers: int = 0
    signals: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.thumbs_up / self.rated if self.rated else float("nan")


@dataclass(frozen=True)
class Decision:
    action: str  # promote | rollback | wait
    reason: str
    interval: tuple[float, float]  # confidence-sequence bounds of p_challenger - p_champion now
    more_needed: int | None = None  # estimated further rated answers per arm (wait only)


def _variance(k_a, n_a, k_b, n_b):  # noqa: ANN001, ANN202 - floats or numpy arrays alike
    pa, pb = (k_a + 1.0) / (n_a + 2.0), (k_b + 1.0) / (n_b + 2.0)
    return pa * (1 - pa) / np.maximum(n_a, 1) + pb * (1 - pb) / np.maximum(n_b, 1)


def half_width(variance, alpha: float, tau: float):  # noqa: ANN001, ANN201
    """Half-width of the normal-mixture confidence sequence at variance V (floats or arrays)."""
    v = np.asarray(variance, float)
    t2 = tau * tau
    return np.sqrt(v * (v + t2) / t2 * (2 * math.log(1 / alpha) + np.log((v + t2) / v)))


def difference_interval(k_a, n_a, k_b, n_b, alpha: float = 0.05, tau: float = 0.1):  # noqa: ANN001, ANN201
    """Confidence sequence of p_b - p_a (arm b minus arm a) from k successes of n trials per arm.

    Vectorised: every argument may be an array (the simulation evaluates thousands of experiments at
    once). With n = 0 on either side the interval is (-1, 1).
    """
    k_a, n_a, k_b, n_b = (np.asarray(x, float) for x in (k_a, n_a, k_b, n_b))
    d = np.where(n_b > 0, k_b / np.maximum(n_b, 1), 0.5) - np.where(n_a > 0, k_a / np.maximum(n_a, 1), 0.5)
    h = half_width(_variance(k_a, n_a, k_b, n_b), alpha, tau)
    empty = (n_a <= 0) | (n_b <= 0)
    return np.where(empty, -1.0, np.maximum(d - h, -1.0)), np.where(empty, 1.0, np.minimum(d + h, 1.0))


def rate_interval(k: float, n: int, alpha: float = 0.05, tau: float = 0.1) -> tuple[float, float]:
    """Confidence sequence of one arm's rate (for plots next to the difference's)."""
    if n <= 0:
        return 0.0, 1.0
    p = (k + 1.0) / (n + 2.0)
    h = float(half_width(p * (1 - p) / n, alpha, tau))
    return max(0.0, k / n - h), min(1.0, k / n + h)


def more_needed(champion: Arm, challenger: Arm, policy: Policy) -> int:
    """Further rated answers per arm until the interval would exclude 0 (or the margin), if the observed
    rates held and the arms kept their ratio; capped at what max_rated leaves."""
    n_a, n_b = max(champion.rated, 1), max(challenger.rated, 1)
    ratio = n_b / n_a
    pa = (champion.thumbs_up + 1) / (champion.rated + 2)
    pb = (challenger.thumbs_up + 1) / (challenger.rated + 2)
    target = max(abs(pb - pa), policy.noninferiority_margin or 0.0, 0.01)
    room = max(0, policy.max_rated - min(champion.rated, challenger.rated))
    lo, hi = 0, room
    while lo < hi:  # the width shrinks monotonically in n: bisect for the smallest sufficient extra
        mid = (lo + hi) // 2
        m_a = n_a + mid
        v = pa * (1 - pa) / m_a + pb * (1 - pb) / (m_a * ratio)
        if float(half_width(v, policy.alpha, policy.mixture_sd)) < target:
            hi = mid
        else:
            lo = mid + 1
    needed = max(lo, policy.min_rated - min(champion.rated, challenger.rated), 1)
    return int(min(needed, room)) if room else 0


def guardrail_breach(champion: Arm, challenger: Arm, policy: Policy) -> str | None:
    """The first guardrail whose rate is higher for the challenger with confidence, described; else None."""
    if min(champion.answers, challenger.answers) < policy.min_answers:
        return None
    for g in policy.guardrails:
        ka, kb = champion.signals.get(g, 0), challenger.signals.get(g, 0)
        lo, _ = difference_interval(ka, champion.answers, kb, challenger.answers, policy.guardrail_alpha,
                                    policy.mixture_sd)
        if float(lo) > policy.guardrail_margin:
            return (f"guardrail {g}: challenger {kb / challenger.answers:.1%} of {challenger.answers} answers vs "
                    f"champion {ka / champion.answers:.1%} of {champion.answers}; the difference is at least "
                    f"{float(lo):+.3f} with {1 - policy.guardrail_alpha:.0%} confidence")
    return None


def decide(champion: Arm, challenger: Arm, policy: Policy | None = None) -> Decision:
    """Promote, roll back or wait on the counts so far (see the module docstring for the order)."""
    p = policy or Policy()
    lo, hi = (float(x) for x in difference_interval(champion.thumbs_up, champion.rated, challenger.thumbs_up,
                                                    challenger.rated, p.alpha, p.mixture_sd))
    rates = (f"thumbs-up challenger {challenger.rate:.1%} of {challenger.rated} rated vs champion "
             f"{champion.rate:.1%} of {champion.rated}; difference in [{lo:+.3f}, {hi:+.3f}] "
             f"({1 - p.alpha:.0%} anytime-valid)")
    if breach := guardrail_breach(champion, challenger, p):
        return Decision("rollback", breach, (lo, hi))
    enough = min(champion.rated, challenger.rated) >= p.min_rated
    if enough and hi < 0:
        return Decision("rollback", f"worse: {rates}", (lo, hi))
    if enough and lo > 0:
        return Decision("promote", f"better: {rates}", (lo, hi))
    if min(champion.rated, challenger.rated) >= p.max_rated:
        if p.noninferiority_margin is not None and lo > -p.noninferiority_margin:
            return Decision("promote", f"non-inferior within {p.noninferiority_margin:.3f} at the maximum sample: "
                                       f"{rates}", (lo, hi))
        return Decision("rollback", f"no better (nor non-inferior) at the maximum sample: {rates}", (lo, hi))
    need = more_needed(champion, challenger, p)
    return Decision("wait", f"undecided: {rates}; about {need} more rated answers per arm", (lo, hi), need)


def fixed_horizon_n(p_a: float, p_b: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Rated answers per arm for a one-look two-sided two-proportion z-test of this power (equal arms)."""
    from scipy.stats import norm

    za, zb = norm.ppf(1 - alpha / 2), norm.ppf(power)
    pbar = (p_a + p_b) / 2
    num = (za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p_a * (1 - p_a) + p_b * (1 - p_b))) ** 2
    return math.ceil(num / (p_a - p_b) ** 2)


def simulate(p_champion: float, p_challenger: float, n_experiments: int, batch: int, share: float,
             policy: Policy, seed: int = 0) -> dict[str, np.ndarray]:
    """Continuous monitoring of many canaries at once: after every batch of `batch` rated answers (split
    by `share`), the primary rule of `decide` is applied; returns, per experiment, the action taken
    (1 promote, -1 rollback, 0 undecided at max_rated) and the rated answers per arm when it was taken.
    Guardrails are not simulated (no guardrail signals)."""
    rng = np.random.default_rng(seed)
    per_look_b = max(1, round(batch * share))
    per_look_a = max(1, batch - per_look_b)
    looks = math.ceil(policy.max_rated / min(per_look_a, per_look_b))
    n_a = per_look_a * np.arange(1, looks + 1)
    n_b = per_look_b * np.arange(1, looks + 1)
    k_a = rng.binomial(per_look_a, p_champion, size=(n_experiments, looks)).cumsum(axis=1)
    k_b = rng.binomial(per_look_b, p_challenger, size=(n_experiments, looks)).cumsum(axis=1)
    lo, hi = difference_interval(k_a, n_a, k_b, n_b, policy.alpha, policy.mixture_sd)
    enough = np.minimum(n_a, n_b) >= policy.min_rated
    at_max = np.minimum(n_a, n_b) >= policy.max_rated
    promote = (enough & (lo > 0))
    if policy.noninferiority_margin is not None:
        promote |= at_max & (lo > -policy.noninferiority_margin)
    rollback = (enough & (hi < 0)) | (at_max & ~promote)
    decided = promote | rollback
    first = np.where(decided.any(axis=1), decided.argmax(axis=1), looks - 1)
    rows = np.arange(n_experiments)
    action = np.where(decided[rows, first], np.where(promote[rows, first], 1, -1), 0)
    return {"action": action, "rated_champion": n_a[first], "rated_challenger": n_b[first],
            "as_better": (promote & ~at_max)[rows, first] & decided[rows, first]}
