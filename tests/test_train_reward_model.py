"""Reward model: Bradley-Terry on the tiny policy backbone (held-out accuracy rises, registered as
flywheel-reward, scored back through load_scorer), and the MiniLM backbone's sentence-pair path."""

from __future__ import annotations

import json
from pathlib import Path

from ingest import endpoints
from ingest.config import load_config
from training import registry

REPO = Path(__file__).resolve().parent.parent


def test_reward_model_policy_backbone_learns_and_scores(stack, tiny_model: str, tmp_path: Path) -> None:  # noqa: ANN001
    from training import reward_model
    from training.synthetic import write_dataset

    write_dataset(endpoints.var_dir() / "datasets", "ds-test-rm1", n_train=48, n_eval=16, seed=4, kinds=("dpo",))
    cfg = load_config(reward_model.Config, REPO / "training" / "configs" / "reward_model.policy.yaml",
                      ["dataset_version=ds-test-rm1", f"output_dir={tmp_path / 'rm'}", "registry_model=flywheel-reward",
                       "precision=fp32", "learning_rate=1e-3"])
    result = reward_model.main(cfg)
    m = result["metrics"]
    assert m["heldout_accuracy"] >= 0.9 and m["heldout_accuracy"] > m["heldout_before_accuracy"], m
    assert result["champion"] and registry.aliases("flywheel-reward")["champion"] == result["model_version"]
    assert registry.read_sidecar(result["model_dir"])["input_format"] == "chat"

    # The evaluation engineer's entry point: a registry URI -> a scoring function.
    score = reward_model.load_scorer("models:/flywheel-reward@champion", cache=tmp_path / "cache")
    prompt = [{"role": "user", "content": "Any tips for trains?"}]
    good = "Here are some tips for trains:\n- Read the manual first.\n- Take breaks often."
    bad = "With trains, read the manual first, and take breaks often."
    s_good, s_bad = score([prompt, prompt], [good, bad])
    assert s_good > s_bad
    # Scores do not depend on batch composition (padding is masked).
    assert abs(score([prompt], [bad])[0] - s_bad) < 1e-4

    # Its held-out accuracy travels with it (sidecar, registry tags) with a 95% Wilson interval over the
    # 16 eval pairs; as the evaluation's judge it reports that accuracy for the gate to weigh.
    assert m["heldout_pairs"] == 16
    assert m["heldout_accuracy_ci_low"] < m["heldout_accuracy"] <= m["heldout_accuracy_ci_high"] <= 1.0
    from training import evaluate, judges

    judge = judges.make_judge(f"rm:models:/flywheel-reward/{result['model_version']}")
    assert judge.version == result["model_version"]
    got = evaluate.judge_metrics(judge)
    assert got["judge_accuracy"] == m["heldout_accuracy"] and got["judge_pairs"] == 16
    assert got["judge_accuracy_ci_low"] == m["heldout_accuracy_ci_low"]
    # A PPO candidate trained against this very version may not be graded by it.
    import pytest

    with pytest.raises(SystemExit, match="was trained against"):
        evaluate.refuse_own_judge(judge, {"trainer": "ppo", "reward_model_version": result["model_version"]})
    evaluate.refuse_own_judge(judge, {"trainer": "ppo", "reward_model_version": "999"})  # another RM: fine


def test_reward_model_minilm_pair_format(stack, tmp_path: Path) -> None:  # noqa: ANN001
    from training import reward_model
    from training.synthetic import write_dataset

    write_dataset(endpoints.var_dir() / "datasets", "ds-test-rm2", n_train=16, n_eval=8, seed=6, kinds=("dpo",))
    cfg = load_config(reward_model.Config, REPO / "training" / "configs" / "reward_model.yaml",
                      ["dataset_version=ds-test-rm2", f"output_dir={tmp_path / 'rm'}", "max_steps=2",
                       "batch_size=8", "registry_model=flywheel-test-rm-minilm", "threads=1"])
    result = reward_model.main(cfg)
    sidecar = json.loads((Path(result["model_dir"]) / registry.SIDECAR).read_text())
    assert sidecar["input_format"] == "pair" and sidecar["trainer"] == "reward_model"
    assert registry.aliases("flywheel-test-rm-minilm")["candidate"] == result["model_version"]
    scores = reward_model.load_scorer(result["model_dir"])([[{"role": "user", "content": "hi"}]] * 2, ["a", "b"])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)


def test_reward_model_configs_load() -> None:
    from training.reward_model import Config

    for path in sorted((REPO / "training" / "configs").glob("reward_model*.yaml")):
        assert path.read_text().startswith("# python -m training.reward_model"), path
        load_config(Config, path)
