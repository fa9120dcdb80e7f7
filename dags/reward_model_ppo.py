"""
### reward_model_ppo — weekly: a Bradley-Terry reward model, then PPO against it

`build_dataset` for the week → `enough_feedback` → `train_reward_model` (MiniLM backbone by
default, registered as `flywheel-reward`) → `train_ppo` (LoRA policy, KL-penalised PPO against that
reward model) → `evaluate` vs champion → `gate` → `start_canary` (or `rejected`).

The judge: none. PPO maximised this very reward model's score, so its verdict on the PPO policy is what
PPO optimised, not evidence (`training.evaluate` refuses it). The evaluation therefore runs with
`judge=none`: the gate's win-rate rules report "no offline evidence", and the safety, regression, length,
KL and held-out implicit-reward-accuracy rules decide whether the candidate may be tried. The users then
decide in the live canary, through the `rollout` DAG, exactly as for DPO candidates.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, get_current_context, task

sys.path.insert(0, str(Path(__file__).parent))  # the shared helper next to this file, wherever it is mounted
from _flywheel import DEFAULT_ARGS, TRAINING, answer, build_dataset_command, job  # noqa: E402

MODEL = "flywheel-assistant"
PERIOD = timedelta(days=7)


@dag(
    dag_id="reward_model_ppo",
    schedule=CronDataIntervalTimetable("@weekly", timezone="UTC"),
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["flywheel", "training", "ppo", "reward-model"],
    doc_md=__doc__,
    params={
        "base_model": Param("smollm2", type="string"),
        "reward_config": Param("training/configs/reward_model.yaml", type="string"),
        "ppo_config": Param("training/configs/ppo.yaml", type="string"),
        "window_start": Param("", type="string"),
        "window_end": Param("", type="string"),
        "canary_share": Param(0.2, type="number", description="share of users the challenger answers"),
    },
)
def reward_model_ppo():
    @task.bash
    def build_dataset() -> str:
        return build_dataset_command(get_current_context(), PERIOD)

    @task.branch
    def enough_feedback(built: str) -> str:
        return "train_reward_model" if answer(built).get("trainable") else "skip_too_little_feedback"

    @task.bash(**TRAINING)
    def train_reward_model(built: str) -> str:
        p = get_current_context()["params"]
        return job("training.reward_model", "--config", p["reward_config"],
                   f"dataset_version={answer(built)['version']}")

    @task.bash(**TRAINING)
    def train_ppo(built: str, reward: str) -> str:
        p = get_current_context()["params"]
        return job("training.ppo", "--config", p["ppo_config"], f"dataset_version={answer(built)['version']}",
                   f"base_model={p['base_model']}", f"reward_model={answer(reward)['model_version']}")

    @task.bash(**TRAINING)
    def evaluate(trained: str) -> str:
        return job("training.evaluate", "--candidate", f"models:/{MODEL}/{answer(trained)['model_version']}",
                   "--baseline", f"models:/{MODEL}@champion", "--judge", "none")

    @task.bash
    def gate(trained: str, evaluated: str) -> str:
        return job("training.gate", "--candidate", f"models:/{MODEL}/{answer(trained)['model_version']}",
                   "--metrics-run", answer(evaluated)["run_id"])

    @task.branch
    def gate_decision(decided: str) -> str:
        return "start_canary" if answer(decided).get("passed") else "rejected"

    @task.bash
    def start_canary(trained: str) -> str:
        ctx = get_current_context()
        return job("training.canary", "--version", answer(trained)["model_version"],
                   f"share={ctx['params']['canary_share']}", "--reason",
                   f"offline gate passed (no judge: PPO's reward model may not grade it) in run {ctx['run_id']}")

    @task
    def rejected(decided: str) -> None:
        print("gate rejected the PPO candidate:\n" + "\n".join(answer(decided).get("lines", [])))

    @task
    def skip_too_little_feedback(built: str) -> None:
        print(f"not enough feedback to train on in this interval: {answer(built)}")

    built = build_dataset()
    reward = train_reward_model(built)
    enough_feedback(built) >> [reward, skip_too_little_feedback(built)]
    trained = train_ppo(built, reward)
    decided = gate(trained, evaluate(trained))
    gate_decision(decided) >> [start_canary(trained), rejected(decided)]


reward_model_ppo()
