"""The loop end to end on the tiny model: real server, simulated users, real broker, Airflow
`dags test` of feedback_ingest and preference_retrain (Spark dataset, DPO, eval, gate, promote),
and a second run of the same interval that changes nothing."""

from __future__ import annotations

import json

import pytest

from infra import demo
from training import registry

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_preference_retrain_end_to_end_and_rerun_changes_nothing(stack, tiny_model):
    cfg = demo.Config(
        base_model="tiny",
        dpo_config="training/configs/dpo.yaml",
        serving_config="serving/configs/serve.tiny.yaml",
        eval_overrides="--suite training/configs/evaluate.tiny.yaml",
        n_users=12,
        traffic_answers_per_prompt=2,
        measure_answers_per_prompt=1,
        max_tokens=48,
        adapter_wait_s=60,
    )
    report = demo.main(cfg)

    assert report["dataset_version"], report
    assert report["model_version"], "preference_retrain registered no model version"
    assert report["gate"]["lines"], "the gate decided nothing"
    assert isinstance(report["gate"]["passed"], bool)
    if report["gate"]["passed"]:
        assert report["champion_version"] == report["model_version"]
    for key in ("thumbs_up_rate_before", "thumbs_up_rate_after"):
        assert 0.0 <= report[key] <= 1.0
    assert report["traffic"]["counts"]["chats"] > 0 and report["traffic"]["errors"] == 0
    saved = json.loads((stack.var / "demo" / "report.json").read_text())
    assert saved["model_version"] == report["model_version"]

    versions_before = [r.version for r in registry.find_versions({})]
    aliases_before = registry.aliases()
    demo.airflow_dags_test("preference_retrain", demo.retrain_conf(cfg, report["window"]))
    assert [r.version for r in registry.find_versions({})] == versions_before
    assert registry.aliases() == aliases_before
