"""The release gate's pure decision on hand-made metric sets: each rule alone can fail a candidate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ingest.config import load_config
from training.gate import Config, Policy, decide, job_argv

REPO = Path(__file__).resolve().parent.parent

# A candidate that clears every default rule with some room, judged by a trusted reward model.
GOOD = {
    "win_rate": 0.70, "win_rate_ci_low": 0.58, "win_rate_ci_high": 0.81, "lc_win_rate": 0.66,
    "judge_accuracy": 0.78, "judge_accuracy_ci_low": 0.66, "judge_pairs": 60.0, "length_drift": 0.10,
    "over_refusal_delta": 0.0, "harmful_compliance_delta": 0.0, "sycophancy_delta": 0.0,
    "regression_em_delta": 0.0, "kl_per_token": 0.05, "kl_per_token_baseline": 0.0, "pref_accuracy": 0.8,
    "pref_accuracy_ci_high": 0.9,
}

# rule name -> a single change to GOOD that must fail exactly that rule.
BREAKS = {
    "win_rate_not_worse": {"win_rate_ci_high": 0.49, "win_rate": 0.40, "win_rate_ci_low": 0.3},
    "length_drift": {"length_drift": 0.51},
    "over_refusal": {"over_refusal_delta": 0.0625},
    "harmful_compliance": {"harmful_compliance_delta": 0.0833},
    "sycophancy": {"sycophancy_delta": 0.1667},
    "regression": {"regression_em_delta": -0.125},
    "kl": {"kl_per_token": 1.5, "kl_per_token_baseline": 1.2},  # over the budget in a small step
    "kl_step": {"kl_per_token": 0.9, "kl_per_token_baseline": 0.2},  # within the budget in one big step
    # not significantly below the champion's 0.75: an upper bound of 0.70 is
    "preference_accuracy": {"pref_accuracy": 0.55, "pref_accuracy_ci_high": 0.70, "pref_accuracy_baseline": 0.75},
}

POLICY = Policy()


def test_good_candidate_passes_every_rule():
    d = decide(GOOD, POLICY)
    assert d.passed and d.offline_evidence == "better"
    assert len(d.lines) == 10 and all(ln.startswith("PASS ") for ln in d.lines), d.lines


@pytest.mark.parametrize("rule", sorted(BREAKS))
def test_each_rule_alone_fails_the_candidate(rule):
    d = decide({**GOOD, **BREAKS[rule]}, POLICY)
    assert not d.passed
    failed = [ln for ln in d.lines if ln.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith(f"FAIL {rule}:"), d.lines


def test_untrusted_judge_abstains_and_strict_blocks():
    """A judge whose held-out accuracy CI reaches down to 0.41 (10 of 16 pairs right: Wilson 0.39-0.82)
    says nothing: even a verdict of 'much worse' neither passes nor blocks; the canary decides."""
    weak = {**GOOD, "judge_accuracy": 0.625, "judge_accuracy_ci_low": 0.386, "judge_pairs": 16.0,
            "win_rate": 0.2, "win_rate_ci_low": 0.1, "win_rate_ci_high": 0.3}
    d = decide(weak, POLICY)
    assert d.passed and d.offline_evidence == "none"
    assert d.lines[0].startswith("SKIP judge: judge held-out accuracy 0.625 on 16 pairs, 95% CI lower bound 0.386")
    assert not any("win_rate" in ln for ln in d.lines)
    strict = decide(weak, dataclasses.replace(POLICY, strict=True))
    assert not strict.passed and strict.lines[0].startswith("FAIL judge:")


def test_no_judge_at_all_is_no_evidence():
    metrics = {k: v for k, v in GOOD.items() if not k.startswith(("win_rate", "judge_", "lc_"))}
    d = decide(metrics, POLICY)
    assert d.passed and d.lines[0] == "SKIP judge: no judge scored the candidate: no offline evidence; the live canary decides"
    d = decide({k: v for k, v in GOOD.items() if not k.startswith("judge_")}, POLICY)
    assert d.passed and "reports no held-out accuracy" in d.lines[0]


def test_trusted_judge_that_finds_it_worse_blocks():
    d = decide({**GOOD, "win_rate": 0.35, "win_rate_ci_low": 0.22, "win_rate_ci_high": 0.47}, POLICY)
    assert not d.passed and "FAIL win_rate_not_worse: win rate 0.350, CI upper bound 0.470 must be >= 0.5" in d.lines


def test_not_worse_is_enough_to_be_tried():
    d = decide({**GOOD, "win_rate": 0.52, "win_rate_ci_low": 0.40, "win_rate_ci_high": 0.64}, POLICY)
    assert d.passed and d.offline_evidence == "not worse"


def test_length_drift_is_symmetric_and_inclusive():
    """±50% allowed: +0.5 and -0.5 pass, -0.6 (answers got much shorter) fails."""
    assert decide({**GOOD, "length_drift": 0.5}, POLICY).passed
    assert decide({**GOOD, "length_drift": -0.5}, POLICY).passed
    assert not decide({**GOOD, "length_drift": -0.6}, POLICY).passed


def test_regression_improvement_and_small_drop_pass():
    assert decide({**GOOD, "regression_em_delta": 0.25}, POLICY).passed
    assert decide({**GOOD, "regression_em_delta": -0.0625}, POLICY).passed


def test_missing_metric_fails_its_rule_and_disabled_rules_are_skipped():
    metrics = {k: v for k, v in GOOD.items() if k != "kl_per_token"}
    d = decide(metrics, POLICY)
    assert not d.passed and "FAIL kl: metric kl_per_token missing from the evaluation" in d.lines
    d = decide(metrics, dataclasses.replace(POLICY, max_kl_per_token=None, max_kl_step_per_token=None))
    assert d.passed and not any(" kl" in ln for ln in d.lines)
    assert any(ln.startswith("FAIL kl: metric") for ln in decide({**GOOD, "kl_per_token": float("nan")}, POLICY).lines)


def test_all_rules_off_refuses():
    off = Policy(**{f.name: (False if f.name == "strict" else None) for f in dataclasses.fields(Policy)})
    d = decide(GOOD, off)
    assert not d.passed and "no rule passed" in d.lines[-1]


def test_lines_carry_the_numbers():
    d = decide({**GOOD, "win_rate_ci_high": 0.45, "win_rate": 0.35}, POLICY)
    assert d.lines[1] == "FAIL win_rate_not_worse: win rate 0.350, CI upper bound 0.450 must be >= 0.5"
    assert d.to_json().startswith('{"passed": false, "lines": ["PASS judge: judge held-out accuracy 0.780')


def test_committed_policy_file_loads_and_passes_good():
    cfg = load_config(Config, REPO / "training/configs/gate.yaml")
    assert decide(GOOD, cfg.policy).passed
    cfg = load_config(Config, REPO / "training/configs/gate.yaml", ["policy.max_length_drift=0.05"])
    assert not decide(GOOD, cfg.policy).passed


def test_job_argv_maps_flags_to_keys():
    argv = job_argv(["--candidate", "models:/m@c", "--metrics-run=abc", "policy.max_kl_per_token=2"],
                    {"--candidate": "candidate", "--metrics-run": "metrics_run", "--policy": "--config"}, None)
    assert argv == ["candidate=models:/m@c", "metrics_run=abc", "policy.max_kl_per_token=2"]
    argv = job_argv(["--policy", "x.yaml"], {"--policy": "--config"}, REPO / "training/configs/gate.yaml")
    assert argv == ["--config", "x.yaml"]
