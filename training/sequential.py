"""Anytime-valid comparison of two proportions: the live canary's challenger vs the champion.

The rollout looks after every ingest interval, and a test that is looked at repeatedly must stay
valid however often one looks: a fixed-horizon z-test checked after every batch declares a winner
between two identical arms far more often than its alpha. So the decision rests on a *confidence
sequence*: an interval for d = p_challenger - p_champion that covers the true d at every look
simultaneously with probability >= 1 - alpha.

Method (`method="exact"`, the default): a mixture likelihood-ratio confidence sequence (Robbins'
mixture martingale; Howard et al. 2021, "Time-uniform, nonparametric, nonasymptotic confidence
sequences", section 3), exact for Bernoulli data. With k_A of n_A (champion), k_B of n_B
(challenger) and a prior pi over the pair of rates,

    m(data)    = integral of L(p_A, p_B) dpi                 (a function of the four counts only)
    E(d0)      = m(data) / max{ L(p_A, p_B) : p_B - p_A = d0 }
    CS         = { d0 : E(d0) < 1 / alpha }                  (an interval: the profile is concave)

For any pair (p_A, p_B) with p_B - p_A = d0, m / L(p_A, p_B) is a nonnegative martingale of mean 1
(a Bayes mixture against a simple null) and E(d0) is below it, so by Ville's inequality
P(E(d_true) ever >= 1/alpha) <= alpha, whatever the nuisance rate, the split between the arms (a
0.2 canary share, or one that changes mid-rollout), the batch sizes and the times one looks. No
step is asymptotic: it holds at 2 rated answers and at rates of 0.01 or 0.99. The price is sample
size: profiling the common rate instead of plugging it in costs about 0.5 log n nats, so it needs
2-2.5x the rated answers of the normal mixture below (median 800 vs 380 challenger answers for
50% -> 60% at a 50/50 split; tests/benchmarks/bench_sequential.py measures both on the same
simulated canaries). We take the guarantee: the normal mixture's errors are lopsided where its
variance estimate is poor, and past alpha on one side at a 0.1 canary share (declared better in
5.2% of 10,000 equal-arm canaries at a 95% rate, declared worse in 5.1% at 5%), while the exact
sequence stayed at or below 0.05% in every cell; it needs no pseudo-counts or minimum sample to be
valid, so `min_rated` is a product rule only. It is also conservative: that 0.05% against an
alpha of 5% is the slack the 0.5 log n pays for.

Prior (the mixing parameter `mixture_sd` = tau): an equal-weight mixture of 32 priors, each a
product of Beta(c kappa, (1 - c) kappa) for both arms with a shared centre c; the centres are
spread evenly in arcsine-root space (dense near 0 and 1, where guardrail rates live) and
kappa = 1 / (2 tau^2) - 1, so at c = 1/2 the prior sd of p_B - p_A is tau, and 2 tau sqrt(c (1 - c))
elsewhere: effects are expected on each rate's own scale. tau = 0.1 puts the mass on the effects a
canary is for (a few to ~15 points); the guarantee holds for every tau, only the speed changes.

`method="normal"`: the normal-mixture sequence of Johari, Pekelis and Walsh ("Always valid
inference", 2017/2022; Howard et al. 2021 eq. 14), d_hat ± sqrt(V (V + tau^2) / tau^2 (2 log(1/alpha)
+ log((V + tau^2) / V))), with V from rates shrunk by one pseudo-success and one pseudo-failure so an
arm at 0% or 100% keeps a width. Valid only as the normal approximation is.

Decisions (`decide`), in this order:
  rollback  a guardrail rate (regenerate, edit, abandon: higher is worse) is higher for the
            challenger by more than guardrail_margin with confidence 1 - guardrail_alpha (each
            guardrail its own sequence: k guardrails falsely trip together with probability
            <= k * guardrail_alpha), or the thumbs-up difference is below 0 with confidence 1 - alpha
  promote   the thumbs-up difference is above 0 with confidence 1 - alpha; or, once both arms reached
            `max_rated`, above -noninferiority_margin (non-inferior: as good within the margin)
  rollback  at `max_rated` when not even non-inferiority holds
  wait      otherwise, with an estimate of how many more rated answers would decide it
Both thumbs-up claims come from one sequence at level alpha, so a challenger equal to the champion is
promoted-as-better or rolled-back-as-worse with probability <= alpha in total.

Pure numpy/scipy, no I/O; the vectorised functions (`log_e_value`, `primary_action`, `simulate`) run
the same rule as `decide` over thousands of simulated canaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.optimize import brentq
from scipy.special import gammaln, logsumexp, xlog1py, xlogy

GUARDRAILS = ("regenerate", "edit", "abandon")
METHODS = ("exact", "normal")
# primary_action's codes: the sign is the action; 2 / -2 are the decisions forced at max_rated
WAIT, PROMOTE, ROLLBACK, NONINFERIOR, INCONCLUSIVE = 0, 1, -1, 2, -2
N_CENTRES = 32
_EDGE = 1 - 1e-12  # a difference of two rates lies strictly inside (-1, 1) for the profile to exist


@dataclass
class Policy:
    """When the live test decides.

    Primary (thumbs-up rate among rated answers):
      alpha: error rate of the whole sequence (promoting a worse or equal challenger as better, or
        rolling back an equal or better one), however often the rollout looks
      method: exact (mixture likelihood ratio, valid at any count) | normal (normal mixture, faster,
        valid only as its normal approximation is); see the module docstring
      mixture_sd: tau of the mixture, in rate units (where the sequence is tightest; any tau is valid)
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
    method: str = "exact"
    mixture_sd: float = 0.1
    min_rated: int = 30
    max_rated: int = 4000
    noninferiority_margin: float | None = 0.05
    guardrails: list[str] = field(default_factory=lambda: list(GUARDRAILS))
    guardrail_alpha: float = 0.05
    guardrail_margin: float = 0.0
    min_answers: int = 30

    def __post_init__(self) -> None:
        for name in ("alpha", "guardrail_alpha"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"policy.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.method not in METHODS:
            raise ValueError(f"policy.method must be one of {METHODS}, got {self.method!r}")
        if not 0 < self.mixture_sd < math.sqrt(0.5):
            raise ValueError(f"policy.mixture_sd must be in (0, 0.707): the Beta concentration "
                             f"1 / (2 tau^2) - 1 must be positive; got {self.mixture_sd}")
        if self.max_rated < max(self.min_rated, 1):
            raise ValueError(f"policy.max_rated ({self.max_rated}) must be >= min_rated ({self.min_rated}) and >= 1")
        if self.noninferiority_margin is not None and not 0 <= self.noninferiority_margin < 1:
            raise ValueError(f"policy.noninferiority_margin must be in [0, 1) or null, got {self.noninferiority_margin}")
        if not 0 <= self.guardrail_margin < 1:
            raise ValueError(f"policy.guardrail_margin must be in [0, 1), got {self.guardrail_margin}")


@dataclass(frozen=True)
class Arm:
    """One arm's counts: rated answers and their thumbs-up; all answers and each guardrail signal
    (answers that got at least one such event, as ingest.live_metrics counts them)."""

    rated: int
    thumbs_up: int
    answers: int = 0
    signals: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.thumbs_up <= self.rated:
            raise ValueError(f"need 0 <= thumbs_up <= rated, got thumbs_up={self.thumbs_up} rated={self.rated}")
        bad = {g: k for g, k in self.signals.items() if not 0 <= k <= self.answers}
        if bad:
            raise ValueError(f"guardrail counts must be within 0..answers={self.answers} (answers with the signal): {bad}")

    @property
    def rate(self) -> float:
        return self.thumbs_up / self.rated if self.rated else float("nan")


@dataclass(frozen=True)
class Decision:
    action: str  # promote | rollback | wait
    reason: str
    interval: tuple[float, float]  # confidence-sequence bounds of p_challenger - p_champion now
    more_needed: int | None = None  # estimated further rated answers of the smaller arm (wait only)


# --- the exact mixture likelihood ratio -----------------------------------------------------------

@dataclass(frozen=True, eq=False)  # hashed by identity: beta_mixture() caches one per tau
class BetaMixture:
    """Equal-weight mixture of Beta(a_k, b_k), the centre k shared by both arms."""

    a: np.ndarray
    b: np.ndarray


@lru_cache(maxsize=16)
def beta_mixture(tau: float, n_centres: int = N_CENTRES) -> BetaMixture:
    """Centres sin^2 of evenly spaced angles in (0, pi/2); concentration 1 / (2 tau^2) - 1."""
    kappa = 0.5 / tau**2 - 1
    c = np.sin((np.arange(n_centres) + 0.5) * np.pi / (2 * n_centres)) ** 2
    return BetaMixture(a=c * kappa, b=(1 - c) * kappa)


@lru_cache(maxsize=8)
def _gammaln_table(prior: BetaMixture, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gammaln(j + a_k), gammaln(j + b_k), gammaln(j + a_k + b_k) for j < size: integer counts become
    lookups (a simulation evaluates millions of (count, centre) pairs; gammaln dominates otherwise)."""
    j = np.arange(size, dtype=float)[:, None]
    return gammaln(j + prior.a), gammaln(j + prior.b), gammaln(j[:, 0] + prior.a[0] + prior.b[0])


def _log_marginals(k, n, prior: BetaMixture) -> np.ndarray:
    """log of the Beta-binomial marginal of k of n per centre, without the binomial coefficient: [..., K]."""
    a, b = prior.a, prior.b
    const = gammaln(a + b) - gammaln(a) - gammaln(b)
    k, n = np.asarray(k), np.asarray(n)
    if k.dtype.kind in "iu" and n.dtype.kind in "iu" and n.size and n.max() < 2**16:
        ga, gb, gab = _gammaln_table(prior, 1 << max(10, int(n.max()).bit_length()))
        return ga[k] + gb[n - k] - gab[n][..., None] + const
    k, n = k.astype(float)[..., None], n.astype(float)[..., None]
    return gammaln(k + a) + gammaln(n - k + b) - gammaln(n + a + b) + const


def log_mixture_likelihood(k_a, n_a, k_b, n_b, prior: BetaMixture) -> np.ndarray:
    """log m(data): both arms' likelihood averaged over the prior (the centre is shared by the arms)."""
    terms = _log_marginals(k_a, n_a, prior) + _log_marginals(k_b, n_b, prior)
    return logsumexp(terms, axis=-1) - math.log(prior.a.size)


def log_likelihood(k, n, p) -> np.ndarray:  # noqa: ANN001 - floats or arrays alike
    """k log p + (n - k) log(1 - p), with 0 log 0 = 0."""
    return xlogy(k, p) + xlog1py(np.asarray(n) - k, -np.asarray(p))


def profile_log_likelihood(k_a, n_a, k_b, n_b, d) -> np.ndarray:  # noqa: ANN001
    """max over p_A of log L(p_A, p_A + d): the best pair of rates with difference d (vectorised).

    d = 0 is the pooled rate. Otherwise the score in p_A is strictly decreasing on the feasible
    interval [max(0, -d), min(1, 1 - d)], so bisection on its sign finds the maximiser (60 halvings
    of a bracket of width <= 1: below float64 resolution).
    """
    k_a, n_a, k_b, n_b, d = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (k_a, n_a, k_b, n_b, d)))
    if np.all(d == 0):
        p = np.where(n_a + n_b > 0, (k_a + k_b) / np.maximum(n_a + n_b, 1), 0.5)
        return log_likelihood(k_a, n_a, p) + log_likelihood(k_b, n_b, p)
    if np.any(np.abs(d) >= 1):
        raise ValueError("a difference of two rates must lie inside (-1, 1)")
    lo, hi = np.maximum(0.0, -d), np.minimum(1.0, 1.0 - d)
    with np.errstate(invalid="ignore", divide="ignore"):
        for _ in range(60):
            p = 0.5 * (lo + hi)
            q = p + d
            up = k_a / p - (n_a - k_a) / (1 - p) + k_b / q - (n_b - k_b) / (1 - q) > 0
            lo, hi = np.where(up, p, lo), np.where(up, hi, p)
    p = 0.5 * (lo + hi)
    return log_likelihood(k_a, n_a, p) + log_likelihood(k_b, n_b, p + d)


def log_e_value(k_a, n_a, k_b, n_b, d0: float = 0.0, prior: BetaMixture | None = None) -> np.ndarray:  # noqa: ANN001
    """log E(d0) = log m(data) - profile log-likelihood at p_B - p_A = d0.

    Against the one-sided null p_B - p_A <= d0 this is the evidence whenever the observed difference is
    above d0 (the profile is concave, so its maximum over that null is at d0); likewise below.
    """
    prior = prior if prior is not None else beta_mixture(Policy.mixture_sd)
    return log_mixture_likelihood(k_a, n_a, k_b, n_b, prior) - profile_log_likelihood(k_a, n_a, k_b, n_b, d0)


def _scalar_profile(k_a: float, n_a: float, k_b: float, n_b: float, d: float) -> float:
    """profile_log_likelihood for one table, by a root finder.

    Parametrised by the distance t from the feasible interval's lower end (width w = 1 - |d|): the
    rates that can be tiny (p_A and 1 - p_B for d >= 0; p_B and 1 - p_A for d < 0) are then t and
    w - t, computed without cancellation even at |d| = 1 - 1e-12.
    """
    w = 1.0 - abs(d)

    def rates(t: float) -> tuple[float, float, float, float]:  # p_A, 1 - p_A, p_B, 1 - p_B
        return (t, 1 - t, d + t, w - t) if d >= 0 else (t - d, w - t, t, 1 - t)

    def score(t: float) -> float:
        pa, qa, pb, qb = rates(t)
        return k_a / pa - (n_a - k_a) / qa + k_b / pb - (n_b - k_b) / qb

    a, b = w * 1e-13, w * (1 - 1e-13)
    t = a if score(a) <= 0 else b if score(b) >= 0 else brentq(score, a, b, xtol=1e-16 * w, rtol=1e-14)
    pa, qa, pb, qb = rates(t)
    return float(xlogy(k_a, pa) + xlogy(n_a - k_a, qa) + xlogy(k_b, pb) + xlogy(n_b - k_b, qb))


def _exact_difference_interval(k_a: int, n_a: int, k_b: int, n_b: int, alpha: float,
                               prior: BetaMixture) -> tuple[float, float]:
    threshold = math.log(1 / alpha)
    log_m = float(log_mixture_likelihood(k_a, n_a, k_b, n_b, prior))
    est = (k_b / n_b if n_b else 0.5) - (k_a / n_a if n_a else 0.5)  # an empty arm fits every rate alike

    def excess(d: float) -> float:
        return log_m - _scalar_profile(k_a, n_a, k_b, n_b, d) - threshold

    est = min(max(est, -_EDGE), _EDGE)
    high = _EDGE if excess(_EDGE) < 0 else brentq(excess, est, _EDGE, xtol=1e-10)
    low = -_EDGE if excess(-_EDGE) < 0 else brentq(excess, -_EDGE, est, xtol=1e-10)
    return (-1.0 if low <= -_EDGE else low), (1.0 if high >= _EDGE else high)


def _exact_rate_interval(k: int, n: int, alpha: float, prior: BetaMixture) -> tuple[float, float]:
    threshold = math.log(1 / alpha)
    log_m = float(logsumexp(_log_marginals(np.asarray(k), np.asarray(n), prior)) - math.log(prior.a.size))
    est, eps = (k / n if n else 0.5), 1e-15

    def excess(p: float) -> float:
        return log_m - float(log_likelihood(k, n, p)) - threshold

    low = 0.0 if excess(eps) < 0 else brentq(excess, eps, max(est, eps), xtol=1e-12)
    high = 1.0 if excess(1 - eps) < 0 else brentq(excess, min(est, 1 - eps), 1 - eps, xtol=1e-12)
    return low, high


# --- the normal mixture (method="normal") --------------------------------------------------------

def _variance(k_a, n_a, k_b, n_b):  # noqa: ANN001, ANN202 - floats or numpy arrays alike
    pa, pb = (k_a + 1.0) / (n_a + 2.0), (k_b + 1.0) / (n_b + 2.0)
    return pa * (1 - pa) / np.maximum(n_a, 1) + pb * (1 - pb) / np.maximum(n_b, 1)


def half_width(variance, alpha: float, tau: float):  # noqa: ANN001, ANN201
    """Half-width of the normal-mixture confidence sequence at variance V (floats or arrays)."""
    v = np.asarray(variance, float)
    t2 = tau * tau
    return np.sqrt(v * (v + t2) / t2 * (2 * math.log(1 / alpha) + np.log((v + t2) / v)))


def _normal_difference_interval(k_a, n_a, k_b, n_b, alpha: float, tau: float):  # noqa: ANN001, ANN202
    k_a, n_a, k_b, n_b = (np.asarray(x, float) for x in (k_a, n_a, k_b, n_b))
    d = np.where(n_b > 0, k_b / np.maximum(n_b, 1), 0.5) - np.where(n_a > 0, k_a / np.maximum(n_a, 1), 0.5)
    h = half_width(_variance(k_a, n_a, k_b, n_b), alpha, tau)
    empty = (n_a <= 0) | (n_b <= 0)
    return np.where(empty, -1.0, np.maximum(d - h, -1.0)), np.where(empty, 1.0, np.minimum(d + h, 1.0))


# --- intervals and decisions ----------------------------------------------------------------------

def difference_interval(k_a, n_a, k_b, n_b, alpha: float = 0.05, tau: float = 0.1,  # noqa: ANN001, ANN201
                        method: str = "exact"):
    """Confidence sequence of p_b - p_a (arm b minus arm a) from k successes of n trials per arm.

    Floats, or arrays of any shape (evaluated table by table for the exact method). With n = 0 on
    either side the interval is (-1, 1).
    """
    if method == "normal":
        return _normal_difference_interval(k_a, n_a, k_b, n_b, alpha, tau)
    arrays = np.broadcast_arrays(*(np.asarray(x) for x in (k_a, n_a, k_b, n_b)))
    if arrays[0].ndim == 0:
        return _exact_difference_interval(*(int(x) for x in arrays), alpha, beta_mixture(tau))
    out = [_exact_difference_interval(*(int(x) for x in t), alpha, beta_mixture(tau))
           for t in zip(*(x.ravel() for x in arrays), strict=True)]
    return (np.array([o[0] for o in out]).reshape(arrays[0].shape), np.array([o[1] for o in out]).reshape(arrays[0].shape))


def rate_interval(k: int, n: int, alpha: float = 0.05, tau: float = 0.1, method: str = "exact") -> tuple[float, float]:
    """Confidence sequence of one arm's rate (for plots next to the difference's)."""
    if n <= 0:
        return 0.0, 1.0
    if method == "exact":
        return _exact_rate_interval(k, n, alpha, beta_mixture(tau))
    p = (k + 1.0) / (n + 2.0)
    h = float(half_width(p * (1 - p) / n, alpha, tau))
    return max(0.0, k / n - h), min(1.0, k / n + h)


def rate_intervals(champion: Arm, challenger: Arm, policy: Policy | None = None) -> dict[str, tuple[float, float, float]]:
    """(estimate, low, high) of both arms' thumbs-up rates and of their difference, for plotting."""
    p = policy or Policy()
    lo, hi = difference_interval(champion.thumbs_up, champion.rated, challenger.thumbs_up, challenger.rated,
                                 p.alpha, p.mixture_sd, p.method)
    return {"champion": (champion.rate, *rate_interval(champion.thumbs_up, champion.rated, p.alpha, p.mixture_sd, p.method)),
            "challenger": (challenger.rate, *rate_interval(challenger.thumbs_up, challenger.rated, p.alpha,
                                                           p.mixture_sd, p.method)),
            "difference": (challenger.rate - champion.rate, float(lo), float(hi))}


def primary_action(k_a, n_a, k_b, n_b, policy: Policy) -> np.ndarray:  # noqa: ANN001
    """The thumbs-up decision, vectorised over counts: PROMOTE 1 (better), ROLLBACK -1 (worse), WAIT 0,
    and at max_rated NONINFERIOR 2 (promote) or INCONCLUSIVE -2 (roll back).

    `decide` takes its thumbs-up decision from here, so simulating this function simulates the rule
    the rollout applies. The interval's bounds decide through the equivalent e-value tests: the exact
    sequence excludes d0 exactly when log E(d0) >= log(1/alpha).
    """
    shape = np.broadcast(*(np.asarray(v) for v in (k_a, n_a, k_b, n_b))).shape
    k_a, n_a, k_b, n_b = (np.atleast_1d(x) for x in
                          np.broadcast_arrays(*(np.asarray(v) for v in (k_a, n_a, k_b, n_b))))
    smaller = np.minimum(n_a, n_b)
    ready = smaller >= max(policy.min_rated, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.where(ready, k_b / np.maximum(n_b, 1) - k_a / np.maximum(n_a, 1), 0.0)
    threshold = math.log(1 / policy.alpha)
    if policy.method == "exact":
        prior = beta_mixture(policy.mixture_sd)
        sig = ready & (diff != 0)
        if sig.any():
            idx = np.nonzero(sig)
            sig[idx] = log_e_value(k_a[idx], n_a[idx], k_b[idx], n_b[idx], 0.0, prior) >= threshold
        better, worse = sig & (diff > 0), sig & (diff < 0)
    else:
        lo, hi = _normal_difference_interval(k_a, n_a, k_b, n_b, policy.alpha, policy.mixture_sd)
        better, worse = ready & (lo > 0), ready & (hi < 0)
    action = np.where(better, PROMOTE, np.where(worse, ROLLBACK, WAIT)).astype(np.int8)
    at_max = (smaller >= policy.max_rated) & (action == WAIT)
    if at_max.any():
        idx = np.nonzero(at_max)
        margin = policy.noninferiority_margin
        if margin is None:
            ok = np.zeros(len(idx[0]), dtype=bool)
        elif policy.method == "exact":
            ok = (diff[idx] > -margin) & (log_e_value(k_a[idx], n_a[idx], k_b[idx], n_b[idx], -margin,
                                                      beta_mixture(policy.mixture_sd)) >= threshold)
        else:
            ok = lo[idx] > -margin
        action[idx] = np.where(ok, NONINFERIOR, INCONCLUSIVE)
    return action.reshape(shape)


def more_needed(champion: Arm, challenger: Arm, policy: Policy) -> int:
    """Further rated answers of the smaller arm (the other grows at the current ratio) until the test
    would decide if the observed rates held; capped at what max_rated leaves, at least what min_rated asks.

    Projects the counts along a geometric grid of sizes (real-valued counts: the Beta-binomial
    marginal and the normal variance both accept them) and takes the first size that decides.
    """
    n_a, n_b = champion.rated, challenger.rated
    small = min(n_a, n_b)
    floor = max(policy.min_rated - small, 0)
    room = max(policy.max_rated - small, 0)
    if room == 0:
        return 0
    if n_a == 0 or n_b == 0:  # no rates to project yet
        return min(max(floor, 1), room)
    pa, pb = champion.rate, challenger.rate
    scale = np.geomspace(max(policy.min_rated, small, 1), policy.max_rated, 300) / small  # x current sample
    ka, na, kb, nb = pa * n_a * scale, n_a * scale, pb * n_b * scale, n_b * scale
    if policy.method == "exact":
        decided = log_e_value(ka, na, kb, nb, 0.0, beta_mixture(policy.mixture_sd)) >= math.log(1 / policy.alpha)
        decided &= pa != pb
    else:
        lo, hi = _normal_difference_interval(ka, na, kb, nb, policy.alpha, policy.mixture_sd)
        decided = (lo > 0) | (hi < 0)
    hit = np.nonzero(decided)[0]
    extra = math.ceil(small * scale[hit[0]] - small - 1e-9) if hit.size else room
    return int(min(max(extra, floor, 1), room))


def guardrail_breach(champion: Arm, challenger: Arm, policy: Policy) -> str | None:
    """The first guardrail whose rate is higher for the challenger with confidence, described; else None."""
    if min(champion.answers, challenger.answers) < max(policy.min_answers, 1):
        return None
    for g in policy.guardrails:
        ka, kb = champion.signals.get(g, 0), challenger.signals.get(g, 0)
        na, nb = champion.answers, challenger.answers
        if kb / nb - ka / na <= policy.guardrail_margin:
            continue
        if policy.method == "exact":
            tripped = float(log_e_value(ka, na, kb, nb, policy.guardrail_margin,
                                        beta_mixture(policy.mixture_sd))) >= math.log(1 / policy.guardrail_alpha)
        else:
            tripped = float(_normal_difference_interval(ka, na, kb, nb, policy.guardrail_alpha,
                                                        policy.mixture_sd)[0]) > policy.guardrail_margin
        if tripped:
            lo, _ = difference_interval(ka, na, kb, nb, policy.guardrail_alpha, policy.mixture_sd, policy.method)
            return (f"guardrail {g}: challenger {kb / nb:.1%} of {nb} answers vs champion {ka / na:.1%} of {na}; "
                    f"the difference is at least {float(lo):+.3f} with {1 - policy.guardrail_alpha:.0%} confidence "
                    f"(anytime-valid)")
    return None


def decide(champion: Arm, challenger: Arm, policy: Policy | None = None) -> Decision:
    """Promote, roll back or wait on the counts so far (see the module docstring for the order)."""
    p = policy or Policy()
    lo, hi = (float(x) for x in difference_interval(champion.thumbs_up, champion.rated, challenger.thumbs_up,
                                                    challenger.rated, p.alpha, p.mixture_sd, p.method))
    rates = (f"thumbs-up challenger {challenger.rate:.1%} of {challenger.rated} rated vs champion "
             f"{champion.rate:.1%} of {champion.rated}; difference in [{lo:+.3f}, {hi:+.3f}] "
             f"({1 - p.alpha:.0%} anytime-valid)")
    if breach := guardrail_breach(champion, challenger, p):
        return Decision("rollback", breach, (lo, hi))
    action = int(primary_action(champion.thumbs_up, champion.rated, challenger.thumbs_up, challenger.rated, p))
    if action == ROLLBACK:
        return Decision("rollback", f"worse: {rates}", (lo, hi))
    if action == INCONCLUSIVE:
        return Decision("rollback", f"no better (nor non-inferior) at the maximum sample: {rates}", (lo, hi))
    if action == PROMOTE:
        return Decision("promote", f"better: {rates}", (lo, hi))
    if action == NONINFERIOR:
        return Decision("promote", f"non-inferior within {p.noninferiority_margin:.3f} at the maximum sample: "
                                   f"{rates}", (lo, hi))
    need = more_needed(champion, challenger, p)
    return Decision("wait", f"undecided: {rates}; about {need} more rated answers on the smaller arm", (lo, hi), need)


def fixed_horizon_n(p_a: float, p_b: float, alpha: float = 0.05, power: float = 0.8, ratio: float = 1.0) -> int:
    """Rated answers of arm b for a one-look two-sided two-proportion z-test of this power, with arm a
    getting `ratio` times as many (ratio = 4 for a 0.2 canary share). Pooled variance under the null."""
    from scipy.stats import norm

    za, zb = norm.ppf(1 - alpha / 2), norm.ppf(power)
    pbar = (ratio * p_a + p_b) / (ratio + 1)
    null_sd = math.sqrt(pbar * (1 - pbar) * (1 + 1 / ratio))
    alt_sd = math.sqrt(p_b * (1 - p_b) + p_a * (1 - p_a) / ratio)
    return math.ceil(((za * null_sd + zb * alt_sd) / (p_a - p_b)) ** 2)


def simulate(p_champion: float, p_challenger: float, n_experiments: int, batch: int, share: float,
             policy: Policy, seed: int = 0) -> dict[str, np.ndarray]:
    """Continuous monitoring of many canaries at once: after every batch of `batch` rated answers (split
    by `share`, the challenger's part), the primary rule of `decide` is applied until every canary has
    decided or reached max_rated. Returns per experiment the action (1 promote, -1 rollback), the
    rated answers per arm when it was taken, `as_better` (promoted because the interval was above 0,
    not by non-inferiority at max_rated) and `worse` (rolled back because it was below 0).
    Guardrails are not simulated (no guardrail signals). Canaries are run in chunks, and a chunk stops
    at the look where all its canaries have decided, so the memory stays at ~chunk x looks x 32 floats."""
    rng = np.random.default_rng(seed)
    per_b = max(1, round(batch * share))
    per_a = max(1, batch - per_b)
    looks = math.ceil(policy.max_rated / min(per_a, per_b))
    n_a, n_b = per_a * np.arange(1, looks + 1), per_b * np.arange(1, looks + 1)
    action = np.zeros(n_experiments, dtype=np.int8)
    first = np.full(n_experiments, looks - 1)
    chunk, span = max(1, 200_000 // looks), 50
    for s in range(0, n_experiments, chunk):
        e = min(n_experiments, s + chunk) - s
        ka = rng.binomial(per_a, p_champion, size=(e, looks)).cumsum(axis=1)
        kb = rng.binomial(per_b, p_challenger, size=(e, looks)).cumsum(axis=1)
        open_ = np.ones(e, dtype=bool)
        for t0 in range(0, looks, span):  # look by look in spans: stop early once the chunk has decided
            t1 = min(looks, t0 + span)
            rows = np.nonzero(open_)[0]
            if rows.size == 0:
                break
            act = primary_action(ka[rows, t0:t1], n_a[t0:t1], kb[rows, t0:t1], n_b[t0:t1], policy)
            hit = act != 0
            got = hit.any(axis=1)
            at = hit.argmax(axis=1)
            r = rows[got]
            action[s + r] = act[got, at[got]]
            first[s + r] = t0 + at[got]
            open_[r] = False
    return {"action": np.sign(action), "rated_champion": n_a[first], "rated_challenger": n_b[first],
            "as_better": action == PROMOTE, "worse": action == ROLLBACK}
