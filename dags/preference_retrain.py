"""
### preference_retrain — feedback of one data interval in, a better adapter out (or nothing)

`build_dataset` (Spark, content-addressed version of the interval's feedback) →
`plan` (what this version can train, `_flywheel.retrain_plan`: DPO when it has enough pairs, else KTO
on the unpaired rated answers, else skip cleanly) → `lookup_candidate` (a re-run of the same interval
reuses the adapter already trained on this dataset version instead of training again) → `train_sft`
(only with `sft_first`: LoRA SFT on the users' edits and strong positives, which DPO/KTO then continue
from) → `train_dpo` or `train_kto`, and beside DPO `train_reward_model` (a MiniLM reward model on the
same version's *train* split: the judge) → `evaluate` (candidate vs champion, judged by exactly that
reward model, whose held-out accuracy on the *eval* split says whether its verdict counts; a KTO
candidate is judged by none, since a reward model needs the pairs this version lacks) → `gate` (the
offline policy: safe and not worse) → `gate_decision` → `start_canary` (the `challenger` alias with
`canary_share` of the users) or `rejected`. Nothing here promotes: the `rollout` DAG promotes or rolls
back on the users' own feedback.

On a fresh deployment (no champion, no reward model) the same path runs: the baseline is the base
model and the judge is trained here.

Every task runs a project job as a process of `.venv` and is idempotent for its interval: the
dataset version derives from content, training is skipped when that version was trained already,
and a canary already running for the version is left alone. Params override the window
(`window_start`, `window_end`), the base model and the config files, e.g.
`airflow dags test preference_retrain -c '{"base_model": "tiny", "dpo_config": "training/configs/dpo.yaml"}'`.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, get_current_context, task

sys.path.insert(0, str(Path(__file__).parent))  # the shared helper next to this file, wherever it is mounted
from _flywheel import DEFAULT_ARGS, TRAINING, answer, build_dataset_command, job, retrain_plan  # noqa: E402

MODEL = "flywheel-assistant"
PERIOD = timedelta(days=1)


# --- the tasks (each runs one job; wired together in the DAG below) ---------------------------------

@task.bash
def build_dataset() -> str:
    return build_dataset_command(get_current_context(), PERIOD)

@task
def plan(built: str) -> dict:
    p = get_current_context()["params"]
    decided = retrain_plan(answer(built), sft_first=bool(p["sft_first"]))
    print(f"plan: {decided}")
    return decided

@task.branch
def enough_feedback(planned: dict) -> list[str] | str:
    if planned["trainer"] is None:
        return "skip_too_little_feedback"
    return ["lookup_candidate", "train_reward_model"] if planned["judge"] == "reward_model" else "lookup_candidate"

@task.bash
def lookup_candidate(built: str, planned: dict) -> str:
    p = get_current_context()["params"]
    return job("training.registry", "--name", MODEL, "find", "--tag", f"dataset_version={answer(built)['version']}",
               "--tag", f"trainer={planned['trainer']}", "--tag", f"base_model={p['base_model']}")

@task.branch
def need_training(found: str) -> str:
    return "reuse_candidate" if answer(found).get("model_version") else "train_sft"

@task.bash(**TRAINING)
def train_sft(built: str, planned: dict) -> str:
    p = get_current_context()["params"]
    if not planned["sft"]:
        return "echo '{\"skipped\": true}'"
    # Registered without an alias: an intermediate, never served; DPO/KTO continue from it.
    return job("training.sft", "--config", p["sft_config"], f"dataset_version={answer(built)['version']}",
               f"base_model={p['base_model']}", f"registry_model={MODEL}", "registry_alias=",
               *p["sft_overrides"].split())

@task.branch
def which_trainer(planned: dict) -> str:
    return f"train_{planned['trainer']}"

def _start_from(sft: str) -> list[str]:
    version = answer(sft).get("model_version")
    return [f"init_from=models:/{MODEL}/{version}"] if version else []

@task.bash(**TRAINING)
def train_dpo(built: str, sft: str) -> str:
    p = get_current_context()["params"]
    return job("training.dpo", "--config", p["dpo_config"], f"dataset_version={answer(built)['version']}",
               f"base_model={p['base_model']}", f"registry_model={MODEL}", *_start_from(sft),
               *p["dpo_overrides"].split())

@task.bash(**TRAINING)
def train_kto(built: str, sft: str) -> str:
    p = get_current_context()["params"]
    return job("training.kto", "--config", p["kto_config"], f"dataset_version={answer(built)['version']}",
               f"base_model={p['base_model']}", f"registry_model={MODEL}", *_start_from(sft),
               *p["kto_overrides"].split())

@task(trigger_rule="none_failed_min_one_success")
def pick_candidate(found: str, dpo: str | None, kto: str | None) -> str:
    trained = dpo or kto
    version = answer(trained).get("model_version") if trained else answer(found).get("model_version")
    if not version:
        raise ValueError("no candidate version: training printed none and none was found")
    return str(version)

@task.bash(**TRAINING)
def train_reward_model(built: str) -> str:
    p = get_current_context()["params"]
    return job("training.reward_model", "--config", p["reward_model_config"],
               f"dataset_version={answer(built)['version']}", *p["reward_model_overrides"].split())

@task.bash(trigger_rule="none_failed_min_one_success", **TRAINING)  # runs without train_reward_model on the KTO path
def evaluate(version: str, judge: str | None) -> str:
    ctx = get_current_context()
    p = ctx["params"]
    # Read, not passed: as an argument `plan` would be an upstream that always succeeds, and this
    # task would then run on the skip path too.
    planned = ctx["ti"].xcom_pull(task_ids="plan")
    if planned["judge"] == "none":
        spec = "none"
    else:
        rm_version = answer(judge).get("model_version")
        if not rm_version:
            raise ValueError(f"the reward model registered no version: {str(judge)[:300]}")
        spec = f"rm:models:/flywheel-reward/{rm_version}"
    return job("training.evaluate", "--candidate", f"models:/{MODEL}/{version}",
               "--baseline", f"models:/{MODEL}@champion", "--judge", spec, *p["eval_overrides"].split())

@task.bash
def gate(version: str, evaluated: str) -> str:
    p = get_current_context()["params"]
    return job("training.gate", "--candidate", f"models:/{MODEL}/{version}",
               "--metrics-run", answer(evaluated)["run_id"], *p["gate_overrides"].split())

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
def skip_too_little_feedback(planned: dict) -> None:
    print(f"not enough feedback to train on in this interval: {planned['reason']}")

@task
def reuse_candidate(found: str) -> None:
    print(f"dataset already trained, reusing model version {answer(found)['model_version']}")

@task
def rejected(decided: str) -> None:
    print("gate rejected the candidate:\n" + "\n".join(answer(decided).get("lines", [])))


# --- the DAG ------------------------------------------------------------------------------------------

@dag(
    dag_id="preference_retrain",
    # Data intervals (not trigger times): a run, manual ones included, trains on the day before it.
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
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
        "kto_config": Param("training/configs/kto.yaml", type="string",
                            description="KTO, trained instead of DPO when the version has too few pairs"),
        "kto_overrides": Param("", type="string", description="extra key=value overrides for training.kto"),
        "sft_first": Param(False, type="boolean", description="LoRA SFT on edits and strong positives before DPO/KTO"),
        "sft_config": Param("training/configs/sft.yaml", type="string"),
        "sft_overrides": Param("", type="string", description="extra key=value overrides for training.sft"),
        "reward_model_config": Param("training/configs/reward_model.yaml", type="string"),
        "reward_model_overrides": Param("", type="string", description="extra key=value for training.reward_model"),
        "canary_share": Param(0.2, type="number", description="share of users the challenger answers"),
        "eval_overrides": Param("", type="string", description="extra key=value overrides for training.evaluate"),
        "dataset_overrides": Param("", type="string", description="extra key=value for ingest.build_dataset"),
        "gate_overrides": Param("", type="string", description="extra key=value for training.gate (policy.*)"),
        "window_start": Param("", type="string", description="ISO time; empty = the data interval's start"),
        "window_end": Param("", type="string", description="ISO time; empty = the data interval's end"),
    },
)
def preference_retrain():
    built = build_dataset()
    planned = plan(built)
    branch = enough_feedback(planned)
    found = lookup_candidate(built, planned)
    branch >> [found, skip_too_little_feedback(planned)]
    train_branch = need_training(found)
    sft = train_sft(built, planned)
    reused = reuse_candidate(found)
    train_branch >> [sft, reused]
    trainer_branch = which_trainer(planned)
    sft >> trainer_branch
    dpo, kto = train_dpo(built, sft), train_kto(built, sft)
    trainer_branch >> [dpo, kto]
    version = pick_candidate(found, dpo, kto)
    reused >> version
    judge = train_reward_model(built)
    branch >> judge
    evaluated = evaluate(version, judge)
    decided = gate(version, evaluated)
    decision = gate_decision(decided)
    decision >> [start_canary(version, decided), rejected(decided)]


preference_retrain()
