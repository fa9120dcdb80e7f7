"""
### preference_retrain — feedback of one data interval in, a better adapter out (or nothing)

`build_dataset` (Spark, content-addressed version of the interval's feedback) →
`enough_feedback` (skip cleanly when too little to train on) →
`lookup_candidate` (a re-run of the same interval reuses the adapter already trained on this
dataset version instead of training again) → `train_dpo` (LoRA DPO from the champion), and beside it
`train_reward_model` (a MiniLM reward model on the same version's *train* split: the judge) →
`evaluate` (candidate vs champion, judged by exactly that reward model, whose held-out accuracy on the
*eval* split says whether its verdict counts) → `gate` (the offline policy: safe and not worse) →
`gate_decision` → `start_canary` (the `challenger` alias with `canary_share` of the users) or
`rejected`. Nothing here promotes: the `rollout` DAG promotes or rolls back on the users' own feedback.

On a fresh deployment (no champion, no reward model) the same path runs: the baseline is the base
model and the judge is trained here.

Every task runs a project job as a process of `.venv` and is idempotent for its interval: the
dataset version derives from content, training is skipped when that version was trained already,
and promotion of the current champion is a no-op. Params override the window (`window_start`,
`window_end`), the base model and the config files, e.g.
`airflow dags test preference_retrain -c '{"base_model": "tiny", "dpo_config": "training/configs/dpo.yaml"}'`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

sys.path.insert(0, str(Path(__file__).parent))  # the shared helper next to this file, wherever it is mounted
from _flywheel import DEFAULT_ARGS, answer, build_dataset_command, job  # noqa: E402

MODEL = "flywheel-assistant"


@dag(
    dag_id="preference_retrain",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["flywheel", "training", "dpo"],
    doc_md=__doc__,
    params={
        "base_model": Param("smollm2", type="string", description="tiny | smollm2 | a model folder"),
        "dpo_config": Param("training/configs/dpo.smollm2.yaml", type="string"),
        "dpo_overrides": Param("", type="string", description="extra key=value overrides for training.dpo"),
        "reward_model_config": Param("training/configs/reward_model.yaml", type="string"),
        "reward_model_overrides": Param("", type="string", description="extra key=value for training.reward_model"),
        "canary_share": Param(0.2, type="number", description="share of users the challenger answers"),
        "eval_overrides": Param("", type="string", description="extra key=value overrides for training.evaluate"),
        "dataset_overrides": Param("", type="string", description="extra key=value for ingest.build_dataset"),
        "window_start": Param("", type="string", description="ISO time; empty = the data interval's start"),
        "window_end": Param("", type="string", description="ISO time; empty = the data interval's end"),
    },
)
def preference_retrain():
    @task.bash
    def build_dataset() -> str:
        return build_dataset_command(get_current_context())

    @task.branch
    def enough_feedback(built: str) -> str:
        return ["lookup_candidate", "train_reward_model"] if answer(built).get("trainable") \
            else "skip_too_little_feedback"

    @task.bash
    def lookup_candidate(built: str) -> str:
        p = get_current_context()["params"]
        return job("training.registry", "--name", MODEL, "find", "--tag", f"dataset_version={answer(built)['version']}",
                   "--tag", "trainer=dpo", "--tag", f"base_model={p['base_model']}")

    @task.branch
    def need_training(found: str) -> str:
        return "reuse_candidate" if answer(found).get("model_version") else "train_dpo"

    @task.bash
    def train_dpo(built: str) -> str:
        p = get_current_context()["params"]
        return job("training.dpo", "--config", p["dpo_config"], f"dataset_version={answer(built)['version']}",
                   f"base_model={p['base_model']}", f"registry_model={MODEL}", *p["dpo_overrides"].split())

    @task(trigger_rule="none_failed_min_one_success")
    def pick_candidate(found: str, trained: str | None) -> str:
        version = answer(trained).get("model_version") if trained else answer(found).get("model_version")
        if not version:
            raise ValueError("no candidate version: training printed none and none was found")
        return str(version)

    @task.bash
    def train_reward_model(built: str) -> str:
        p = get_current_context()["params"]
        return job("training.reward_model", "--config", p["reward_model_config"],
                   f"dataset_version={answer(built)['version']}", *p["reward_model_overrides"].split())

    @task.bash
    def evaluate(version: str, judge: str) -> str:
        p = get_current_context()["params"]
        rm_version = answer(judge).get("model_version")
        if not rm_version:
            raise ValueError(f"the reward model registered no version: {judge[:300]}")
        return job("training.evaluate", "--candidate", f"models:/{MODEL}/{version}",
                   "--baseline", f"models:/{MODEL}@champion", "--judge", f"rm:models:/flywheel-reward/{rm_version}",
                   *p["eval_overrides"].split())

    @task.bash
    def gate(version: str, evaluated: str) -> str:
        return job("training.gate", "--candidate", f"models:/{MODEL}/{version}",
                   "--metrics-run", answer(evaluated)["run_id"])

    @task.branch
    def gate_decision(decided: str) -> str:
        return "start_canary" if answer(decided).get("passed") else "rejected"

    @task.bash
    def start_canary(version: str, decided: str) -> str:
        ctx = get_current_context()
        evidence = answer(decided).get("offline_evidence", "none")
        return job("training.canary", "--version", version, f"share={ctx['params']['canary_share']}", "--reason",
                   f"offline gate passed (judge evidence: {evidence}) in preference_retrain run {ctx['run_id']}")

    @task
    def skip_too_little_feedback(built: str) -> None:
        print(f"not enough feedback to train on in this interval: {answer(built)}")

    @task
    def reuse_candidate(found: str) -> None:
        print(f"dataset already trained, reusing model version {answer(found)['model_version']}")

    @task
    def rejected(decided: str) -> None:
        print("gate rejected the candidate:\n" + "\n".join(answer(decided).get("lines", [])))

    built = build_dataset()
    branch = enough_feedback(built)
    found = lookup_candidate(built)
    branch >> [found, skip_too_little_feedback(built)]
    train_branch = need_training(found)
    trained = train_dpo(built)
    reused = reuse_candidate(found)
    train_branch >> [trained, reused]
    version = pick_candidate(found, trained)
    reused >> version
    judge = train_reward_model(built)
    branch >> judge
    evaluated = evaluate(version, judge)
    decided = gate(version, evaluated)
    decision = gate_decision(decided)
    decision >> [start_canary(version, decided), rejected(decided)]


preference_retrain()
