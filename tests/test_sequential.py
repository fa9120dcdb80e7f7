"""The live test's statistics: hand-worked values, the decision order, and the guarantee itself,
checked by simulating thousands of continuously monitored canaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from training import sequential as seq
from training.sequential import Arm, Policy, decide


def test_half_width_by_hand():
    """V = 0.01, tau = 0.1, alpha = 0.05: V (V + tau^2) / tau^2 = 0.02; 2 log 20 = 5.99146;
    log((V + tau^2) / V) = log 2 = 0.69315; sqrt(0.02 * 6.68461) = 0.365640."""
    assert float(seq.half_width(0.01, 0.05, 0.1)) == pytest.approx(0.365640, abs=1e-6)


def test_clear_winner_by_hand():
    """Champion 50/100 up, challenger 80/100. Shrunk rates 51/102 = 0.5 and 81/102 = 0.794118;
    V = 0.25/100 + 0.794118 * 0.205882/100 = 0.0041349; V (V + 0.01) / 0.01 = 0.0058447;
    log((V + 0.01)/V) = 1.22921; half-width sqrt(0.0058447 * (5.99146 + 1.22921)) = 0.205434;
    d = 0.3 -> [0.094566, 0.505434]: above 0, promote."""
    d = decide(Arm(100, 50), Arm(100, 80))
    assert d.action == "promote" and d.reason.startswith("better:")
    assert d.interval == pytest.approx((0.094566, 0.505434), abs=1e-5)


def test_mirror_image_rolls_back():
    d = decide(Arm(100, 80), Arm(100, 50))
    assert d.action == "rollback" and d.reason.startswith("worse:")
    assert d.interval == pytest.approx((-0.505434, -0.094566), abs=1e-5)


def test_no_decision_before_min_rated_and_wait_says_how_many_more():
    """29 rated per arm at 0% vs 100% would be decisive, but under min_rated = 30 it waits."""
    d = decide(Arm(29, 0), Arm(29, 29))
    assert d.action == "wait" and d.more_needed == 1
    d = decide(Arm(40, 24), Arm(40, 26))  # 60% vs 65%: far from decided
    assert d.action == "wait" and 100 < d.more_needed <= Policy().max_rated
    assert d.interval[0] < 0 < d.interval[1]


def test_more_needed_is_enough_if_the_rates_hold():
    """Waiting the estimated number of answers at the observed rates does decide it."""
    champion, challenger = Arm(60, 36), Arm(60, 45)  # 60% vs 75%
    need = decide(champion, challenger).more_needed
    later = decide(Arm(60 + need, round(0.6 * (60 + need))), Arm(60 + need, round(0.75 * (60 + need))))
    assert later.action == "promote", (need, later)


def test_guardrail_rolls_back_even_when_thumbs_are_better():
    """Challenger's thumbs are better, but 40% of its answers are regenerated vs 5%: rollback."""
    champion = Arm(200, 100, answers=220, signals={"regenerate": 11})
    challenger = Arm(200, 140, answers=220, signals={"regenerate": 88})
    d = decide(champion, challenger)
    assert d.action == "rollback" and d.reason.startswith("guardrail regenerate:")
    assert decide(champion, challenger, Policy(guardrails=[])).action == "promote"


def test_max_sample_decides_by_non_inferiority():
    """At 2000 rated per arm, 60.0% vs 60.5%: not shown better (interval about [-0.044, +0.054]), but
    within the 5-point margin -> promote; 52% vs 60% is not even non-inferior -> rollback."""
    d = decide(Arm(2000, 1200), Arm(2000, 1210))
    assert d.action == "promote" and d.reason.startswith("non-inferior")
    d = decide(Arm(2000, 1200), Arm(2000, 1040))
    assert d.action == "rollback"
    assert decide(Arm(2000, 1200), Arm(2000, 1210), Policy(noninferiority_margin=None)).action == "rollback"


def test_fixed_horizon_n_by_hand():
    """0.70 vs 0.80, alpha 0.05 two-sided, power 0.8: z 1.95996 and 0.84162, pbar 0.75;
    (1.95996 sqrt(0.375) + 0.84162 sqrt(0.21 + 0.16))^2 / 0.01 = 293.0 -> 294 (the next integer)."""
    assert seq.fixed_horizon_n(0.7, 0.8) == 294


counts = st.integers(min_value=0, max_value=5000)


@given(counts, counts, counts, counts)
def test_interval_is_ordered_bounded_and_antisymmetric(ka, na, kb, nb):
    ka, kb = min(ka, na), min(kb, nb)
    lo, hi = (float(x) for x in seq.difference_interval(ka, na, kb, nb))
    assert -1.0 <= lo <= hi <= 1.0
    if na and nb:
        assert lo <= kb / nb - ka / na <= hi
    rlo, rhi = (float(x) for x in seq.difference_interval(kb, nb, ka, na))
    assert (rlo, rhi) == pytest.approx((-hi, -lo), abs=1e-12)


@pytest.mark.parametrize("base", [0.05, 0.2, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("share", [0.5, 0.2])
def test_no_difference_is_rarely_promoted_as_better_however_often_one_looks(base, share):
    """2,000 canaries with equal arms, a look after every 50 rated answers (up to 2,000 per arm): the share
    declared better stays below alpha, at every base rate and canary share. A naive z-test checked at every
    look would exceed it several times over."""
    policy = Policy()
    r = seq.simulate(base, base, 2000, 50, share, policy, seed=11)
    assert r["as_better"].mean() <= policy.alpha, r["as_better"].mean()
    # and a challenger truly worse by the margin is promoted (as better or non-inferior) at most alpha
    worse = seq.simulate(base, base - policy.noninferiority_margin, 2000, 50, share, policy, seed=12)
    assert (worse["action"] == 1).mean() <= policy.alpha


def test_naive_repeated_z_test_would_fail_the_same_check():
    """The control: with equal arms at 0.5 and the same looks, 'z > 1.96 at any look' fires far more than 5%."""
    rng = np.random.default_rng(0)
    looks = 80
    ka = rng.binomial(25, 0.5, size=(2000, looks)).cumsum(axis=1)
    kb = rng.binomial(25, 0.5, size=(2000, looks)).cumsum(axis=1)
    n = 25 * np.arange(1, looks + 1)
    pa, pb = ka / n, kb / n
    pool = (ka + kb) / (2 * n)
    z = (pb - pa) / np.sqrt(pool * (1 - pool) * 2 / n)
    assert (z > 1.96).any(axis=1).mean() > 0.10


def test_ten_point_gain_is_found_about_as_fast_as_a_fixed_horizon_test():
    """+10 points (70% -> 80%) at a 50/50 split: the sequential test promotes nearly always, with a median
    sample per arm within 1.5x the one-look z-test's n at 80% power (294 per arm)."""
    r = seq.simulate(0.7, 0.8, 2000, 50, 0.5, Policy(), seed=13)
    power = (r["action"] == 1).mean()
    median = float(np.median(r["rated_challenger"][r["action"] == 1]))
    assert power >= 0.95 and median <= 1.5 * seq.fixed_horizon_n(0.7, 0.8), (power, median)
    assert math.isfinite(median)
