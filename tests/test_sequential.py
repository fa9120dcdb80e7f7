"""The live test's statistics: values worked out by hand, properties of the exact confidence sequence
(its e-value has mean <= 1 under every null, checked by enumerating all outcomes), the decision order and
edge cases, and the guarantee itself: thousands of continuously monitored canaries per base rate and
canary share, with a look after every 10 rated answers of the challenger."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from training import sequential as seq
from training.sequential import Arm, Policy, decide

UNIFORM = seq.BetaMixture(a=np.array([1.0]), b=np.array([1.0]))  # one centre, Beta(1, 1) on each arm


def test_e_value_by_hand_with_a_uniform_prior():
    """Champion 0 of 2 up, challenger 2 of 2. m = B(1, 3) / B(1, 1) * B(3, 1) / B(1, 1) = 1/3 * 1/3 = 1/9;
    the best common rate is 2/4 = 1/2 with likelihood (1/2)^4 = 1/16; E(0) = (1/9) / (1/16) = 16/9."""
    assert math.exp(float(seq.log_e_value(0, 2, 2, 2, 0.0, UNIFORM))) == pytest.approx(16 / 9, rel=1e-12)


def test_profile_e_value_by_hand_off_zero():
    """1 of 2 on each arm, null difference d0 = -0.5: maximise p(1 - p)(p - 1/2)(3/2 - p) over p_A = p in
    (1/2, 1); with u = p - 3/4 it is (9/16 - u^2)(1/16 - u^2), largest at u = 0: p_A = 3/4, p_B = 1/4,
    L = 3/4 * 1/4 * 1/4 * 3/4 = 9/256. m = (B(2, 2) / B(1, 1))^2 = (1/6)^2 = 1/36. E = (1/36) / (9/256) = 64/81."""
    assert math.exp(float(seq.log_e_value(1, 2, 1, 2, -0.5, UNIFORM))) == pytest.approx(64 / 81, rel=1e-9)
    assert float(seq.profile_log_likelihood(1, 2, 1, 2, -0.5)) == pytest.approx(math.log(9 / 256), rel=1e-9)


def test_one_arm_interval_by_hand():
    """10 of 10 up, uniform prior: m = B(11, 1) = 1/11, L(p) = p^10; the sequence keeps p while
    p^10 > alpha / 11, so it is [(0.05 / 11)^(1/10), 1] = [0.583120, 1]."""
    low, high = seq._exact_rate_interval(10, 10, 0.05, UNIFORM)
    assert low == pytest.approx((0.05 / 11) ** 0.1, abs=1e-9) and high == 1.0


def test_default_prior_has_the_mixing_sd_at_one_half():
    """tau = 0.1: kappa = 1 / (2 * 0.01) - 1 = 49; with centre c each arm's rate is Beta(49c, 49(1 - c)),
    variance c (1 - c) / 50, so p_B - p_A has variance 2 c (1 - c) / 50 = 0.01 = tau^2 at c = 1/2."""
    prior = seq.beta_mixture(0.1)
    assert np.allclose(prior.a + prior.b, 49.0)
    c = prior.a / 49.0
    assert np.all((c > 0) & (c < 1)) and np.allclose(np.sort(c), c) and np.allclose(c, 1 - c[::-1])
    a, b = prior.a, prior.b
    var_diff = 2 * a * b / ((a + b) ** 2 * (a + b + 1))  # two independent Beta(a, b) rates
    assert np.allclose(np.sqrt(var_diff), 0.1 * 2 * np.sqrt(c * (1 - c)))  # = tau at c = 1/2


def test_normal_method_half_width_and_interval_by_hand():
    """V = 0.01, tau = 0.1, alpha = 0.05: V (V + tau^2) / tau^2 = 0.02; 2 log 20 = 5.99146; log 2 = 0.69315;
    sqrt(0.02 * 6.68461) = 0.365640. Champion 50/100, challenger 80/100, shrunk rates 0.5 and 81/102:
    V = 0.0041349, half-width 0.205434, d = 0.3 -> [0.094566, 0.505434]."""
    assert float(seq.half_width(0.01, 0.05, 0.1)) == pytest.approx(0.365640, abs=1e-6)
    d = decide(Arm(100, 50), Arm(100, 80), Policy(method="normal"))
    assert d.action == "promote" and d.interval == pytest.approx((0.094566, 0.505434), abs=1e-5)


def test_fixed_horizon_n_by_hand():
    """0.70 vs 0.80, alpha 0.05 two-sided, power 0.8: z 1.959964 and 0.841621, pbar 0.75;
    (1.959964 sqrt(0.375) + 0.841621 sqrt(0.21 + 0.16))^2 / 0.01 = 293.0 -> 294.
    With 4 champion answers per challenger answer: pbar = (4 * 0.7 + 0.8) / 5 = 0.72, null sd
    sqrt(0.72 * 0.28 * 1.25) = 0.501996, alternative sd sqrt(0.16 + 0.21 / 4) = 0.460977;
    ((0.983894 + 0.387967) / 0.1)^2 = 188.2 -> 189 challenger answers (756 champion)."""
    assert seq.fixed_horizon_n(0.7, 0.8) == 294
    assert seq.fixed_horizon_n(0.7, 0.8, ratio=4) == 189


# --- properties -----------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.integers(0, 24), st.integers(0, 24), st.floats(0.001, 0.999), st.floats(-0.6, 0.6))
def test_e_value_has_mean_at_most_one_under_every_null(n_a, n_b, p_a, d):
    """Every outcome of n_a and n_b answers enumerated: E_{p_A, p_A + d}[E(d)] <= 1 for any rates, arm
    sizes and null difference (including rates near 0 and 1), the property Ville's inequality needs."""
    p_b = p_a + d
    if not 0 < p_b < 1:
        return
    k_a, k_b = np.meshgrid(np.arange(n_a + 1), np.arange(n_b + 1), indexing="ij")
    weight = binom.pmf(k_a, n_a, p_a) * binom.pmf(k_b, n_b, p_b)
    e = np.exp(seq.log_e_value(k_a, np.full_like(k_a, n_a), k_b, np.full_like(k_b, n_b), d))
    assert float((weight * e).sum()) <= 1 + 1e-9


counts = st.integers(min_value=0, max_value=3000)


@settings(max_examples=60, deadline=None)
@given(counts, counts, counts, counts)
def test_interval_is_ordered_bounded_antisymmetric_and_agrees_with_the_decision(ka, na, kb, nb):
    ka, kb = min(ka, na), min(kb, nb)
    lo, hi = seq.difference_interval(ka, na, kb, nb)
    assert -1.0 <= lo <= hi <= 1.0
    if na and nb:
        assert lo <= kb / nb - ka / na <= hi
    rlo, rhi = seq.difference_interval(kb, nb, ka, na)
    assert (rlo, rhi) == pytest.approx((-hi, -lo), abs=1e-7)
    wider = seq.difference_interval(ka, na, kb, nb, alpha=0.01)
    assert wider[0] <= lo + 1e-9 and hi <= wider[1] + 1e-9
    # decide() tests with e-values, the interval is found by root finding: they must agree
    policy = Policy(min_rated=1, max_rated=10**6)
    action = int(seq.primary_action(ka, na, kb, nb, policy))
    if min(na, nb) >= 1:
        if lo > 1e-6:
            assert action == seq.PROMOTE
        if hi < -1e-6:
            assert action == seq.ROLLBACK
        if lo < -1e-6 and hi > 1e-6:
            assert action == seq.WAIT


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_swapping_the_arms_swaps_promote_and_rollback(na, nb, ra, rb):
    champion, challenger = Arm(na, round(ra * na)), Arm(nb, round(rb * nb))
    policy = Policy(min_rated=1, noninferiority_margin=None)
    forward, backward = decide(champion, challenger, policy).action, decide(challenger, champion, policy).action
    flip = {"promote": "rollback", "rollback": "promote", "wait": "wait"}
    assert backward == flip[forward] or (forward == backward == "rollback" and min(na, nb) >= policy.max_rated)


# --- decisions and edge cases ---------------------------------------------------------------------

def test_clear_winner_and_its_mirror_image():
    d = decide(Arm(100, 50), Arm(100, 80))
    assert d.action == "promote" and d.reason.startswith("better:") and 0 < d.interval[0] < 0.3 < d.interval[1]
    m = decide(Arm(100, 80), Arm(100, 50))
    assert m.action == "rollback" and m.reason.startswith("worse:")
    assert m.interval == pytest.approx((-d.interval[1], -d.interval[0]), abs=1e-7)


def test_zero_counts_and_thin_evidence_wait_with_how_many_more():
    """No rated answers: the interval is everything and the wait is min_rated. 0% vs 100% is decisive
    but waits below min_rated = 30 (one more answer each decides it); 60% vs 65% at 40 is far off."""
    d = decide(Arm(0, 0), Arm(0, 0))
    assert d.action == "wait" and d.interval == (-1.0, 1.0) and d.more_needed == 30
    assert decide(Arm(29, 0), Arm(29, 29)).more_needed == 1
    assert decide(Arm(30, 0), Arm(30, 30)).action == "promote"
    d = decide(Arm(40, 24), Arm(40, 26))
    assert d.action == "wait" and 100 < d.more_needed <= Policy().max_rated and d.interval[0] < 0 < d.interval[1]


def test_all_thumbs_up_on_both_arms_is_no_evidence_either_way():
    d = decide(Arm(500, 500), Arm(120, 120))
    assert d.action == "wait" and d.interval[0] < 0 < d.interval[1]
    assert d.interval[1] < 0.1  # but it does learn: both rates are near 1


def test_more_needed_is_enough_if_the_rates_hold():
    """Waiting the estimated number (+10%: counts are whole answers) at the observed rates and the same
    4:1 split does decide it; waiting half of it does not."""
    champion, challenger = Arm(240, 144), Arm(60, 45)  # 60% vs 75%
    need = decide(champion, challenger).more_needed
    n_b = 60 + math.ceil(1.1 * need)
    later = decide(Arm(4 * n_b, round(0.6 * 4 * n_b)), Arm(n_b, round(0.75 * n_b)))
    assert later.action == "promote", (need, later)
    n_b = 60 + need // 2
    assert decide(Arm(4 * n_b, round(0.6 * 4 * n_b)), Arm(n_b, round(0.75 * n_b))).action == "wait"


def test_guardrail_rolls_back_even_when_thumbs_are_better():
    """Thumbs better, but 40% of the challenger's answers are regenerated vs 5%: rollback."""
    champion = Arm(300, 150, answers=320, signals={"regenerate": 16})
    challenger = Arm(300, 210, answers=320, signals={"regenerate": 128})
    d = decide(champion, challenger)
    assert d.action == "rollback" and d.reason.startswith("guardrail regenerate:")
    assert decide(champion, challenger, Policy(guardrails=[])).action == "promote"
    assert decide(champion, challenger, Policy(guardrail_margin=0.4)).action == "promote"


def test_guardrail_at_a_low_rate_on_a_small_canary():
    """Abandon rates 1% vs 4% with the challenger on a fifth of the traffic: 200 answers is not yet
    enough, 2,000 is. A lower rate for the challenger never trips."""
    def arms(n_b: int, rate_b: float) -> tuple[Arm, Arm]:
        return (Arm(100, 60, answers=4 * n_b, signals={"abandon": round(0.01 * 4 * n_b)}),
                Arm(100, 60, answers=n_b, signals={"abandon": round(rate_b * n_b)}))
    assert seq.guardrail_breach(*arms(200, 0.04), Policy()) is None
    assert "abandon" in seq.guardrail_breach(*arms(2000, 0.04), Policy())
    assert seq.guardrail_breach(*arms(20000, 0.0), Policy()) is None


def test_max_sample_decides_by_non_inferiority():
    """At 4000 rated per arm, 60.0% vs 60.25%: not shown better (about [-0.046, +0.051]) but within the
    5-point margin -> promote; 54% vs 60% is not even non-inferior -> rollback; no margin -> rollback."""
    d = decide(Arm(4000, 2400), Arm(4000, 2410))
    assert d.action == "promote" and d.reason.startswith("non-inferior")
    assert decide(Arm(4000, 2400), Arm(4000, 2160)).action == "rollback"
    assert decide(Arm(4000, 2400), Arm(4000, 2410), Policy(noninferiority_margin=None)).action == "rollback"


def test_bad_inputs_are_refused_where_they_are_made():
    with pytest.raises(ValueError, match="thumbs_up"):
        Arm(10, 11)
    with pytest.raises(ValueError, match="answers"):
        Arm(10, 5, answers=3, signals={"edit": 4})
    with pytest.raises(ValueError, match="method"):
        Policy(method="bayes")
    with pytest.raises(ValueError, match="mixture_sd"):
        Policy(mixture_sd=0.8)
    with pytest.raises(ValueError, match="max_rated"):
        Policy(min_rated=50, max_rated=10)


# --- the guarantee, by simulation -----------------------------------------------------------------

LOOK = 10  # rated answers of the challenger between looks; the champion gets (1 - share) / share times more
SIM = 2000


def _batch(share: float) -> int:
    return round(LOOK / share)


@pytest.mark.parametrize("base", [0.05, 0.2, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("share", [0.5, 0.2])
def test_no_difference_is_rarely_declared_better_or_worse_however_often_one_looks(base, share):
    """2,000 canaries with equal arms, a look after every 10 challenger answers up to 2,000 per arm
    (200 looks): declared better, and declared worse, each (and together) at most alpha, at every base
    rate and canary share. A challenger truly worse by the margin is promoted (as better or non-inferior)
    at most alpha. (The exact sequence is conservative: expect well under alpha.)"""
    policy = Policy(max_rated=2000)
    r = seq.simulate(base, base, SIM, _batch(share), share, policy, seed=11)
    assert r["as_better"].mean() + r["worse"].mean() <= policy.alpha, (r["as_better"].mean(), r["worse"].mean())
    if base - policy.noninferiority_margin > 0:
        worse = seq.simulate(base, base - policy.noninferiority_margin, SIM, _batch(share), share, policy, seed=12)
        assert (worse["action"] == 1).mean() <= policy.alpha


def test_naive_repeated_z_test_would_fail_the_same_check():
    """The control: with equal arms at 0.5 and the same looks, 'z > 1.96 at any look' fires far more than 5%."""
    rng = np.random.default_rng(0)
    looks = 200
    ka = rng.binomial(LOOK, 0.5, size=(SIM, looks)).cumsum(axis=1)
    kb = rng.binomial(LOOK, 0.5, size=(SIM, looks)).cumsum(axis=1)
    n = LOOK * np.arange(1, looks + 1)
    pool = (ka + kb) / (2 * n)
    z = (kb / n - ka / n) / np.sqrt(pool * (1 - pool) * 2 / n)
    assert (z > 1.96).any(axis=1).mean() > 0.10


@pytest.mark.parametrize("share", [0.5, 0.2])
def test_ten_point_gain_is_found_sooner_than_a_fixed_horizon_test_of_the_same_power(share):
    """+10 points (70% -> 80%): promoted as better in >= 95% of 2,000 canaries, with a median challenger
    sample below the one-look z-test's n at the same power (and same split). The price of looking
    at will with an exact guarantee: under 2.3x the z-test's n at 80% power (294 per arm at 50/50)."""
    policy = Policy()
    r = seq.simulate(0.7, 0.8, SIM, _batch(share), share, policy, seed=13)
    power = float(r["as_better"].mean())
    median = float(np.median(r["rated_challenger"][r["as_better"]]))
    ratio = (1 - share) / share
    same_power = seq.fixed_horizon_n(0.7, 0.8, power=min(power, 1 - 1 / (2 * SIM)), ratio=ratio)
    assert power >= 0.95 and median < same_power, (power, median, same_power)
    assert median <= 2.3 * seq.fixed_horizon_n(0.7, 0.8, ratio=ratio), median


def test_rate_intervals_for_plots_hold_each_estimate_and_narrow_with_data():
    """75% on the champion, 80% on a challenger with a quarter of its answers, at 50 and 800 challenger answers."""
    widths = []
    for n in (50, 800):
        ri = seq.rate_intervals(Arm(4 * n, 3 * n), Arm(n, round(0.8 * n)))
        for est, lo, hi in ri.values():
            assert lo <= est <= hi
        assert ri["difference"][1:] == pytest.approx(seq.difference_interval(3 * n, 4 * n, round(0.8 * n), n))
        widths.append({k: hi - lo for k, (_, lo, hi) in ri.items()})
    assert all(widths[1][k] < widths[0][k] for k in widths[0])
    assert seq.rate_intervals(Arm(0, 0), Arm(10, 10))["champion"][1:] == (0.0, 1.0)
