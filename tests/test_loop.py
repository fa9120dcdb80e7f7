"""The loop end to end on the tiny model: real server, simulated users, real broker, and the Airflow
scheduler running feedback_ingest, preference_retrain (Spark dataset, DPO, reward model, eval, gate,
canary) and rollout, each triggered through the REST API as an operator would; then, by `airflow dags
test`, a second run of the same interval that changes nothing, and a run on a version with too few
pairs, which trains KTO instead and is judged by nothing offline."""

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
        canary_round_chats=40,
        max_canary_rounds=2,
        runner="scheduler",
        # The tiny random-weight model drifts 0.7-1.4 nats/token from its base in one update: the KL
        # budgets (per cycle and in all) would reject many candidates, and this test is about the canary
        # path too. The KL rules have their own tests (tests/test_gate.py).
        gate_overrides="policy.max_kl_step_per_token=null policy.max_kl_per_token=null",
    )
    report = demo.main(cfg)

    runs = report["dag_runs"]
    retrain = [r for r in runs if r["dag_id"] == "preference_retrain"]
    assert len(retrain) == 1 and retrain[0]["runner"] == "scheduler" and retrain[0]["run_id"], runs
    assert retrain[0]["tasks"]["gate"] == "success" and retrain[0]["tasks"]["train_dpo"] == "success", retrain
    assert {r["dag_id"] for r in runs} == {"feedback_ingest", "preference_retrain", "rollout"}, runs

    assert report["dataset_version"], report
    assert report["model_version"], "preference_retrain registered no model version"
    assert report["gate"]["lines"], "the gate decided nothing"
    assert report["judge"]["judge"].startswith("rm:models:/flywheel-reward/"), report["judge"]
    canary = report["canary"]
    if not report["gate"]["passed"]:  # rejected: its lines say why, and nothing was tried
        assert any(ln.startswith("FAIL") for ln in report["gate"]["lines"]) and not canary["started"]
        assert report["champion_version"] is None
    else:  # tried on live users: the rollout looked after every round, and acted on what it saw
        assert canary["started"] and canary["rounds"], canary
        assert all(r["action"] in ("promote", "rollback", "wait") for r in canary["rounds"]), canary
        assert sum(r["challenger_rated"] or 0 for r in canary["rounds"][-1:]) > 0, canary
        expected = {"promote": report["model_version"], "rollback": None, "wait": None}[canary["decision"]]
        assert report["champion_version"] == expected, (canary, report["aliases"])
        if canary["decision"] == "promote":  # the users' own rates, not the hidden preference, said better
            last = canary["rounds"][-1]
            assert last["challenger_thumbs_up_rate"] > last["champion_thumbs_up_rate"], last
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

    # The same events with the pairing rules off: a version with no pairs but the rated answers
    # unpaired. The DAG trains KTO instead of skipping, and with no pairs there is no reward model to
    # judge it, so the gate reports no offline evidence and leaves the decision to the canary.
    no_pairs = "pairing.w_edit=-10 pairing.w_regenerate=-10 pairing.max_thumb_pairs_per_prompt=0"
    conf = demo.retrain_conf(cfg, report["window"])
    demo.airflow_dags_test("preference_retrain", {**conf, "dataset_overrides": f"{conf['dataset_overrides']} {no_pairs}",
                                                  "kto_overrides": "max_steps=4"})
    kto = registry.find_versions({"trainer": "kto"})
    assert len(kto) == 1 and kto[0].version not in versions_before, kto
    tags = registry.client().get_model_version(registry.DEFAULT_MODEL_NAME, kto[0].version).tags
    assert tags["gate.offline_evidence"] == "none", tags
    assert "no offline evidence" in tags["gate.lines"], tags["gate.lines"]

