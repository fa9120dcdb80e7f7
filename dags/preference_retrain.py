"""
### preference_retrain — feedback of one data interval in, a better adapter out (or nothing)

`build_dataset` (Spark, content-addressed version of the interval's feedback) →
`enough_feedback` (skip cleanly when too little to train on) →
`lookup_candidate` (a re-run of the same interval reuses the adapter already trained on this
dataset version instead of training again) → `train_dpo` (LoRA DPO from the champion) →
`evaluate` (candidate vs champion, MLflow eval run) → `gate` (policy file) →
`gate_decision` → `promote` (champion alias) or `rejected`.

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
        return "lookup_candidate" if answer(built).get("trainable") else "skip_too_little_feedback"

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
    def evaluate(version: str) -> str:
        p = get_current_context()["params"]
        return job("training.evaluate", "--candidate", f"models:/{MODEL}/{version}",
                   "--baseline", f"models:/{MODEL}@champion", *p["eval_overrides"].split())

    @task.bash
    def gate(version: str, evaluated: str) -> str:
        return job("training.gate", "--candidate", f"models:/{MODEL}/{version}",
                   "--metrics-run", answer(evaluated)["run_id"])

    @task.branch
    def gate_decision(decided: str) -> str:
        return "promote" if answer(decided).get("passed") else "rejected"

    @task.bash
    def promote(version: str) -> str:
        ctx = get_current_context()
        return job("training.promote", "--version", version, "--reason",
                   f"gate passed in preference_retrain run {ctx['run_id']}")

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
    evaluated = evaluate(version)
    decided = gate(version, evaluated)
    decision = gate_decision(decided)
    decision >> [promote(version), rejected(decided)]


preference_retrain()
