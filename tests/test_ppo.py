"""PPO job on the tiny model against a reward that prefers bullet lists (a rule stands in for the reward
model so the test is fast and the target property is unambiguous; the reward-model path is covered in
test_train_reward_model.py)."""

from __future__ import annotations

from pathlib import Path

from ingest import endpoints
from ingest.config import load_config
from training import registry

REPO = Path(__file__).resolve().parent.parent


def test_ppo_raises_reward_within_kl_budget(stack, tiny_model: str, tmp_path: Path) -> None:  # noqa: ANN001
    from training import ppo
    from training.synthetic import write_dataset

    write_dataset(endpoints.var_dir() / "datasets", "ds-test-ppo1", n_train=32, n_eval=8, seed=5, kinds=("dpo",))
    cfg = load_config(ppo.Config, REPO / "training" / "configs" / "ppo.yaml",
                      ["dataset_version=ds-test-ppo1", "reward_model=rule:bullets", f"output_dir={tmp_path / 'ppo'}",
                       "registry_model=flywheel-test-ppo"])
    result = ppo.main(cfg)
    m = result["metrics"]
    # The tiny model writes lists ~25% of the time; PPO should make it most of the time.
    assert m["reward_last"] > m["reward_first"] + 0.3, m
    assert m["kl_last"] <= cfg.kl_budget and m["kl_within_budget"] == 1.0, m
    assert m["value_loss_last"] < 0.2

    run = registry.client().get_run(result["run_id"])
    for key in ("reward_mean", "kl", "kl_coef", "value_loss", "policy_loss", "tokens_per_s"):
        history = registry.client().get_metric_history(result["run_id"], key)
        assert len(history) == cfg.iterations, key
    assert run.data.tags["trainer"] == "ppo"
    assert "plots/ppo_curves.png" in [a.path for a in registry.client().list_artifacts(result["run_id"], "plots")]
    assert registry.aliases("flywheel-test-ppo")["candidate"] == result["model_version"]
    assert registry.read_sidecar(result["adapter_dir"])["trainer"] == "ppo"
    # A DAG retry of the finished run changes nothing: same version, nothing trained or registered again.
    assert ppo.main(cfg)["model_version"] == result["model_version"]
    assert [r.version for r in registry.find_versions({}, name="flywheel-test-ppo")] == [result["model_version"]]


def test_ppo_configs_load() -> None:
    from training.ppo import Config

    for path in sorted((REPO / "training" / "configs").glob("ppo*.yaml")):
        assert path.read_text().startswith("# python -m training.ppo"), path
        load_config(Config, path)
